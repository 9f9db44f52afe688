"""The stream-ingest loop against real brokers: data-etl's rows and rejects, exactly once
through crashes before and after the commit, and hostile messages that forge nothing."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import uuid

import orjson
import pyarrow as pa
import pytest

from blocks.storage import LocalStorageConfig
from setlist.brokers.base import BrokerKind, open_broker
from setlist.core.storage import tenant_storage
from setlist.etl.appends import appended_backlog
from setlist.etl.curated import read_events, read_manifest, read_partition
from setlist.etl.demo import iter_raw_lines
from setlist.etl.load import load_new_files
from setlist.stream.analytics import read_snapshot
from setlist.stream.ingest import (
    STREAM_QUARANTINE,
    IngestReport,
    IngestSettings,
    commit,
    gather,
    ingest,
)
from setlist.stream.job import consume

URLS = {BrokerKind.redis: "redis://127.0.0.1:6379/0", BrokerKind.nats: "nats://127.0.0.1:4222"}
SETTINGS = IngestSettings(max_batch_events=1_500, max_batch_seconds=0.3)


@pytest.fixture(params=[BrokerKind.redis, BrokerKind.nats])
async def broker(request):
    if request.param is BrokerKind.nats:
        pytest.importorskip("setlist.brokers.nats_jetstream")
    async with open_broker(request.param, URLS[request.param]) as b:
        yield b


@pytest.fixture
async def tenant(broker):
    tenant_id = f"stream-{uuid.uuid4().hex[:8]}"
    yield tenant_id
    await broker.delete_stream(tenant_id)


@pytest.fixture
def storage(tenant, tmp_path):
    return tenant_storage(tenant, LocalStorageConfig(root=str(tmp_path / "store")))


def no_lock():
    """The table lock of a table no load publishes to meanwhile."""
    return contextlib.nullcontext()


def _lines(tenant: str, events: int, defect_share: float = 0.0) -> list[bytes]:
    return [
        line
        for line, _ in iter_raw_lines(tenant, events=events, defect_share=defect_share, seed=11)
    ]


def _stored_rows(storage) -> tuple[int, int]:
    """(rows as stored in every file of the table, distinct event ids among them): a
    batch appended twice shows as more rows than ids, whatever readers dedupe."""
    manifest = read_manifest(storage)
    tables = [
        read_partition(storage, p, ["event_id"]) for d in manifest.dates for p in manifest.files(d)
    ]
    ids = pa.concat_tables(tables)["event_id"] if tables else pa.array([], pa.string())
    return len(ids), len(set(ids.to_pylist()))


async def _drain(storage, broker, stream, events: int) -> IngestReport:
    report = IngestReport(tenant_id=storage.tenant_id, stream=stream)
    async with broker.consumer(storage.tenant_id) as consumer:
        async for _ in ingest(storage, consumer, stream, no_lock, SETTINGS, report):
            if report.messages >= events:
                break
    return report


async def test_rows_and_rejects_are_data_etls(broker, tenant, storage, tmp_path):
    lines = _lines(tenant, 6_000, defect_share=0.04)
    for start in range(0, len(lines), 1_000):
        await broker.send(tenant, lines[start : start + 1_000])
    report = await _drain(storage, broker, broker.kind.value, len(lines))
    assert report.messages == len(lines) and report.replayed_messages == 0

    # The same lines as one raw file, loaded by data-etl in another store.
    twin = tenant_storage(tenant, LocalStorageConfig(root=str(tmp_path / "twin")))
    twin.put_bytes("raw/all.jsonl.gz", gzip.compress(b"".join(x + b"\n" for x in lines)))
    batch = load_new_files(twin, tenant, workers=1)
    assert report.rejects_by_reason == batch.rejects_by_reason
    assert report.rejected == batch.rejected
    quarantined = [
        orjson.loads(line)
        for key in storage.list_keys(STREAM_QUARANTINE)
        for line in storage.get_bytes(key).splitlines()
    ]
    assert len(quarantined) == batch.rejected
    assert all(q["detail"].startswith("message ") for q in quarantined)
    # Compacted, the table is the batch load's, file for file.
    load_new_files(storage, tenant, workers=1)
    ours = {d: p.sha256 for d, p in read_manifest(storage).partitions.items()}
    assert ours == {d: p.sha256 for d, p in read_manifest(twin).partitions.items()}


async def test_a_crash_before_the_commit_loses_nothing(broker, tenant, storage):
    lines = _lines(tenant, 2_000)
    await broker.send(tenant, lines)
    async with broker.consumer(tenant) as consumer:  # takes a batch, dies before committing
        taken = await gather(consumer, SETTINGS)
        assert taken
    report = await _drain(storage, broker, broker.kind.value, len(lines))
    assert report.rows == len(lines)
    assert _stored_rows(storage) == (len(lines), len(lines))
    assert await broker.stream_length(tenant) == 0


async def test_a_crash_between_commit_and_ack_appends_nothing_twice(broker, tenant, storage):
    lines = _lines(tenant, 2_000)
    await broker.send(tenant, lines)
    stream = broker.kind.value
    async with broker.consumer(tenant) as consumer:  # commits a batch, dies before the ack
        first = await gather(consumer, SETTINGS)
        done, _ = await commit(storage, stream, first, no_lock)
        assert not done.replay and done.rows == len(first)
    version = read_manifest(storage).version
    report = await _drain(storage, broker, stream, len(lines))
    assert report.replayed_messages == len(first)  # came again, found committed
    assert _stored_rows(storage) == (len(lines), len(lines))
    assert read_manifest(storage).version > version
    async with broker.consumer(tenant) as consumer:
        assert await consumer.lag() == 0


async def test_hostile_messages_forge_nothing(broker, tenant, storage):
    other = f"victim-{uuid.uuid4().hex[:6]}"
    good = _lines(tenant, 3)
    forged = orjson.loads(good[0])
    forged.update(event_id="forged-1", tenant_id=other)
    messages = [
        good[0],
        orjson.dumps(forged),  # another tenant's row, sent to this tenant's stream
        b"\xff\xfe not utf-8",
        good[1].replace(b",", b",\n", 1),  # a raw line break: one message, one row
        b'{"event_id": ' + b'"x' * 200_000 + b'"}',  # a huge message
        b"[1, 2, 3]",
        good[2],
    ]
    await broker.send(tenant, messages)
    report = await _drain(storage, broker, broker.kind.value, len(messages))
    table = read_events(storage)
    assert sorted(table["event_id"].to_pylist()) == sorted(
        orjson.loads(x)["event_id"] for x in good
    )
    assert set(table["tenant_id"].to_pylist()) == {tenant}
    assert report.rejected == 4 and report.rejects_by_reason["foreign_tenant"] == 1
    # Nothing reached the other tenant's stream, its store, nor a path outside this one.
    assert await broker.stream_length(other) == 0
    assert all(k.startswith(("curated/", STREAM_QUARANTINE)) for k in storage.list_keys(""))


async def test_the_job_loop_keeps_live_analytics_and_stops_on_time(broker, tenant, storage):
    lines = _lines(tenant, 3_000)
    await broker.send(tenant, lines)
    batches = []
    report = await consume(
        storage, broker, broker.kind.value, no_lock, SETTINGS, seconds=4, on_batch=batches.append
    )
    assert report.rows == 3_000 and sum(b.rows for b in batches) == 3_000
    snapshot = read_snapshot(storage)
    assert snapshot["tenant_id"] == tenant and snapshot["events_total"] == 3_000
    assert snapshot["lag"] == 0
    assert appended_backlog(read_manifest(storage))[1] == 3_000
    # A second run resumes the same analytics and commits nothing old again.
    await broker.send(tenant, [lines[0]])
    again = await consume(storage, broker, broker.kind.value, no_lock, SETTINGS, seconds=2)
    assert again.rows == 1  # the same event once more: a row stored, deduped for readers
    assert read_events(storage).num_rows == 3_000
    assert read_snapshot(storage)["events_total"] == 3_001


async def test_a_slow_table_lock_keeps_one_batch_in_memory(broker, tenant, storage):
    """Backpressure: while a commit waits, the loop fetches nothing more."""
    lines = _lines(tenant, 4_000)
    await broker.send(tenant, lines)
    gate = asyncio.Event()

    class Slow:
        async def __aenter__(self):
            await gate.wait()

        async def __aexit__(self, *exc):
            return None

    report = IngestReport(tenant_id=tenant, stream=broker.kind.value)
    async with broker.consumer(tenant) as consumer:
        loop = ingest(storage, consumer, broker.kind.value, Slow, SETTINGS, report)
        step = asyncio.ensure_future(loop.__anext__())
        await asyncio.sleep(1.0)
        assert not step.done()
        assert await consumer.lag() == len(lines)  # nothing acked, the rest not taken
        gate.set()
        first = await step
        assert first.messages <= SETTINGS.max_batch_events
        await loop.aclose()
