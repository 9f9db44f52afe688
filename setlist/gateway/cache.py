"""A small TTL cache for what the gateway looks up per request on the Prefect API.

Every delivery needs its source (block and secret) and its tenant's existence; asking
Prefect each time would make the gateway's throughput Prefect's. So answers are kept, and
an expired one is still served while it is refreshed in the background: an expiry never
stalls a request, and a rotation or an offboarding takes effect within about one TTL. A
miss is the one time a request waits, so concurrent misses for one key share one lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger("setlist.gateway")

V = TypeVar("V")


class TtlCache(Generic[V]):
    """Values by key from ``load(key)``, which returns ``None`` for "no such key".

    - A value older than ``ttl`` is still returned, and reloaded in the background, one
      reload per key at a time; a reload that fails keeps the old value (the next request
      tries again), one that finds the key gone drops it.
    - "No such key" is remembered for ``missing_ttl`` seconds, so a flood of requests for
      an unknown key is not a flood of lookups.
    - Both are bounded: at most ``max_entries`` values and ``max_missing`` "no such key"
      answers are kept, the oldest dropped first (expired answers before any other), so
      requests naming ever new keys can't grow the gateway's memory.
    - Concurrent misses for one key wait on one load (single flight). A load that fails
      reaches every waiter and is not remembered: the next request asks again.
    """

    def __init__(
        self,
        load: Callable[[str], Awaitable[V | None]],
        *,
        ttl: float,
        missing_ttl: float,
        max_entries: int = 1024,
        max_missing: int = 1024,
    ):
        self.load = load
        self.ttl = ttl
        self.missing_ttl = missing_ttl
        self.max_entries = max(1, max_entries)
        self.max_missing = max(1, max_missing)
        # Both in insertion order, which is age order (an update re-inserts at the end).
        self._values: dict[str, tuple[float, V]] = {}  # key: (loaded at, value)
        self._missing: dict[str, float] = {}  # key: found missing at
        self._refreshing: set[str] = set()
        self._inflight: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()  # the loop keeps only a weak reference

    async def get(self, key: str) -> V | None:
        now = time.monotonic()
        hit = self._values.get(key)
        if hit is not None:
            loaded, value = hit
            if now - loaded >= self.ttl:
                self._refresh_later(key)
            return value
        missing_at = self._missing.get(key)
        if missing_at is not None:
            if now - missing_at < self.missing_ttl:
                return None
            del self._missing[key]
        return await self._single_flight(key)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: str) -> bool:
        """Whether a value is kept for ``key`` (however old)."""
        return key in self._values

    @property
    def missing_count(self) -> int:
        return len(self._missing)

    def _remember_missing(self, key: str, at: float) -> None:
        self._missing.pop(key, None)
        now = time.monotonic()
        while self._missing:
            oldest = next(iter(self._missing))
            if len(self._missing) < self.max_missing and (
                now - self._missing[oldest] < self.missing_ttl
            ):
                break
            del self._missing[oldest]
        self._missing[key] = at

    def _remember_value(self, key: str, at: float, value: V) -> None:
        self._values.pop(key, None)
        while len(self._values) >= self.max_entries:
            del self._values[next(iter(self._values))]
        self._values[key] = (at, value)

    async def _fetch(self, key: str) -> V | None:
        started = time.monotonic()  # an entry is as old as the question, not the answer
        value = await self.load(key)
        if value is None:
            self._values.pop(key, None)
            self._remember_missing(key, started)
        else:
            self._remember_value(key, started, value)
            self._missing.pop(key, None)
        return value

    def _refresh_later(self, key: str) -> None:
        if key in self._refreshing:
            return
        self._refreshing.add(key)

        async def run() -> None:
            try:
                await self._fetch(key)
            except Exception as exc:  # keep the old entry; the next expiry tries again
                log.warning("refreshing %s failed: %s", key, type(exc).__name__)
            finally:
                self._refreshing.discard(key)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _single_flight(self, key: str) -> V | None:
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        task = asyncio.get_running_loop().create_task(self._fetch(key))
        self._inflight[key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._inflight.pop(key, None)
            else:  # this caller was cancelled: the others still wait on it
                task.add_done_callback(lambda _: self._inflight.pop(key, None))
