"""Metrics exporter benchmark: one scrape with many tenants and runs in the server.

    .venv/bin/python bench/metrics.py [--tenants 1000] [--runs 10000]

Starts a local Prefect test server, creates ``--tenants`` tenant profiles and ``--runs``
flow runs spread over them (finished in the last day, running, and due), then scrapes
``setlist.observability.metrics.Exporter`` over HTTP:
  - cold: the exporter's first scrape, which reads the whole 24 h window once;
  - warm: the next scrape, which reads only what changed (what every scrape costs after
    the first).
Prints one JSON object as its last line: tenants, runs, scrape_ms (warm), api_calls
(warm), cold_scrape_ms, cold_api_calls, series (samples in the scrape).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOB_TYPES = ["data-etl", "ml-training", "billing-report", "canary"]
BANDS = ["critical", "high", "normal", "low", "batch"]
# share of runs in each final or current state
MIX = [("COMPLETED", 0.80), ("FAILED", 0.06), ("CRASHED", 0.01), ("CANCELLED", 0.03),
       ("RUNNING", 0.05), ("SCHEDULED", 0.05)]  # fmt: skip


async def populate(api_url: str, tenants: int, runs: int) -> None:
    """Tenant profiles through the API; runs inserted straight into the server's
    database in one transaction (the API would take minutes for 10,000 on SQLite; the
    scrape reads them through the API like any others)."""
    import uuid
    from datetime import UTC, datetime, timedelta

    import httpx
    import sqlalchemy as sa
    from prefect.server.database import provide_database_interface

    from blocks.tenant import TenantProfile
    from setlist.core.tenancy import TenantQuota

    rng = random.Random(3)
    names = [f"tenant-{i:04d}" for i in range(tenants)]
    limit = asyncio.Semaphore(2)  # SQLite takes one writer at a time

    async def profile(name: str) -> None:
        async with limit:
            quota = TenantQuota(concurrent_jobs=rng.randint(2, 8))
            await TenantProfile(tenant_id=name, quota=quota).asave(f"tenant-{name}", overwrite=True)

    await asyncio.gather(*(profile(n) for n in names))
    async with httpx.AsyncClient(base_url=api_url.rstrip("/") + "/", timeout=60) as http:
        flow_id = uuid.UUID((await http.post("flows/", json={"name": "bench-job"})).json()["id"])
    states = [s for s, share in MIX for _ in range(round(share * 1000))]
    now = datetime.now(UTC)
    rows = []
    for i in range(runs):
        tenant, band, state = names[i % tenants], rng.choice(BANDS), rng.choice(states)
        expected = now - timedelta(seconds=rng.uniform(60, 23 * 3600))
        seconds = rng.uniform(1, 3600)
        start = expected + timedelta(seconds=rng.uniform(0, 30)) if state != "SCHEDULED" else None
        end = start + timedelta(seconds=seconds) if start and state != "RUNNING" else None
        if end and end > now:
            end = now
        rows.append(
            {
                "id": uuid.uuid4(),
                "flow_id": flow_id,
                "name": f"bench-{i}",
                "tags": ["setlist", f"tenant:{tenant}", f"job:{rng.choice(JOB_TYPES)}"],
                "work_queue_name": f"{tenant}.{band}",
                "state_type": state,
                "state_name": state.title(),
                "state_timestamp": end or start or expected,
                "expected_start_time": expected,
                "start_time": start,
                "end_time": end,
                "total_run_time": timedelta(seconds=seconds if end else 0),
            }
        )
    db = provide_database_interface()
    async with db.session_context(begin_transaction=True) as session:
        await session.execute(sa.insert(db.FlowRun), rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> tuple[float, int, int]:
    """(milliseconds, API calls the scrape made, samples served)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    t0 = time.perf_counter()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=120).text
    ms = (time.perf_counter() - t0) * 1000
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    calls = next(s.value for s in samples if s.name == "setlist_exporter_api_calls")
    return ms, int(calls), len(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=10_000)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="setlist-bench-metrics-"))
    os.environ["SETLIST_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from blocks import register_all
    from setlist.observability.metrics import Exporter, serve

    with prefect_test_harness(server_startup_timeout=120):
        api_url = PREFECT_API_URL.value()
        asyncio.run(register_all())
        t0 = time.perf_counter()
        asyncio.run(populate(api_url, args.tenants, args.runs))
        print(
            f"created {args.tenants} tenants, {args.runs} runs in {time.perf_counter() - t0:.1f}s"
        )
        exporter = Exporter(api_url, ["setlist-local"])
        port = free_port()
        server, _ = serve(exporter, port, addr="127.0.0.1")
        cold_ms, cold_calls, _ = scrape(port)
        warm_ms, warm_calls, series = scrape(port)
        server.shutdown()
    print(
        json.dumps(
            {
                "tenants": args.tenants,
                "runs": args.runs,
                "scrape_ms": round(warm_ms, 1),
                "api_calls": warm_calls,
                "cold_scrape_ms": round(cold_ms, 1),
                "cold_api_calls": cold_calls,
                "series": series,
            }
        )
    )


if __name__ == "__main__":
    main()
