"""The backup flows' steps as Prefect tasks with retries.

A tenant backup is a task graph: plan → one task per batch of files → manifest.

The steps are ``setlist.backup.snapshots``' (``plan_snapshot``, ``back_up_batch``,
``finish_snapshot``), the same ones ``create_snapshot`` runs in one call; here each is a
Prefect task with retries, so the UI shows a backup's progress batch by batch and a
failure costs a retry of its batch, not the night's backup.

Resuming is by checkpoint, not by Prefect's result cache: each stored batch leaves a
checkpoint in the tenant's repository, and a plan reads them, so a task retry, a flow
retry or a new run after a crash (which a cache keyed on this run would not survive)
reads only the batches that were not finished. Batches run one after another: each
already keeps the cores busy (chunking, compression and encryption on the writer's
threads), and one ``Repository`` handle must not take two batches at once; memory stays
bounded by one batch's chunks in flight.

A restore is the same shape (``setlist.backup.restores``): plan → "stage batch i of n"
→ switch. Its staging directory outlives a dead try, and the plan keeps what an earlier
try staged and hashes right, so a retry reads only the batches that were not finished;
the switch, retried after dying midway, starts its upload over behind its journal. A
migration's copy is plan → "copy batch i of n" (each checkpointed in the target's
repository) → manifest. A prune stays one task: it reads only manifests, deletes
manifests before chunks and recomputes what to drop, so a retry has nothing to redo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from setlist.backup import restores
from setlist.backup.repository import Repository
from setlist.backup.restores import MigrationPlan, RestorePlan, RestoreSummary
from setlist.backup.snapshots import (
    BackupSummary,
    BatchResult,
    PruneSummary,
    Retention,
    SnapshotPlan,
    back_up_batch,
    finish_snapshot,
    plan_snapshot,
    prune,
)
from setlist.core.storage import ObjectEntry, TenantStorage

RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "cache_policy": NO_CACHE}


@task(name="plan-snapshot", persist_result=False, **RETRIES)
def plan(data: TenantStorage, repo: Repository) -> SnapshotPlan:
    return plan_snapshot(data, repo)


@task(name="store-batch", task_run_name="store batch {index} of {total}", persist_result=False,
      **RETRIES)  # fmt: skip
def store_batch(
    data: TenantStorage, repo: Repository, batch: list[ObjectEntry], index: int, total: int
) -> BatchResult:
    return back_up_batch(data, repo, batch)


@task(name="write-manifest", persist_result=False, **RETRIES)
def write_manifest(
    data: TenantStorage,
    repo: Repository,
    planned: SnapshotPlan,
    results: list[BatchResult],
    config: dict[str, Any] | None,
) -> BackupSummary:
    return finish_snapshot(data, repo, planned, results, config=config)


def snapshot_graph(
    data: TenantStorage, repo: Repository, *, config: dict[str, Any] | None = None
) -> BackupSummary:
    """Back up the tenant's data as tasks; what ``create_snapshot`` does in one call."""
    logger = get_run_logger()
    planned = plan(data, repo)
    todo = sum(e.size for batch in planned.batches for e in batch)
    logger.info(
        "snapshot %s: %d files, %d bytes; %d bytes to read in %d batches, the rest unchanged",
        planned.snapshot_id,
        planned.summary.files,
        planned.summary.bytes,
        todo,
        len(planned.batches),
    )
    results: list[BatchResult] = []
    done = 0
    for index, batch in enumerate(planned.batches, 1):
        results.append(store_batch(data, repo, batch, index, len(planned.batches)))
        done += sum(e.size for e in batch)
        logger.info("batch %d/%d stored: %d of %d bytes read", index, len(planned.batches),
                    done, todo)  # fmt: skip
    return write_manifest(data, repo, planned, results, config)


@task(name="plan-restore", persist_result=False, **RETRIES)
def plan_restore(
    data: TenantStorage, repo: Repository, snapshot: str, paths: list[str] | None,
    scratch: Path | None,
) -> RestorePlan:  # fmt: skip
    return restores.plan_restore(data, repo, snapshot, paths=paths, scratch=scratch)


@task(name="stage-batch", task_run_name="stage batch {index} of {total}", persist_result=False,
      **RETRIES)  # fmt: skip
def stage_batch(
    repo: Repository, planned: RestorePlan, batch: list[dict], index: int, total: int
) -> int:
    return restores.stage_batch(repo, planned.staging, batch)


@task(name="switch-in", persist_result=False, **RETRIES)
def switch_in(
    data: TenantStorage, repo: Repository, planned: RestorePlan, bytes_read: int
) -> RestoreSummary:
    return restores.switch_restore(data, repo, planned, bytes_read)


def restore_graph(
    data: TenantStorage,
    repo: Repository,
    snapshot: str,
    paths: list[str] | None,
    scratch: Path | None,
) -> RestoreSummary:
    """Restore as tasks; what ``restores.restore_snapshot`` does in one call."""
    logger = get_run_logger()
    planned = plan_restore(data, repo, snapshot, paths, scratch)
    logger.info(
        "restore of %s: %d files, %d bytes; %d already staged by an earlier try, %d batches",
        planned.snapshot_id,
        len(planned.files),
        planned.summary.bytes,
        planned.resumed,
        len(planned.batches),
    )
    total = len(planned.batches)
    read = sum(
        stage_batch(repo, planned, batch, index, total)
        for index, batch in enumerate(planned.batches, 1)
    )
    return switch_in(data, repo, planned, read)


@task(name="plan-copy", persist_result=False, **RETRIES)
def plan_copy(source: Repository, target: Repository, snapshot: str) -> MigrationPlan:
    return restores.plan_migration(source, target, snapshot)


@task(name="copy-batch", task_run_name="copy batch {index} of {total}", persist_result=False,
      **RETRIES)  # fmt: skip
def copy_batch(
    source: Repository, target: Repository, planned: MigrationPlan, batch: list[dict],
    index: int, total: int,
) -> BatchResult:  # fmt: skip
    return restores.copy_batch(source, target, planned, batch)


@task(name="write-copy-manifest", persist_result=False, **RETRIES)
def finish_copy(
    target: Repository, planned: MigrationPlan, results: list[BatchResult]
) -> BackupSummary:
    return restores.finish_migration(target, planned, results)


def copy_graph(source: Repository, target: Repository, snapshot: str) -> BackupSummary:
    """A snapshot copied into another tenant's repository as tasks; what
    ``restores.migrate_snapshot`` does in one call."""
    planned = plan_copy(source, target, snapshot)
    total = len(planned.batches)
    results = [
        copy_batch(source, target, planned, batch, index, total)
        for index, batch in enumerate(planned.batches, 1)
    ]
    return finish_copy(target, planned, results)


@task(name="prune-repository", persist_result=False, **RETRIES)
def prune_repository(repo: Repository, policy: Retention) -> PruneSummary:
    return prune(repo, policy)
