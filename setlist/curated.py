"""The curated events table of a tenant: Parquet per event date, published by manifest.

Layout under the tenant's storage::

    curated/events/_manifest.json                    the table: the one file per date, and
                                                     every raw file already loaded
    curated/events/date=YYYY-MM-DD/part-<sha>.parquet

A load writes new partition files (content-addressed: the same rows give the same name
and bytes) and then replaces the manifest in one PUT — the single atomic step on a local
disk and on S3 alike. Readers go through the manifest, so they see the previous load or
the new one, never half of one; a crash before the PUT leaves the previous table intact,
and files it left behind are unreferenced until the next load removes them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from setlist.raw_events import EVENT_SCHEMA
from setlist.storage import ObjectNotFound, TenantStorage

TABLE_PREFIX = "curated/events/"
MANIFEST_KEY = "curated/events/_manifest.json"
SORT_KEYS = [("ts", "ascending"), ("event_id", "ascending")]


@dataclass
class PartitionFile:
    key: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """The table. No wall-clock fields: the same loads give the same bytes."""

    version: int = 0
    partitions: dict[str, PartitionFile] = field(default_factory=dict)
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Files the previous version referenced: kept one more load for readers still on it.
    retired: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "version": self.version,
                "partitions": {d: p.__dict__ for d, p in sorted(self.partitions.items())},
                "loaded": dict(sorted(self.loaded.items())),
                "retired": sorted(self.retired),
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        raw = orjson.loads(data)
        return cls(
            version=raw["version"],
            partitions={d: PartitionFile(**p) for d, p in raw["partitions"].items()},
            loaded=raw["loaded"],
            retired=raw.get("retired", []),
        )

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions.values())


def read_manifest(storage: TenantStorage) -> Manifest:
    try:
        return Manifest.from_bytes(storage.get_bytes(MANIFEST_KEY))
    except ObjectNotFound:
        return Manifest()


def read_partition(
    storage: TenantStorage, part: PartitionFile, columns: list[str] | None = None
) -> pa.Table:
    return pq.read_table(
        io.BytesIO(storage.get_bytes(part.key)), schema=EVENT_SCHEMA, columns=columns
    )


def read_table(
    storage: TenantStorage, manifest: Manifest, columns: list[str] | None = None
) -> pa.Table:
    """Every row of one published version (the manifest a reader already holds)."""
    schema = (
        EVENT_SCHEMA if columns is None else pa.schema([EVENT_SCHEMA.field(c) for c in columns])
    )
    tables = [
        read_partition(storage, manifest.partitions[d], columns)
        for d in sorted(manifest.partitions)
    ]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_events(storage: TenantStorage, dates: list[str] | None = None) -> pa.Table:
    """The published events (optionally of some dates) as one table."""
    manifest = read_manifest(storage)
    if dates is None:
        return read_table(storage, manifest)
    wanted = sorted(set(dates))
    tables = [
        read_partition(storage, manifest.partitions[d]) for d in wanted if d in manifest.partitions
    ]
    return pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table()


def event_dates(table: pa.Table) -> pa.Array:
    return pc.strftime(table["ts"], format="%Y-%m-%d")


_DAY_MS = 86_400_000
_EPOCH = dt.date(1970, 1, 1)


def split_by_date(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """(YYYY-MM-DD, rows of that UTC date) for each date of the table's ``ts`` (no nulls),
    dates ascending, rows of a date in table order: the same as filtering by
    ``event_dates``, in one pass."""
    if not table.num_rows:
        return
    day = table["ts"].cast(pa.int64()).to_numpy() // _DAY_MS
    order = np.argsort(day, kind="stable")
    day = day[order]
    cuts = [0, *(np.flatnonzero(np.diff(day)) + 1).tolist(), len(day)]
    if len(cuts) > 2:
        table = table.take(order)
    for start, end in itertools.pairwise(cuts):
        when = _EPOCH + dt.timedelta(days=int(day[start]))
        yield when.isoformat(), table.slice(start, end - start)


def canonical(table: pa.Table) -> tuple[pa.Table, int]:
    """Drop repeated event ids (first occurrence wins) and sort; returns (table, dropped)."""
    indexed = table.append_column("__i", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by("event_id", use_threads=False).aggregate([("__i", "min")])
    keep = pc.sort_indices(first["__i_min"])
    unique = indexed.take(pc.take(first["__i_min"], keep)).drop_columns(["__i"])
    unique = unique.take(pc.sort_indices(unique, sort_keys=SORT_KEYS))
    return unique, table.num_rows - unique.num_rows


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet: same rows, same bytes (so names can be content hashes)."""
    sink = io.BytesIO()
    pq.write_table(
        table.cast(EVENT_SCHEMA),
        sink,
        compression="zstd",
        row_group_size=256_000,
        use_dictionary=["context", "device", "country", "tenant_id"],
        write_statistics=True,
    )
    return sink.getvalue()


def write_partition(storage: TenantStorage, date: str, table: pa.Table) -> PartitionFile:
    data = parquet_bytes(table)
    sha = hashlib.sha256(data).hexdigest()
    key = f"{TABLE_PREFIX}date={date}/part-{sha[:20]}.parquet"
    if not storage.exists(key):
        storage.put_bytes(key, data)
    return PartitionFile(key=key, rows=table.num_rows, bytes=len(data), sha256=sha)


def publish(storage: TenantStorage, previous: Manifest, manifest: Manifest) -> Manifest:
    """Make ``manifest`` the table: one atomic write. Then remove unreferenced files."""
    live = {p.key for p in manifest.partitions.values()}
    manifest.version = previous.version + 1
    manifest.retired = sorted({p.key for p in previous.partitions.values()} - live)
    storage.put_bytes(MANIFEST_KEY, manifest.to_bytes())
    collect_garbage(storage, manifest)
    return manifest


def collect_garbage(storage: TenantStorage, manifest: Manifest) -> int:
    """Delete partition files neither the table nor its previous version references."""
    live = {p.key for p in manifest.partitions.values()} | set(manifest.retired)
    removed = 0
    for key in storage.list_keys(TABLE_PREFIX):
        if key.endswith(".parquet") and key not in live:
            storage.delete(key)
            removed += 1
    return removed
