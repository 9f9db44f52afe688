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

A restore, a migration's copy and a prune are one task each, retried whole: a restore
stages and verifies everything before it switches, and a try that died during the
switch is finished (rolled forward from its journal) by the next try before anything
else; a copy writes its manifest last; a prune recomputes what to drop. None of them
has batches to resume yet: their retry starts their step over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from setlist.backup.repository import Repository
from setlist.backup.snapshots import (
    BackupSummary,
    BatchResult,
    PruneSummary,
    RestoreSummary,
    Retention,
    SnapshotPlan,
    back_up_batch,
    finish_snapshot,
    migrate_snapshot,
    pending_journal,
    plan_snapshot,
    prune,
    restore_snapshot,
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


@task(name="restore-files", persist_result=False, **RETRIES)
def restore_files(
    data: TenantStorage,
    repo: Repository,
    snapshot: str,
    paths: list[str] | None,
    scratch: Path | None,
) -> RestoreSummary:
    """Stage, verify and switch in ``snapshot``; a switch this very restore left half
    done (an earlier try of this task) is finished first."""
    ctx = TaskRunContext.get()
    retry = ctx is not None and ctx.task_run.run_count > 1
    journal = pending_journal(repo) if retry else None
    if journal and journal.get("snapshot_id") == repo.resolve(snapshot):
        restore_snapshot(
            data, repo, journal["snapshot_id"], paths=journal.get("paths"), scratch=scratch
        )
    return restore_snapshot(data, repo, snapshot, paths=paths, scratch=scratch)


@task(name="copy-snapshot", persist_result=False, **RETRIES)
def copy_snapshot(source: Repository, target: Repository, snapshot: str) -> BackupSummary:
    return migrate_snapshot(source, target, snapshot)


@task(name="prune-repository", persist_result=False, **RETRIES)
def prune_repository(repo: Repository, policy: Retention) -> PruneSummary:
    return prune(repo, policy)
