"""The leading dispatcher killed in the middle of a contended dispatch.

- ``dispatcher-kill``: two dispatcher replicas (``python -m setlist.dispatch`` with the
  stack's environment) and a process worker on the shared server; six tenants with
  quotas of 1 to 3 (``bench/ha.py``'s contention tenants) submit canary runs of mixed
  bands faster than the pool drains: half at once, the rest one by one at random
  intervals that outlast the fault. At a random point while runs wait, the replica that
  holds the heartbeat is SIGKILLed: no step-down, its claim on the leader limit and its
  heartbeat left behind, as when a node dies. The standby must lead within 20 s
  (``takeover_s``: from the kill until the heartbeat names the standby and is fresh),
  the load runs to its end, and over the recorded history (``setlist.dispatch.history``,
  the rules the contention test judges by) no tenant was ever over its quota, no lower
  band went while a higher one waited with a free slot, the pool limit held, the worker
  took only granted runs, and every run ran exactly once.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench.faults import Context

RUNS = 24
HOLD_S = 1.0  # each canary stays running this long
EXPECTED_RUN_S = 2.0  # what the dispatchers charge a run under way: about a canary's run
TAKEOVER_LIMIT_S = 20.0
SHOWN = 5  # violations quoted in the result; all are counted


def _pid(holder: str | None) -> int | None:
    """The process id in a leadership holder name (``<host>-<pid>-<hex>``)."""
    try:
        return int((holder or "").rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return None


async def _leader(client, procs: list[subprocess.Popen], timeout: float = 60.0):
    """→ (index in ``procs`` of the replica that leads, its holder name)."""
    from setlist.dispatch.leadership import HEARTBEAT_TTL, read_heartbeat

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder, age = await read_heartbeat(client)
        pids = [p.pid for p in procs]
        if age is not None and age < HEARTBEAT_TTL and _pid(holder) in pids:
            return pids.index(_pid(holder)), holder
        await asyncio.sleep(0.2)
    raise RuntimeError(f"no replica of {[p.pid for p in procs]} leads after {timeout:.0f} s")


async def _wait_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not in {log} after {timeout:.0f} s")
        await asyncio.sleep(0.3)


async def _wait_online(client, pool: str, name: str, proc, log: Path, timeout=120.0) -> None:
    """Until the worker has polled the server once (it is then listed as online)."""
    from prefect.client.schemas.objects import WorkerStatus

    deadline = time.monotonic() + timeout
    while True:
        workers = await client.read_workers_for_work_pool(pool)
        if any(w.name == name and w.status == WorkerStatus.ONLINE for w in workers):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker {name} not online after {timeout:.0f} s; see {log}")
        await asyncio.sleep(0.5)


async def _read(client, ids: list[str]) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids)
    )


async def _states(client, ids: list[str]) -> dict[str, str]:
    """Each run's state type (as the API names it)."""
    return {str(r.id): r.state.type.value if r.state else "" for r in await _read(client, ids)}


async def _at_kill(client, ids: list[str]) -> dict[str, int]:
    """How the runs stand: waiting, granted but not yet taken, under way."""
    from setlist.dispatch.grants import is_granted

    runs = await _read(client, ids)
    kinds = [r.state.type.value if r.state else "" for r in runs]
    return {
        "waiting": kinds.count("SCHEDULED"),
        "granted_untaken": sum(
            1
            for r, kind in zip(runs, kinds, strict=True)
            if kind == "SCHEDULED" and is_granted(r.tags, r.id, r.state_id)
        ),
        "busy": kinds.count("PENDING") + kinds.count("RUNNING"),
    }


async def _wait_final(client, ids: list[str], timeout: float) -> dict[str, str]:
    """One read a second until every run is final or ``timeout`` passes."""
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    deadline = time.monotonic() + timeout
    while True:
        states = await _states(client, ids)
        done = len(states) == len(ids) and set(states.values()) <= final
        if done or time.monotonic() > deadline:  # a run not final by then counts as lost
            return states
        await asyncio.sleep(1.0)


async def dispatcher_kill(ctx: Context, args, rng: random.Random) -> dict:
    from bench.ha import BANDS, QUOTAS, _cancel_scheduled, _spawn, _stop, _wait_holding
    from setlist.core.settings import get_settings
    from setlist.core.tenancy import Priority, TenantQuota
    from setlist.dispatch import history
    from setlist.dispatch.dispatcher import release_queues
    from setlist.dispatch.leadership import HEARTBEAT_TTL, read_heartbeat
    from setlist.stack import stack_env
    from setlist.tenants import submit as submitting
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    client, settings = ctx.client, get_settings()
    pool = settings.work_pool
    logs_dir = Path(tempfile.mkdtemp(prefix="setlist-chaos-dispatch-"))
    tag = uuid.uuid4().hex[:4]
    quotas = {f"chaos-d-{tag}-{i}": q for i, q in enumerate(QUOTAS)}
    await _cancel_scheduled(client)  # a quiet pool: only this load competes for it
    for tenant, quota in quotas.items():
        spec = TenantSpec(tenant_id=tenant, quota=TenantQuota(concurrent_jobs=quota))
        await create_tenant(client, spec)
    # The stack's environment for its processes. The shared server checks no credential,
    # so none is set here (one in this process's environment would be passed on).
    env = stack_env(settings, ctx.api_url)
    env.update(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
    replica_args = ["--interval", "0.5", "--pool", pool]
    replica_args += ["--expected-run-seconds", str(EXPECTED_RUN_S)]
    replica_args += ["--log-level", "DEBUG"]  # every decision, so each pick-up meets its own
    logs = [logs_dir / "dispatcher-a.log", logs_dir / "dispatcher-b.log"]
    worker_name = f"chaos-worker-{tag}"
    procs: list[subprocess.Popen] = []
    worker = None
    result: dict = {"name": "dispatcher-kill", "logs": str(logs_dir)}
    try:
        procs = [_spawn("setlist.dispatch", replica_args, env, log) for log in logs]
        queues = {f"{t}.{b.value}" for t in quotas for b in Priority}
        await _wait_holding(client, pool, queues, procs[0], logs[0])
        leader, holder = await _leader(client, procs)
        standby = 1 - leader
        await _wait_log(procs[standby], logs[standby], "standing by")
        worker_args = ["worker", "start", "--pool", pool, "--type", "setlist-process"]
        worker_args += ["--limit", "8", "--name", worker_name]
        # INFO: the worker's "submitting" line is the pick-up the history is judged by.
        worker_env = dict(env, PREFECT_LOGGING_LEVEL="INFO")
        worker = _spawn("prefect", worker_args, worker_env, logs_dir / "worker.log")
        await _wait_online(client, pool, worker_name, worker, logs_dir / "worker.log")
        pool_limit = (await client.read_work_pool(pool)).concurrency_limit

        plan = [(rng.choice(list(quotas)), rng.choice(BANDS)) for _ in range(RUNS)]
        gaps = [rng.uniform(1.0, 4.0) for _ in plan[RUNS // 2 :]]  # about 30 s of arrivals
        kill_after = rng.uniform(2.0, 30.0)  # after the first grants, before the backlog ends
        submitted: list[tuple[str, str, str]] = []

        async def submit(tenant: str, band: str) -> None:
            sub = await submitting.submit(
                client, "canary", tenant, band, params={"hold_seconds": HOLD_S}
            )
            submitted.append((str(sub.flow_run_id), tenant, band))

        for tenant, band in plan[: RUNS // 2]:
            await submit(tenant, band)
        started = time.monotonic()

        async def trickle() -> None:
            for (tenant, band), gap in zip(plan[RUNS // 2 :], gaps, strict=True):
                await asyncio.sleep(gap)
                await submit(tenant, band)

        load = asyncio.create_task(trickle())
        await asyncio.sleep(kill_after)
        while True:  # the fault lands while runs wait for a grant
            at_kill = await _at_kill(client, [s[0] for s in submitted])
            if at_kill["waiting"] or time.monotonic() - started > 120:
                break
            await asyncio.sleep(0.5)
        procs[leader].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[leader].wait()

        takeover_s, new_holder = None, None
        while time.monotonic() - killed < 3 * TAKEOVER_LIMIT_S:
            now_holder, age = await read_heartbeat(client)
            if now_holder not in (None, holder) and age is not None and age < HEARTBEAT_TTL:
                takeover_s, new_holder = time.monotonic() - killed, now_holder
                break
            await asyncio.sleep(0.2)
        await load
        ids = [s[0] for s in submitted]
        states = await _wait_final(client, ids, timeout=600)

        runs, unreadable = [], []
        for rid, tenant, band in submitted:
            if states.get(rid) != "COMPLETED":
                continue
            try:
                runs.append(await history.read_history(client, rid, tenant, band))
            except history.HistoryIncomplete as exc:
                unreadable.append(str(exc))
        texts = [log.read_text(errors="replace") for log in logs]
        decisions = history.parse_decisions(*texts)
        found = {
            "quota_violations": history.quota_violations(runs, quotas) + history.bounced(runs),
            "band_violations": history.band_violations(runs, quotas, decisions),
            "pool_violations": history.pool_violations(runs, pool_limit),
            "ungranted_runs": history.ungranted(runs),
        }
        duplicated = history.ran_once(runs)
        lost = [rid for rid in ids if states.get(rid) != "COMPLETED"] + unreadable
        grants = [sum(d.grants for d in history.parse_decisions(t)) for t in texts]
        result.update(
            runs=len(ids),
            tenants=len(quotas),
            pool_limit=pool_limit,
            kill_after_s=round(killed - started, 1),
            waiting_at_kill=at_kill["waiting"],
            granted_untaken_at_kill=at_kill["granted_untaken"],
            busy_at_kill=at_kill["busy"],
            takeover_s=None if takeover_s is None else round(takeover_s, 1),
            takeover_limit_s=TAKEOVER_LIMIT_S,
            standby_leads=_pid(new_holder) == procs[standby].pid,
            runs_granted_by_killed=grants[leader],
            runs_granted_by_standby=grants[standby],
            runs_granted=len(runs) - len(found["ungranted_runs"]),
            decisions=len(decisions),
            completed=sum(1 for s in states.values() if s == "COMPLETED"),
            **{k: len(v) for k, v in found.items()},
            lost_runs=len(lost),
            duplicate_runs=len(duplicated),
            lost_or_duplicate_rows=0,
        )
        shown = {k: v[:SHOWN] for k, v in found.items() if v}
        if lost or duplicated:
            shown["lost_or_duplicated"] = (lost + duplicated)[:SHOWN]
        if shown:
            result["examples"] = shown
        result["survived"] = (
            takeover_s is not None
            and takeover_s <= TAKEOVER_LIMIT_S
            and result["standby_leads"]
            and not any(found.values())
            and not lost
            and not duplicated
        )
        if runs and not result["survived"]:
            (logs_dir / "timeline.txt").write_text(history.timeline(runs, decisions))
        return result
    finally:
        if worker is not None:
            _stop(worker, timeout=5)  # every run is final: the worker has nothing to finish
        for proc in procs:
            _stop(proc)  # the standby steps down on SIGTERM, releasing its claim
        await release_queues(client, [pool])  # later work runs without a dispatcher
        if result.get("survived"):
            shutil.rmtree(logs_dir, ignore_errors=True)
            result.pop("logs")
