"""Tenant backups: snapshot, verify and prune over a ``Repository`` (restores and
migrations: ``restores.py``).

A snapshot is everything under the tenant's storage prefix, cut into content-defined
chunks (FastCDC, 256 KiB – 1 MiB – 4 MiB), so an insertion shifts only the chunks it
touches and identical data is stored once across files and snapshots. A file whose
listing fingerprint (size, mtime, ctime, inode locally; size, ETag, last-modified on S3)
matches the previous snapshot is not read again: a nightly backup of unchanged data costs
a listing and a manifest.

While a restore's journal stands (an object-store switch interrupted), no backup of the
tenant is taken. The platform's records (the curated table's manifest, the model
registry, …) are restored after every other file: each publishes files that must be
there first, so a reader of the table sees the old version or the restored one
throughout, never a manifest that names files not back yet.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

from fastcdc.fastcdc_cy import fastcdc_cy

from setlist.backup.repository import (
    AVG_CHUNK,
    MAX_CHUNK,
    MIN_CHUNK,
    BackupError,
    IntegrityError,
    Repository,
    new_snapshot_id,
    snapshot_time,
)
from setlist.core.records import RECORD_PREFIXES
from setlist.core.storage import (
    ObjectEntry,
    ObjectNotFound,
    StorageKeyError,
    TenantStorage,
    normalize_key,
)

READ_BLOCK = 16 * 1024 * 1024
MAX_FILES = 10_000_000
JOURNAL = "restore-journal.json"


# ----------------------------------------------------------------------------- create


@dataclass
class BackupSummary:
    snapshot_id: str
    files: int = 0
    bytes: int = 0
    files_read: int = 0
    bytes_read: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    reused_chunks: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    manifest_bytes: int = 0

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes per stored byte written by this snapshot."""
        return self.bytes / max(1, self.new_bytes + self.manifest_bytes)


def iter_chunks(stream: BinaryIO, file_hash) -> Iterator[bytes]:
    """Content-defined chunks of a stream, read in bounded blocks.

    Cut points are found from each chunk's start, so carrying the unfinished last chunk
    into the next block gives exactly the chunks of the whole file at once.
    """
    buf = bytearray()
    while True:
        block = stream.read(READ_BLOCK)
        eof = not block
        if block:
            file_hash.update(block)
            buf += block
        if not buf:
            return
        if not eof and len(buf) < MAX_CHUNK:
            continue
        view = memoryview(buf)
        consumed = 0
        for chunk in fastcdc_cy(view, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK, False, None):
            end = chunk.offset + chunk.length
            if not eof and end == len(buf):
                break  # may continue in the next block
            yield bytes(view[chunk.offset : end])
            consumed = end
        view.release()
        del buf[:consumed]
        if eof:
            return


class _ChunkWriter:
    """Hash, dedupe, compress, encrypt and store chunks on a few threads.

    zstd, SHA-256 and AES-GCM release the GIL, so two threads use both cores; at most
    ``inflight`` chunks are held at once, whatever the file sizes.
    """

    def __init__(self, repo: Repository, summary: BackupSummary, workers: int):
        self.repo = repo
        self.summary = summary
        self.known = repo.known_chunks()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk")
        self.slots = threading.BoundedSemaphore(workers * 3)

    def submit(self, data: bytes) -> Future:
        self.slots.acquire()
        future = self.pool.submit(self._store, data)
        future.add_done_callback(lambda _f: self.slots.release())
        return future

    def _store(self, data: bytes) -> list:
        chunk_id = self.repo.key.chunk_id(data)
        with self.lock:
            seen = chunk_id in self.known
            self.known.add(chunk_id)
        if seen:
            with self.lock:
                self.summary.reused_chunks += 1
            return [chunk_id, len(data)]
        try:
            written = self.repo.put_sealed(chunk_id, self.repo.seal_chunk(chunk_id, data))
        except BaseException:
            with self.lock:
                self.known.discard(chunk_id)
            raise
        with self.lock:
            self.summary.new_chunks += 1
            self.summary.new_bytes += written
        return [chunk_id, len(data)]

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.repo.flush()


BATCH_BYTES = 256 * 1024 * 1024  # a batch: what a retry reads again at most
BATCH_FILES = 2000
Item = TypeVar("Item")


def batches_of(
    items: Iterable[Item], size: Callable[[Item], int], batch_bytes: int, batch_files: int
) -> list[list[Item]]:
    """``items`` in order, cut into batches of at most ``batch_files`` items and
    ``batch_bytes`` bytes (an item larger than that is a batch of its own): the unit of
    a backup's and a restore's task runs, and so what a retry does again."""
    batches: list[list[Item]] = [[]]
    total = 0
    for item in items:
        n = size(item)
        if batches[-1] and (total + n > batch_bytes or len(batches[-1]) >= batch_files):
            batches.append([])
            total = 0
        batches[-1].append(item)
        total += n
    return [batch for batch in batches if batch]


@dataclass
class SnapshotPlan:
    """What a snapshot will hold, before any file is read: the entries it can take from
    the previous snapshot or a crashed run's checkpoints, and the batches left to read."""

    snapshot_id: str
    parent_id: str | None
    files: list[dict | str]  # listing order: a known entry, or the key of a file to read
    batches: list[list[ObjectEntry]]
    summary: BackupSummary


@dataclass
class BatchResult:
    files: list[dict]
    files_read: int = 0
    bytes_read: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    reused_chunks: int = 0  # chunks the repository already had


def plan_snapshot(
    data: TenantStorage,
    repo: Repository,
    *,
    incremental: bool = True,
    now: datetime | None = None,
    batch_bytes: int = BATCH_BYTES,
    batch_files: int = BATCH_FILES,
) -> SnapshotPlan:
    """List the tenant's objects and split what must be read into batches.

    A file is not read again when an entry of the previous snapshot, or of a checkpoint
    a crashed backup left, has its fingerprint and all its chunks are in the repository.
    """
    if data.tenant_id != repo.tenant_id:
        raise BackupError(
            f"tenant {data.tenant_id!r}'s data can't go into {repo.tenant_id!r}'s repository"
        )
    refuse_if_journal(repo)
    parent_id = (repo.snapshot_ids() or [None])[-1]
    snapshot_id = new_snapshot_id(now, after=parent_id)
    summary = BackupSummary(snapshot_id)
    previous: dict[str, dict] = {}
    if incremental:
        known = repo.known_chunks()
        candidates = repo.get_manifest(parent_id)["files"] if parent_id else []
        for entry in [*candidates, *repo.checkpoint_files()]:
            if entry.get("fingerprint") and all(cid in known for cid, _n in entry["chunks"]):
                previous[entry["path"]] = entry
    files: list[dict | str] = []
    to_read: list[ObjectEntry] = []
    for entry in data.iter_entries(""):
        if entry.kind != "file":
            summary.skipped.append({"path": entry.key, "reason": f"not a file ({entry.kind})"})
            continue
        old = previous.get(entry.key)
        if old is not None and old.get("fingerprint") == entry.fingerprint:
            files.append({**old, "mode": entry.mode})
            summary.reused_chunks += len(old["chunks"])
        else:
            to_read.append(entry)
            files.append(entry.key)
        summary.files += 1
        summary.bytes += entry.size
    batches = batches_of(to_read, lambda entry: entry.size, batch_bytes, batch_files)
    return SnapshotPlan(snapshot_id, parent_id, files, batches, summary)


def back_up_batch(
    data: TenantStorage,
    repo: Repository,
    batch: list[ObjectEntry],
    *,
    workers: int | None = None,
) -> BatchResult:
    """Read, chunk and store one batch, then checkpoint it: once this returns, a crash
    costs this batch nothing. Safe to run again (chunks the repository has are not
    stored twice); batches must not run at once on one ``Repository``."""
    part = BackupSummary("")
    writer = _ChunkWriter(repo, part, workers or max(2, os.cpu_count() or 2))
    # The chunker holds the GIL while it scans; a short switch interval hands it to a
    # worker that waits to run its next C call sooner (5 ms by default stalls them).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        files = [_read_file(data, entry, writer, part) for entry in batch]
        for item in files:  # resolve chunk futures in order
            item["chunks"] = [f.result() if isinstance(f, Future) else f for f in item["chunks"]]
    finally:
        sys.setswitchinterval(interval)
        writer.close()  # every pack and its index written: the chunks exist
    repo.put_checkpoint(files)
    return BatchResult(
        files, part.files_read, part.bytes_read, part.new_chunks, part.new_bytes,
        part.reused_chunks,
    )  # fmt: skip


def finish_snapshot(
    data: TenantStorage,
    repo: Repository,
    plan: SnapshotPlan,
    results: list[BatchResult],
    *,
    config: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> BackupSummary:
    """Write the manifest (last: the snapshot exists only now) and drop the checkpoints."""
    summary = plan.summary
    read: dict[str, dict] = {}
    for result in results:
        read.update((item["path"], item) for item in result.files)
        summary.files_read += result.files_read
        summary.bytes_read += result.bytes_read
        summary.new_chunks += result.new_chunks
        summary.new_bytes += result.new_bytes
        summary.reused_chunks += result.reused_chunks
    missing = [f for f in plan.files if isinstance(f, str) and f not in read]
    if missing:
        raise BackupError(f"{len(missing)} files were never stored, e.g. {missing[0]!r}")
    files = [read[f] if isinstance(f, str) else f for f in plan.files]
    manifest = {
        "format": 1,
        "snapshot_id": plan.snapshot_id,
        "tenant_id": repo.tenant_id,
        "created_at": (now or datetime.now(UTC)).isoformat(),
        "parent": plan.parent_id,
        "source": data.describe(),
        "files": files,
        "config": config,
        "skipped": summary.skipped,
        "stats": {
            "files": summary.files,
            "bytes": summary.bytes,
            "new_chunks": summary.new_chunks,
            "new_bytes": summary.new_bytes,
        },
    }
    summary.manifest_bytes = repo.put_manifest(manifest)
    repo.drop_checkpoints()
    return summary


def create_snapshot(
    data: TenantStorage,
    repo: Repository,
    *,
    config: dict[str, Any] | None = None,
    incremental: bool = True,
    workers: int | None = None,
    now: datetime | None = None,
    batch_bytes: int = BATCH_BYTES,
) -> BackupSummary:
    """Back up every object of the tenant into a new snapshot; returns what it stored.

    Only chunks the repository lacks are written; each batch is checkpointed once its
    chunks are stored, and the manifest is written last, so a crash leaves no snapshot
    and the next run reads only the batches that were not finished. The flow runs the
    same three steps as tasks (``setlist.backup.graph``).
    """
    plan = plan_snapshot(data, repo, incremental=incremental, now=now, batch_bytes=batch_bytes)
    results = [back_up_batch(data, repo, batch, workers=workers) for batch in plan.batches]
    return finish_snapshot(data, repo, plan, results, config=config, now=now)


def _read_file(data: TenantStorage, entry, writer: _ChunkWriter, summary: BackupSummary) -> dict:
    file_hash = hashlib.sha256()
    chunks: list = []
    size = 0
    with data.open_read(entry.key) as stream:
        for chunk in iter_chunks(stream, file_hash):
            size += len(chunk)
            chunks.append(writer.submit(chunk))
    summary.files_read += 1
    summary.bytes_read += size
    return {
        "path": entry.key,
        "size": size,
        "mode": entry.mode,
        "fingerprint": entry.fingerprint if size == entry.size else "",
        "sha256": file_hash.hexdigest(),
        "chunks": chunks,
    }


# --------------------------------------------------------------------------- checking


def check_manifest(manifest: dict) -> list[dict]:
    """The manifest's files, each proven safe to write before anything is written.

    A manifest is authenticated, but a restore must not trust it further than it has
    to: names must be plain relative keys, entries regular files with plain permission
    bits, and sizes consistent with chunk lengths the format allows.
    """
    files = manifest.get("files")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise IntegrityError("the manifest's file list is missing or too long")
    seen: set[str] = set()
    for item in files:
        path = item.get("path")
        try:
            key = normalize_key(path)
        except StorageKeyError as exc:
            raise IntegrityError(f"the manifest holds an unsafe path: {exc}") from None
        if key != path or key in seen:
            raise IntegrityError(f"the manifest holds a non-canonical or repeated path {path!r}")
        seen.add(key)
        mode = item.get("mode", 0o644)
        if item.get("kind", "file") != "file" or not isinstance(mode, int) or mode & ~0o777:
            raise IntegrityError(
                f"the manifest makes {path!r} something other than a plain file "
                f"(kind {item.get('kind', 'file')!r}, mode {mode!r}): links, devices and "
                "set-id bits are never restored"
            )
        chunks = item.get("chunks") or []
        if any(not (0 < n <= MAX_CHUNK) for _cid, n in chunks) or sum(
            n for _c, n in chunks
        ) != item.get("size"):
            raise IntegrityError(f"the manifest's chunk list of {path!r} doesn't add up")
    return files


def select(files: list[dict], paths: Iterable[str] | None) -> list[dict]:
    """The files under any of ``paths`` (keys or prefixes); all of them when None."""
    if not paths:
        return files
    wanted = [normalize_key(p) for p in paths]
    return [f for f in files if any(_under(f["path"], w) for w in wanted)]


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "/")


# ---------------------------------------------------------------------------- restore
# (restores and migrations: ``setlist.backup.restores``; the journal they share is here,
# because no backup may start while one stands)


def publishes(key: str) -> bool:
    """Whether ``key`` is a platform record, which names other files of the tenant that
    readers then open (``setlist.core.records``)."""
    return key.startswith(RECORD_PREFIXES) and key.endswith(".json")


def pending_journal(repo: Repository) -> dict | None:
    import json

    try:
        return json.loads(repo.store.get_text(JOURNAL))
    except ObjectNotFound:
        return None


def refuse_if_journal(repo: Repository) -> None:
    journal = pending_journal(repo)
    if journal:
        raise BackupError(
            f"a restore of snapshot {journal.get('snapshot_id')} into {repo.tenant_id!r} was "
            "interrupted; restore it again to finish before taking a backup"
        )


# ----------------------------------------------------------------------------- verify


@dataclass
class VerifySummary:
    snapshot_id: str
    files_checked: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    chunks_total: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_snapshot(
    repo: Repository, snapshot: str = "latest", *, sample: float = 1.0, seed: int | None = None
) -> VerifySummary:
    """Read back the snapshot: with ``sample`` 1, every file reassembled and its sha256
    checked (so every chunk authenticated and hashed); below 1, that share of its chunks."""
    snapshot_id = repo.resolve(snapshot)
    files = check_manifest(repo.get_manifest(snapshot_id))
    summary = VerifySummary(snapshot_id)
    unique = {cid: n for f in files for cid, n in f["chunks"]}
    summary.chunks_total = len(unique)
    if sample >= 1.0:
        for item in files:
            file_hash = hashlib.sha256()
            try:
                for chunk_id, length in item["chunks"]:
                    file_hash.update(repo.get_chunk(chunk_id, length))
                    summary.chunks_checked += 1
                    summary.bytes_checked += length
            except IntegrityError as exc:
                summary.errors.append(f"{item['path']}: {exc}")
                continue
            if file_hash.hexdigest() != item["sha256"]:
                summary.errors.append(f"{item['path']}: sha256 mismatch")
            summary.files_checked += 1
        return summary
    rng = random.Random(seed)
    count = max(1, round(len(unique) * sample)) if unique else 0
    for chunk_id in rng.sample(sorted(unique), count):
        try:
            repo.get_chunk(chunk_id, unique[chunk_id])
        except IntegrityError as exc:
            summary.errors.append(str(exc))
        summary.chunks_checked += 1
        summary.bytes_checked += unique[chunk_id]
    return summary


# ------------------------------------------------------------------------------ prune


@dataclass(frozen=True)
class Retention:
    daily: int = 7
    weekly: int = 4
    monthly: int = 12


_BUCKETS: dict[str, Callable[[datetime], Any]] = {
    "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
}


def snapshots_to_keep(snapshot_ids: list[str], policy: Retention) -> set[str]:
    """The newest snapshot of each of the last N days, M ISO weeks and K months; the
    newest snapshot of all is always kept (it is the next backup's parent)."""
    newest_first = sorted(snapshot_ids, reverse=True)
    keep = set(newest_first[:1])
    for name, bucket_of in _BUCKETS.items():
        left = getattr(policy, name)
        last = None
        for snapshot_id in newest_first:
            if left <= 0:
                break
            bucket = bucket_of(snapshot_time(snapshot_id))
            if bucket != last:
                keep.add(snapshot_id)
                last = bucket
                left -= 1
    return keep


@dataclass
class PruneSummary:
    kept: list[str]
    removed: list[str]
    chunks_deleted: int = 0
    chunks_kept: int = 0


def prune(repo: Repository, policy: Retention, *, dry_run: bool = False) -> PruneSummary:
    """Forget the snapshots the policy doesn't keep, then delete the chunks no kept
    snapshot references. Every kept manifest is read first: if one can't be, nothing is
    deleted (a chunk is only deleted when it is certainly unreferenced)."""
    refuse_if_journal(repo)
    ids = repo.snapshot_ids()
    keep = snapshots_to_keep(ids, policy)
    referenced: set[str] = set()
    for snapshot_id in sorted(keep):
        for item in check_manifest(repo.get_manifest(snapshot_id)):
            referenced.update(cid for cid, _n in item["chunks"])
    removed = [s for s in ids if s not in keep]
    summary = PruneSummary(kept=sorted(keep), removed=removed)
    stored = repo.known_chunks()
    summary.chunks_kept = len(stored & referenced)
    if dry_run:
        summary.chunks_deleted = len(stored - referenced)
        return summary
    for snapshot_id in removed:  # manifests first: a crash then leaves only orphans
        repo.delete_manifest(snapshot_id)
    summary.chunks_deleted, summary.chunks_kept = repo.drop_unreferenced(referenced)
    return summary


# ------------------------------------------------------------------------------- list


def list_snapshots(repo: Repository) -> list[dict]:
    rows = []
    for snapshot_id in repo.snapshot_ids():
        manifest = repo.get_manifest(snapshot_id)
        stats = manifest.get("stats") or {}
        rows.append(
            {
                "snapshot_id": snapshot_id,
                "created_at": manifest.get("created_at"),
                "files": stats.get("files", len(manifest.get("files", []))),
                "bytes": stats.get("bytes"),
                "new_bytes": stats.get("new_bytes"),
                "config": manifest.get("config") is not None,
                "migrated_from": (manifest.get("migrated_from") or {}).get("tenant_id"),
            }
        )
    return rows
