"""Security-scan benchmark: Kubernetes posture of many tenants from rendered manifests.

    .venv/bin/python bench/security.py [--tenants 500]

Starts a local Prefect test server (prefect-kubernetes resolves block references through
its client), then for each tenant renders what the platform would deploy — its namespace
kit, the ClusterRoles it binds and one Job per job type and pool kind through
prefect-kubernetes — and runs every posture check on it. Each tenant must come out clean.
The baseline is the checks alone on the already-rendered objects (check_s), so scan_s -
check_s is the rendering. The last line is one JSON object: tenants, scan_s,
per_tenant_ms, check_s, check_ratio, objects, findings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


async def run(tenants: int) -> dict:
    from prefect.client.orchestration import get_client

    from blocks.tenant import TenantProfile
    from setlist.core.tenancy import tenant_namespace
    from setlist.security.posture import posture_findings
    from setlist.security.sources import rendered_objects

    profiles = [TenantProfile(tenant_id=f"bench-{i:04d}") for i in range(tenants)]
    rendered = []
    findings = 0
    async with get_client() as client:
        start = time.perf_counter()
        for profile in profiles:
            objects = await rendered_objects(client, profile, {})
            ns = tenant_namespace(profile.tenant_id)
            findings += len(posture_findings(profile.tenant_id, ns, objects)[0])
            rendered.append((profile.tenant_id, ns, objects))
        scan_s = time.perf_counter() - start
    start = time.perf_counter()
    for tenant_id, ns, objects in rendered:
        posture_findings(tenant_id, ns, objects)
    check_s = time.perf_counter() - start
    return {
        "tenants": tenants,
        "scan_s": round(scan_s, 3),
        "per_tenant_ms": round(1000 * scan_s / tenants, 2),
        "check_s": round(check_s, 3),
        "check_ratio": round(check_s / scan_s, 4),
        "objects": sum(len(o) for _, _, o in rendered),
        "findings": findings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=500)
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        result = asyncio.run(run(args.tenants))
    if result["findings"]:
        print(f"platform-rendered tenants have {result['findings']} finding(s)", file=sys.stderr)
    print(json.dumps(result))
    sys.exit(1 if result["findings"] else 0)


if __name__ == "__main__":
    main()
