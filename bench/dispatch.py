"""Dispatcher benchmark: one control cycle and the worker's poll with 1,000 tenants.

    .venv/bin/python bench/dispatch.py [--tenants 1000] [--waiting 2] [--limit 100] [--rounds 20]

Starts a local Prefect test server and builds, in one pool, what 1,000 onboarded tenants
look like to the dispatcher: a profile block each (through the API), five band queues
each in band order (5,000 queues, held as the dispatcher holds them), ``--waiting`` due
runs per tenant in mixed bands, ``--limit`` - 10 runs under way (the pool's limit is
``--limit``), and a day of finished runs for the fair-share history. Queues and runs are
inserted straight into the server's database (creating 5,000 queues through the API
re-sequences priorities on every create: minutes); the dispatcher and the poll read
them through the API like any others.

Each round: one dispatcher cycle (timed: ``cycle_ms``), then Setlist's worker's poll of
the pool (``SetlistProcessWorker._get_scheduled_flow_runs``: the granted runs, and
Prefect's poll of the queues besides the tenant queues; timed: ``poll_ms``). Every 30 s
that worker makes Prefect's full poll of every queue instead, which keeps them marked
ready; every 5th round forces one (``poll_full_ms``), and ``poll_ms_amortized`` is the
mean cost per poll at Prefect's default interval of 10 s. The runs it returns start, as
many older runs finish, and a few new runs arrive. The baseline poll runs in the same
rounds: Prefect's poll of a pool of five queues holding the same runs, open (Prefect's
plain layout at that size): ``poll_ms_baseline``.
Prints one JSON object as its last line: tenants, queues, cycle_ms (median), poll_ms,
poll_ms_baseline, ratio = poll_ms / poll_ms_baseline, and the spread, the full poll and
the first (takeover) cycle for context.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BANDS = ["critical", "high", "normal", "low", "batch"]
BIG, SMALL = "bench-dispatch", "bench-baseline"


async def profiles(names: list[str], rng: random.Random) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    from blocks.tenant import TenantProfile
    from setlist.core.tenancy import TenantQuota, profile_block_name

    limit = asyncio.Semaphore(2)  # SQLite takes one writer at a time

    async def one(name: str) -> None:
        quota = TenantQuota(concurrent_jobs=rng.randint(1, 6), weight=rng.choice([1, 1, 2, 4]))
        async with limit:
            for attempt in range(5):
                try:
                    await TenantProfile(tenant_id=name, quota=quota).asave(
                        profile_block_name(name), overwrite=True
                    )
                    return
                except PrefectHTTPStatusError:  # a busy server answers 503: try again
                    await asyncio.sleep(1 + attempt)
            raise RuntimeError(f"could not save the profile of {name}")

    await asyncio.gather(*(one(n) for n in names))


def run_row(flow_id, name, queue_id, queue_name, tenant, state, now, rng, **times):
    due = times.pop("due", now - timedelta(seconds=rng.uniform(1, 600)))
    return {
        "id": uuid.uuid4(),
        "flow_id": flow_id,
        "name": name,
        "tags": ["setlist", f"tenant:{tenant}", f"band:{queue_name.rsplit('.', 1)[1]}"],
        "work_queue_name": queue_name,
        "work_queue_id": queue_id,
        "state_type": state,
        "state_name": state.title(),
        "state_timestamp": now,
        "expected_start_time": due,
        "next_scheduled_start_time": due,
        **times,
    }


async def populate(tenants: int, waiting: int, limit: int, rng: random.Random):
    """Both pools with their queues and runs; returns what the rounds need."""
    import sqlalchemy as sa
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.server.database import provide_database_interface

    names = [f"tenant-{i:04d}" for i in range(tenants)]
    async with get_client() as client:
        pools = {}
        for pool, kind in ((BIG, "setlist-process"), (SMALL, "process")):
            await client.create_work_pool(
                WorkPoolCreate(name=pool, type=kind, concurrency_limit=limit)
            )
            pools[pool] = (await client.read_work_pool(pool)).id
        flow_id = await client.create_flow_from_name("bench-job")
    now = datetime.now(UTC)
    queues, big_queues, small_queues = [], [], []
    priority = 2  # 1 is the pool's default queue
    for band in BANDS:
        for tenant in names:
            q = {"id": uuid.uuid4(), "name": f"{tenant}.{band}", "priority": priority}
            q.update(work_pool_id=pools[BIG], is_paused=True, concurrency_limit=None)
            queues.append(q)
            big_queues.append((q["id"], q["name"], tenant))
            priority += 1
    for i, band in enumerate(BANDS):
        q = {"id": uuid.uuid4(), "name": f"solo.{band}", "priority": i + 2}
        q.update(work_pool_id=pools[SMALL], is_paused=False, concurrency_limit=None)
        queues.append(q)
        small_queues.append((q["id"], q["name"], "solo"))
    rows = []
    by_tenant = {}
    for qid, qname, tenant in big_queues:
        by_tenant.setdefault(tenant, []).append((qid, qname))
    for tenant in names:
        for _ in range(waiting):
            qid, qname = rng.choice(by_tenant[tenant])
            rows.append(run_row(flow_id, "w", qid, qname, tenant, "SCHEDULED", now, rng))
    for i in range(limit - 10):
        tenant = names[i * 7 % tenants]
        qid, qname = rng.choice(by_tenant[tenant])
        start = now - timedelta(seconds=rng.uniform(10, 3000))
        rows.append(
            run_row(flow_id, "b", qid, qname, tenant, "RUNNING", now, rng, start_time=start)
        )
    for i in range(10_000):  # a day of history
        tenant = names[i % tenants]
        qid, qname = rng.choice(by_tenant[tenant])
        end = now - timedelta(seconds=rng.uniform(60, 23 * 3600))
        start = end - timedelta(seconds=rng.uniform(30, 7200))
        rows.append(
            run_row(
                flow_id, "f", qid, qname, tenant, "COMPLETED", now, rng, start_time=start,
                end_time=end,
            )
        )  # fmt: skip
    # the baseline pool: the same waiting and running runs, in five queues
    for row in [r for r in rows if r["state_type"] in ("SCHEDULED", "RUNNING")]:
        qid, qname, _ = rng.choice(small_queues)
        rows.append({**row, "id": uuid.uuid4(), "work_queue_id": qid, "work_queue_name": qname})
    db = provide_database_interface()
    async with db.session_context(begin_transaction=True) as session:
        await session.execute(sa.insert(db.WorkQueue), queues)
        await insert_runs(session, db, rows)
    return flow_id, names, by_tenant, len(big_queues)


async def insert_runs(session, db, rows: list[dict]) -> None:
    """The runs, each with its current state row (a grant names the state it is for)."""
    import sqlalchemy as sa

    states = []
    for row in rows:
        states.append(
            {
                "id": uuid.uuid4(),
                "flow_run_id": row["id"],
                "type": row["state_type"],
                "name": row["state_name"],
                "timestamp": row["state_timestamp"],
            }
        )
    await session.execute(sa.insert(db.FlowRun), rows)
    await session.execute(sa.insert(db.FlowRunState), states)
    await session.execute(  # plain SQL: the ORM's bulk update would stamp `updated`
        sa.text("UPDATE flow_run SET state_id = :state WHERE id = :run"),
        [{"state": str(st["id"]), "run": str(st["flow_run_id"])} for st in states],
    )


async def churn(flow_id, picked, names, by_tenant, rng, arrivals: int) -> None:
    """What the worker and the users do between two cycles: the runs the poll returned
    start, as many older runs finish, a few new ones arrive."""
    import sqlalchemy as sa
    from prefect.server.database import provide_database_interface

    db = provide_database_interface()
    now = datetime.now(UTC)
    async with db.session_context(begin_transaction=True) as session:
        if picked:
            await session.execute(
                sa.update(db.FlowRun)
                .where(db.FlowRun.id.in_(picked))
                .values(state_type="RUNNING", state_name="Running", start_time=now)
            )
            oldest = (
                (
                    await session.execute(
                        sa.select(db.FlowRun.id)
                        .where(
                            db.FlowRun.state_type == "RUNNING",
                            db.FlowRun.id.not_in(picked),
                            db.FlowRun.work_queue_name.like("tenant-%"),
                        )
                        .order_by(db.FlowRun.start_time)
                        .limit(len(picked))
                    )
                )
                .scalars()
                .all()
            )
            await session.execute(
                sa.update(db.FlowRun)
                .where(db.FlowRun.id.in_(oldest))
                .values(state_type="COMPLETED", state_name="Completed", end_time=now)
            )
        rows = []
        for _ in range(arrivals):
            tenant = rng.choice(names)
            qid, qname = rng.choice(by_tenant[tenant])
            rows.append(run_row(flow_id, "a", qid, qname, tenant, "SCHEDULED", now, rng, due=now))
        if rows:
            await insert_runs(session, db, rows)


async def poll(client, pool: str) -> tuple[float, list]:
    """Prefect's worker poll of ``pool`` (every queue)."""
    t0 = time.perf_counter()
    got = await client.get_scheduled_flow_runs_for_work_pool(
        pool, scheduled_before=datetime.now(UTC) + timedelta(seconds=10)
    )
    return (time.perf_counter() - t0) * 1000, got


async def setlist_poll(worker) -> tuple[float, bool, list]:
    """Setlist's worker poll: (ms, whether it was the periodic full poll, runs)."""
    full_before = worker._full_polled
    t0 = time.perf_counter()
    got = await worker._get_scheduled_flow_runs()
    return (time.perf_counter() - t0) * 1000, worker._full_polled != full_before, got


async def bench(args) -> dict:
    from prefect.client.orchestration import get_client

    from blocks import register_all
    from setlist.dispatch.dispatcher import Dispatcher
    from setlist.dispatch.grants import is_granted
    from setlist.workers.process import SetlistProcessWorker

    rng = random.Random(7)
    await register_all()
    t0 = time.perf_counter()
    names = [f"tenant-{i:04d}" for i in range(args.tenants)]
    await profiles(names, rng)
    flow_id, names, by_tenant, queues = await populate(args.tenants, args.waiting, args.limit, rng)
    print(f"built {args.tenants} tenants, {queues} queues in {time.perf_counter() - t0:.1f}s")

    dispatcher = Dispatcher([BIG], interval=1.0, prefetch_s=10.0)
    cycles, polls, full_polls, baseline, granted = [], [], [], [], []
    worker = SetlistProcessWorker(work_pool_name=BIG, prefetch_seconds=10)
    async with get_client() as client, worker:
        t0 = time.perf_counter()
        await dispatcher.cycle(client)  # taking over: reads the pool, profiles, history
        takeover_ms = (time.perf_counter() - t0) * 1000
        await churn(flow_id, [], names, by_tenant, rng, 0)
        for _ in range(args.rounds):
            report = await dispatcher.cycle(client)
            cycles.append(report.ms)
            granted.append(sum(report.grants.values()))
            # the two polls in alternating order, so neither always runs second
            order = [(BIG, polls), (SMALL, baseline)]
            if len(cycles) % 2:
                order.reverse()
            picked = []
            for pool, into in order:
                if pool == SMALL:
                    ms, _ = await poll(client, pool)
                    into.append(ms)
                    continue
                if len(cycles) % 5 == 1:  # measure the periodic full poll every 5th round
                    worker._full_polled = float("-inf")
                ms, full, got = await setlist_poll(worker)
                (full_polls if full else polls).append(ms)
                picked = [g.flow_run.id for g in got]
                # it takes only runs granted for their current state
                assert all(
                    is_granted(g.flow_run.tags, g.flow_run.id, g.flow_run.state_id) for g in got
                )
            await churn(flow_id, picked, names, by_tenant, rng, args.arrivals)
            await asyncio.sleep(0.2)
        await dispatcher.leadership.release(client)
    med = statistics.median
    return {
        "tenants": args.tenants,
        "queues": queues,
        "waiting_runs": args.tenants * args.waiting,
        "cycle_ms": round(med(cycles), 1),
        "cycle_ms_p90": round(sorted(cycles)[int(len(cycles) * 0.9)], 1),
        "takeover_ms": round(takeover_ms, 1),
        "granted_per_cycle": round(statistics.mean(granted), 1),
        "poll_full_ms": round(med(full_polls), 1),
        "full_polls": len(full_polls),
        # at Prefect's default poll interval (10 s), one poll in three is the full one
        "poll_ms_amortized": round((med(full_polls) + 2 * med(polls)) / 3, 1),
        "poll_ms": round(med(polls), 1),
        "poll_ms_baseline": round(med(baseline), 1),
        "ratio": round(med(polls) / med(baseline), 2),
        "ratio_amortized": round((med(full_polls) + 2 * med(polls)) / 3 / med(baseline), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--waiting", type=int, default=2, help="due runs per tenant")
    ap.add_argument("--limit", type=int, default=100, help="the pool's concurrency limit")
    ap.add_argument("--arrivals", type=int, default=20, help="new runs between two cycles")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    os.environ["SETLIST_HOME"] = tempfile.mkdtemp(prefix="setlist-bench-dispatch-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        result = asyncio.run(bench(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
