"""The curated events table of a tenant: Parquet per event date, published by manifest.

Layout under the tenant's storage::

    curated/events/_manifest.json                    the table: the one file per date, and
                                                     every raw file already loaded
    curated/events/date=YYYY-MM-DD/part-<sha>.parquet

    curated/events/date=YYYY-MM-DD/append-<sha>.parquet  rows a stream micro-batch
                                                     appended (``setlist.etl.appends``)

A load writes new partition files (content-addressed: the same rows give the same name
and bytes) and then replaces the manifest in one PUT — the single atomic step on a local
disk and on S3 alike. Readers go through the manifest, so they see the previous load or
the new one, never half of one; a crash before the PUT leaves the previous table intact,
and files it left behind are unreferenced until the next load removes them.

A date may also have appended files: the rows of stream micro-batches since the date's
last compaction, in commit order, with each stream's committed broker position in the
same manifest (``streams``). Readers see a date as its canonical file and its appended
files together, made canonical (the first row of each event id, sorted) — the same rows
the next data-etl load writes when it compacts them into the date's one file.

Staging (``stage_raw_file``) is the per-file half of a load: one raw file → its valid rows
as scratch Arrow files on local disk, one per date and batch, and its rejects → the
tenant's quarantine. It needs nothing but the file, so files are staged side by side,
in this process or in worker processes (``stage_raw_file_in_worker``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.abc
import io
import itertools
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from setlist.core import records
from setlist.core.storage import LocalTenantStorage, ObjectNotFound, TenantStorage, tenant_storage
from setlist.etl.raw_events import EVENT_SCHEMA, BatchValidator, read_batches

if TYPE_CHECKING:  # they import Prefect, which a staging worker process does without
    from blocks.storage import LocalStorageConfig, S3StorageConfig

RAW_PREFIX = "raw/"
QUARANTINE_PREFIX = "quarantine/events/"
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
    # Rows of stream micro-batches not compacted yet: date → files, in commit order.
    appended: dict[str, list[PartitionFile]] = field(default_factory=dict)
    # Each stream's broker position committed with the rows it appended (stream → position).
    streams: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc = {
            "version": self.version,
            "partitions": {d: p.__dict__ for d, p in sorted(self.partitions.items())},
            "loaded": dict(sorted(self.loaded.items())),
            "retired": sorted(self.retired),
        }
        # Only when there are some: a table no stream writes keeps its bytes of before.
        if any(self.appended.values()):
            doc["appended"] = {
                d: [p.__dict__ for p in files]
                for d, files in sorted(self.appended.items())
                if files
            }
        if self.streams:
            doc["streams"] = dict(sorted(self.streams.items()))
        return doc

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        return cls(
            version=raw["version"],
            partitions={d: PartitionFile(**p) for d, p in raw["partitions"].items()},
            loaded=raw["loaded"],
            retired=raw.get("retired", []),
            appended={
                d: [PartitionFile(**p) for p in files]
                for d, files in raw.get("appended", {}).items()
            },
            streams=dict(raw.get("streams", {})),
        )

    def copy(self) -> Manifest:
        """A new version to edit (``publish`` numbers it), sharing no mutable part."""
        return Manifest(
            version=self.version,
            partitions=dict(self.partitions),
            loaded=dict(self.loaded),
            retired=list(self.retired),
            appended={d: list(files) for d, files in self.appended.items() if files},
            streams=dict(self.streams),
        )

    @property
    def dates(self) -> list[str]:
        return sorted(set(self.partitions) | {d for d, f in self.appended.items() if f})

    def files(self, date: str) -> list[PartitionFile]:
        """The date's files as stored: its canonical file first, then appended ones."""
        canonical_file = [self.partitions[date]] if date in self.partitions else []
        return canonical_file + list(self.appended.get(date, []))

    def live_keys(self) -> set[str]:
        return {p.key for d in self.dates for p in self.files(d)}

    @property
    def rows(self) -> int:
        """Rows as stored. Appended rows whose event id the table already holds count
        here until compaction drops them."""
        return sum(p.rows for d in self.dates for p in self.files(d))


def read_manifest(storage: TenantStorage) -> Manifest:
    """The published table (empty before the first load). A manifest the platform did not
    seal for this tenant is refused (``records.UnsealedRecord``), never read: it would
    choose which files are the tenant's events. Restoring a backup brings a sealed one
    back."""
    try:
        return Manifest.from_dict(records.read_record(storage, MANIFEST_KEY))
    except ObjectNotFound:
        return Manifest()
    except (KeyError, TypeError):
        raise records.UnsealedRecord(f"{MANIFEST_KEY} is not a table manifest") from None


def read_partition(
    storage: TenantStorage, part: PartitionFile, columns: list[str] | None = None
) -> pa.Table:
    """One partition file, only if it is the file the sealed manifest names."""
    data = records.check_bytes(part.key, storage.get_bytes(part.key), part.sha256)
    return pq.read_table(io.BytesIO(data), schema=EVENT_SCHEMA, columns=columns)


def read_date(
    storage: TenantStorage, manifest: Manifest, date: str, columns: list[str] | None = None
) -> pa.Table:
    """The rows of one date of a published version. With appended files, the date's
    files are made canonical together, as compaction will write them (the key columns
    are read for that, then dropped when not asked for)."""
    files = manifest.files(date)
    if len(files) == 1 and date in manifest.partitions:
        return read_partition(storage, files[0], columns)
    wanted = None if columns is None else list(dict.fromkeys([*columns, "event_id", "ts"]))
    table = pa.concat_tables([read_partition(storage, p, wanted) for p in files])
    table = table.take(canonical_rows(table))
    return table if columns is None else table.select(columns)


def read_table(
    storage: TenantStorage, manifest: Manifest, columns: list[str] | None = None
) -> pa.Table:
    """Every row of one published version (the manifest a reader already holds)."""
    schema = (
        EVENT_SCHEMA if columns is None else pa.schema([EVENT_SCHEMA.field(c) for c in columns])
    )
    tables = [read_date(storage, manifest, d, columns) for d in manifest.dates]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_events(storage: TenantStorage, dates: list[str] | None = None) -> pa.Table:
    """The published events (optionally of some dates) as one table."""
    manifest = read_manifest(storage)
    if dates is None:
        return read_table(storage, manifest)
    wanted = set(dates)
    tables = [read_date(storage, manifest, d) for d in manifest.dates if d in wanted]
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
    first = day.min()
    if day.max() - first < 1 << 16:  # a radix sort (numpy's stable sort of 16-bit ints)
        order = np.argsort((day - first).astype(np.uint16), kind="stable")
    else:
        order = np.argsort(day, kind="stable")
    day = day[order]
    cuts = [0, *(np.flatnonzero(np.diff(day)) + 1).tolist(), len(day)]
    if len(cuts) > 2:
        table = table.take(order)
    for start, end in itertools.pairwise(cuts):
        when = _EPOCH + dt.timedelta(days=int(day[start]))
        yield when.isoformat(), table.slice(start, end - start)


def canonical_rows(table: pa.Table) -> np.ndarray:
    """The rows of the canonical table, in its order: the first row of each event id (in
    table order), sorted by ``ts``, ``event_id``.

    Every row is sorted (a stable sort: ties stay in table order), then the later rows of
    an id are dropped: the same order as sorting the first rows alone, without taking
    them out first. The keys are sorted as one chunk (Arrow merges sorted chunks
    otherwise: a date's rows come in a chunk per staged file)."""
    n = table.num_rows
    ids = pa.table({"event_id": table["event_id"], "__i": np.arange(n)})
    first = ids.group_by("event_id", use_threads=False).aggregate([("__i", "min")])
    is_first = np.zeros(n, dtype=bool)
    is_first[first["__i_min"].to_numpy()] = True
    keys = table.select([k for k, _ in SORT_KEYS]).combine_chunks()
    order = pc.sort_indices(keys, sort_keys=SORT_KEYS).to_numpy()
    return order[is_first[order]]


def canonical(table: pa.Table) -> tuple[pa.Table, int]:
    """Drop repeated event ids (first occurrence wins) and sort; returns (table, dropped)."""
    rows = canonical_rows(table)
    return table.take(rows), table.num_rows - len(rows)


ROW_GROUP = 256_000
# Text columns whose values repeat (a listener, a track, a country): dictionary-encoded,
# smaller and quicker to write. Not event_id, unique by definition (a dictionary would be
# built, then dropped at its size limit), nor the numbers (plain encoding is quicker).
DICTIONARY_COLUMNS = [
    f.name for f in EVENT_SCHEMA if pa.types.is_string(f.type) and f.name != "event_id"
]


def parquet_bytes(table: pa.Table, rows: np.ndarray | None = None) -> bytes:
    """Deterministic Parquet: same rows, same bytes (so names can be content hashes).

    With ``rows``, the file holds those rows of ``table`` in that order, taken one row
    group at a time (the same bytes as taking them all first, in a row group's memory)."""
    sink = io.BytesIO()
    n = table.num_rows if rows is None else len(rows)
    options = {
        "compression": "zstd",
        "use_dictionary": DICTIONARY_COLUMNS,
        "write_statistics": True,
    }
    if not n:
        pq.write_table(table.cast(EVENT_SCHEMA).slice(0, 0), sink, **options)
        return sink.getvalue()
    with pq.ParquetWriter(sink, EVENT_SCHEMA, **options) as writer:
        for start in range(0, n, ROW_GROUP):
            group = (
                table.slice(start, ROW_GROUP)
                if rows is None
                else table.take(rows[start : start + ROW_GROUP])
            )
            writer.write_table(group.cast(EVENT_SCHEMA), row_group_size=ROW_GROUP)
    return sink.getvalue()


def encode_partition(
    date: str, table: pa.Table, rows: np.ndarray | None = None, kind: str = "part"
) -> tuple[PartitionFile, bytes]:
    """The content-addressed file of a date's rows (``rows`` of ``table``, or all of it),
    and its bytes (not written yet). ``kind`` names it: ``part`` (a date's canonical
    file) or ``append`` (a micro-batch's rows)."""
    data = parquet_bytes(table, rows)
    sha = hashlib.sha256(data).hexdigest()
    key = f"{TABLE_PREFIX}date={date}/{kind}-{sha[:20]}.parquet"
    count = table.num_rows if rows is None else len(rows)
    return PartitionFile(key=key, rows=count, bytes=len(data), sha256=sha), data


def put_partition(storage: TenantStorage, part: PartitionFile, data: bytes) -> PartitionFile:
    if not storage.exists(part.key):
        storage.put_bytes(part.key, data)
    return part


def write_partition(storage: TenantStorage, date: str, table: pa.Table) -> PartitionFile:
    return put_partition(storage, *encode_partition(date, table))


def publish(storage: TenantStorage, previous: Manifest, manifest: Manifest) -> Manifest:
    """Make ``manifest`` the table: one atomic write. Then remove unreferenced files."""
    manifest.version = previous.version + 1
    manifest.retired = sorted(previous.live_keys() - manifest.live_keys())
    records.write_record(storage, MANIFEST_KEY, manifest.as_dict())
    collect_garbage(storage, manifest)
    return manifest


def collect_garbage(storage: TenantStorage, manifest: Manifest) -> int:
    """Delete partition files neither the table nor its previous version references.

    Only while holding the table's publish lock: a stream writes its micro-batch files
    under that lock, so none is ever between written and published here."""
    live = manifest.live_keys() | set(manifest.retired)
    removed = 0
    for key in storage.list_keys(TABLE_PREFIX):
        if key.endswith(".parquet") and key not in live:
            storage.delete(key)
            removed += 1
    return removed


@dataclass
class StagedFile:
    """What staging one raw file found (the rows themselves are in the scratch files)."""

    key: str
    bytes: int
    lines: int = 0
    blank_lines: int = 0
    valid: int = 0
    rejects: Counter = field(default_factory=Counter)
    dates: Counter = field(default_factory=Counter)  # rows staged per date


def quarantine_key(raw_key: str) -> str:
    return QUARANTINE_PREFIX + raw_key.removeprefix(RAW_PREFIX) + ".rejects.jsonl"


def write_scratch(path: Path, table: pa.Table) -> None:
    """Staged rows as an uncompressed Arrow IPC file: local, read once, right away."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_scratch(path: Path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_file(source).read_all()


@dataclass(frozen=True)
class StageArgs:
    """One raw file to stage, and how: everything a staging call needs but the storage
    handle (a worker process opens its own). One picklable value, because it crosses
    into worker processes."""

    key: str
    size: int
    file_no: int
    staging: Path
    validator: BatchValidator
    batch_rows: int


def stage_raw_file(storage: TenantStorage, args: StageArgs) -> StagedFile:
    """Parse one raw file in batches; valid rows go to ``staging/date=…/<file>-<batch>.arrow``,
    rejects to the tenant's quarantine file for that raw file. Holds one batch at a time.

    The scratch names depend only on the file's number and its batches, so the rows of
    a date read back in name order are in input order, whichever process staged them."""
    _skip_pandas()  # (in the load's own process too: its first staging would import it)
    key, file_no, staging = args.key, args.file_no, args.staging
    stats = StagedFile(key=key, bytes=args.size)
    rejects_path = staging / f"rejects-{file_no:06d}.jsonl"
    with storage.open_read(key) as stream, open(rejects_path, "wb") as rejects_out:
        batches = read_batches(stream, key, args.validator, args.batch_rows)
        for batch_no, batch in enumerate(batches):
            stats.lines += batch.lines
            stats.blank_lines += batch.blank_lines
            for reject in batch.rejects:
                stats.rejects[reject.reason.value] += 1
                rejects_out.write(reject.as_json() + b"\n")
            if not batch.rows:
                continue
            stats.valid += batch.rows
            for date, part in split_by_date(batch.table):
                out = staging / f"date={date}" / f"{file_no:06d}-{batch_no:06d}.arrow"
                out.parent.mkdir(parents=True, exist_ok=True)
                write_scratch(out, part)
                stats.dates[date] += part.num_rows
    quarantine = rejects_path.read_bytes()
    if quarantine:
        storage.put_bytes(quarantine_key(key), quarantine)
    return stats


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("pandas: not imported by a staging worker")
        return None


def _skip_pandas() -> None:
    """pyarrow imports pandas (~0.5 s, more without bytecode caches) on its first
    conversion of Python objects, only to tell pandas objects apart, which staging never
    passes it: let that first look find no pandas. (pyarrow still imports it if asked for
    a pandas conversion.)"""
    if "pandas" in sys.modules:
        return
    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(finder)


def stage_raw_file_in_worker(
    config: LocalStorageConfig | S3StorageConfig | str, tenant_id: str, args: StageArgs
) -> StagedFile:
    """``stage_raw_file`` in a worker process: it opens its own handle on the tenant's
    storage (and so its own S3 client) from the store's config, or from the root of a
    local store (a ``str``: no config object, so the worker needs no Prefect import)."""
    _skip_pandas()
    if isinstance(config, str):
        storage: TenantStorage = LocalTenantStorage(tenant_id, config)
    else:
        storage = tenant_storage(tenant_id, config)
    return stage_raw_file(storage, args)
