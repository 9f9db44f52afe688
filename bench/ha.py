"""Control-plane benchmark: one server on SQLite, one on PostgreSQL, and Prefect's
multi-replica shape (two API replicas, ``--services`` services processes (2), PostgreSQL
and Redis).

    .venv/bin/python bench/ha.py [--webhooks 200] [--concurrency 32] [--tenants 8]
                                 [--contention-runs 24] [--kill-webhooks 200]
                                 [--only sqlite,one_replica,two_replicas] [--services 2]

Each configuration runs the same gated server (``python -m setlist.controlplane``), on a
fresh database of its own (SQLite under a temporary home; a fresh embedded PostgreSQL;
for two replicas the same, plus a Redis database claimed for the run), and the same work:

1. the webhook burst of ``bench/gateway.py``: ``--webhooks`` signed webhooks through the
   gateway (on the last replica) → the data-etl trigger → flow runs. ``runs_per_s`` is
   runs created over the time from the first webhook sent to the last run created (what
   the automations sustain); ``p95_ms`` webhook sent → run created;
2. a dispatch contention run: ``--contention-runs`` canary runs over six tenants with
   quotas of 1 to 3 and mixed bands, faster than the pool (limit 4) drains, with the
   dispatcher on the last replica and a process worker on the first (with two replicas,
   every run's state changes cross them). From each run's state history:
   ``quota_violations`` (a run started while its tenant already had its quota busy),
   ``pool_violations``, ``lost`` (a run that did not complete), ``duplicated`` (a run
   that ran twice);
3. two replicas only: a second burst (``--kill-webhooks``) through a gateway that reaches
   the replicas through one address (``setlist.controlplane.balancer``, as a Service
   would), with the gateway's own replica SIGKILLed at a random point of it:
   ``kill_lost``, ``kill_duplicated``.

The last line is one JSON object: per configuration ``<name>_runs_per_s``,
``<name>_p95_ms`` (``sqlite``, ``one_replica``, ``two_replica``), and over all three
``quota_violations``, ``pool_violations``, ``lost`` and ``duplicated`` (contention
runs, and accepted webhooks without a run or with two, killed replica included), with
the configurations' details under ``configs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CONFIGS = ("sqlite", "one_replica", "two_replicas")
QUOTAS = [1, 1, 2, 2, 3, 1]  # of the contention tenants
BANDS = ["critical", "high", "normal", "low", "batch"]


# ---------------------------------------------------------------- the control planes


@contextlib.contextmanager
def control_plane(name: str, home: Path, auth: str, services: int = 2):
    """→ the API URLs of configuration ``name`` (the last one is the dispatcher's and the
    gateway's, the first the worker's) and the processes serving them."""
    from setlist.controlplane import ha
    from setlist.controlplane.local import start_local_ha, start_local_server
    from setlist.controlplane.postgres import EmbeddedPostgres

    pg = None if name == "sqlite" else EmbeddedPostgres(home / "postgres")
    try:
        database_url = pg.start() if pg else None
        if name != "two_replicas":
            proc, url = start_local_server(home, auth, database_url=database_url)
            try:
                yield [url], [proc]
            finally:
                _stop(proc)
            return
        with ha.claimed_database(
            os.environ.get("SETLIST_BENCH_REDIS_URL", ha.DEFAULT_REDIS_URL)
        ) as r:
            started = start_local_ha(home, auth, database_url, r, services=services)
            try:
                yield started.urls, [p for p, _ in started.replicas] + started.services
            finally:
                started.stop()
    finally:
        if pg:
            pg.stop()


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def _spawn(module: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _component_env(home: Path, url: str, auth: str) -> dict[str, str]:
    return dict(
        os.environ,
        PREFECT_API_URL=url,
        PREFECT_API_AUTH_STRING=auth,
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "results"),
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="3",
        SETLIST_HOME=str(home),
    )


def _gateway(home: Path, api: str, auth: str, log_name: str) -> tuple[subprocess.Popen, str]:
    from servers import free_port

    from setlist.controlplane.local import wait_answering

    port = free_port()
    proc = _spawn(
        "setlist.gateway", ["--port", str(port)], _component_env(home, api, auth), home / log_name
    )
    url = f"http://127.0.0.1:{port}"
    wait_answering(proc, url, home / log_name, timeout=90)
    return proc, url


# ---------------------------------------------------------------- 1. the webhook burst


async def webhook_burst(
    gateway_url: str, tenants: list[str], n: int, concurrency: int, during=None
) -> dict:
    """``n`` signed webhooks at ``concurrency``; ``during(sent_so_far)`` is called as
    they go (the kill). → accepted, runs created, lost, duplicated, runs/s, p50/p95."""
    from gateway import (
        SECRET,
        _Connections,
        _ids,
        _latencies,
        _new_runs,
        _pct,
        _runs_by_tenant,
        _wait_runs,
    )
    from prefect.client.orchestration import get_client

    from setlist.gateway.signatures import sign_setlist

    to_gateway = _Connections(gateway_url, concurrency)
    sends: list[tuple[str, float, int]] = []

    async def send(tenant: str) -> None:
        body = json.dumps(
            {"tenant_id": tenant, "files": [f"raw/{uuid.uuid4().hex}.jsonl"]}
        ).encode()
        headers = {
            "content-type": "application/json",
            "x-setlist-signature": sign_setlist(SECRET, body),
            "x-setlist-delivery": uuid.uuid4().hex,
        }
        sent_at = time.time()
        for _ in range(20):  # 503 while the gateway is backlogged: the sender retries
            status = await to_gateway.post("/hooks/bench", body, headers)
            if status != 503:
                break
            await asyncio.sleep(0.5)
        sends.append((tenant, sent_at, status))
        if during:
            await during(len(sends))

    async with get_client() as client:
        before = _ids(await _runs_by_tenant(client, tenants))
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with slots:
                await send(tenants[i % len(tenants)])

        await asyncio.gather(*(one(i) for i in range(n)))
        accepted = [s for s in sends if s[2] == 202]
        created = await _wait_runs(client, tenants, len(before) + len(accepted), stall=60)
    to_gateway.close()
    new = _new_runs(created, before)
    made = sum(map(len, new.values()))
    stamps = [c for v in new.values() for c in v]
    first_sent = min(s[1] for s in sends)
    latencies = _latencies(accepted, new)
    return {
        "sent": n,
        "accepted": len(accepted),
        "runs_created": made,
        "webhook_lost": max(len(accepted) - made, 0),
        "webhook_duplicated": max(made - len(accepted), 0),
        "runs_per_s": round(made / (max(stamps) - first_sent), 2) if stamps else 0.0,
        "p50_ms": _pct(latencies, 0.5),
        "p95_ms": _pct(latencies, 0.95),
    }


# ---------------------------------------------------------------- 2. dispatch contention


async def _wait_holding(client, pool: str, queues: set[str], proc, log: Path) -> None:
    from setlist.dispatch.leadership import dispatcher_active
    from setlist.dispatch.queues import read_pool_queues

    deadline = time.monotonic() + 180
    while True:
        if await dispatcher_active(client):
            paused = {q.name for q in await read_pool_queues(client, pool) if q.is_paused}
            if queues <= paused:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the dispatcher did not hold the queues; see {log}")
        await asyncio.sleep(0.5)


async def _cancel_scheduled(client) -> int:
    """The bursts' runs exist to be counted, not run: cancelled before a worker starts."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    waiting = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
    )
    cancelled = 0
    while runs := await client.read_flow_runs(flow_run_filter=waiting, limit=200):
        for run in runs:
            await client.set_flow_run_state(run.id, Cancelled(), force=True)
        cancelled += len(runs)
    return cancelled


def _busy(states) -> tuple[float, float] | None:
    """(first Pending, final) timestamps of a run's history; None if it never started."""
    pending = [s.timestamp.timestamp() for s in states if s.type.value == "PENDING"]
    final = [s.timestamp.timestamp() for s in states if s.is_final()]
    return (pending[0], final[-1]) if pending and final else None


def _overlaps(spans: list[tuple[float, float]], limit: int) -> int:
    """How many spans began while ``limit`` others were already under way."""
    return sum(
        1
        for i, (start, _) in enumerate(spans)
        if sum(1 for j, (s, e) in enumerate(spans) if j != i and s <= start < e) >= limit
    )


async def contention(
    home: Path, urls: list[str], auth: str, tenants: list[str], runs: int, seed: int
) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from setlist.core.settings import get_settings
    from setlist.core.tenancy import Priority
    from setlist.tenants import submit as submitting

    pool = get_settings().work_pool
    rng = random.Random(seed)
    async with get_client() as client:
        await _cancel_scheduled(client)
    dispatcher = _spawn(
        "setlist.dispatch",
        ["--interval", "0.5", "--pool", pool],
        _component_env(home, urls[-1], auth),
        home / "dispatcher.log",
    )
    worker = _spawn(
        "prefect",
        [
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "setlist-process",
            "--limit",
            "8",
            "--name",
            "bench-worker",
        ],
        _component_env(home, urls[0], auth),
        home / "worker.log",
    )
    try:
        async with get_client() as client:
            queues = {f"{t}.{b.value}" for t in tenants for b in Priority}
            await _wait_holding(client, pool, queues, dispatcher, home / "dispatcher.log")
            pool_limit = (await client.read_work_pool(pool)).concurrency_limit
            plan = [(rng.choice(tenants), rng.choice(BANDS)) for _ in range(runs)]
            ids = []
            for tenant, band in plan:
                sub = await submitting.submit(
                    client, "canary", tenant, band, params={"hold_seconds": 1.0}
                )
                ids.append(str(sub.flow_run_id))
            t0 = time.monotonic()
            while True:
                found = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids)
                )
                if all(r.state and r.state.is_final() for r in found) and len(found) == len(ids):
                    break
                if time.monotonic() - t0 > 600:
                    break
                await asyncio.sleep(1.0)
            seconds = time.monotonic() - t0
            spans: dict[str, list[tuple[float, float]]] = {t: [] for t in tenants}
            every, lost, twice = [], 0, 0
            final = {str(r.id): r for r in found}
            for rid, (tenant, _) in zip(ids, plan, strict=True):
                states = sorted(await client.read_flow_run_states(rid), key=lambda s: s.timestamp)
                run = final.get(rid)
                if not (run and run.state and run.state.is_completed()):
                    lost += 1
                twice += sum(1 for s in states if s.type.value == "RUNNING") > 1
                span = _busy(states)
                if span:
                    spans[tenant].append(span)
                    every.append(span)
    finally:
        for proc in (worker, dispatcher):
            _stop(proc)
    quota = dict(zip(tenants, QUOTAS, strict=True))
    return {
        "contention_runs": runs,
        "contention_s": round(seconds, 1),
        "quota_violations": sum(_overlaps(s, quota[t]) for t, s in spans.items()),
        "pool_violations": _overlaps(every, pool_limit) if pool_limit else 0,
        "lost": lost,
        "duplicated": twice,
    }


# ---------------------------------------------------------------- one configuration


async def _onboard(hooks: list[str], contenders: list[str]) -> None:
    from gateway import _setup
    from prefect.client.orchestration import get_client

    from setlist import stack
    from setlist.core.tenancy import TenantQuota
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    await stack.bootstrap_platform(Path(os.environ["SETLIST_HOME"]) / "storage")
    await _setup(hooks)
    async with get_client() as client:
        for tenant, quota in zip(contenders, QUOTAS, strict=True):
            spec = TenantSpec(tenant_id=tenant, quota=TenantQuota(concurrent_jobs=quota))
            await create_tenant(client, spec)


def run_config(name: str, args, seed: int) -> dict:
    import anyio
    from prefect.settings import temporary_settings

    from setlist.core.credentials import client_settings

    home = Path(tempfile.mkdtemp(prefix=f"setlist-bench-ha-{name}-"))
    os.environ["SETLIST_HOME"] = str(home)
    auth = f"setlist:{secrets.token_urlsafe(24)}"
    tag = uuid.uuid4().hex[:4]
    hooks = [f"ha-hook-{tag}-{i}" for i in range(args.tenants)]
    contenders = [f"ha-q-{tag}-{i}" for i in range(len(QUOTAS))]
    result: dict = {"home": str(home)}
    print(f"[{name}] starting (logs under {home})", file=sys.stderr)
    with control_plane(name, home, auth, args.services) as (urls, servers):
        with temporary_settings(updates=client_settings(urls[-1], auth)):
            anyio.run(_onboard, hooks, contenders)
            gateway, gateway_url = _gateway(home, urls[-1], auth, "gateway.log")
            try:
                result.update(
                    anyio.run(webhook_burst, gateway_url, hooks, args.webhooks, args.concurrency)
                )
            finally:
                _stop(gateway)
            print(f"[{name}] burst: {result}", file=sys.stderr)
            result.update(
                anyio.run(contention, home, urls, auth, contenders, args.contention_runs, seed)
            )
        if name == "two_replicas" and args.kill_webhooks:
            result.update(kill_burst(home, urls, servers, auth, hooks, args, seed))
    print(f"[{name}] {result}", file=sys.stderr)
    return result


def kill_burst(home: Path, urls, servers, auth: str, hooks, args, seed: int) -> dict:
    """A burst through the balancer; the last replica SIGKILLed at a random point."""
    import anyio
    from prefect.settings import temporary_settings
    from servers import free_port

    from setlist.controlplane.local import wait_answering
    from setlist.core.credentials import client_settings

    port = free_port()
    balancer = _spawn(
        "setlist.controlplane.balancer",
        ["--port", str(port), *(x for u in urls for x in ("--backend", u))],
        dict(os.environ),
        home / "balancer.log",
    )
    front = f"http://127.0.0.1:{port}/api"
    wait_answering(balancer, front, home / "balancer.log", timeout=90)
    victim = servers[len(urls) - 1]  # the last replica: the one the others used
    kill_at = random.Random(seed).randint(args.kill_webhooks // 4, 3 * args.kill_webhooks // 4)
    killed_after: list[int] = []

    async def during(sent: int) -> None:
        if sent >= kill_at and not killed_after:
            killed_after.append(sent)
            victim.send_signal(signal.SIGKILL)

    gw_home = home / "gateway-2"
    gw_home.mkdir()
    gateway, gateway_url = _gateway(gw_home, front, auth, "gateway.log")
    try:
        with temporary_settings(updates=client_settings(front, auth)):
            got = anyio.run(
                webhook_burst, gateway_url, hooks, args.kill_webhooks, args.concurrency, during
            )
    finally:
        _stop(gateway)
        _stop(balancer)
    return {
        "kill_sent": got["sent"],
        "kill_accepted": got["accepted"],
        "kill_after_webhooks": killed_after[0] if killed_after else None,
        "kill_runs_created": got["runs_created"],
        "kill_lost": got["webhook_lost"],
        "kill_duplicated": got["webhook_duplicated"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhooks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--contention-runs", type=int, default=24)
    parser.add_argument("--kill-webhooks", type=int, default=200, help="0: no kill phase")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--services", type=int, default=2, help="Prefect services processes of two_replicas"
    )
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    chosen = [c for c in args.only.split(",") if c]
    unknown = set(chosen) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; known: {CONFIGS}")

    configs = {name: run_config(name, args, args.seed) for name in chosen}
    short = {"sqlite": "sqlite", "one_replica": "one_replica", "two_replicas": "two_replica"}
    out: dict = {}
    for name, r in configs.items():
        out[f"{short[name]}_runs_per_s"] = r["runs_per_s"]
        out[f"{short[name]}_p95_ms"] = r["p95_ms"]
    for key in ("quota_violations", "pool_violations"):
        out[key] = sum(r[key] for r in configs.values())
    for key in ("lost", "duplicated"):  # runs of the contention, webhooks of the bursts
        out[key] = sum(
            r[key] + r[f"webhook_{key}"] + r.get(f"kill_{key}", 0) for r in configs.values()
        )
    out["configs"] = configs
    print(json.dumps(out))


if __name__ == "__main__":
    main()
