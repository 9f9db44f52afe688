"""Dispatcher benchmark: control cycles and the worker's poll with 1,000 tenants (or
10,000), and a deep queue beside them.

    .venv/bin/python bench/dispatch.py [--tenants 1000] [--waiting 2] [--limit 100]
        [--rounds 20] [--database sqlite|postgresql|embedded] [--deep 1000]
        [--deep-slots 200] [--deep-shallow 100]

Starts a Prefect server (``--database``: Prefect's test SQLite by default, a fresh
database on the local PostgreSQL server with ``postgresql``, see ``bench/servers.py``)
and builds, in one pool, what ``--tenants`` onboarded tenants look like to the
dispatcher: a profile block each, five band queues each in band order (5,000 queues,
held as the dispatcher holds them), ``--waiting`` due runs per tenant in mixed bands,
``--limit`` - 10 runs under way (the pool's limit is ``--limit``), and a day of finished
runs for the fair-share history. Profiles, queues and runs are inserted straight into
the server's database (profiles encrypted as the API stores them; creating 5,000
queues through the API re-sequences priorities on every create: minutes); the
dispatcher and the poll read them through the API like any others.

Each round: one dispatcher cycle (timed: ``cycle_ms``, its reads ``cycle_read_ms`` and
its writes ``cycle_write_ms``), then Setlist's worker's poll of the pool
(``SetlistProcessWorker._get_scheduled_flow_runs``: the granted runs, and Prefect's
poll of the queues besides the tenant queues; timed: ``poll_ms``). Every 30 s that
worker makes Prefect's full poll of every queue instead, which keeps them marked ready;
every 5th round forces one (``poll_full_ms``), and ``poll_ms_amortized`` is the mean
cost per poll at Prefect's default interval of 10 s. The runs it returns start, as many
older runs finish, and a few new runs arrive. The baseline poll runs in the same rounds:
Prefect's poll of a pool of five queues holding the same runs, open (Prefect's plain
layout at that size): ``poll_ms_baseline``.

Then the deep-queue case (``deep_queue``; ``--deep 0`` skips it): one tenant with
``--deep`` due runs and ``--deep-slots`` free slots in a pool of its own beside
``--deep-shallow`` shallow tenants, governed by the same dispatcher as the main pool:
``deep_grants_per_s`` and ``shallow_wait_p95_s``.

Prints one JSON object as its last line: database, tenants, queues, cycle_ms (median)
and cycle_ms_p90 (``pg_cycle_ms`` and ``pg_cycle_ms_p90`` too on PostgreSQL), poll_ms,
poll_ms_baseline, ratio = poll_ms / poll_ms_baseline, the deep-queue figures, and the
spread, the full poll and the first (takeover) cycle for context.
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


async def profiles(names: list[str], rng: random.Random, quota=None, weight=None) -> None:
    """A profile block per tenant, written straight into the server's database with its
    data encrypted as the API would (``Block.asave`` through the API costs about 0.2 s
    a tenant here, registering the block type and schema again on every save)."""
    import sqlalchemy as sa
    from prefect.client.orchestration import get_client
    from prefect.server.database import provide_database_interface
    from prefect.server.utilities.encryption import _get_fernet_encryption

    from blocks.tenant import TenantProfile
    from setlist.core.tenancy import TenantQuota, profile_block_name

    await TenantProfile.aregister_type_and_schema()
    async with get_client() as client:
        block_type = await client.read_block_type_by_slug(TenantProfile.get_block_type_slug())
    # One document made as Block.asave makes it (60 ms each: it hashes the schema);
    # the others are its data with the tenant's fields in place.
    first = TenantProfile(tenant_id="probe")._to_block_document(name="probe")
    extra = {
        k: v
        for k, v in first.model_dump(mode="json", context={"include_secrets": True})["data"].items()
        if k not in TenantProfile.model_fields
    }
    db = provide_database_interface()
    async with db.session_context(begin_transaction=True) as session:
        fernet = await _get_fernet_encryption(session)
        rows = []
        for name in names:
            q = TenantQuota(
                concurrent_jobs=quota or rng.randint(1, 6),
                weight=weight or rng.choice([1, 1, 2, 4]),
            )
            data = {**TenantProfile(tenant_id=name, quota=q).model_dump(mode="json"), **extra}
            rows.append(
                {
                    "id": uuid.uuid4(),
                    "name": profile_block_name(name),
                    "block_schema_id": first.block_schema_id,
                    "block_type_id": first.block_type_id,
                    "block_type_name": block_type.name,
                    "is_anonymous": False,
                    "data": fernet.encrypt(json.dumps(data).encode()).decode(),
                }
            )
        await session.execute(sa.insert(db.BlockDocument), rows)


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


DEEP = "bench-deep"


async def deep_queue(args, client, dispatcher, flow_id, rng) -> dict:
    """The deep-queue case, after the main rounds, on the same server and dispatcher.

    A pool of its own (``bench-deep``) joins the dispatcher's pools: one tenant with
    ``--deep`` due runs and a quota of ``--deep-slots``, and ``--deep-shallow`` shallow
    tenants (quota 4) whose runs arrive ``--arrivals`` a round; the pool's limit leaves
    the deep tenant its whole quota free and room for the arrivals. The main pool and
    its 1,000 tenants stay governed by the same cycles. Rounds keep the dispatcher's
    cadence (one cycle a ``--interval``); a run granted is taken at once and lasts one
    round. Measured: the deep tenant's grants per second until its queue is drained
    (``deep_grants_per_s``: its runs / time from the first cycle to the cycle that
    granted its last), and the shallow runs' wait from arrival (their scheduled time) to
    their grant, when its write landed (``shallow_wait_p95_s``; a run still waiting at
    the end counts its wait so far; the last round's arrivals, which no cycle followed,
    are left out)."""
    import sqlalchemy as sa
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.server.database import provide_database_interface

    deep = "deep-0000"
    shallow = [f"shallow-{i:04d}" for i in range(args.deep_shallow)]
    await profiles([deep], rng, quota=args.deep_slots, weight=1)
    await profiles(shallow, rng, quota=4)
    headroom = 2 * args.arrivals
    await client.create_work_pool(
        WorkPoolCreate(
            name=DEEP, type="setlist-process", concurrency_limit=args.deep_slots + headroom
        )
    )
    pool_id = (await client.read_work_pool(DEEP)).id
    now = datetime.now(UTC)
    queues, by_tenant = [], {}
    for i, (tenant, band) in enumerate((t, b) for b in BANDS for t in [deep, *shallow]):
        q = {"id": uuid.uuid4(), "name": f"{tenant}.{band}", "priority": i + 2}
        q.update(work_pool_id=pool_id, is_paused=True, concurrency_limit=None)
        queues.append(q)
        by_tenant.setdefault(tenant, []).append((q["id"], q["name"]))
    qid, qname = next(x for x in by_tenant[deep] if x[1].endswith(".normal"))
    rows = [
        run_row(flow_id, "d", qid, qname, deep, "SCHEDULED", now, rng,
                due=now - timedelta(seconds=rng.uniform(1, 60)))
        for _ in range(args.deep)
    ]  # fmt: skip
    db = provide_database_interface()
    async with db.session_context(begin_transaction=True) as session:
        await session.execute(sa.insert(db.WorkQueue), queues)
        await insert_runs(session, db, rows)
    deep_ids = {str(r["id"]) for r in rows}
    # The new pool joins the dispatcher (its books share the list of pools); read its
    # queues, the new profiles and its runs before the first timed cycle.
    dispatcher.pools.append(DEEP)
    await dispatcher.book.load(client)
    await dispatcher._load_terms(client)
    await dispatcher.runs.sync(client, dispatcher.book, time.time())

    arrived: dict[str, float] = {}  # shallow run -> its scheduled time
    granted_at: dict[str, float] = {}
    cycles, deep_per_cycle = [], []
    first = last_deep = None
    for n in range(args.deep_rounds):
        started = time.monotonic()
        async with db.session_context(begin_transaction=True) as session:
            # the runs taken last round end (runs one round long)
            await session.execute(
                sa.update(db.FlowRun)
                .where(db.FlowRun.work_queue_id.in_([q["id"] for q in queues]))
                .where(db.FlowRun.state_type == "RUNNING")
                .values(state_type="COMPLETED", state_name="Completed", end_time=datetime.now(UTC))
            )
        t_cycle = time.time()
        first = first or t_cycle
        report = await dispatcher.cycle(client)
        t_done = time.time()
        cycles.append(report.ms)
        print(
            f"deep round {n}: cycle {report.ms:.0f} ms (read {report.read_ms:.0f}, "
            f"write {report.write_ms:.0f}), grants {sum(report.grants.values())}",
            flush=True,
        )
        picked, got = [], 0
        for run in dispatcher.runs.waiting.values():
            if run.granted and run.id not in granted_at:
                granted_at[run.id] = run.granted_at or t_done
                if run.pool == DEEP:
                    picked.append(uuid.UUID(run.id))
                    if run.id in deep_ids:
                        got += 1
        deep_per_cycle.append(got)
        if got:
            last_deep = t_done
        async with db.session_context(begin_transaction=True) as session:
            if picked:  # the worker takes what was granted
                await session.execute(
                    sa.update(db.FlowRun)
                    .where(db.FlowRun.id.in_(picked))
                    .values(state_type="RUNNING", state_name="Running",
                            start_time=datetime.now(UTC))
                )  # fmt: skip
            arrivals = []
            t_arrive = datetime.now(UTC)
            for _ in range(args.arrivals):
                tenant = rng.choice(shallow)
                aqid, aqname = rng.choice(by_tenant[tenant])
                arrivals.append(
                    run_row(flow_id, "s", aqid, aqname, tenant, "SCHEDULED", t_arrive, rng,
                            due=t_arrive)
                )  # fmt: skip
            await insert_runs(session, db, arrivals)
        drained = sum(1 for rid in deep_ids if rid in granted_at) == len(deep_ids)
        if drained and n >= args.deep_min_rounds:
            break
        for r in arrivals:  # a cycle follows: these count
            arrived[str(r["id"])] = r["next_scheduled_start_time"].timestamp()
        await asyncio.sleep(max(args.interval - (time.monotonic() - started), 0.0))
    end = time.time()
    waits = sorted(granted_at.get(rid, end) - due for rid, due in arrived.items())
    deep_granted = sum(1 for rid in deep_ids if rid in granted_at)
    span = (last_deep - first) if last_deep and first else 0.0
    # the first cycle's grants count over the cycle itself; later ones over the cadence
    span = max(span + cycles[0] / 1000, 1e-3)
    dispatcher.pools.remove(DEEP)
    return {
        "deep_runs": len(deep_ids),
        "deep_slots": args.deep_slots,
        "deep_granted": deep_granted,
        "deep_rounds": len(cycles),
        "deep_grants_per_s": round(deep_granted / span, 1),
        "deep_grants_per_cycle_max": max(deep_per_cycle),
        "deep_cycle_ms": round(statistics.median(cycles), 1),
        "deep_cycle_ms_p90": round(p90(cycles), 1),
        "shallow_runs": len(waits),
        "shallow_ungranted": sum(1 for rid in arrived if rid not in granted_at),
        "shallow_wait_p50_s": round(waits[len(waits) // 2], 2) if waits else None,
        "shallow_wait_p95_s": round(waits[int(len(waits) * 0.95)], 2) if waits else None,
    }


def p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)]


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
    print(f"profiles of {args.tenants} tenants in {time.perf_counter() - t0:.1f}s", flush=True)
    flow_id, names, by_tenant, queues = await populate(args.tenants, args.waiting, args.limit, rng)
    print(
        f"built {args.tenants} tenants, {queues} queues in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    dispatcher = Dispatcher([BIG], interval=args.interval, prefetch_s=10.0)
    cycles, polls, full_polls, baseline, granted = [], [], [], [], []
    reads, writes = [], []
    deep = {}
    worker = SetlistProcessWorker(work_pool_name=BIG, prefetch_seconds=10)
    async with get_client() as client, worker:
        t0 = time.perf_counter()
        await dispatcher.cycle(client)  # taking over: reads the pool, profiles, history
        takeover_ms = (time.perf_counter() - t0) * 1000
        await churn(flow_id, [], names, by_tenant, rng, 0)
        for _ in range(args.rounds):
            report = await dispatcher.cycle(client)
            cycles.append(report.ms)
            reads.append(report.read_ms)
            writes.append(report.write_ms)
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
        phases = zip(cycles, reads, writes, strict=True)
        print(f"main rounds (cycle, read, write ms): {[tuple(map(round, p)) for p in phases]}")
        if args.deep:
            deep = await deep_queue(args, client, dispatcher, flow_id, rng)
        await dispatcher.leadership.release(client)
    med = statistics.median
    result = {
        "database": args.database,
        "tenants": args.tenants,
        "queues": queues,
        "waiting_runs": args.tenants * args.waiting,
        "cycle_ms": round(med(cycles), 1),
        "cycle_ms_p90": round(p90(cycles), 1),
        "cycle_read_ms": round(med(reads), 1),
        "cycle_read_ms_p90": round(p90(reads), 1),
        "cycle_write_ms": round(med(writes), 1),
        "cycle_write_ms_p90": round(p90(writes), 1),
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
        **deep,
    }
    if args.database != "sqlite":  # the fields the issue names for PostgreSQL
        result["pg_cycle_ms"] = result["cycle_ms"]
        result["pg_cycle_ms_p90"] = result["cycle_ms_p90"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--waiting", type=int, default=2, help="due runs per tenant")
    ap.add_argument("--limit", type=int, default=100, help="the pool's concurrency limit")
    ap.add_argument("--arrivals", type=int, default=20, help="new runs between two cycles")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--interval", type=float, default=1.0, help="the dispatcher's cadence")
    ap.add_argument(
        "--database",
        choices=("sqlite", "postgresql", "embedded"),
        default="sqlite",
        help="Prefect's test SQLite, a fresh database on the local PostgreSQL server, or an "
        "embedded PostgreSQL (bench/servers.py)",
    )
    ap.add_argument("--deep", type=int, default=1000, help="the deep tenant's due runs (0: skip)")
    ap.add_argument("--deep-slots", type=int, default=200, help="the deep tenant's free slots")
    ap.add_argument("--deep-shallow", type=int, default=100, help="shallow tenants beside it")
    ap.add_argument("--deep-rounds", type=int, default=30, help="at most this many rounds")
    ap.add_argument("--deep-min-rounds", type=int, default=8, help="at least this many")
    args = ap.parse_args()
    os.environ["SETLIST_HOME"] = tempfile.mkdtemp(prefix="setlist-bench-dispatch-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from bench.servers import prefect_server

    with prefect_server(args.database):
        result = asyncio.run(bench(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
