"""A tenant id's leftovers after offboarding, and purging them.

Offboarding keeps a tenant's data, backups and backup key on purpose (a late restore, an
audit). While they remain the id stays taken: a new tenant created under it would
inherit another customer's data, its snapshots and the key that opens them. So
onboarding refuses such an id, and ``purge_tenant`` (``setlist tenant purge``, audited)
erases what is left, once the tenant is offboarded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from prefect.exceptions import ObjectNotFound

from setlist.core import audit
from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.core.tenancy import (
    SetlistError,
    backup_identity_block_name,
    backup_key_block_name,
    identity_block_name,
    profile_block_name,
    validate_tenant_id,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient


@dataclass
class Leftovers:
    data_objects: int = 0
    backup_objects: int = 0
    blocks: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.data_objects or self.backup_objects or self.blocks)

    def describe(self) -> str:
        parts = []
        if self.data_objects:
            parts.append(f"{self.data_objects}+ stored object(s)")
        if self.backup_objects:
            parts.append(f"{self.backup_objects}+ backup object(s)")
        if self.blocks:
            parts.append(f"block(s) {', '.join(self.blocks)}")
        return ", ".join(parts)


def _tenant_blocks(tenant_id: str) -> list[str]:
    return [
        backup_key_block_name(tenant_id),
        identity_block_name(tenant_id),
        backup_identity_block_name(tenant_id),
    ]


async def _stores(tenant_id: str):
    settings = get_settings()
    names = dict.fromkeys([settings.storage_block, settings.backup_block])
    stores = []
    for name in names:
        try:
            stores.append(tenant_storage(tenant_id, await load_storage_config(name)))
        except SetlistError:
            stores.append(None)  # that store is not configured: nothing can remain there
    return stores


async def _existing_blocks(client: PrefectClient, tenant_id: str) -> list[tuple[str, object]]:
    found = []
    for name in _tenant_blocks(tenant_id):
        for slug in ("secret", "setlist-s3-storage"):
            try:
                doc = await client.read_block_document_by_name(name, slug, include_secrets=False)
            except ObjectNotFound:
                continue
            found.append((name, doc.id))
    return found


async def leftovers(client: PrefectClient, tenant_id: str, *, first_only: bool = True) -> Leftovers:
    """What an offboarded tenant left under ``tenant_id`` (with ``first_only``, whether
    anything: counting stops at the first object of each store)."""
    validate_tenant_id(tenant_id)
    counts = []
    for store in await _stores(tenant_id):
        n = 0
        for _ in store.iter_keys() if store is not None else ():
            n += 1
            if first_only:
                break
        counts.append(n)
    data, backups = (counts + [0, 0])[:2]
    names = tuple(name for name, _ in await _existing_blocks(client, tenant_id))
    return Leftovers(data_objects=data, backup_objects=backups, blocks=names)


async def purge_tenant(client: PrefectClient, tenant_id: str) -> dict:
    """Erase an offboarded tenant's data, backups and keys; refused while it exists."""
    from blocks.tenant import TenantProfile

    validate_tenant_id(tenant_id)
    try:
        await client.read_block_document_by_name(
            profile_block_name(tenant_id), TenantProfile.get_block_type_slug()
        )
    except ObjectNotFound:
        pass
    else:
        raise SetlistError(
            f"tenant {tenant_id!r} still exists; offboard it first (setlist tenant delete)"
        )
    removed = []
    for store in await _stores(tenant_id):
        n = 0
        if store is not None:
            for key in list(store.iter_keys()):
                n += bool(store.delete(key))
        removed.append(n)
    blocks = []
    for name, block_id in await _existing_blocks(client, tenant_id):
        try:
            await client.delete_block_document(block_id)
        except ObjectNotFound:
            continue
        blocks.append(name)
    done = Leftovers(data_objects=removed[0], backup_objects=removed[-1], blocks=tuple(blocks))
    if len(removed) == 1:  # one store for data and backups: count its objects once
        done.backup_objects = 0
    await audit.emit(
        client,
        "setlist.tenant.purged",
        tenant_id,
        obj=(audit.tenant_resource_id(tenant_id), "tenant"),
        payload={**asdict(done), "blocks": list(done.blocks)},
    )
    return {**asdict(done), "blocks": list(done.blocks)}
