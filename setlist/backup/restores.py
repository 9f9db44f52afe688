"""Restores and migrations of a tenant's data, resumable batch by batch.

A restore is plan → stage batches → switch. Staging goes to a directory named for the
tenant, the snapshot and the paths asked for, kept until the switch is done, so a try
that dies (a task retry, a flow retry, a new run after a crash) finds what it already
staged: the plan re-hashes each staged file against the manifest's sha256 and only the
files missing or wrong are read from the repository again. Nothing in a staging
directory is trusted: a file that doesn't hash right, a file the snapshot doesn't hold,
a link of any kind, is removed before anything is staged beside it.

The switch changes the tenant's data only once everything is staged and verified: on a
local store the staged tree is swapped in with one atomic directory exchange; on an
object store the files are uploaded behind a journal (``snapshots.JOURNAL``), records
last, and an interrupted switch is rolled forward by the next restore.

A migration copies a snapshot into another tenant's repository, re-encrypted with the
target's key, in batches: each copied batch leaves a checkpoint in the target
repository (sealed with the target's key, so only a migration of the same snapshot can
use it), and a resumed copy takes the checkpointed files instead of reading them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path

from setlist.backup.repository import (
    BackupError,
    IntegrityError,
    Repository,
    new_snapshot_id,
)
from setlist.backup.snapshots import (
    BATCH_BYTES,
    BATCH_FILES,
    JOURNAL,
    BackupSummary,
    BatchResult,
    _under,
    batches_of,
    check_manifest,
    publishes,
    refuse_if_journal,
    select,
)
from setlist.core.storage import TENANTS_PREFIX, LocalTenantStorage, TenantStorage, normalize_key

HASH_BLOCK = 4 * 1024 * 1024
_KEY = 20  # hex characters of a staging directory's key


# ---------------------------------------------------------------------------- staging


def _clear(path: Path) -> None:
    """Remove whatever is at ``path`` without following it: a link goes, not its target."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _staging_dir(data: TenantStorage, snapshot_id: str, paths: list[str] | None,
                 scratch: Path | None) -> tuple[Path, re.Pattern[str]]:  # fmt: skip
    """Where this restore stages, and the pattern of every staging directory of the
    tenant's in this store (an abandoned one of another snapshot is dropped by the next
    restore).

    Locally it is a sibling of the tenant's directory (same filesystem, so the switch is
    a rename; the leading dot keeps it out of every tenant id's reach); for an object
    store, under the scratch directory."""
    wanted = sorted(normalize_key(p) for p in paths) if paths else []
    key = hashlib.sha256(json.dumps([data.tenant_id, snapshot_id, wanted]).encode()).hexdigest()
    if isinstance(data, LocalTenantStorage):
        parent, prefix = data.root / TENANTS_PREFIX, f".restore-{data.tenant_id}-"
    else:
        # The scratch directory may be shared (the host's /tmp by default): the store's
        # identity in the name keeps a restore of the same tenant id in another store
        # (another platform, another bucket) from taking this one's staging for stale.
        store = hashlib.sha256(data.describe().encode()).hexdigest()[:12]
        parent = scratch or Path(tempfile.gettempdir())
        prefix = f"setlist-restore-{data.tenant_id}-{store}-"
    return parent / f"{prefix}{key[:_KEY]}", re.compile(re.escape(prefix) + f"[0-9a-f]{{{_KEY}}}")


def _open_staging(staging: Path, pattern: re.Pattern[str]) -> None:
    staging.parent.mkdir(parents=True, exist_ok=True)
    for other in staging.parent.iterdir():
        if other.name != staging.name and pattern.fullmatch(other.name):
            _clear(other)
    try:
        st = os.lstat(staging)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            _clear(staging)  # a link or a stranger's directory is never staged into
    except FileNotFoundError:
        pass
    staging.mkdir(mode=0o700, exist_ok=True)


def _sweep(staging: Path, wanted: set[str]) -> None:
    """Remove every link and every file the snapshot doesn't hold from ``staging`` (a
    planted file, or the old tree of a switch that died before its clean-up)."""
    for top, dirs, files in os.walk(staging):
        for name in dirs + files:
            path = Path(top) / name
            is_link = path.is_symlink()
            if is_link or (name in files and path.relative_to(staging).as_posix() not in wanted):
                _clear(path)
        dirs[:] = [d for d in dirs if (Path(top) / d).is_dir() and not (Path(top) / d).is_symlink()]
    for top, _dirs, _files in os.walk(staging, topdown=False):  # and directories left empty
        if top != str(staging) and not any(Path(top).iterdir()):
            os.rmdir(top)


def _staged(path: Path, item: dict) -> bool:
    """Whether ``path`` is a regular file holding exactly ``item``'s bytes."""
    if not _regular_of_size(path, item["size"]):
        return False
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest() == item["sha256"]


def _write_file(repo: Repository, item: dict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear(target)  # what a dead try left half-written
    file_hash = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        for chunk_id, length in item["chunks"]:
            data = repo.get_chunk(chunk_id, length)
            file_hash.update(data)
            out.write(data)
    if file_hash.hexdigest() != item["sha256"]:
        raise IntegrityError(f"{item['path']} does not match its sha256 after reassembly")
    os.chmod(target, item.get("mode", 0o644) & 0o777)


# ---------------------------------------------------------------------------- restore


@dataclass
class RestoreSummary:
    snapshot_id: str
    files: int = 0
    bytes: int = 0
    removed: int = 0
    kept: int = 0
    bytes_read: int = 0  # read from the repository by this try (a resumed one reads less)
    files_resumed: int = 0  # found staged and verified by an earlier try


@dataclass
class RestorePlan:
    """What a restore writes, where it stages, and the batches left to stage."""

    tenant_id: str
    snapshot_id: str
    paths: list[str] | None
    files: list[dict]
    staging: Path
    batches: list[list[dict]]
    resumed: int = 0
    summary: RestoreSummary = field(init=False)

    def __post_init__(self) -> None:
        self.summary = RestoreSummary(
            self.snapshot_id,
            files=len(self.files),
            bytes=sum(f["size"] for f in self.files),
            files_resumed=self.resumed,
        )


def plan_restore(
    data: TenantStorage,
    repo: Repository,
    snapshot: str = "latest",
    *,
    paths: list[str] | None = None,
    scratch: Path | None = None,
    batch_bytes: int = BATCH_BYTES,
    batch_files: int = BATCH_FILES,
) -> RestorePlan:
    """Check the snapshot's manifest, open its staging directory and keep there only
    what an earlier try staged right; the rest is split into batches.

    The repository and the data must belong to the same tenant: restoring one tenant's
    snapshot into another is a migration's job, and only on explicit request.
    """
    if data.tenant_id != repo.tenant_id:
        raise BackupError(
            f"a restore can't cross tenants ({repo.tenant_id!r} → {data.tenant_id!r}); "
            "use migrate to copy a tenant's snapshot into another tenant"
        )
    snapshot_id = repo.resolve(snapshot)
    files = select(check_manifest(repo.get_manifest(snapshot_id)), paths)
    if paths and not files:
        raise BackupError(f"snapshot {snapshot_id} holds nothing under {', '.join(paths)}")
    staging, pattern = _staging_dir(data, snapshot_id, paths, scratch)
    _open_staging(staging, pattern)
    _sweep(staging, {f["path"] for f in files})
    todo = [f for f in files if not _staged(staging / f["path"], f)]
    return RestorePlan(
        data.tenant_id,
        snapshot_id,
        paths,
        files,
        staging,
        batches_of(todo, itemgetter("size"), batch_bytes, batch_files),
        resumed=len(files) - len(todo),
    )


def stage_batch(repo: Repository, staging: Path, batch: list[dict]) -> int:
    """Write and verify one batch under ``staging``; → bytes read from the repository.

    A damaged snapshot (a chunk that fails authentication, a file that doesn't hash
    right) is refused with nothing left behind: retrying can't mend it. Any other error
    (the store unreachable, the pod evicted) keeps what is staged for the next try."""
    read = 0
    try:
        for item in batch:
            _write_file(repo, item, staging / item["path"])
            read += item["size"]
    except (IntegrityError, BackupError):
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read


def switch_restore(
    data: TenantStorage, repo: Repository, plan: RestorePlan, bytes_read: int = 0
) -> RestoreSummary:
    """Make the tenant's data what ``plan`` staged, then drop the staging directory.
    Safe to run again after dying midway: a file the staging lost meanwhile is staged
    again first, and an object store's upload starts over behind its journal."""
    lost = [f for f in plan.files if not _regular_of_size(plan.staging / f["path"], f["size"])]
    bytes_read += stage_batch(repo, plan.staging, lost)
    summary = plan.summary
    summary.bytes_read = bytes_read
    if isinstance(data, LocalTenantStorage):
        _switch_local(data, plan, summary)
    else:
        _switch_objects(data, repo, plan, summary)
    shutil.rmtree(plan.staging, ignore_errors=True)
    return summary


def _regular_of_size(path: Path, size: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _switch_local(data: LocalTenantStorage, plan: RestorePlan, summary: RestoreSummary) -> None:
    staging = plan.staging
    if plan.paths and data.dir.is_dir():
        wanted = [normalize_key(p) for p in plan.paths]
        for entry in data.iter_entries(""):
            if entry.kind == "file" and not any(_under(entry.key, w) for w in wanted):
                link = staging / entry.key
                link.parent.mkdir(parents=True, exist_ok=True)
                _clear(link)  # linked by a try that died before its switch
                os.link(data.dir / entry.key, link)  # unchanged: hard-linked, not copied
                summary.kept += 1
    restored = {f["path"] for f in plan.files}
    summary.removed = sum(
        1
        for e in data.iter_entries("")
        if e.key not in restored and (not plan.paths or any(_under(e.key, p) for p in plan.paths))
    )
    _switch(staging, data.dir)


def _switch(staged: Path, target: Path) -> None:
    """Put ``staged`` in ``target``'s place; the old tree ends up at ``staged``."""
    if not target.exists():
        os.rename(staged, target)
        staged.mkdir()
        return
    if _exchange(staged, target):
        return
    old = staged.with_name(staged.name + ".old")  # no atomic exchange: two renames
    os.rename(target, old)
    os.rename(staged, target)
    os.rename(old, staged)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two directories in one atomic step (Linux)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _switch_objects(
    data: TenantStorage, repo: Repository, plan: RestorePlan, summary: RestoreSummary
) -> None:
    wanted = [normalize_key(p) for p in plan.paths] if plan.paths else None
    restored = {f["path"] for f in plan.files}
    extra = [
        e.key
        for e in data.iter_entries("")
        if (wanted is None or any(_under(e.key, w) for w in wanted)) and e.key not in restored
    ]
    # Verified in full; from here a crash is rolled forward by the next restore.
    journal = {"snapshot_id": plan.snapshot_id, "paths": plan.paths, "tenant": data.tenant_id}
    repo.store.put_text(JOURNAL, json.dumps(journal))
    for item in sorted(plan.files, key=lambda f: publishes(f["path"])):  # stable: records last
        data.put_file(item["path"], plan.staging / item["path"])
    for key in extra:
        data.delete(key)
    summary.removed = len(extra)
    repo.store.delete(JOURNAL)


def restore_snapshot(
    data: TenantStorage,
    repo: Repository,
    snapshot: str = "latest",
    *,
    paths: list[str] | None = None,
    scratch: Path | None = None,
    batch_bytes: int = BATCH_BYTES,
) -> RestoreSummary:
    """Make the tenant's data (or the ``paths`` part of it) what ``snapshot`` holds: the
    three steps in one call (the flow runs them as tasks, ``setlist.backup.graph``)."""
    plan = plan_restore(data, repo, snapshot, paths=paths, scratch=scratch, batch_bytes=batch_bytes)
    read = sum(stage_batch(repo, plan.staging, batch) for batch in plan.batches)
    return switch_restore(data, repo, plan, read)


# ---------------------------------------------------------------------------- migrate


@dataclass
class MigrationPlan:
    """A snapshot's copy into another tenant's repository: the files a checkpoint of an
    earlier try already copied, and the batches left to copy."""

    source_tenant_id: str
    snapshot_id: str
    files: list[dict]
    copied: dict[str, dict]  # path → the target's entry, from the checkpoints
    batches: list[list[dict]]

    @property
    def marker(self) -> str:
        return f"{self.source_tenant_id}/{self.snapshot_id}"


def plan_migration(
    source: Repository,
    target: Repository,
    snapshot: str = "latest",
    *,
    batch_bytes: int = BATCH_BYTES,
    batch_files: int = BATCH_FILES,
) -> MigrationPlan:
    if source.tenant_id == target.tenant_id:
        raise BackupError("migrate copies between two tenants; use restore within one")
    refuse_if_journal(target)
    snapshot_id = source.resolve(snapshot)
    files = check_manifest(source.get_manifest(snapshot_id))
    marker = f"{source.tenant_id}/{snapshot_id}"
    known = target.known_chunks()
    by_path = {f["path"]: f for f in files}
    copied: dict[str, dict] = {}
    for entry in target.checkpoint_files():
        item = by_path.get(entry["path"])
        if (
            item is not None
            and entry.get("migrated_from") == marker
            and entry.get("sha256") == item["sha256"]
            and entry.get("size") == item["size"]
            and all(cid in known for cid, _n in entry.get("chunks") or [])
        ):
            copied[item["path"]] = entry
    todo = [f for f in files if f["path"] not in copied]
    batches = batches_of(todo, itemgetter("size"), batch_bytes, batch_files)
    return MigrationPlan(source.tenant_id, snapshot_id, files, copied, batches)


def copy_batch(source: Repository, target: Repository, plan: MigrationPlan,
               batch: list[dict]) -> BatchResult:  # fmt: skip
    """Copy one batch's chunks, re-encrypted for the target, then checkpoint it: once
    this returns, a crash costs this batch nothing."""
    part = BatchResult([])
    known = target.known_chunks()
    moved: list[dict] = []
    for item in batch:
        chunks = []
        for chunk_id, length in item["chunks"]:
            data = source.get_chunk(chunk_id, length)
            part.bytes_read += length
            new_id = target.key.chunk_id(data)
            if new_id in known:
                part.reused_chunks += 1
            else:
                part.new_bytes += target.put_sealed(new_id, target.seal_chunk(new_id, data))
                part.new_chunks += 1
                known.add(new_id)
            chunks.append([new_id, length])
        moved.append({**item, "chunks": chunks, "fingerprint": "", "migrated_from": plan.marker})
        part.files_read += 1
    target.flush()  # every chunk written before the checkpoint names it
    target.put_checkpoint(moved)
    part.files = moved
    return part


def finish_migration(
    target: Repository, plan: MigrationPlan, parts: list[BatchResult]
) -> BackupSummary:
    """Write the target's manifest (last: the copy exists only now), drop the checkpoints."""
    summary = BackupSummary(new_snapshot_id(after=(target.snapshot_ids() or [None])[-1]))
    entries = dict(plan.copied)
    for part in parts:
        summary.files_read += part.files_read
        summary.bytes_read += part.bytes_read
        summary.new_chunks += part.new_chunks
        summary.new_bytes += part.new_bytes
        summary.reused_chunks += part.reused_chunks
        entries.update((item["path"], item) for item in part.files)
    missing = [f["path"] for f in plan.files if f["path"] not in entries]
    if missing:
        raise BackupError(f"{len(missing)} files were never copied, e.g. {missing[0]!r}")
    moved = [
        {k: v for k, v in entries[f["path"]].items() if k != "migrated_from"} for f in plan.files
    ]
    summary.files = len(moved)
    summary.bytes = sum(f["size"] for f in moved)
    manifest = {
        "format": 1,
        "snapshot_id": summary.snapshot_id,
        "tenant_id": target.tenant_id,
        "created_at": datetime.now(UTC).isoformat(),
        "parent": None,
        "migrated_from": {"tenant_id": plan.source_tenant_id, "snapshot_id": plan.snapshot_id},
        "files": moved,
        "config": None,
        "skipped": [],
        "stats": {"files": summary.files, "bytes": summary.bytes},
    }
    summary.manifest_bytes = target.put_manifest(manifest)
    target.drop_checkpoints()
    return summary


def migrate_snapshot(
    source: Repository, target: Repository, snapshot: str = "latest", *,
    batch_bytes: int = BATCH_BYTES,
) -> BackupSummary:  # fmt: skip
    """Copy one tenant's snapshot into another tenant's repository, re-encrypted (and
    re-keyed) for the target. The tenant configuration stays behind: it is the source's."""
    plan = plan_migration(source, target, snapshot, batch_bytes=batch_bytes)
    parts = [copy_batch(source, target, plan, batch) for batch in plan.batches]
    return finish_migration(target, plan, parts)
