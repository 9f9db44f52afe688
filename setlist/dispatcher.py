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
  band, one slot at a time to the tenant with the lowest weighted usage (decayed
  run-seconds / weight, runs under way counted at least at the expected run length);
* a grant is written on the run it chose (``setlist.grants``): the queue's oldest
  waiting runs get the tag of their Scheduled state, and Setlist's workers take a
  tenant run only with that grant. A granted run not yet taken holds its slot in later
  decisions; a run that ends frees nothing until the next decision;
* a cycle writes nothing but its grants (one tag write each): no queue write, whatever
  the number of tenants, except pausing a queue someone opened;
* one replica leads at a time: a Prefect global concurrency limit of 1 is the claim, a
  Prefect variable carries the leader's heartbeat; a standby takes over when the
  heartbeat is stale. Without any dispatcher the queues stay held (nothing runs that was
  not granted); the tenant's global concurrency limit still holds.
  ``release_queues`` opens them for running without a dispatcher.

A run that arrives waits for the next cycle (the *reaction time*: one cycle plus one
worker poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound

from setlist.grants import is_granted, with_grant
from setlist.tenancy import Priority, parse_queue_name

log = logging.getLogger("setlist.dispatcher")

LEADER_LIMIT = "setlist-dispatcher"
HEARTBEAT_VARIABLE = "setlist_dispatcher"
HEARTBEAT_TTL = 15.0  # a leader silent this long is presumed gone
BUSY = ("PENDING", "RUNNING", "CANCELLING")
PREFECT_BUSY = ("PENDING", "RUNNING")  # what a pool limit counts
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
_PAGE = 200


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Candidate:
    """Runs of one (tenant, band) queue in one pool that are due and not yet taken."""

    pool: str
    queue: str
    tenant: str
    band: Priority
    waiting: int
    oldest: float  # POSIX time of the earliest due run, for ties


def plan_grants(
    candidates: Iterable[Candidate],
    *,
    tenant_free: dict[str, int],
    pool_free: dict[str, float],
    usage: dict[str, float],
    weight: dict[str, float],
    quantum: float,
) -> dict[tuple[str, str], int]:
    """Slots per (pool, queue) for this cycle. Pure: the whole policy is here.

    Band by band, highest first; inside a band, one slot at a time to the candidate whose
    tenant has the lowest ``usage / weight`` (ties: higher weight, older run, tenant id),
    charging ``quantum / weight`` per slot granted. Never more than a tenant's free quota
    or a pool's free slots.
    """
    tenant_free = dict(tenant_free)
    pool_free = dict(pool_free)
    share = {t: usage.get(t, 0.0) / weight[t] for t in weight}
    by_band: dict[Priority, list[Candidate]] = {}
    for c in candidates:
        if c.waiting > 0 and c.tenant in weight:
            by_band.setdefault(c.band, []).append(c)
    grants: dict[tuple[str, str], int] = {}
    for band in Priority:
        left = {(c.pool, c.queue): c.waiting for c in by_band.get(band, [])}
        heap = [
            (share[c.tenant], -weight[c.tenant], c.oldest, c.tenant, c.pool, c.queue)
            for c in by_band.get(band, [])
        ]
        heapq.heapify(heap)
        while heap:
            key_share, neg_w, oldest, tenant, pool, queue = heapq.heappop(heap)
            if tenant_free.get(tenant, 0) <= 0 or pool_free.get(pool, 0) <= 0:
                continue
            if key_share != share[tenant]:  # the tenant was charged since: re-queue
                heapq.heappush(heap, (share[tenant], neg_w, oldest, tenant, pool, queue))
                continue
            grants[(pool, queue)] = grants.get((pool, queue), 0) + 1
            tenant_free[tenant] -= 1
            pool_free[pool] -= 1
            left[(pool, queue)] -= 1
            share[tenant] += quantum / weight[tenant]
            if left[(pool, queue)] > 0:
                heapq.heappush(heap, (share[tenant], neg_w, oldest, tenant, pool, queue))
    return grants


def decay_factor(age_s: float, half_life_s: float) -> float:
    return 0.5 ** (max(age_s, 0.0) / half_life_s)


# ----------------------------------------------------------------------------- API state


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


@dataclass
class Run:
    id: str
    pool: str
    queue: str
    tenant: str | None  # None: not a Setlist queue
    band: Priority | None
    state: str
    due: float | None  # next scheduled start
    start: float | None
    end: float | None
    state_id: str | None = None
    tags: tuple[str, ...] = ()
    granted: bool = False  # it carries the grant for its current (Scheduled) state


@dataclass
class Queue:
    id: str
    pool: str
    name: str
    tenant: str
    band: Priority
    paused: bool
    limit: int | None
    written: float = -math.inf  # monotonic time of the dispatcher's last write


@dataclass
class TenantTerms:
    quota: int
    weight: float
    active: bool


async def _call(client: PrefectClient, method: str, path: str, **kwargs: Any):
    """A raw API call; ``None`` when the object does not exist (404)."""
    import httpx

    try:
        return await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return None
        raise


async def _filter_runs(client: PrefectClient, body: dict[str, Any]) -> list[dict]:
    """Every flow run matching ``body`` (raw JSON, paged)."""
    out: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        resp = await _call(
            client,
            "POST",
            "/flow_runs/filter",
            json={**body, "limit": _PAGE, "offset": offset, "sort": "ID_DESC"},
        )
        page = resp.json()
        for r in page:
            if r["id"] not in seen:
                seen.add(r["id"])
                out.append(r)
        if len(page) < _PAGE:
            return out
        offset += _PAGE


class QueueBook:
    """The Setlist queues of the dispatcher's pools, as last read or written."""

    def __init__(self, pools: list[str]):
        self.pools = pools
        self.queues: dict[tuple[str, str], Queue] = {}
        self.by_id: dict[str, Queue] = {}
        self.foreign: set[str] = set()  # queues of the pools that are not Setlist's
        self.pool_limit: dict[str, int | None] = {}
        self.loaded_at = -math.inf

    def _add(self, raw: dict, pool: str) -> Queue | None:
        parsed = parse_queue_name(raw["name"])
        if parsed is None:
            self.foreign.add(str(raw["id"]))
            return None
        q = Queue(
            id=str(raw["id"]),
            pool=pool,
            name=raw["name"],
            tenant=parsed[0],
            band=parsed[1],
            paused=bool(raw["is_paused"]),
            limit=raw.get("concurrency_limit"),
        )
        self.queues[(pool, q.name)] = q
        self.by_id[q.id] = q
        return q

    async def load(self, client: PrefectClient) -> None:
        """Read every queue of the pools. Safe while cycles go on: a queue the dispatcher
        wrote since the read began keeps what was written."""
        started = time.monotonic()
        fresh = QueueBook(self.pools)
        for pool in self.pools:
            try:
                wp = await client.read_work_pool(pool)
            except ObjectNotFound:
                continue
            fresh.pool_limit[pool] = wp.concurrency_limit
            offset = 0
            while True:
                resp = await _call(
                    client,
                    "POST",
                    f"/work_pools/{pool}/queues/filter",
                    json={"limit": _PAGE, "offset": offset},
                )
                page = resp.json()
                for raw in page:
                    fresh._add(raw, pool)
                if len(page) < _PAGE:
                    break
                offset += _PAGE
        for key, q in fresh.queues.items():
            mine = self.queues.get(key)
            if mine is not None and mine.written >= started:
                q.paused, q.written = mine.paused, mine.written
        self.queues, self.by_id, self.foreign = fresh.queues, fresh.by_id, fresh.foreign
        self.pool_limit = fresh.pool_limit
        self.loaded_at = started

    async def find(self, client: PrefectClient, queue_id: str) -> Queue | None:
        """A queue not in the book yet (created since the last load)."""
        if queue_id in self.by_id:
            return self.by_id[queue_id]
        if queue_id in self.foreign:
            return None
        resp = await _call(client, "GET", f"/work_queues/{queue_id}")
        if resp is None:
            return None
        raw = resp.json()
        pool = raw.get("work_pool_name")
        if pool not in self.pools:
            self.foreign.add(queue_id)
            return None
        return self._add(raw, pool)

    def setlist_queues(self) -> Iterable[Queue]:
        return self.queues.values()


class RunBook:
    """Runs the dispatcher needs, kept up to date incrementally from the API.

    Each cycle reads the busy runs of the pools (few: bounded by the limits), the runs
    that became due since the previous cycle, and the runs that ended since then. A full
    read of the due runs every ``resync_s`` catches anything the windows missed (a run
    created with a scheduled time long past, a deleted run). While few runs wait, each
    cycle reads all the due ones instead of a window.
    """

    def __init__(
        self,
        pools: list[str],
        *,
        window: timedelta,
        resync_s: float = 60.0,
        margin_s: float = 10.0,
        prefetch_s: float = 10.0,
    ):
        self.pools = pools
        self.window_s = window.total_seconds()
        self.resync_s = resync_s
        self.margin_s = margin_s  # clock skew and commit delay between us and the server
        self.prefetch_s = prefetch_s  # the worker takes runs due this far ahead
        self.full_read_max = 150  # waiting runs up to which each cycle reads them all
        self.waiting: dict[str, Run] = {}
        self.busy: dict[str, Run] = {}
        self.finished: dict[str, tuple[str, float, float]] = {}  # id -> tenant, start, end
        self._due_cursor: float | None = None
        self._end_cursor: float | None = None
        self._synced_at = -math.inf
        self._arrivals: dict[str, Run] | None = None  # seen while a sync runs

    async def _runs(self, client, book: QueueBook, flow_runs: dict[str, Any]) -> list[Run]:
        runs = []
        for pool in self.pools:
            body = {"flow_runs": flow_runs, "work_pools": {"name": {"any_": [pool]}}}
            for r in await _filter_runs(client, body):
                runs.append(await self._run(client, book, pool, r))
        return runs

    async def _run(self, client, book: QueueBook, pool: str, r: dict) -> Run:
        q = await book.find(client, str(r["work_queue_id"])) if r.get("work_queue_id") else None
        return Run(
            id=r["id"],
            pool=pool,
            queue=r.get("work_queue_name") or "",
            tenant=q.tenant if q else None,
            band=q.band if q else None,
            state=r["state_type"],
            due=_ts(r.get("next_scheduled_start_time")),
            start=_ts(r.get("start_time")),
            end=_ts(r.get("end_time")),
            state_id=r.get("state_id"),
            tags=tuple(r.get("tags") or ()),
            granted=is_granted(r.get("tags") or (), r.get("state_id")),
        )

    async def _ended(self, client: PrefectClient, since: float) -> list[dict]:
        """Setlist runs (any pool) that ended after ``since``."""
        return await _filter_runs(
            client,
            {
                "flow_runs": {
                    "tags": {"all_": ["setlist"]},
                    "state": {"type": {"any_": list(FINAL)}},
                    "end_time": {"after_": _iso(since)},
                }
            },
        )

    def _forget(self, run_id: str) -> None:
        self.waiting.pop(run_id, None)
        if self._arrivals is not None:
            self._arrivals.pop(run_id, None)

    def _scheduled(self, now: float, after: float | None = None) -> dict[str, Any]:
        due: dict[str, str] = {"before_": _iso(now + self.prefetch_s)}
        if after is not None:
            due["after_"] = _iso(after)
        return {"state": {"type": {"any_": ["SCHEDULED"]}}, "next_scheduled_start_time": due}

    async def sync(self, client: PrefectClient, book: QueueBook, now: float) -> None:
        """Every due run, read in full. Runs while cycles go on: what they learn
        meanwhile (arrivals, departures) is merged into the result."""
        self._arrivals = {}
        try:
            waiting = {r.id: r for r in await self._runs(client, book, self._scheduled(now))}
            waiting.update(self._arrivals)
        finally:
            self._arrivals = None
        self.waiting = {
            rid: r
            for rid, r in waiting.items()
            if rid not in self.busy and rid not in self.finished
        }
        self._synced_at = now
        self._due_cursor = max(self._due_cursor or now, now)

    def sync_due(self, now: float) -> bool:
        return now - self._synced_at >= self.resync_s

    async def refresh(self, client: PrefectClient, book: QueueBook, now: float) -> None:
        """One cycle's reads, made at once: busy runs, runs that became due since the
        previous cycle (new ones, rescheduled ones, scheduled ones whose time came), and
        runs that ended since then. While few runs wait (at most ``full_read_max``), the
        cycle reads every due run instead: as cheap, and it does not depend on a run's
        scheduled time being close to the moment it became visible."""
        if self._due_cursor is None:
            await self.sync(client, book, now)
        assert self._due_cursor is not None
        since = (
            now - self.window_s if self._end_cursor is None else self._end_cursor - self.margin_s
        )
        full = len(self.waiting) <= self.full_read_max
        after = None if full else self._due_cursor - self.margin_s
        busy, arrived, ended = await asyncio.gather(
            self._runs(client, book, {"state": {"type": {"any_": list(BUSY)}}}),
            self._runs(client, book, self._scheduled(now, after=after)),
            self._ended(client, since),
        )
        self._due_cursor = self._end_cursor = now
        if full:
            self.waiting = {}
        for r in arrived:
            self.waiting[r.id] = r
            if self._arrivals is not None:
                self._arrivals[r.id] = r
        self.busy = {r.id: r for r in busy}
        for rid in self.busy:
            self._forget(rid)
        for raw in ended:
            tenant = next((t[7:] for t in raw.get("tags", []) if t.startswith("tenant:")), None)
            start, end = _ts(raw.get("start_time")), _ts(raw.get("end_time"))
            if tenant and start and end:
                self.finished[raw["id"]] = (tenant, start, end)
            self._forget(raw["id"])
            self.busy.pop(raw["id"], None)  # ended between the reads
        cutoff = now - self.window_s
        for rid in [k for k, v in self.finished.items() if v[2] < cutoff]:
            del self.finished[rid]

    def usage(
        self, now: float, half_life_s: float, quantum: float, tenant_of_busy: dict[str, str]
    ) -> dict[str, float]:
        """Decayed run-seconds per tenant; a run under way counts at least ``quantum``."""
        usage: dict[str, float] = {}
        for tenant, start, end in self.finished.values():
            usage[tenant] = usage.get(tenant, 0.0) + (end - start) * decay_factor(
                now - end, half_life_s
            )
        for rid, run in self.busy.items():
            tenant = tenant_of_busy.get(rid)
            if tenant:
                ran = now - run.start if run.start else 0.0
                usage[tenant] = usage.get(tenant, 0.0) + max(ran, quantum)
        return usage

    def quantum(self, default: float = 60.0) -> float:
        """The expected run length: the median of recent finished runs."""
        lengths = sorted(end - start for _, start, end in self.finished.values())
        if not lengths:
            return default
        return min(max(lengths[len(lengths) // 2], 1.0), 3600.0)


async def read_terms(client: PrefectClient) -> dict[str, TenantTerms]:
    """Quota, weight and status of every tenant, from the profile blocks."""
    from blocks.tenant import TenantProfile

    docs = await client.read_block_documents_by_type(
        TenantProfile.get_block_type_slug(), include_secrets=False
    )
    terms = {}
    for d in docs:
        data = d.data or {}
        quota = data.get("quota") or {}
        if "tenant_id" in data:
            terms[data["tenant_id"]] = TenantTerms(
                quota=int(quota.get("concurrent_jobs", 4)),
                weight=float(quota.get("weight", 1.0)),
                active=data.get("status", "active") == "active",
            )
    return terms


# ----------------------------------------------------------------------------- leadership


def _server_now(resp) -> float:
    """The server's clock from the response's Date header (whole seconds: + 0.5)."""
    try:
        return parsedate_to_datetime(resp.headers["date"]).timestamp() + 0.5
    except (KeyError, TypeError, ValueError):
        return time.time()


async def read_heartbeat(client: PrefectClient) -> tuple[str | None, float | None]:
    """(holder, seconds since its last heartbeat by the server's clock), or (None, None)."""
    resp = await _call(client, "GET", f"/variables/name/{HEARTBEAT_VARIABLE}")
    if resp is None:
        return None, None
    raw = resp.json()
    value = raw.get("value") or {}
    updated = _ts(raw.get("updated"))
    age = max(_server_now(resp) - updated, 0.0) if updated else None
    return value.get("holder") if isinstance(value, dict) else None, age


async def dispatcher_active(client: PrefectClient) -> bool:
    """Whether a dispatcher leads now (its heartbeat is fresh)."""
    holder, age = await read_heartbeat(client)
    return holder is not None and age is not None and age < HEARTBEAT_TTL


class Leadership:
    """At most one leading replica: the claim is a Prefect global concurrency limit of 1
    (increments are atomic), liveness a heartbeat variable the leader rewrites each cycle.

    A standby claims when the slot is free, or — when the heartbeat is older than
    ``HEARTBEAT_TTL`` (the leader died, or the server lost its state) — resets the slot
    first. A leader that finds another holder in the heartbeat steps down.
    """

    def __init__(self, holder: str | None = None, beat_s: float = 3.0):
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.beat_s = beat_s  # how often a leader confirms itself and beats
        self.leading = False
        self._beaten = -math.inf

    async def _ensure_limit(self, client: PrefectClient) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            await client.read_global_concurrency_limit_by_name(LEADER_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=LEADER_LIMIT, limit=1, active=True)
                )

    async def _beat(self, client: PrefectClient) -> None:
        body = {"name": HEARTBEAT_VARIABLE, "value": {"holder": self.holder}}
        if await _call(client, "PATCH", f"/variables/name/{HEARTBEAT_VARIABLE}", json=body) is None:
            await _call(client, "POST", "/variables/", json=body)

    async def _claim(self, client: PrefectClient) -> bool:
        import httpx

        try:
            await client.increment_concurrency_slots([LEADER_LIMIT], 1, "concurrency")
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return False
            raise
        return True

    async def hold(self, client: PrefectClient) -> bool:
        """Claim or confirm leadership; returns whether this replica leads now."""
        if self.leading:
            if time.monotonic() - self._beaten < self.beat_s:
                return True
            holder, _ = await read_heartbeat(client)
            if holder not in (None, self.holder):
                log.warning("dispatcher %s took over; %s stands by", holder, self.holder)
                self.leading = False
                return False
            await self._beat(client)
            self._beaten = time.monotonic()
            return True
        await self._ensure_limit(client)
        if not await self._claim(client):
            holder, age = await read_heartbeat(client)
            if holder is not None and age is not None and age < HEARTBEAT_TTL:
                return False
            # The slot is held but nobody beats: the holder is gone. Reset, then claim.
            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            await client.update_global_concurrency_limit(
                LEADER_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0)
            )
            if not await self._claim(client):
                return False
        await self._beat(client)
        self._beaten = time.monotonic()
        self.leading = True
        log.info("dispatcher %s leads", self.holder)
        return True

    async def release(self, client: PrefectClient) -> None:
        """Step down so a standby takes over at once."""
        if not self.leading:
            return
        self.leading = False
        holder, _ = await read_heartbeat(client)
        if holder == self.holder:
            await _call(client, "DELETE", f"/variables/name/{HEARTBEAT_VARIABLE}")
            await client.release_concurrency_slots([LEADER_LIMIT], 1, 1.0)


# ----------------------------------------------------------------------------- the loop


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
    ):
        if prefetch_s is None:
            from prefect.settings import PREFECT_WORKER_PREFETCH_SECONDS

            prefetch_s = float(PREFECT_WORKER_PREFETCH_SECONDS.value())
        self.pools = list(dict.fromkeys(pools))
        self.interval = interval
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

    async def _load_terms(self, client: PrefectClient) -> None:
        self.terms = await read_terms(client)
        self._terms_at = time.monotonic()

    async def cycle(self, client: PrefectClient) -> CycleReport:
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
        # Periodic full reads run beside the cycles, never in their way.
        if mono - self.book.loaded_at >= self.queue_resync_s:
            self._background("queues", lambda: self.book.load(client))
        unknown = any(r.tenant and r.tenant not in self.terms for r in self.runs.waiting.values())
        if mono - self._terms_at >= (2.0 if unknown else self.terms_refresh_s):
            # A tenant onboarded since the last read has runs waiting: read again soon.
            self._background("terms", lambda: self._load_terms(client))
        if self.runs.sync_due(now):
            self._background("runs", lambda: self.runs.sync(client, self.book, now))
        await self.runs.refresh(client, self.book, now)
        grants = self.decide(now)
        decided = time.time()
        grants = await self.mark(client, grants)
        writes = await self.hold(client)
        return CycleReport(
            leading=True,
            snapshot=now,
            decided=decided,
            ms=(time.perf_counter() - t0) * 1000,
            grants=grants,
            writes=writes,
            waiting=len(self.runs.waiting),
            busy=len(self.runs.busy),
        )

    async def mark(
        self, client: PrefectClient, grants: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], int]:
        """Grant each queue's slots to its oldest waiting runs (first come, first served
        inside a queue): tag each with the grant for its Scheduled state, one write at a
        time. → the runs granted per queue."""
        chosen: dict[tuple[str, str], list[Run]] = {}
        for run in self.runs.waiting.values():
            if (run.pool, run.queue) in grants and not run.granted:
                chosen.setdefault((run.pool, run.queue), []).append(run)
        marked: dict[tuple[str, str], int] = {}
        for key, n in grants.items():
            for run in sorted(chosen.get(key, []), key=lambda r: (r.due or 0.0, r.id))[:n]:
                tags = tuple(with_grant(run.tags, run.state_id))
                try:
                    await client.update_flow_run(uuid.UUID(run.id), tags=list(tags))
                except ObjectNotFound:  # deleted meanwhile
                    self.runs.waiting.pop(run.id, None)
                    continue
                run.tags, run.granted = tags, True
                marked[key] = marked.get(key, 0) + 1
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

    from setlist.settings import get_settings

    ap = argparse.ArgumentParser(
        prog="setlist.dispatcher",
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


if __name__ == "__main__":
    main()
