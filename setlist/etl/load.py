"""The load behind the ``data-etl`` flow: a tenant's new raw event files → its curated
events table.

Incremental (the table's manifest lists every raw file loaded), streaming (each raw file
read in batches and staged on local scratch disk; a few files at once, in worker
processes), all-or-nothing (one manifest write publishes the load), and repeatable: the
same raw files always give the same bytes, whatever the batch size or number of workers.

It lives here, not in the flow, so that tests and the benchmark run it without a flow
run; its tasks (``stage_file``, ``merge_partition``) are still task runs of the flow run
that calls it. The flow adds the tenant check, the lock, the artifacts and the audit.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import logging
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import SyncClientContext
from pydantic import BaseModel, Field

from blocks.storage import LocalStorageConfig, S3StorageConfig
from setlist.core.storage import LocalTenantStorage, TenantStorage, tenant_storage
from setlist.core.tenancy import SetlistError
from setlist.etl.curated import (
    QUARANTINE_PREFIX,
    RAW_PREFIX,
    Manifest,
    PartitionFile,
    StageArgs,
    StagedFile,
    canonical_rows,
    encode_partition,
    publish,
    put_partition,
    read_manifest,
    read_partition,
    read_scratch,
    stage_raw_file,
    stage_raw_file_in_worker,
)
from setlist.etl.raw_events import BatchValidator, ReadLimits

log = logging.getLogger("setlist.etl")
StorageConfig = LocalStorageConfig | S3StorageConfig
# Worker processes import these once (in the fork server), not once per worker. Neither
# Prefect nor pandas: a worker gets a local store's root, not its config (a Prefect
# block), and keeps pyarrow from importing pandas (see stage_raw_file_in_worker).
WORKER_MODULES = ["__main__", "setlist.etl.curated"]


class TooManyBadRows(SetlistError):
    """More of the input is bad than the run may accept; nothing was published."""


class ScratchFull(SetlistError):
    """The scratch disk filled up while staging or merging: nothing was published."""


@contextlib.contextmanager
def _scratch_space(scratch: str | None):
    """A full scratch disk, wherever it surfaces (a worker process's write, pyarrow's,
    the temporary directory's), as one error that says what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = scratch or tempfile.gettempdir()
        raise ScratchFull(
            f"scratch disk full at {where} (no space left on device) while staging the new "
            "raw files; nothing was published and the table is unchanged. Give the load more "
            "scratch (the pod's /tmp sizeLimit, SETLIST_SCRATCH) or fewer files at once"
        ) from exc


class EtlReport(BaseModel):
    tenant_id: str
    files: int = 0
    lines: int = 0
    valid_rows: int = 0
    loaded_rows: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects_by_reason: dict[str, int] = Field(default_factory=dict)
    blank_lines: int = 0  # no input lines: neither in ``lines`` nor in ``max_bad_share``
    partitions: list[str] = Field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0
    table_version: int = 0
    table_rows: int = 0


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def find_new_raw_files(storage: TenantStorage, manifest: Manifest) -> list[tuple[str, int]]:
    """Raw files not in the table's manifest (a re-uploaded file of another size is new)."""
    return [
        (key, size)
        for key, size in storage.iter_objects(RAW_PREFIX)
        if manifest.loaded.get(key, {}).get("bytes") != size
    ]


class StagingWorker:
    """A worker process of the load's pool, with what it needs to open the tenant's
    storage itself: the store's config and the tenant id (never a client object)."""

    def __init__(self, pool: ProcessPoolExecutor, config: StorageConfig, tenant_id: str):
        self.pool, self.tenant_id = pool, tenant_id
        # a local store's root: unpickling a config would import Prefect in the worker
        self.config = config.root if isinstance(config, LocalStorageConfig) else config

    def stage(self, args: StageArgs) -> StagedFile:
        future = self.pool.submit(stage_raw_file_in_worker, self.config, self.tenant_id, args)
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise SetlistError(
                f"a staging worker process died ({exc}); if it was killed for memory, lower "
                "batch_rows or workers; a script that runs loads needs an "
                "`if __name__ == '__main__':` guard (workers re-import it); workers=1 "
                "stages in this process only"
            ) from exc


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def stage_file(
    storage: TenantStorage, args: StageArgs, worker: StagingWorker | None = None
) -> StagedFile:
    """Parse one raw file in batches (in this process, or in ``worker``'s); valid rows go to
    scratch files by date, rejects to the tenant's quarantine file for that raw file."""
    if worker is None:
        return stage_raw_file(storage, args)
    return worker.stage(args)


def _merged(
    storage: TenantStorage, date: str, current: list[PartitionFile], staged_dir: Path
) -> tuple[PartitionFile, bytes, int, int]:
    """Published rows of the date (its canonical file, then appended ones) + staged rows
    → one canonical file, not written yet. (file, its bytes, rows the raw files added,
    duplicates dropped)"""
    staged = [read_scratch(p) for p in sorted(staged_dir.glob("*.arrow"))]
    old = [read_partition(storage, p) for p in current]
    published = sum(t.num_rows for t in old)
    table = pa.concat_tables(old + staged)
    rows = canonical_rows(table)  # the merged table is never built whole: see parquet_bytes
    part, data = encode_partition(date, table, rows)
    added = int((rows >= published).sum())  # kept rows that came from the raw files
    return part, data, added, table.num_rows - len(rows)


class MergeAhead:
    """A date's ``_merged``, begun in a thread of the load's pool while earlier dates
    are written."""

    def __init__(self, future: Future[tuple[PartitionFile, bytes, int, int]]):
        self.future: Future | None = future

    def take(self) -> tuple[PartitionFile, bytes, int, int] | None:
        """Its result, once; None if it failed (the task then merges again itself)."""
        future, self.future = self.future, None
        if future is None or future.exception() is not None:
            return None
        return future.result()


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def merge_partition(
    storage: TenantStorage,
    date: str,
    current: list[PartitionFile],
    staged_dir: Path,
    ahead: MergeAhead | None = None,
) -> tuple[PartitionFile, int, int]:
    """Published rows of the date + staged rows → one canonical file. (file, added, dups)

    The date's scratch files go once its file is written (not before: a retry reads
    them again), so scratch frees up as the merge goes on, not at the end."""
    merged = ahead.take() if ahead is not None else None
    part, data, added, duplicates = merged or _merged(storage, date, current, staged_dir)
    written = put_partition(storage, part, data)
    shutil.rmtree(staged_dir, ignore_errors=True)
    return written, added, duplicates


# A row being merged takes about a quarter of the memory of a row being staged (decoded
# Python objects): merges at once may hold this many rows per row a batch may hold.
MERGE_ROWS_PER_BATCH_ROW = 4


def _merge_all(
    storage: TenantStorage,
    manifest: Manifest,
    rows: dict[str, int],
    staging: Path,
    workers: int,
    batch_rows: int,
) -> Iterator[tuple[str, PartitionFile, int, int]]:
    """(date, file, added, dups) of each date of ``rows`` (date → rows to merge), in date
    order. Up to ``workers`` dates are merged at once in threads (Arrow's work runs
    without the GIL) while their rows together stay within what the staging batches
    held, or within the largest date's; files are written one at a time, in date order,
    from here."""
    dates = sorted(rows)

    def task_args(date: str) -> tuple:
        return storage, date, manifest.files(date), staging / f"date={date}"

    if workers <= 1:
        for date in dates:
            yield date, *merge_partition(*task_args(date))
        return
    budget = max(MERGE_ROWS_PER_BATCH_ROW * workers * batch_rows, *rows.values())
    with ThreadPoolExecutor(workers, thread_name_prefix="etl-merge") as pool:
        ahead: deque[Future] = deque()
        started = held = 0
        for date in dates:
            while (
                started < len(dates)
                and len(ahead) < workers
                and held + rows[dates[started]] <= budget
            ):
                ahead.append(pool.submit(_merged, *task_args(dates[started])))
                held += rows[dates[started]]
                started += 1
            yield date, *merge_partition(*task_args(date), MergeAhead(ahead.popleft()))
            held -= rows[date]


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker_config(storage: TenantStorage, config: StorageConfig | None) -> StorageConfig | None:
    """The config worker processes open the tenant's storage from; None if there is none
    (an S3 handle carries no config: its caller must pass the one it was made from)."""
    if config is None and isinstance(storage, LocalTenantStorage):
        config = LocalStorageConfig(root=str(storage.root))
    if config is not None:
        theirs = tenant_storage(storage.tenant_id, config).describe()
        if theirs != storage.describe():
            raise SetlistError(
                f"storage_config names {theirs}, but the load's storage is "
                f"{storage.describe()}; pass the config the storage handle was made from"
            )
    return config


def _worker_context() -> multiprocessing.context.BaseContext:
    """How worker processes start: forked from a fork server that imported
    ``WORKER_MODULES`` (a fork of this process would copy Prefect's threads' state)."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(WORKER_MODULES)
    return ctx


def _start_fork_server() -> None:
    """Start the fork server (a new interpreter and its imports: a few tenths of a second)
    in a thread while the load still lists its files, so that the first worker process
    starts as soon as staging does. Once per process; a failure here is met again, and
    raised, when the pool starts a worker."""
    if _worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        threading.Thread(
            target=forkserver.ensure_running, name="etl-forkserver", daemon=True
        ).start()


def _stage_all(
    storage: TenantStorage,
    new: list[tuple[str, int]],
    staging: Path,
    validator: BatchValidator,
    batch_rows: int,
    workers: int,
    config: StorageConfig | None,
) -> list[StagedFile]:
    """Stage every new file: ``workers`` at a time, this process being one of them and
    worker processes the others; biggest files first. Results in the order of ``new``."""

    def one(n: int, worker: StagingWorker | None = None) -> StagedFile:
        key, size = new[n]
        return stage_file(storage, StageArgs(key, size, n, staging, validator, batch_rows), worker)

    if workers <= 1 or config is None:
        if workers > 1:
            log.warning("no storage config for worker processes: staging in this one only")
        return [one(n) for n in range(len(new))]

    ctx = _worker_context()
    slots: queue.SimpleQueue[StagingWorker | None] = queue.SimpleQueue()

    def in_slot(n: int) -> StagedFile:
        worker = slots.get()
        try:
            return one(n, worker)
        finally:
            slots.put(worker)

    with (
        ProcessPoolExecutor(workers - 1, mp_context=ctx) as pool,
        ThreadPoolExecutor(workers, thread_name_prefix="etl-stage") as threads,
    ):
        slots.put(None)  # this process
        for _ in range(workers - 1):
            slots.put(StagingWorker(pool, config, storage.tenant_id))
        futures: dict[int, Future[StagedFile]] = {}
        for n in sorted(range(len(new)), key=lambda n: -new[n][1]):
            # each task runs in the caller's context (its flow run), as if called here
            futures[n] = threads.submit(contextvars.copy_context().run, in_slot, n)
        try:
            return [futures[n].result() for n in range(len(new))]
        except BaseException:
            for future in futures.values():
                future.cancel()
            raise


def read_limits() -> ReadLimits:
    """What reading one raw file may cost: ``ReadLimits``' defaults, each overridable by
    the operator as ``SETLIST_ETL_<FIELD>`` (e.g. ``SETLIST_ETL_MAX_RATIO=500``)."""
    return ReadLimits(
        **{
            f.name: int(value)
            for f in dataclasses.fields(ReadLimits)
            if (value := os.environ.get(f"SETLIST_ETL_{f.name.upper()}"))
        }
    )


class TableChanged(SetlistError):
    """The table's files changed between a load's start and its publish (a restore or
    another load published): nothing was published; run the load again."""


@dataclasses.dataclass
class PreparedLoad:
    """A load with its files written and not published yet (``publish_load``)."""

    base: Manifest
    report: EtlReport
    partitions: dict[str, PartitionFile] = dataclasses.field(default_factory=dict)
    compacted: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    loaded: dict[str, dict] = dataclasses.field(default_factory=dict)
    started: float = 0.0


def prepare_load(
    storage: TenantStorage,
    tenant_id: str,
    *,
    max_bad_share: float = 0.05,
    batch_rows: int = 100_000,
    now: datetime | None = None,
    scratch: str | None = None,
    workers: int | None = None,
    storage_config: StorageConfig | None = None,
    limits: ReadLimits | None = None,
) -> PreparedLoad:
    """Everything of a load but its publish (``publish_load``): new raw files staged,
    and each date they touch or that has appended stream rows merged into a new
    canonical file (written, not yet referenced).

    Up to ``workers`` raw files (default: one per CPU) are staged at once, this process
    staging one and worker processes the others, then up to ``workers`` dates are merged
    at once in threads (within a memory budget); 1 does it all one at a time here.
    Worker processes open the tenant's storage from ``storage_config`` (a local store's
    is known from its handle). The result is the same whatever the number of workers.
    What reading a raw file may cost is ``limits`` (default: ``read_limits()``); blank
    lines are counted apart (``blank_lines``), not toward ``max_bad_share``."""
    t0 = time.perf_counter()
    workers = max(1, workers or default_workers())
    if workers > 1 and (storage_config is not None or isinstance(storage, LocalTenantStorage)):
        _start_fork_server()
    report = EtlReport(tenant_id=tenant_id)
    manifest = read_manifest(storage)
    prepared = PreparedLoad(base=manifest, report=report, started=t0)
    new = find_new_raw_files(storage, manifest)
    report.table_version, report.table_rows = manifest.version, manifest.rows
    appended = {d: files for d, files in manifest.appended.items() if files}
    if not new and not appended:
        return prepared
    validator = BatchValidator(tenant_id, now or datetime.now(UTC), limits or read_limits())
    stagers = max(1, min(workers, len(new)))
    config = _worker_config(storage, storage_config) if stagers > 1 else None
    if scratch:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with (
        _scratch_space(scratch),
        tempfile.TemporaryDirectory(prefix="setlist-etl-", dir=scratch) as tmp,
    ):
        staging = Path(tmp)
        stats = _stage_all(storage, new, staging, validator, batch_rows, stagers, config)
        rejects = sum((s.rejects for s in stats), Counter())
        report.files = len(stats)
        report.lines = sum(s.lines for s in stats)
        report.valid_rows = sum(s.valid for s in stats)
        report.rejected = sum(rejects.values())
        report.rejects_by_reason = dict(sorted(rejects.items()))
        report.blank_lines = sum(s.blank_lines for s in stats)
        if report.blank_lines > report.lines:
            log.warning("%s blank lines, %s others", report.blank_lines, report.lines)
        report.bytes_in = sum(s.bytes for s in stats)
        if report.lines and report.rejected / report.lines > max_bad_share:
            raise TooManyBadRows(
                f"{report.rejected} of {report.lines} lines are bad "
                f"({report.rejected / report.lines:.1%} > {max_bad_share:.1%} allowed): "
                f"{report.rejects_by_reason}; see {QUARANTINE_PREFIX}; nothing was loaded"
            )
        rows = sum((s.dates for s in stats), Counter())
        for date in appended:  # compacted with the raw files' rows, or alone
            rows[date] += 0
        for date in list(rows):
            rows[date] += sum(p.rows for p in manifest.files(date))
        merged = _merge_all(storage, manifest, rows, staging, workers, batch_rows)
        for date, part, added, dups in merged:
            prepared.partitions[date] = part
            prepared.compacted[date] = {p.key for p in appended.get(date, [])}
            report.loaded_rows += added
            report.duplicates += dups
            report.bytes_out += part.bytes
            report.partitions.append(date)
        for s in stats:
            prepared.loaded[s.key] = {
                "bytes": s.bytes,
                "lines": s.lines,
                "valid": s.valid,
                "rejected": sum(s.rejects.values()),
            }
    return prepared


def publish_load(storage: TenantStorage, prepared: PreparedLoad) -> EtlReport:
    """Publish a prepared load on the table as it is now: the stream rows appended
    since the load began stay appended, each stream's newer position is kept. Call under
    the table lock. A load with nothing to publish publishes nothing."""
    report = prepared.report
    if prepared.partitions or prepared.loaded:
        current = read_manifest(storage)
        if current.partitions != prepared.base.partitions:
            raise TableChanged(
                f"the table went from version {prepared.base.version} to {current.version} "
                "with other canonical files during this load; nothing was published, "
                "run it again"
            )
        updated = current.copy()
        updated.partitions.update(prepared.partitions)
        updated.loaded.update(prepared.loaded)
        for date, keys in prepared.compacted.items():
            left = [p for p in current.appended.get(date, []) if p.key not in keys]
            updated.appended[date] = left
        published = publish(storage, current, updated)
        report.table_version, report.table_rows = published.version, published.rows
    report.seconds = round(time.perf_counter() - prepared.started, 3)
    report.events_per_s = round(report.lines / report.seconds, 1) if report.seconds else 0.0
    return report


def load_new_files(storage: TenantStorage, tenant_id: str, **options: Any) -> EtlReport:
    """The whole load, ``prepare_load`` (whose keywords ``options`` are) then
    ``publish_load``, without the table lock: for a caller that is the table's only
    writer (tests, the benchmark). The flow prepares, then publishes under the lock.

    Its task runs share one API client, as a flow run's do: outside a flow each task run
    would otherwise build its own, and with it a TLS context from the CA bundle (~25 ms
    of CPU each, two dozen times a load)."""
    with SyncClientContext.get_or_create():
        return publish_load(storage, prepare_load(storage, tenant_id, **options))
