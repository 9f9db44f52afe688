"""Where backups live and what of the platform they carry: repository store, keys, config.

The repository store is its own storage block (``SETLIST_BACKUP_BLOCK``, default
``setlist-backups``), refused when it is the tenants' data store: a backup that sits in
the data it protects is lost with it. On S3 a tenant's jobs open it with the tenant's
own backup credential (block ``setlist-backup-identity-<tenant>``, made at onboarding),
which reaches that tenant's prefix only. Each tenant's key is a Prefect Secret block,
``setlist-backup-key-<tenant>``, created with the tenant's first backup; it is never
logged, put in an artifact or a manifest. Without it the tenant's backups are
unreadable — operators must back the key up outside the platform.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.system import Secret
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.exceptions import ObjectNotFound

from blocks.storage import LocalStorageConfig, S3StorageConfig
from setlist.backup.repository import BackupError, BackupKey, Repository, open_repository
from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, load_storage_location, tenant_storage
from setlist.core.tenancy import (
    backup_key_block_name,
    concurrency_limit_name,
    parse_queue_name,
    variable_owner,
)
from setlist.dispatch.leadership import dispatcher_active
from setlist.dispatch.queues import read_pool_queues
from setlist.tenants.storage_identity import tenant_store_config


async def load_key(tenant_id: str) -> BackupKey | None:
    try:
        secret = await Secret.aload(backup_key_block_name(tenant_id))
    except ValueError:
        return None
    return BackupKey.from_text(str(secret.get()))


async def repository_config(tenant_id: str | None = None) -> LocalStorageConfig | S3StorageConfig:
    """The backup store's config: with ``tenant_id``, as that tenant's jobs open it (on S3
    its own backup credential, ``setlist.tenants.storage_identity``); without, the
    platform's block itself."""
    settings = get_settings()
    # Where the stores are needs no credential: a tenant's job may not read the platform's.
    config = await load_storage_location(settings.backup_block)
    data = await load_storage_location(settings.storage_block)
    if _same_place(config, data):
        raise BackupError(
            f"the backup store {settings.backup_block!r} is the tenants' data store "
            f"{settings.storage_block!r}; point it at another directory or bucket/prefix"
        )
    if tenant_id is None:
        return await load_storage_config(settings.backup_block)
    return await tenant_store_config(tenant_id, settings.backup_block, purpose="backup")


def _same_place(a: Any, b: Any) -> bool:
    if isinstance(a, LocalStorageConfig) and isinstance(b, LocalStorageConfig):
        from pathlib import Path

        ra, rb = Path(a.root).resolve(), Path(b.root).resolve()
        return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)
    if isinstance(a, S3StorageConfig) and isinstance(b, S3StorageConfig):
        pa, pb = a.prefix.strip("/"), b.prefix.strip("/")
        return (
            a.bucket == b.bucket
            and (a.endpoint_url or "") == (b.endpoint_url or "")
            and (pa == pb or pa.startswith(pb + "/") or pb.startswith(pa + "/") or not pa or not pb)
        )
    return False


async def tenant_repository(tenant_id: str, *, create: bool = False) -> Repository:
    """The tenant's repository; with ``create``, a first backup makes its key and header.

    A repository that exists while its key block is gone is never given a new key:
    that would silently make every earlier snapshot unreadable.
    """
    store = tenant_storage(tenant_id, await repository_config(tenant_id))
    key = await load_key(tenant_id)
    if key is None:
        if not create or store.exists("repo.json"):
            raise BackupError(
                f"no backup key for tenant {tenant_id!r} (Secret block "
                f"{backup_key_block_name(tenant_id)!r})"
                + ("; its repository exists, so restore the key block" if create else "")
            )
        key, text = BackupKey.generate()
        await Secret(value=text).asave(backup_key_block_name(tenant_id), overwrite=False)
    return open_repository(store, key, create=create)


# ------------------------------------------------------------------- tenant config


async def capture_config(client: PrefectClient, tenant_id: str) -> dict[str, Any]:
    """The tenant's platform configuration: profile, queues, quota limit, deployments
    and variables — what a restore needs to make the tenant behave as it did."""
    from setlist.tenants.onboarding import read_profile

    profile = await read_profile(tenant_id)
    queues = []
    for pool in get_settings().pools:
        try:
            pool_queues = await read_pool_queues(client, pool)
        except ObjectNotFound:
            continue
        for q in pool_queues:
            parsed = parse_queue_name(q.name)
            if parsed and parsed[0] == tenant_id:
                queues.append(
                    {
                        "pool": pool,
                        "name": q.name,
                        "priority": q.priority,
                        "concurrency_limit": q.concurrency_limit,
                        "paused": q.is_paused,
                    }
                )
    try:
        limit = await client.read_global_concurrency_limit_by_name(
            concurrency_limit_name(tenant_id)
        )
        quota_limit = {"name": limit.name, "limit": limit.limit, "active": limit.active}
    except ObjectNotFound:
        quota_limit = None
    deployments = await client.read_deployments(
        deployment_filter=DeploymentFilter(
            tags=DeploymentFilterTags(all_=["setlist", f"tenant:{tenant_id}"])
        )
    )
    flow_names = {
        fid: (await client.read_flow(fid)).name for fid in {d.flow_id for d in deployments}
    }
    variables = [
        {"name": v.name, "value": v.value, "tags": list(v.tags)}
        for v in await client.read_variables()
        if variable_owner(v.name, v.tags or []) == tenant_id
    ]
    return {
        "profile": profile.model_dump(mode="json", exclude={"block_type_slug"}),
        "queues": sorted(queues, key=lambda q: (q["pool"], q["name"])),
        "quota_limit": quota_limit,
        "deployments": sorted(
            (
                {
                    "flow": flow_names[d.flow_id],
                    "name": d.name,
                    "paused": d.paused,
                    "work_queue_name": d.work_queue_name,
                    "parameters": d.parameters,
                    "job_variables": d.job_variables,
                    "schedules": [
                        {"schedule": s.schedule.model_dump(mode="json"), "active": s.active}
                        for s in d.schedules
                    ],
                }
                for d in deployments
            ),
            key=lambda d: (d["flow"], d["name"]),
        ),
        "variables": sorted(variables, key=lambda v: v["name"]),
    }


async def apply_config(client: PrefectClient, tenant_id: str, config: dict[str, Any]) -> list[str]:
    """Bring the tenant's profile, pause states and variables back to the snapshot's.

    Goes through onboarding, so queues, the quota limit and deployments are converged
    from the restored profile by the same code that made them.
    """
    from setlist.tenants.onboarding import update_tenant

    profile = config.get("profile") or {}
    if profile.get("tenant_id") != tenant_id:
        raise BackupError(
            f"the snapshot's configuration is tenant {profile.get('tenant_id')!r}'s, "
            f"not {tenant_id!r}'s"
        )
    fields = (
        "display_name",
        "quota",
        "default_priority",
        "tier_overrides",
        "labels",
        "training_policy",
    )
    await update_tenant(client, tenant_id, {f: profile[f] for f in fields if f in profile})
    done = ["profile"]

    # While a dispatcher leads, it owns the pause state of tenant queues (its gate).
    queues = [] if await dispatcher_active(client) else config.get("queues") or []
    for q in queues:
        try:
            queue = await client.read_work_queue_by_name(q["name"], work_pool_name=q["pool"])
        except ObjectNotFound:
            continue
        if queue.is_paused != q["paused"]:
            await client.update_work_queue(queue.id, is_paused=q["paused"])
            done.append(f"queue {q['pool']}/{q['name']} paused={q['paused']}")
    wanted = {(d["flow"], d["name"]): d["paused"] for d in config.get("deployments") or []}
    for dep in await client.read_deployments(
        deployment_filter=DeploymentFilter(
            tags=DeploymentFilterTags(all_=["setlist", f"tenant:{tenant_id}"])
        )
    ):
        flow_name = (await client.read_flow(dep.flow_id)).name
        paused = wanted.get((flow_name, dep.name))
        if paused is not None and dep.paused != paused:
            if paused:
                await client.pause_deployment(dep.id)
            else:
                await client.resume_deployment(dep.id)
            done.append(f"deployment {flow_name}/{dep.name} paused={paused}")
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    for v in config.get("variables") or []:
        if variable_owner(v["name"], v["tags"]) != tenant_id:  # a snapshot taken before
            continue  # ownership was exact may hold another tenant's variables
        existing = await client.read_variable_by_name(v["name"])
        if existing is None:
            await client.create_variable(
                VariableCreate(name=v["name"], value=v["value"], tags=v["tags"])
            )
        else:
            await client.update_variable(
                VariableUpdate(name=v["name"], value=v["value"], tags=v["tags"])
            )
        done.append(f"variable {v['name']}")
    return done
