"""Security-scan benchmark: Kubernetes posture of many tenants from rendered manifests.

    .venv/bin/python bench/security.py [--tenants 500] [--baseline-tenants 25]

Starts a local Prefect test server (prefect-kubernetes resolves block references through
its client), then for each tenant builds what the platform would deploy — its namespace
kit, the ClusterRoles it binds and one Job per job type and pool kind — and runs every
posture check on it. Each tenant must come out clean. The tenants' priority bands and
data-etl tiers vary (5 bands × 6 tiers), so their Jobs differ as on a real platform.

The scan derives each tenant's Jobs from one prefect-kubernetes render per job variables
and template revision (``setlist.security.render_cache``), starting from an empty cache.
Two baselines are measured in the same run: the old path, every Job rendered in full
through prefect-kubernetes, on the first ``--baseline-tenants`` tenants (whose objects must
equal the derived ones, or the run fails); and the checks alone on the scanned objects
(check_s). The last line is one JSON object: tenants, scan_s, per_tenant_ms, check_s,
check_ratio, objects, findings, full_renders (prefect-kubernetes renders the scan did,
probes included), cache_entries, baseline_tenants, full_per_tenant_ms, speedup,
derived_equal.
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


def bench_profiles(tenants: int) -> list:
    from blocks.tenant import TenantProfile
    from setlist.core.tenancy import JobType, Priority, ResourceTier

    bands, tiers = list(Priority), list(ResourceTier)
    return [
        TenantProfile(
            tenant_id=f"bench-{i:04d}",
            default_priority=bands[i % len(bands)],
            tier_overrides={JobType.data_etl: tiers[(i // len(bands)) % len(tiers)]},
        )
        for i in range(tenants)
    ]


async def run(tenants: int, baseline_tenants: int) -> dict:
    from prefect.client.orchestration import get_client

    from setlist.core.tenancy import tenant_namespace
    from setlist.security.posture import posture_findings
    from setlist.security.render_cache import JobRenderCache
    from setlist.security.sources import rendered_objects

    profiles = bench_profiles(tenants)
    renders = JobRenderCache()
    rendered = []
    findings = 0
    async with get_client() as client:
        start = time.perf_counter()
        for profile in profiles:
            objects = await rendered_objects(client, profile, {}, renders=renders)
            ns = tenant_namespace(profile.tenant_id)
            findings += len(posture_findings(profile.tenant_id, ns, objects)[0])
            rendered.append((profile.tenant_id, ns, objects))
        scan_s = time.perf_counter() - start

        baseline = profiles[: max(1, min(baseline_tenants, tenants))]
        full = []
        start = time.perf_counter()
        for profile in baseline:
            objects = await rendered_objects(client, profile, {}, derive=False)
            ns = tenant_namespace(profile.tenant_id)
            findings += len(posture_findings(profile.tenant_id, ns, objects)[0])
            full.append(objects)
        full_s = time.perf_counter() - start
    start = time.perf_counter()
    for tenant_id, ns, objects in rendered:
        posture_findings(tenant_id, ns, objects)
    check_s = time.perf_counter() - start
    per_tenant_ms = 1000 * scan_s / tenants
    full_per_tenant_ms = 1000 * full_s / len(baseline)
    return {
        "tenants": tenants,
        "scan_s": round(scan_s, 3),
        "per_tenant_ms": round(per_tenant_ms, 2),
        "check_s": round(check_s, 3),
        "check_ratio": round(check_s / scan_s, 4),
        "objects": sum(len(o) for _, _, o in rendered),
        "findings": findings,
        "full_renders": renders.renders,
        "cache_entries": len(renders),
        "baseline_tenants": len(baseline),
        "full_per_tenant_ms": round(full_per_tenant_ms, 2),
        "speedup": round(full_per_tenant_ms / per_tenant_ms, 1),
        "derived_equal": full == [o for _, _, o in rendered[: len(baseline)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument(
        "--baseline-tenants",
        type=int,
        default=25,
        help="tenants also scanned the old way, every Job rendered in full (the baseline)",
    )
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        result = asyncio.run(run(args.tenants, args.baseline_tenants))
    if result["findings"]:
        print(f"platform-rendered tenants have {result['findings']} finding(s)", file=sys.stderr)
    if not result["derived_equal"]:
        print("derived Jobs differ from the fully rendered ones", file=sys.stderr)
    print(json.dumps(result))
    sys.exit(1 if result["findings"] or not result["derived_equal"] else 0)


if __name__ == "__main__":
    main()
