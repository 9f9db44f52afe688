"""What a stream-ingest run does between taking its tenant's stream and ending: the
micro-batch loop (``ingest``), the live analytics fed by each committed batch, and the
call for compaction when appended files pile up.

It is here, not in the flow, so the benchmark runs exactly this in its consumer
processes; the flow adds the tenant check, the locks, the broker block and the events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from setlist.brokers.base import Broker
from setlist.core.storage import TenantStorage
from setlist.stream.analytics import LiveAnalytics, SnapshotInvalid, read_snapshot, save_snapshot
from setlist.stream.ingest import BatchReport, IngestReport, IngestSettings, TableLock, ingest

log = logging.getLogger("setlist.stream")
COMPACT_FILES = 64  # appended files (all dates) that call for a compaction
COMPACT_EVERY_S = 600
Notify = Callable[[dict], Awaitable[None]]


def resume_analytics(storage: TenantStorage, tenant_id: str) -> LiveAnalytics:
    """The analytics the tenant's previous run left, or new ones. A snapshot that isn't
    one (the tenant's store is the tenant's to write) starts them afresh."""
    try:
        snapshot = read_snapshot(storage)
    except SnapshotInvalid as exc:
        log.warning("live analytics start afresh: %s", exc)
        snapshot = None
    return LiveAnalytics.from_snapshot(snapshot) if snapshot else LiveAnalytics(tenant_id)


async def consume(
    storage: TenantStorage,
    broker: Broker,
    stream: str,
    table_lock: TableLock,
    settings: IngestSettings,
    *,
    seconds: float,
    compaction_due: Notify | None = None,
    on_batch: Callable[[BatchReport], None] | None = None,
) -> IngestReport:
    """Micro-batches from the tenant's stream for ``seconds``, then return (the current
    batch committed and acked first). ``compaction_due`` is awaited, at most every
    ``COMPACT_EVERY_S``, while ``COMPACT_FILES`` or more appended files wait."""
    tenant_id = storage.tenant_id
    report = IngestReport(tenant_id=tenant_id, stream=stream)
    live = resume_analytics(storage, tenant_id)
    end = time.monotonic() + seconds
    asked = float("-inf")
    async with broker.consumer(tenant_id) as consumer:
        batches = ingest(storage, consumer, stream, table_lock, settings, report)
        async for batch in batches:
            if batch is not None:
                if batch.valid is not None:
                    live.update(batch.valid)
                live.set_lag(await consumer.lag())
                live.set_batch(batch.rows, batch.rejected, batch.commit_s)
                save_snapshot(storage, live.snapshot())
                if on_batch is not None:
                    on_batch(batch)
                files, rows = batch.appended_files, batch.appended_rows
                waited = time.monotonic() - asked
                if compaction_due and files >= COMPACT_FILES and waited > COMPACT_EVERY_S:
                    asked = time.monotonic()
                    await compaction_due({"appended_files": files, "appended_rows": rows})
            if time.monotonic() >= end:
                break
        await batches.aclose()
    return report
