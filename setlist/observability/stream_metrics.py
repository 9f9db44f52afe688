"""The live stream figures in Prometheus: each tenant's ``live/analytics.json`` snapshot
(``setlist.stream.analytics``), read by the exporter on a cached cadence.

Cadence and cost. A tenant whose ``stream-ingest`` run is due or under way, or whose
last read found a snapshot, is read every ``ttl`` seconds (10: the job saves one every
commit, every 2 s or so); any other tenant every ``idle_ttl`` seconds (the storage
cadence), so tenants without a stream cost one GET per five minutes, not one per
scrape. A read is one ranged GET of at most ``MAX_SNAPSHOT_BYTES``; reads run on a few
threads so that many streaming tenants don't add up to a slow scrape.

Trust. A snapshot is written by the tenant's own job, so it is the tenant's data:
``read_snapshot`` validates it, and a tenant whose snapshot can't be read or is refused
has no stream samples that scrape (a warning is logged); the other tenants and the
rest of the scrape are untouched.

Cardinality. The only label is ``tenant``: the top tracks stay in the JSON snapshot,
never in a label. ``setlist_stream_events_total`` is a counter: the job restores it from
its snapshot on restart, so it only falls if the snapshot is lost (``rate()`` copes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from setlist.core.tenancy import JobType
from setlist.stream.analytics import MINUTE_MS, read_snapshot

if TYPE_CHECKING:
    from setlist.core.storage import TenantStorage

STREAM_JOB = JobType.stream_ingest.value  # the job type (``job:`` tag) of the stream job
READERS = 8
logger = logging.getLogger("setlist.metrics")


@dataclass(frozen=True)
class LiveFigures:
    """What Prometheus gets of one tenant's snapshot."""

    plays: int | None  # in the last complete minute
    listeners: int | None
    skip_rate: float | None  # over 5 minutes
    events_total: int
    lag: int | None
    updated_ms: int


def live_figures(snapshot: dict[str, Any]) -> LiveFigures:
    """The figures of a validated snapshot; the last complete minute is the one before
    the snapshot's current (partial) one."""
    last_complete = snapshot["updated_ms"] // MINUTE_MS - 1
    entry = next(
        (
            m
            for m in reversed(snapshot["plays_per_minute"])
            if int(datetime.fromisoformat(m["minute"]).timestamp()) // 60 == last_complete
        ),
        None,
    )
    return LiveFigures(
        plays=entry["plays"] if entry else None,
        listeners=entry["listeners"] if entry else None,
        skip_rate=snapshot["skip_rate_5m"],
        events_total=snapshot["events_total"],
        lag=snapshot["lag"],
        updated_ms=snapshot["updated_ms"],
    )


class LiveSnapshots:
    """The tenants' live figures, each read at its cadence (see the module docstring)."""

    def __init__(self, ttl: float = 10.0, idle_ttl: float = 300.0, readers: int = READERS):
        self.ttl = ttl
        self.idle_ttl = idle_ttl
        self.readers = readers
        self._read_at: dict[str, float] = {}  # tenant → monotonic time of its last read
        self._figures: dict[str, LiveFigures] = {}

    def _due(self, tenant: str, streaming: Collection[str], now: float) -> bool:
        at = self._read_at.get(tenant)
        if at is None:
            return True
        ttl = self.ttl if tenant in streaming or tenant in self._figures else self.idle_ttl
        return now - at >= ttl

    def refresh(
        self,
        tenants: Iterable[str],
        handle: Callable[[str], TenantStorage | None],
        streaming: Collection[str] = (),
    ) -> None:
        """Read the snapshots that are due of ``tenants`` (``handle``: the tenant's data
        store, None when it can't be reached); forget tenants no longer listed."""
        tenants = sorted(tenants)
        now = time.monotonic()
        due = [t for t in tenants if self._due(t, streaming, now)]
        stores = {}
        for tenant in due:
            self._read_at[tenant] = now
            try:
                store = handle(tenant)
            except Exception as exc:  # noqa: BLE001 - one tenant's store must not end the scrape
                logger.warning("live snapshot of %s not read: %s", tenant, exc)
                store = None
            if store is None:
                self._figures.pop(tenant, None)
            else:
                stores[tenant] = store
        if len(stores) > 1:
            with ThreadPoolExecutor(min(self.readers, len(stores))) as pool:
                read = dict(zip(stores, pool.map(self._read, stores.values()), strict=True))
        else:
            read = {tenant: self._read(store) for tenant, store in stores.items()}
        for tenant, figures in read.items():
            if figures is None:
                self._figures.pop(tenant, None)
            else:
                self._figures[tenant] = figures
        keep = set(tenants)
        for tenant in [t for t in self._read_at if t not in keep]:
            del self._read_at[tenant]
            self._figures.pop(tenant, None)

    @staticmethod
    def _read(store: TenantStorage) -> LiveFigures | None:
        try:
            snapshot = read_snapshot(store)
        except Exception as exc:  # noqa: BLE001 - junk or an unreadable store: no samples
            logger.warning("live snapshot of %s not read: %s", store.tenant_id, exc)
            return None
        return live_figures(snapshot) if snapshot is not None else None

    def figures(self) -> dict[str, LiveFigures]:
        return dict(self._figures)

    def families(self, now: datetime) -> Iterator[Any]:
        """The stream metric families, by tenant, as of ``now``."""
        plays = _gauge("setlist_stream_plays_per_minute", "plays in the last complete minute")
        listeners = _gauge(
            "setlist_stream_listeners_per_minute",
            "distinct listeners in the last complete minute (estimated beyond 4096)",
        )
        skips = _gauge("setlist_stream_skip_rate", "share of plays under 30 s over 5 minutes")
        lag = _gauge("setlist_stream_consumer_lag", "messages in the broker not yet committed")
        age = _gauge("setlist_stream_snapshot_age_seconds", "seconds since the job saved figures")
        events = CounterMetricFamily(
            "setlist_stream_events", "valid events the stream job folded in", labels=["tenant"]
        )
        for tenant, f in sorted(self._figures.items()):
            for family, value in ((plays, f.plays), (listeners, f.listeners), (skips, f.skip_rate)):
                if value is not None:
                    family.add_metric([tenant], value)
            if f.lag is not None:
                lag.add_metric([tenant], f.lag)
            events.add_metric([tenant], f.events_total)
            age.add_metric([tenant], max(0.0, now.timestamp() - f.updated_ms / 1000))
        yield from (plays, listeners, skips, events, lag, age)


def _gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=["tenant"])
