"""Fault injection: each scenario injects one fault at a random point inside real work,
lets the platform recover as it would in production, then checks what must hold.

    .venv/bin/python bench/chaos.py [--only NAME ...] [--seed N] [--events N]

Everything runs on loopback: a Prefect server on a fresh embedded PostgreSQL (the
stack's default), moto's S3 and IAM, tenants onboarded on that store with their own IAM
keys, and the real flows. The scenarios live in ``bench/faults/``, one module per kind
of fault; each module's docstring says what it injects and what must hold after.

Prints one JSON object as its last line: ``scenarios``, ``survived``, ``lost_runs``,
``duplicate_runs``, ``lost_events``, ``lost_or_duplicate_rows`` and ``results``, one entry per
scenario with what it injected and found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.faults import Context  # noqa: E402
from bench.faults.controlplane import (  # noqa: E402
    gateway_spool,
    postgres_restart,
    server_restart_postgres,
    server_restart_sqlite,
)
from bench.faults.dispatcher import dispatcher_kill  # noqa: E402
from bench.faults.store import scratch_full, store_faults  # noqa: E402
from bench.faults.worker_kill import (  # noqa: E402
    worker_kill_backup,
    worker_kill_etl,
    worker_kill_restore,
)
from bench.servers import prefect_server  # noqa: E402

SCENARIOS = {
    "store-faults": store_faults,
    "scratch-full": scratch_full,
    "worker-kill-etl": worker_kill_etl,
    "worker-kill-backup": worker_kill_backup,
    "worker-kill-restore": worker_kill_restore,
    "dispatcher-kill": dispatcher_kill,
    "server-restart-sqlite": server_restart_sqlite,
    "server-restart-postgres": server_restart_postgres,
    "postgres-restart": postgres_restart,
    "gateway-spool": gateway_spool,
}
TOTALS = ("lost_runs", "duplicate_runs", "lost_events", "lost_or_duplicate_rows")


async def run_all(names: list[str], args, api_url: str) -> list[dict]:
    from moto.server import ThreadedMotoServer
    from prefect.client.orchestration import get_client

    from setlist.stack import bootstrap_platform

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="setlist-chaos-") as home:
            await bootstrap_platform(Path(home) / "storage")
            async with get_client() as client:
                ctx = Context(client=client, s3=f"http://{host}:{port}", api_url=api_url)
                for name in names:
                    rng = random.Random(f"{args.seed}-{name}")
                    t0 = time.perf_counter()
                    result = await SCENARIOS[name](ctx, args, rng)
                    result["seconds"] = round(time.perf_counter() - t0, 1)
                    results.append(result)
                    print(json.dumps(result), file=sys.stderr)
    finally:
        moto.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS))
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--fault-rate", type=float, default=0.15)
    args = parser.parse_args()
    names = args.only or list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="setlist-chaos-home-") as home:
        os.environ["SETLIST_HOME"] = home
        with prefect_server("embedded") as api_url:
            results = asyncio.run(run_all(names, args, api_url))
    totals = {k: sum(r.get(k, 0) for r in results) for k in TOTALS}
    print(
        json.dumps(
            {
                "scenarios": len(results),
                "survived": sum(r["survived"] for r in results),
                **totals,
                "seed": args.seed,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
