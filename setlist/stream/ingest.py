"""The stream-ingest loop: a tenant's broker stream → micro-batches committed to its
curated events table, exactly once.

Each micro-batch is what arrived within ``max_batch_seconds`` (at most
``max_batch_events``). Its messages are validated by data-etl's own rules
(``read_batches`` over the messages as JSON lines): the same rows, the same reject
reasons. Rejects go to the tenant's quarantine, valid rows and the batch's last position
to the table in one manifest write (``setlist.etl.appends``), and only then is the batch
acked. So:

- a crash before the manifest write leaves the batch unacked: the next consumer gets it
  again and commits it;
- a crash after it and before the ack: the batch comes again, its position is found
  committed, it is acked and nothing is appended twice;
- a failed commit ends the loop (the caller starts over with a new consumer), never a
  fetch past a batch that is not in the table: its redelivery would then look committed.

Memory is bounded by one micro-batch at a time; what the tenant sends faster than that
waits in the broker (its lag, exported as a metric), which refuses producers past its own
bound (``StreamFull``).

Quarantine files are named by the batch's first position: a batch replayed after a crash
starts at the same position and, holding at least the same messages, replaces the file
instead of adding a second copy of its rejects.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from enum import StrEnum

import orjson
import pyarrow as pa
from pydantic import BaseModel, Field

from setlist.brokers.base import MAX_BATCH, Consumer, Message
from setlist.core.storage import TenantStorage
from setlist.etl.appends import append_batch, appended_backlog, is_committed
from setlist.etl.curated import QUARANTINE_PREFIX, read_manifest
from setlist.etl.load import read_limits
from setlist.etl.raw_events import EVENT_SCHEMA, BatchValidator, Reject, read_batches

log = logging.getLogger("setlist.stream")
STREAM_QUARANTINE = QUARANTINE_PREFIX + "stream/"
TableLock = Callable[[], AbstractAsyncContextManager]


class IngestSettings(BaseModel):
    """How a stream-ingest run batches; the flow's parameters."""

    max_batch_events: int = Field(default=20_000, ge=1, le=200_000)
    max_batch_seconds: float = Field(default=1.0, gt=0, le=30)


class BatchReport(BaseModel):
    """One micro-batch: what came, what the table took, how fresh it is."""

    first: str
    last: str
    messages: int
    rows: int
    rejected: int
    replay: bool
    table_version: int
    # what waits for compaction in the table the batch left (``appended_backlog``)
    appended_files: int
    appended_rows: int
    # oldest message of the batch: broker time → visible through the manifest
    oldest_age_s: float
    commit_s: float
    valid: pa.Table | None = Field(default=None, exclude=True)

    model_config = {"arbitrary_types_allowed": True}


class Outcome(StrEnum):
    consumed = "consumed"
    held_elsewhere = "another run holds the tenant's stream"
    nothing_sent = "the tenant has sent no event to this stream"


class IngestReport(BaseModel):
    tenant_id: str
    stream: str
    outcome: Outcome = Outcome.consumed
    batches: int = 0
    messages: int = 0
    rows: int = 0
    rejected: int = 0
    rejects_by_reason: dict[str, int] = Field(default_factory=dict)
    replayed_messages: int = 0
    table_version: int = 0
    last_position: str | None = None

    def add(self, batch: BatchReport, reasons: Counter) -> None:
        self.batches += 1
        self.messages += batch.messages
        self.rows += batch.rows
        self.rejected += batch.rejected
        self.replayed_messages += batch.messages if batch.replay else 0
        self.table_version = batch.table_version
        self.last_position = batch.last
        merged = Counter(self.rejects_by_reason) + reasons
        self.rejects_by_reason = dict(sorted(merged.items()))


def _line(data: bytes) -> bytes:
    """A message as one JSON line. A raw line break is JSON whitespace outside strings
    and invalid inside them, so blanking it keeps every valid event valid and one
    message one line (the line number is the message's place in the batch)."""
    if b"\n" in data or b"\r" in data:
        return data.replace(b"\n", b" ").replace(b"\r", b" ")
    return data


def validate_messages(
    tenant_id: str, source: str, messages: list[Message]
) -> tuple[pa.Table, list[Reject]]:
    """(valid rows in message order, rejects): data-etl's checks, ``now`` being now."""
    validator = BatchValidator(tenant_id, datetime.now(UTC), read_limits())
    payload = b"\n".join(_line(m.data) for m in messages)
    tables: list[pa.Table] = []
    rejects: list[Reject] = []
    for batch in read_batches(io.BytesIO(payload), source, validator, len(messages) + 1):
        if batch.rows:
            tables.append(batch.table)
        rejects.extend(batch.rejects)
    for reject in rejects:  # say which message, not which line of the joined batch
        if 1 <= reject.line <= len(messages):
            reject.detail = f"message {messages[reject.line - 1].position}: {reject.detail}"
    table = pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table()
    return table, rejects


def quarantine_key(stream: str, first: str) -> str:
    return f"{STREAM_QUARANTINE}{stream}/{first}.rejects.jsonl"


async def gather(consumer: Consumer, settings: IngestSettings) -> list[Message]:
    """One micro-batch: waits for a first message up to ``max_batch_seconds``, then takes
    what else arrives until the batch is full or that much time has passed since."""
    deadline = time.monotonic() + settings.max_batch_seconds
    messages: list[Message] = []
    while len(messages) < settings.max_batch_events:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        want = min(MAX_BATCH, settings.max_batch_events - len(messages))
        got = await consumer.fetch(want, left)
        if not got and messages:
            break
        messages.extend(got)
    return messages


async def commit(
    storage: TenantStorage,
    stream: str,
    messages: list[Message],
    table_lock: TableLock,
) -> tuple[BatchReport, Counter]:
    """Quarantine the batch's rejects, then publish its rows with its last position.
    A batch wholly at or before the committed position is a replay: nothing written."""
    first, last = messages[0], messages[-1]
    t0 = time.perf_counter()
    manifest = read_manifest(storage)
    fresh = [m for m in messages if not is_committed(manifest, stream, m.position)]
    reasons: Counter = Counter()
    valid = EVENT_SCHEMA.empty_table()
    if fresh:
        valid, rejects = validate_messages(storage.tenant_id, f"stream/{stream}", fresh)
        reasons = Counter(r.reason.value for r in rejects)
        if rejects:
            body = b"".join(r.as_json() + b"\n" for r in rejects)
            storage.put_bytes(quarantine_key(stream, fresh[0].position), body)
        async with table_lock():
            appended = append_batch(storage, stream, last.position, valid)
        version, replay, backlog = appended.version, appended.replay, appended.backlog
    else:
        version, replay, backlog = manifest.version, True, appended_backlog(manifest)
    now_ms = time.time() * 1000
    report = BatchReport(
        first=first.position,
        last=last.position,
        messages=len(messages),
        rows=0 if replay else valid.num_rows,
        rejected=0 if replay else sum(reasons.values()),
        replay=replay,
        table_version=version,
        appended_files=backlog[0],
        appended_rows=backlog[1],
        oldest_age_s=round(max(0.0, now_ms - min(m.produced_ms for m in messages)) / 1000, 3),
        commit_s=round(time.perf_counter() - t0, 3),
        valid=None if replay else valid,
    )
    return report, (Counter() if replay else reasons)


async def ingest(
    storage: TenantStorage,
    consumer: Consumer,
    stream: str,
    table_lock: TableLock,
    settings: IngestSettings,
    report: IngestReport,
) -> AsyncIterator[BatchReport | None]:
    """Micro-batches until the caller stops iterating: each is committed and acked
    before it is yielded (its ``valid`` rows are there for the live analytics); None
    after a wait in which nothing came, so the caller can look at its clock."""
    while True:
        messages = await gather(consumer, settings)
        if not messages:
            yield None
            continue
        batch, reasons = await commit(storage, stream, messages, table_lock)
        await consumer.ack(messages)
        report.add(batch, reasons)
        if batch.rejected:
            log.info(
                "%s of %s messages rejected: %s",
                batch.rejected,
                batch.messages,
                orjson.dumps(dict(reasons)).decode(),
            )
        yield batch
