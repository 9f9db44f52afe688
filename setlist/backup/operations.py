"""The steps the backup flows share: restore under the tenant's locks, prune, and publish a
run's artifact and audit events.

A restore takes the tenant's ``backup``, ``etl`` and ``models`` locks, so no load or
model registration writes into data being replaced, and it first finishes a switch that
was interrupted: a tenant's data is never left half-restored. Then, before it stages
anything, it is refused if the tenant is at or over its storage quota
(``setlist.tenants.usage``). Here, not in the flows, so that the flows only say which
steps they run and under which lock.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from pathlib import Path

from prefect.artifacts import acreate_table_artifact
from prefect.client.orchestration import get_client
from pydantic import BaseModel

from setlist.backup.graph import prune_repository, restore_graph
from setlist.backup.platform import apply_config, tenant_repository
from setlist.backup.repository import BackupError
from setlist.backup.results import PruneResult, RestoreResult, RetentionPolicy
from setlist.backup.snapshots import pending_journal
from setlist.core import audit
from setlist.dispatch.locks import tenant_lock
from setlist.tenants.runtime import enter_tenant
from setlist.tenants.usage import ensure_within_storage_quota


async def publish_result(
    artifact: str, event: str, tenant_ids: list[str], obj: tuple[str, str], result: BaseModel
) -> None:
    """The run's table artifact and its audit event on each tenant it concerns."""
    rows = [{"field": k, "value": str(v)} for k, v in result.model_dump().items()]
    await acreate_table_artifact(key=artifact, table=rows, description=event)
    async with get_client() as client:
        for tenant_id in tenant_ids:
            await audit.emit(client, event, tenant_id, obj=obj, payload=result.model_dump())


async def prune_tenant(tenant_id: str, retention: RetentionPolicy) -> PruneResult:
    repo = await tenant_repository(tenant_id)
    done = prune_repository(repo, retention.policy())
    return PruneResult(
        tenant_id=tenant_id,
        kept=done.kept,
        removed=done.removed,
        chunks_deleted=done.chunks_deleted,
        chunks_kept=done.chunks_kept,
    )


async def restore_tenant(
    tenant_id: str, snapshot: str, paths: list[str], restore_config: bool, source: str = ""
) -> RestoreResult:
    tenant = await enter_tenant(tenant_id, active_only=False)
    async with AsyncExitStack() as locks:
        for name in ("backup", "etl", "models"):
            await locks.enter_async_context(tenant_lock(tenant_id, name))
        repo = await tenant_repository(tenant_id)
        journal = pending_journal(repo)
        if journal and not source:
            # An interrupted switch is finished first: the tenant's data must not stay
            # half-restored, whatever is asked now.
            restore_graph(
                tenant.storage, repo, journal["snapshot_id"], journal.get("paths"), scratch_dir()
            )
        if not source:
            # Finishing a switch already under way is repair, never refused; what is
            # asked now is a new write: refused at or over the quota before anything is
            # staged. (tenant-migrate checks its target before it copies the snapshot.)
            await ensure_within_storage_quota(tenant, "tenant-restore")
        done = restore_graph(tenant.storage, repo, snapshot, paths or None, scratch_dir())
        applied: list[str] = []
        if restore_config:
            manifest = repo.get_manifest(done.snapshot_id)
            if manifest.get("config") is None:
                raise BackupError(f"snapshot {done.snapshot_id} holds no configuration")
            async with get_client() as client:
                applied = await apply_config(client, tenant_id, manifest["config"])
    return RestoreResult(
        tenant_id=tenant_id,
        snapshot_id=done.snapshot_id,
        files=done.files,
        bytes=done.bytes,
        removed=done.removed,
        kept=done.kept,
        config=applied,
        source_tenant_id=source,
        bytes_read=done.bytes_read,
        files_resumed=done.files_resumed,
    )


def scratch_dir() -> Path | None:
    scratch = os.environ.get("SETLIST_SCRATCH")
    return Path(scratch) if scratch else None
