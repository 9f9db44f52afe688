"""The curated table's append path: a stream micro-batch's rows and its broker position,
published in one manifest write.

Exactly once into the table comes from that one write: the rows of a micro-batch and the
position of its last message become visible together, or not at all. A consumer acks the
broker only after the write; one that dies between the two gets the batch again and
``append_batch`` finds its position already committed, so it appends nothing twice.

The caller holds the tenant's table lock (``setlist.dispatch.locks``, name ``table``)
around ``append_batch``, as data-etl does around its publish: each rewrites the manifest
from the version it reads under the lock, so neither loses the other's change. A
micro-batch writes its files under that lock too, so the garbage collection of a load's
publish never sees one written and not yet listed.

Small files would pile up between compactions: a date holding more than
``MAX_APPENDED_FILES`` has its newest ``MERGE_NEWEST`` merged into one, in commit order
(a merge changes no row, only how they are stored). data-etl's next load compacts a
date's appended files into its canonical file (``setlist.etl.load``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from setlist.brokers.base import position_key
from setlist.core import records
from setlist.core.storage import TenantStorage
from setlist.etl.curated import (
    MANIFEST_KEY,
    Manifest,
    PartitionFile,
    encode_partition,
    put_partition,
    read_manifest,
    read_partition,
    split_by_date,
)

MAX_APPENDED_FILES = 32
MERGE_NEWEST = 8


@dataclass(frozen=True)
class Appended:
    """What one ``append_batch`` published (``version`` 0 and no dates: a replay)."""

    version: int
    rows: int
    dates: tuple[str, ...]
    replay: bool = False
    backlog: tuple[int, int] = (0, 0)  # ``appended_backlog`` of the table it left


def committed_position(manifest: Manifest, stream: str) -> str | None:
    return manifest.streams.get(stream)


def is_committed(manifest: Manifest, stream: str, position: str) -> bool:
    """Whether the table already holds everything up to ``position`` of ``stream``."""
    committed = committed_position(manifest, stream)
    return committed is not None and position_key(position) <= position_key(committed)


def _merge_newest(storage: TenantStorage, date: str, files: list[PartitionFile]) -> PartitionFile:
    newest = files[-MERGE_NEWEST:]
    table = pa.concat_tables([read_partition(storage, p) for p in newest])
    return put_partition(storage, *encode_partition(date, table, kind="append"))


def append_batch(storage: TenantStorage, stream: str, position: str, table: pa.Table) -> Appended:
    """Publish ``table`` (valid rows, ``EVENT_SCHEMA``) as appended files of their dates
    with ``stream`` committed at ``position`` (the batch's last message). Call under the
    table lock. A position at or before the committed one is a replay: nothing is
    written. An empty table still commits the position (a batch of rejects only)."""
    position_key(position)  # refuse a malformed position before anything is written
    current = read_manifest(storage)
    if is_committed(current, stream, position):
        return Appended(
            version=current.version,
            rows=0,
            dates=(),
            replay=True,
            backlog=appended_backlog(current),
        )
    updated = current.copy()
    retired: set[str] = set()
    dates = []
    for date, rows in split_by_date(table):
        files = updated.appended.setdefault(date, [])
        files.append(put_partition(storage, *encode_partition(date, rows, kind="append")))
        if len(files) > MAX_APPENDED_FILES:
            merged = _merge_newest(storage, date, files)
            retired.update(p.key for p in files[-MERGE_NEWEST:])
            files[-MERGE_NEWEST:] = [merged]
        dates.append(date)
    updated.streams[stream] = position
    updated.version = current.version + 1
    # Merged-away files stay one more version for readers on this one; nothing is
    # deleted here (a load's publish collects them), so a file data-etl has written
    # and not yet published is never at risk from a micro-batch.
    updated.retired = sorted((set(current.retired) | retired) - updated.live_keys())
    records.write_record(storage, MANIFEST_KEY, updated.as_dict())
    return Appended(
        version=updated.version,
        rows=table.num_rows,
        dates=tuple(dates),
        backlog=appended_backlog(updated),
    )


def appended_backlog(manifest: Manifest) -> tuple[int, int]:
    """(files, rows) appended and not compacted yet: what data-etl's next load merges."""
    files = [p for d in manifest.appended for p in manifest.appended[d]]
    return len(files), sum(p.rows for p in files)
