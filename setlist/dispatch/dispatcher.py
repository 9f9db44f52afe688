"""The dispatcher: a small control loop that decides which tenant runs the workers may
take, so bands, quotas and fair share hold on every pool.

Prefect's worker takes runs from the unpaused queues of its pool in queue-priority
order, at most a queue's and the pool's concurrency limits. Those limits count per
queue, know nothing of tenants or fairness, and a slot freed by a run ending is taken
before anyone decides who should have it. So the dispatcher turns the queues into a
gate and decides run by run:

* every Setlist queue (``<tenant>.<band>``) is *held*: paused while a dispatcher leads,
  so Prefect's own dispatch and stock workers take no tenant run;
* each cycle grants runs, computed from the Prefect API state (no state of its own): per
  pool, at most the pool's free slots; per tenant, at most its quota minus its Pending
  + Running + Cancelling runs (over all pools); band by band, highest first; inside a
  band, each slot to the tenant with the lowest weighted usage (decayed run-seconds /
  weight, runs under way counted at least at the expected run length). One pass plans
  the whole cycle: a deep queue gets as many runs as its quota, the pool and fair share
  allow in that cycle, not one;
* a grant is written on the run it chose (``setlist.dispatch.grants``): the queue's
  oldest waiting runs get the tag of their Scheduled state, and Setlist's workers take a
  tenant run only with that grant. A granted run not yet taken holds its slot in later
  decisions; a run that ends frees nothing until the next decision;
* a cycle writes nothing but its grants (one tag write each, sent together with a
  bound on those in flight, all landed before the cycle ends): no queue write, whatever
  the number of tenants, except pausing a queue someone opened;
* one replica leads at a time (``setlist.dispatch.leadership``): a Prefect global
  concurrency limit of 1 is the claim, a Prefect variable carries the leader's
  heartbeat; a standby takes over when the heartbeat is stale. Without any dispatcher
  the queues stay held (nothing runs that was not granted); the tenant's global
  concurrency limit still holds. ``release_queues`` opens them for running without a
  dispatcher.

A run that arrives waits for the next cycle (the *reaction time*: one cycle plus one
worker poll). The policy itself is ``setlist.dispatch.plan``; what a cycle reads is
``setlist.dispatch.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta

from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound

from setlist.core import audit
from setlist.dispatch._api import _call
from setlist.dispatch.grants import with_grant
from setlist.dispatch.leadership import Leadership
from setlist.dispatch.plan import Candidate, plan_grants
from setlist.dispatch.state import (
    PREFECT_BUSY,
    Queue,
    QueueBook,
    Run,
    RunBook,
    TenantTerms,
    read_terms,
)

log = logging.getLogger("setlist.dispatcher")


@dataclass
class CycleReport:
    leading: bool
    snapshot: float = 0.0  # POSIX time the cycle's reads began
    decided: float = 0.0  # POSIX time the plan was made, before its writes
    ms: float = 0.0
    grants: dict[tuple[str, str], int] = field(default_factory=dict)
    writes: int = 0
    waiting: int = 0
    busy: int = 0
    read_ms: float = 0.0  # the cycle's reads (leadership, runs)
    write_ms: float = 0.0  # its grant writes and queue holds


class Dispatcher:
    """One control loop over the given pools. ``cycle()`` is one decision; ``run()``
    repeats it every ``interval`` seconds until stopped."""

    def __init__(
        self,
        pools: list[str],
        *,
        interval: float = 1.0,
        half_life: timedelta = timedelta(hours=6),
        window: timedelta = timedelta(hours=24),
        resync_s: float = 60.0,
        queue_resync_s: float = 120.0,
        terms_refresh_s: float = 30.0,
        prefetch_s: float | None = None,
        expected_run_s: float | None = None,
        holder: str | None = None,
        write_concurrency: int = 4,
    ):
        if prefetch_s is None:
            from prefect.settings import PREFECT_WORKER_PREFETCH_SECONDS

            prefetch_s = float(PREFECT_WORKER_PREFETCH_SECONDS.value())
        self.pools = list(dict.fromkeys(pools))
        self.interval = interval
        self.write_concurrency = write_concurrency  # grant writes in flight at once
        self.expected_run_s = expected_run_s  # None: the median of recent runs
        self.half_life_s = half_life.total_seconds()
        self.queue_resync_s = queue_resync_s
        self.terms_refresh_s = terms_refresh_s
        self.book = QueueBook(self.pools)
        self.runs = RunBook(self.pools, window=window, resync_s=resync_s, prefetch_s=prefetch_s)
        self.leadership = Leadership(holder)
        self.terms: dict[str, TenantTerms] = {}
        self._terms_at = -math.inf
        self._fresh = False  # everything read since this replica (re)gained leadership
        self._tasks: dict[str, asyncio.Task] = {}
        # Set between cycles: the full reads beside the cycles page only then, so a cycle
        # shares the server with at most one page of theirs.
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _pause(self, client: PrefectClient, q: Queue) -> bool:
        try:
            await client.update_work_queue(q.id, is_paused=True)
        except ObjectNotFound:  # the tenant was offboarded meanwhile
            self.book.queues.pop((q.pool, q.name), None)
            self.book.by_id.pop(q.id, None)
            return False
        q.paused = True
        q.written = time.monotonic()
        return True

    async def hold(self, client: PrefectClient) -> int:
        """Pause every Setlist queue that is open (all of them when taking over; later only
        those someone opened, e.g. ``setlist queue release``): a paused queue hands no
        run to Prefect's own dispatch or to a stock worker, and the worker's poll skips
        it at once. Setlist's workers take the granted runs of paused queues."""
        held = 0
        for q in list(self.book.setlist_queues()):
            if not q.paused:
                held += await self._pause(client, q)
        return held

    def _background(self, name: str, coro_fn) -> None:
        """Start ``coro_fn()`` unless the same refresh still runs; errors are logged."""
        task = self._tasks.get(name)
        if task is not None and not task.done():
            return

        async def guarded():
            try:
                await coro_fn()
            except Exception:  # noqa: BLE001 - the next period retries
                log.exception("dispatcher refresh %s failed", name)

        self._tasks[name] = asyncio.create_task(guarded())

    async def _load_terms(self, client: PrefectClient, pace=None) -> None:
        if pace is not None:
            await pace()
        self.terms = await read_terms(client, pace)
        self._terms_at = time.monotonic()

    async def cycle(self, client: PrefectClient) -> CycleReport:
        self._idle.clear()
        try:
            return await self._cycle(client)
        finally:
            self._idle.set()

    async def _cycle(self, client: PrefectClient) -> CycleReport:
        t0 = time.perf_counter()
        if not await self.leadership.hold(client):
            self._fresh = False
            return CycleReport(leading=False)
        mono, now = time.monotonic(), time.time()
        if not self._fresh:
            # Taking over: read everything and hold every queue before the first decision.
            await self.book.load(client)
            await self.hold(client)
            await self._load_terms(client)
            await self.runs.sync(client, self.book, now)
            self._fresh = True
        # Periodic full reads run beside the cycles, never in their way: they read a page
        # only between cycles.
        if mono - self.book.loaded_at >= self.queue_resync_s:
            self._background("queues", lambda: self.book.load(client, self._idle.wait))
        unknown = any(r.tenant and r.tenant not in self.terms for r in self.runs.waiting.values())
        if mono - self._terms_at >= (2.0 if unknown else self.terms_refresh_s):
            # A tenant onboarded since the last read has runs waiting: read again soon.
            self._background("terms", lambda: self._load_terms(client, self._idle.wait))
        if self.runs.sync_due(now):
            self._background(
                "runs", lambda: self.runs.sync(client, self.book, now, self._idle.wait)
            )
        await self.runs.refresh(client, self.book, now)
        t1 = time.perf_counter()
        grants = self.decide(now)
        decided = time.time()
        t2 = time.perf_counter()
        grants = await self.mark(client, grants)
        writes = await self.hold(client)
        t3 = time.perf_counter()
        return CycleReport(
            leading=True,
            snapshot=now,
            decided=decided,
            ms=(t3 - t0) * 1000,
            grants=grants,
            writes=writes,
            waiting=len(self.runs.waiting),
            busy=len(self.runs.busy),
            read_ms=(t1 - t0) * 1000,
            write_ms=(t3 - t2) * 1000,
        )

    async def mark(
        self, client: PrefectClient, grants: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], int]:
        """Grant each queue's slots to its oldest waiting runs (first come, first served
        inside a queue): tag each with the grant for its Scheduled state. The writes go
        out together, at most ``write_concurrency`` in flight (the queues granted fewest
        runs first), and all of them have
        landed or failed when this returns: none outlives the cycle that decided it. A
        write that failed otherwise than on a deleted run fails the cycle once every
        other write is done (the loop then reads everything again). → the runs granted
        per queue."""
        chosen: dict[tuple[str, str], list[Run]] = {}
        for run in self.runs.waiting.values():
            if (run.pool, run.queue) in grants and not run.granted:
                chosen.setdefault((run.pool, run.queue), []).append(run)
        picks: list[tuple[tuple[str, str], Run]] = []
        # Queues granted few runs first: a deep queue's many writes do not delay the
        # shallow queues' grants of the same cycle.
        for key, n in sorted(grants.items(), key=lambda kv: kv[1]):
            ordered = sorted(chosen.get(key, []), key=lambda r: (r.due or 0.0, r.id))
            picks += [(key, run) for run in ordered[:n]]
        gate = asyncio.Semaphore(self.write_concurrency)

        async def grant(run: Run) -> bool:
            tags = with_grant(run.tags, run.id, run.state_id)
            async with gate:
                # a raw PATCH of the tags alone: the client's model round trip costs as
                # much as the server's write
                resp = await _call(client, "PATCH", f"/flow_runs/{run.id}", json={"tags": tags})
            if resp is None:  # deleted meanwhile
                self.runs.waiting.pop(run.id, None)
                return False
            run.tags, run.granted, run.granted_at = tuple(tags), True, time.time()
            return True

        done = await asyncio.gather(*(grant(run) for _, run in picks), return_exceptions=True)
        marked: dict[tuple[str, str], int] = {}
        for (key, _), ok in zip(picks, done, strict=True):
            if ok is True:
                marked[key] = marked.get(key, 0) + 1
        for ok in done:
            if isinstance(ok, BaseException):
                raise ok
        return marked

    def decide(self, now: float) -> dict[tuple[str, str], int]:
        """Slots granted per queue this cycle. Runs granted earlier and not yet taken
        hold their slots."""
        busy_pool: dict[str, int] = {}
        busy_tenant: dict[str, int] = {}
        tenant_of_busy: dict[str, str] = {}
        for run in self.runs.busy.values():
            if run.state in PREFECT_BUSY:
                busy_pool[run.pool] = busy_pool.get(run.pool, 0) + 1
            if run.tenant:
                busy_tenant[run.tenant] = busy_tenant.get(run.tenant, 0) + 1
                tenant_of_busy[run.id] = run.tenant
        pool_free: dict[str, float] = {}
        for pool in self.pools:
            limit = self.book.pool_limit.get(pool)
            pool_free[pool] = math.inf if limit is None else limit - busy_pool.get(pool, 0)
        active = {t: terms for t, terms in self.terms.items() if terms.active}
        tenant_free = {t: terms.quota - busy_tenant.get(t, 0) for t, terms in active.items()}
        quantum = self.expected_run_s or self.runs.quantum()
        usage = self.runs.usage(now, self.half_life_s, quantum, tenant_of_busy)
        demand: dict[tuple[str, str], list[float]] = {}
        for run in self.runs.waiting.values():
            if run.granted:  # as good as under way
                pool_free[run.pool] -= 1
                if run.tenant in tenant_free:
                    tenant_free[run.tenant] -= 1
                    usage[run.tenant] = usage.get(run.tenant, 0.0) + quantum
            elif run.tenant in active and (run.pool, run.queue) in self.book.queues:
                demand.setdefault((run.pool, run.queue), []).append(run.due or now)
        candidates = []
        for (pool, name), dues in demand.items():
            q = self.book.queues[(pool, name)]
            candidates.append(Candidate(pool, name, q.tenant, q.band, len(dues), min(dues)))
        grants = plan_grants(
            candidates,
            tenant_free=tenant_free,
            pool_free=pool_free,
            usage=usage,
            weight={t: terms.weight for t, terms in active.items()},
            quantum=quantum,
        )
        return grants

    async def run(self, client: PrefectClient, on_cycle=None) -> None:
        """Cycle every ``interval`` seconds until ``stop()``; errors are logged and the
        next cycle starts from the API state again."""
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    report = await self.cycle(client)
                    if on_cycle:
                        on_cycle(report)
                except Exception:  # noqa: BLE001 - one bad cycle must not end the loop
                    log.exception("dispatch cycle failed; retrying")
                    # A write may have landed or not: read the queues and runs again.
                    self.book.loaded_at = -math.inf
                    self.runs._synced_at = -math.inf
                wait = max(self.interval - (time.monotonic() - started), 0.05)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)
        finally:
            for task in self._tasks.values():
                task.cancel()
            with contextlib.suppress(Exception):
                await self.leadership.release(client)


async def release_queues(client: PrefectClient, pools: list[str]) -> int:
    """Open every Setlist queue (unpaused, no limit): Prefect alone dispatches then, by
    queue priority, with the tenant and pool limits. For running without a dispatcher."""
    book = QueueBook(pools)
    await book.load(client)
    changed = 0
    for q in book.setlist_queues():
        if q.paused or q.limit is not None:
            await client.update_work_queue(q.id, is_paused=False, concurrency_limit=None)
            changed += 1
    await audit.emit(
        client, "setlist.queues.released", None, payload={"pools": pools, "opened": changed}
    )
    return changed


async def serve(pools: list[str], interval: float, expected_run_s: float | None = None) -> None:
    from prefect.client.orchestration import get_client

    dispatcher = Dispatcher(pools, interval=interval, expected_run_s=expected_run_s)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, dispatcher.stop)
    last = {"leading": None}

    def report(r: CycleReport) -> None:
        if r.leading != last["leading"]:
            log.info("dispatcher %s", "leading" if r.leading else "standing by")
            last["leading"] = r.leading
        if r.leading:
            # One line per decision: when its reads began, when it was made, what it
            # granted. Decisions that change nothing are logged at DEBUG only.
            changed = bool(r.writes or any(r.grants.values()))
            log.log(
                logging.INFO if changed else logging.DEBUG,
                "decision snapshot=%.3f decided=%.3f cycle_ms=%.0f waiting=%d busy=%d "
                "writes=%d grants=%s",
                r.snapshot,
                r.decided,
                r.ms,
                r.waiting,
                r.busy,
                r.writes,
                json.dumps({f"{p}/{q}": n for (p, q), n in r.grants.items() if n}),
            )

    async with get_client() as client:
        await dispatcher.run(client, on_cycle=report)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from setlist.core.settings import get_settings

    ap = argparse.ArgumentParser(
        prog="setlist.dispatch",
        description="Decide every interval which tenant queue may hand the worker how many "
        "runs: bands first, tenant quotas, weighted fair share, the pool limit.",
    )
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between cycles")
    ap.add_argument("--pool", action="append", help="pool to govern (default: Setlist's)")
    ap.add_argument(
        "--expected-run-seconds",
        type=float,
        default=None,
        help="what a grant and a run under way are charged (default: median of recent runs)",
    )
    ap.add_argument("--log-level", default="INFO", help="DEBUG also logs idle decisions")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(args.log_level.upper())
    asyncio.run(serve(args.pool or get_settings().pools, args.interval, args.expected_run_seconds))
