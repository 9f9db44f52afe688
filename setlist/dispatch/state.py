"""What the dispatcher knows of the Prefect API: queues, runs and tenant terms.

The dispatcher keeps no state of its own; each decision is computed from what these
books read. Reading every run each cycle would cost in proportion to history, so
``RunBook`` reads incrementally (busy runs, runs due and runs ended since the last cycle)
with a periodic full read to catch what the windows miss, and ``QueueBook`` keeps the
dispatcher's own writes over a read that began before them. Runs are read as raw JSON
(``setlist.dispatch._api``) and reduced at once to the few fields a decision needs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound

from setlist.core.tenancy import Priority, parse_queue_name
from setlist.dispatch._api import _PAGE, Pace, _call, _filter_runs, _iso, _ts
from setlist.dispatch.grants import is_granted
from setlist.dispatch.plan import decay_factor

BUSY = ("PENDING", "RUNNING", "CANCELLING")
PREFECT_BUSY = ("PENDING", "RUNNING")  # what a pool limit counts
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def retrying_in_process(r: dict) -> bool:
    """A flow retry: Prefect parks the run in ``AwaitingRetry`` (a Scheduled state) while
    its own process waits to run it again. It is not waiting for a grant — granting it
    would let a worker start it a second time — and it keeps its slot meanwhile."""
    return (
        r.get("state_name") == "AwaitingRetry"
        and (r.get("empirical_policy") or {}).get("retry_type") == "in_process"
    )


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
    granted_at: float | None = None  # POSIX time this dispatcher's grant write landed


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

    async def load(self, client: PrefectClient, pace: Pace = None) -> None:
        """Read every queue of the pools. Safe while cycles go on: a queue the dispatcher
        wrote since the read began keeps what was written. ``pace`` is awaited before
        each page (a read beside the cycles waits there while one runs)."""
        started = time.monotonic()
        fresh = QueueBook(self.pools)
        for pool in list(self.pools):
            if pace is not None:
                await pace()
            try:
                wp = await client.read_work_pool(pool)
            except ObjectNotFound:
                continue
            fresh.pool_limit[pool] = wp.concurrency_limit
            offset = 0
            while True:
                if pace is not None and offset:
                    await pace()
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

    async def _runs(
        self, client, book: QueueBook, flow_runs: dict[str, Any], pace: Pace = None
    ) -> list[Run]:
        runs = []
        for pool in list(self.pools):
            if pace is not None:
                await pace()
            body = {"flow_runs": flow_runs, "work_pools": {"name": {"any_": [pool]}}}
            for r in await _filter_runs(client, body, pace):
                if not retrying_in_process(r):
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
            granted=is_granted(r.get("tags") or (), r.get("id"), r.get("state_id")),
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

    async def sync(
        self, client: PrefectClient, book: QueueBook, now: float, pace: Pace = None
    ) -> None:
        """Every due run, read in full. Runs while cycles go on: what they learn
        meanwhile (arrivals, departures) is merged into the result. ``pace`` is awaited
        before each page: beside the cycles, the read waits while one runs."""
        self._arrivals = {}
        try:
            scheduled = self._scheduled(now)
            waiting = {r.id: r for r in await self._runs(client, book, scheduled, pace)}
            waiting.update(self._arrivals)
        finally:
            self._arrivals = None
        for rid, r in waiting.items():
            # A grant a cycle wrote after the read of its page: keep it (the run holds its
            # slot), as long as the run is still in the state it was granted for.
            mine = self.waiting.get(rid)
            if mine is not None and mine.granted and not r.granted and mine.state_id == r.state_id:
                r.tags, r.granted, r.granted_at = mine.tags, True, mine.granted_at
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
        """One cycle's reads: runs that became due since the previous cycle (new ones,
        rescheduled ones, scheduled ones whose time came), then busy runs and runs that
        ended since then. While few runs wait (at most ``full_read_max``), the
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
        # Waiting runs first, busy ones after: a run the worker takes between the two
        # reads is then seen twice (and counted busy), never missed by both, which would
        # free its slot for one decision, past the tenant's quota and the pool's limit.
        arrived = await self._runs(client, book, self._scheduled(now, after=after))
        busy, ended = await asyncio.gather(
            self._runs(client, book, {"state": {"type": {"any_": list(BUSY)}}}),
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


async def read_terms(client: PrefectClient, pace: Pace = None) -> dict[str, TenantTerms]:
    """Quota, weight and status of every tenant, from the profile blocks: raw JSON, a
    page at a time (``pace`` awaited before each page after the first), so a refresh
    beside the cycles neither holds the server nor validates 1,000 documents at once."""
    from blocks.tenant import TenantProfile

    slug = TenantProfile.get_block_type_slug()
    terms = {}
    seen: set[str] = set()
    offset = 0
    while True:
        if pace is not None and offset:
            await pace()
        body = {
            "block_types": {"slug": {"any_": [slug]}},
            "include_secrets": False,
            "sort": "NAME_ASC",
            "offset": offset,
            "limit": _PAGE,
        }
        resp = await _call(client, "POST", "/block_documents/filter", json=body)
        page = resp.json() if resp is not None else []
        new = [d for d in page if d["id"] not in seen]
        seen.update(d["id"] for d in new)
        for d in new:
            data = d.get("data") or {}
            quota = data.get("quota") or {}
            if "tenant_id" in data:
                terms[data["tenant_id"]] = TenantTerms(
                    quota=int(quota.get("concurrent_jobs", 4)),
                    weight=float(quota.get("weight", 1.0)),
                    active=data.get("status", "active") == "active",
                )
        if len(page) < _PAGE or not new:
            return terms
        offset += _PAGE
