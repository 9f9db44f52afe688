"""An offboarded tenant's id can't be taken again with its data; purge frees it."""

from __future__ import annotations

import pytest
from prefect.blocks.system import Secret

from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.core.tenancy import SetlistError, backup_key_block_name
from setlist.tenants.onboarding import TenantExists, TenantSpec, create_tenant, delete_tenant
from setlist.tenants.purge import leftovers, purge_tenant
from tests.helpers import wait_for_events

pytestmark = pytest.mark.server


async def test_a_reused_id_inherits_nothing(client, tenant_id):
    settings = get_settings()
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    data = tenant_storage(tenant_id, await load_storage_config(settings.storage_block))
    backups = tenant_storage(tenant_id, await load_storage_config(settings.backup_block))
    data.put_text("raw/private.jsonl", '{"user": "old customer"}\n')
    backups.put_text("repo.json", "{}")
    await Secret(value="old-key").asave(backup_key_block_name(tenant_id), overwrite=True)
    with pytest.raises(SetlistError, match="still exists"):
        await purge_tenant(client, tenant_id)

    await delete_tenant(client, tenant_id)
    left = await leftovers(client, tenant_id)
    assert left.data_objects and left.backup_objects
    assert left.blocks == (backup_key_block_name(tenant_id),)
    with pytest.raises(TenantExists, match="setlist tenant purge"):
        await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    assert data.exists("raw/private.jsonl")  # the refusal erased nothing

    done = await purge_tenant(client, tenant_id)
    assert done["data_objects"] == 1 and done["backup_objects"] == 1
    assert done["blocks"] == [backup_key_block_name(tenant_id)]
    assert not await leftovers(client, tenant_id)
    (event,) = await wait_for_events(client, tenant_id, "setlist.tenant.purged")
    assert event.payload["data_objects"] == 1

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    assert data.list_keys() == [] and backups.list_keys() == []
