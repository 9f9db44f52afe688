"""Tenant backup, restore, migration and retention (flows tenant-backup, tenant-restore,
tenant-migrate, backup-prune).

The work is in ``setlist.backup``: ``snapshots`` (chunking, staging, switching,
retention), ``repository`` (encryption, integrity) and ``operations`` (the steps these
flows share); these flows add the tenant check, the locks that keep writers out while a
tenant's data is swapped, the platform config, the artifacts and the audit trail. Runs
of one tenant never overlap: backup, prune and restore share the tenant's ``backup``
lock, and a restore also takes the ``etl`` and ``models`` locks, so no load or model
registration writes into data being replaced.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from pydantic import Field

from setlist.backup.graph import copy_graph, snapshot_graph
from setlist.backup.operations import prune_tenant, publish_result, restore_tenant
from setlist.backup.platform import capture_config, tenant_repository
from setlist.backup.repository import BackupError
from setlist.backup.results import (
    SNAPSHOT_DOC,
    BackupResult,
    PruneResult,
    RestoreResult,
    RetentionPolicy,
)
from setlist.core.tenancy import parse_queue_name
from setlist.dispatch.locks import tenant_lock
from setlist.tenants.runtime import JOB_FLOW, enter_tenant
from setlist.tenants.usage import ensure_within_storage_quota

__all__ = [
    "BackupResult",
    "PruneResult",
    "RestoreResult",
    "RetentionPolicy",
    "backup_prune",
    "tenant_backup",
    "tenant_migrate",
    "tenant_restore",
]


# A flow retry resumes from the batches' checkpoints (``setlist.backup.graph``).
@flow(name="tenant-backup", log_prints=True, persist_result=True, retries=1, **JOB_FLOW)
async def tenant_backup(
    tenant_id: str,
    prune_after: Annotated[
        bool, Field(description="apply the retention policy after the backup")
    ] = False,
    retention: RetentionPolicy = RetentionPolicy(),  # noqa: B008 - a pydantic default
) -> BackupResult:
    """Snapshot the tenant's data and platform configuration into its backup repository:
    deduplicated, compressed, encrypted with the tenant's key; unchanged files are not
    read again."""
    tenant = await enter_tenant(tenant_id, active_only=False)
    logger = get_run_logger()
    async with tenant_lock(tenant_id, "backup"):
        repo = await tenant_repository(tenant_id, create=True)
        async with get_client() as client:
            config = await capture_config(client, tenant_id)
        done = snapshot_graph(tenant.storage, repo, config=config)
        result = BackupResult(
            tenant_id=tenant_id,
            snapshot_id=done.snapshot_id,
            files=done.files,
            bytes=done.bytes,
            files_read=done.files_read,
            new_chunks=done.new_chunks,
            new_bytes=done.new_bytes + done.manifest_bytes,
            reused_chunks=done.reused_chunks,
            skipped=len(done.skipped),
            dedup_ratio=round(done.dedup_ratio, 3),
        )
        for item in done.skipped:
            logger.warning("not backed up: %s (%s)", item["path"], item["reason"])
        if prune_after:
            pruned = await prune_tenant(tenant_id, retention)
            result.pruned, result.chunks_deleted = pruned.removed, pruned.chunks_deleted
    logger.info(
        "snapshot %s: %s files, %s bytes (%s files read), %s new bytes stored",
        result.snapshot_id,
        result.files,
        result.bytes,
        result.files_read,
        result.new_bytes,
    )
    await publish_result(
        f"backup-{tenant_id}",
        "setlist.backup.completed",
        [tenant_id],
        (f"setlist.backup.{tenant_id}.{result.snapshot_id}", "snapshot"),
        result,
    )
    return result


@flow(name="tenant-restore", log_prints=True, persist_result=True, **JOB_FLOW)
async def tenant_restore(
    tenant_id: str,
    snapshot: Annotated[str, Field(min_length=1, max_length=40, description=SNAPSHOT_DOC)] = (
        "latest"
    ),
    paths: Annotated[
        list[str], Field(description="restore only these keys or prefixes (e.g. curated/)")
    ] = [],  # noqa: B006 - pydantic copies it
    restore_config: Annotated[
        bool, Field(description="also bring back the profile, pause states and variables")
    ] = False,
) -> RestoreResult:
    """Restore one of the tenant's own snapshots into the tenant: staged and verified in
    full, then switched in; the tenant's data is never left half-restored."""
    result = await restore_tenant(tenant_id, snapshot, paths, restore_config)
    await publish_result(
        f"restore-{tenant_id}",
        "setlist.backup.restored",
        [tenant_id],
        (f"setlist.backup.{tenant_id}.{result.snapshot_id}", "snapshot"),
        result,
    )
    return result


@flow(name="tenant-migrate", log_prints=True, persist_result=True, **JOB_FLOW)
async def tenant_migrate(
    source_tenant_id: str,
    target_tenant_id: str,
    snapshot: Annotated[str, Field(min_length=1, max_length=40, description=SNAPSHOT_DOC)] = (
        "latest"
    ),
    confirm: Annotated[
        str, Field(description="must read SOURCE->TARGET: migration replaces the target's data")
    ] = "",
) -> RestoreResult:
    """Copy a snapshot of one tenant into another (re-encrypted with the target's key)
    and restore it there. Only on explicit request: ``confirm`` must name both tenants."""
    if confirm != f"{source_tenant_id}->{target_tenant_id}":
        raise BackupError(
            "migration replaces the target tenant's data with another tenant's; pass "
            f"confirm={source_tenant_id}->{target_tenant_id} to ask for it explicitly"
        )
    if source_tenant_id == target_tenant_id:
        raise BackupError("source and target are the same tenant; use tenant-restore")
    ctx = FlowRunContext.get()
    if (
        ctx
        and ctx.flow_run
        and (
            parse_queue_name(ctx.flow_run.work_queue_name or "")
            or any(t.startswith("tenant:") for t in ctx.flow_run.tags)
        )
    ):
        # A tenant's queue or deployment acts for that tenant only; reading another
        # tenant's snapshot is an operator's act.
        raise BackupError("tenant-migrate runs only as an operator's run, not a tenant's job")
    # The target's data and repository are written: refused at or over its storage quota.
    target_tenant = await enter_tenant(target_tenant_id, active_only=False)
    await ensure_within_storage_quota(target_tenant, "tenant-migrate")
    source = await tenant_repository(source_tenant_id)
    async with tenant_lock(target_tenant_id, "backup"):
        target = await tenant_repository(target_tenant_id, create=True)
        copied = copy_graph(source, target, snapshot)
    result = await restore_tenant(
        target_tenant_id, copied.snapshot_id, [], False, source=source_tenant_id
    )
    await publish_result(
        f"migrate-{target_tenant_id}",
        "setlist.backup.migrated",
        [source_tenant_id, target_tenant_id],
        (f"setlist.backup.{target_tenant_id}.{result.snapshot_id}", "snapshot"),
        result,
    )
    return result


# A prune recomputes what to drop from the manifests that are left: a retry is safe.
@flow(name="backup-prune", log_prints=True, persist_result=True, retries=1, **JOB_FLOW)
async def backup_prune(
    tenant_id: str,
    retention: RetentionPolicy = RetentionPolicy(),  # noqa: B008 - a pydantic default
) -> PruneResult:
    """Forget the tenant's snapshots the retention policy doesn't keep and delete the
    chunks no kept snapshot references."""
    await enter_tenant(tenant_id, active_only=False)
    async with tenant_lock(tenant_id, "backup"):
        result = await prune_tenant(tenant_id, retention)
    await publish_result(
        f"prune-{tenant_id}",
        "setlist.backup.pruned",
        [tenant_id],
        (f"setlist.backup.{tenant_id}", "repository"),
        result,
    )
    return result
