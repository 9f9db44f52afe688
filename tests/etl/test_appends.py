"""The curated table's append path: micro-batches published with their stream position,
replays that append nothing, readers that see appended rows as the compacted table will
hold them, and data-etl's compaction giving the same files as a batch load."""

from __future__ import annotations

import gzip
import io
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from setlist.brokers.base import BrokerError
from setlist.core.storage import tenant_storage
from setlist.etl.appends import MAX_APPENDED_FILES, MERGE_NEWEST, append_batch, appended_backlog
from setlist.etl.curated import read_events, read_manifest
from setlist.etl.demo import iter_raw_lines
from setlist.etl.load import TableChanged, load_new_files, prepare_load, publish_load
from setlist.etl.raw_events import BatchValidator, read_batches
from setlist.etl.raw_stream import LIMITS

# The loads run their tasks outside a flow: they still report to the session's server.
pytestmark = pytest.mark.server
NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def storage(prefect_server, storage_config):
    return tenant_storage("acme", storage_config)


def _lines(events: int, seed: int = 3, defect_share: float = 0.0) -> list[bytes]:
    return [
        line
        for line, _ in iter_raw_lines("acme", events=events, defect_share=defect_share, seed=seed)
    ]


def _valid(lines: list[bytes]) -> pa.Table:
    """The rows data-etl's validator makes of ``lines`` (in order)."""
    validator = BatchValidator("acme", NOW, LIMITS)
    batches = read_batches(io.BytesIO(b"\n".join(lines)), "t.jsonl", validator, 10**9)
    return pa.concat_tables([b.table for b in batches])


def _ids(table: pa.Table) -> list[str]:
    return table["event_id"].to_pylist()


def test_a_batch_is_visible_with_its_position_and_a_replay_appends_nothing(storage):
    rows = _valid(_lines(2_000))
    first = append_batch(storage, "redis", "1000-0", rows.slice(0, 1_200))
    assert not first.replay and first.rows == 1_200
    manifest = read_manifest(storage)
    assert manifest.streams == {"redis": "1000-0"} and manifest.version == first.version
    assert read_events(storage).num_rows == 1_200

    # The same batch again (a crash between commit and ack), or an older one: nothing.
    for position in ("1000-0", "999-7", "9-0"):
        again = append_batch(storage, "redis", position, rows.slice(0, 1_200))
        assert again.replay and again.rows == 0
    assert read_manifest(storage).version == first.version
    # Position keys compare as numbers: "1000-1" is after "999-9", though smaller as text.
    second = append_batch(storage, "redis", "1000-1", rows.slice(1_200))
    assert not second.replay
    table = read_events(storage)
    assert sorted(_ids(table)) == sorted(_ids(rows))
    assert read_manifest(storage).streams == {"redis": "1000-1"}


def test_a_malformed_position_is_refused_before_anything_is_written(storage):
    rows = _valid(_lines(50))
    for bad in ("", "12a", "../x", "1-2-", "-1", "1" * 65):
        with pytest.raises(BrokerError, match="not a broker position"):
            append_batch(storage, "redis", bad, rows)
    assert storage.list_keys("curated") == []


def test_readers_see_appended_rows_as_the_compacted_table(storage):
    lines = _lines(3_000)
    rows = _valid(lines)
    # A duplicate event id within and across batches: readers keep its first row.
    append_batch(storage, "nats", "1", rows.slice(0, 2_000))
    append_batch(storage, "nats", "2", pa.concat_tables([rows.slice(1_500), rows.slice(0, 10)]))
    table = read_events(storage)
    assert table.num_rows == 3_000 == len(set(_ids(table)))
    ts = table["ts"].to_pylist()
    assert ts == sorted(ts)
    assert read_manifest(storage).rows == 2_000 + 1_510  # as stored, until compacted


def _batch_loaded(storage_config, lines: list[bytes]) -> dict[str, str]:
    """date → sha256 of the canonical file a batch load of ``lines`` writes."""
    from tests.etl.test_load import _twin

    other = tenant_storage("acme", _twin(storage_config))
    other.put_bytes("raw/all.jsonl.gz", gzip.compress(b"".join(x + b"\n" for x in lines), mtime=0))
    load_new_files(other, "acme", now=NOW, workers=1)
    return {d: p.sha256 for d, p in read_manifest(other).partitions.items()}


def test_compaction_writes_the_files_a_batch_load_of_the_same_events_writes(
    storage, storage_config
):
    lines = _lines(6_000, defect_share=0.03)  # duplicates and bad rows among them
    validator = BatchValidator("acme", NOW, LIMITS)
    position = 0
    for start in range(0, len(lines), 700):
        chunk = lines[start : start + 700]
        batches = read_batches(io.BytesIO(b"\n".join(chunk)), "s", validator, 10**9)
        position += len(chunk)
        table = pa.concat_tables([b.table for b in batches])
        append_batch(storage, "redis", f"{position}-0", table)
    before = read_events(storage)
    report = load_new_files(storage, "acme", now=NOW, workers=1)
    assert report.files == 0 and report.loaded_rows == 0  # no raw file: a compaction only
    manifest = read_manifest(storage)
    assert appended_backlog(manifest) == (0, 0) and manifest.appended == {}
    assert manifest.streams == {"redis": f"{position}-0"}  # the position survives it
    assert {d: p.sha256 for d, p in manifest.partitions.items()} == _batch_loaded(
        storage_config, lines
    )
    assert read_events(storage).equals(before)


def test_many_small_batches_stay_a_bounded_number_of_files(storage):
    rows = _valid(_lines(400))
    days = pc.strftime(rows["ts"], format="%Y-%m-%d")
    one_day = rows.filter(pc.equal(days, days[0]))
    n = MAX_APPENDED_FILES + 3 * MERGE_NEWEST
    for i in range(n):
        append_batch(storage, "redis", f"{i + 1}", one_day.slice(i % one_day.num_rows, 1))
    manifest = read_manifest(storage)
    (date,) = manifest.appended
    assert len(manifest.appended[date]) <= MAX_APPENDED_FILES
    stored = sum(p.rows for p in manifest.appended[date])
    assert stored == n  # merging changes how rows are stored, never which
    assert manifest.retired  # merged-away files kept one version for readers on it


def test_a_load_keeps_what_a_stream_appended_while_it_ran(storage):
    rows = _valid(_lines(1_000))
    append_batch(storage, "redis", "10-0", rows.slice(0, 400))
    prepared = prepare_load(storage, "acme", now=NOW, workers=1)  # compacts the 400
    append_batch(storage, "redis", "11-0", rows.slice(400))  # arrives during the load
    report = publish_load(storage, prepared)
    manifest = read_manifest(storage)
    assert manifest.streams == {"redis": "11-0"}
    kept = [p for files in manifest.appended.values() for p in files]
    assert sum(p.rows for p in kept) == 600  # the newer batch is still appended
    assert report.table_version == manifest.version
    assert sorted(_ids(read_events(storage))) == sorted(_ids(rows))


def test_a_load_whose_table_changed_under_it_publishes_nothing(storage):
    rows = _valid(_lines(500))
    append_batch(storage, "redis", "1-0", rows.slice(0, 200))
    first = prepare_load(storage, "acme", now=NOW, workers=1)
    second = prepare_load(storage, "acme", now=NOW, workers=1)
    publish_load(storage, first)
    version = read_manifest(storage).version
    append_batch(storage, "redis", "2-0", rows.slice(200))
    with pytest.raises(TableChanged, match="nothing was published"):
        publish_load(storage, second)
    assert read_manifest(storage).version == version + 1


def test_files_written_by_a_batch_that_never_committed_are_collected(storage):
    rows = _valid(_lines(300))
    append_batch(storage, "redis", "1-0", rows.slice(0, 100))
    # A micro-batch that died after writing its file and before the manifest write:
    orphan = "curated/events/date=2020-01-01/append-0000.parquet"
    storage.put_bytes(orphan, b"half a batch")
    assert read_events(storage).num_rows == 100  # readers never see it
    load_new_files(storage, "acme", now=NOW, workers=1)
    assert orphan not in storage.list_keys("curated")
    assert read_events(storage).num_rows == 100
