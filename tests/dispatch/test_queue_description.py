"""A tenant queue the dispatcher holds says so where the UI shows it *Paused*."""

from __future__ import annotations

import uuid

import pytest

from setlist.core.tenancy import Priority
from setlist.dispatch.queues import ensure_tenant_queues, queue_description, read_pool_queues


@pytest.mark.server
async def test_every_band_queue_explains_its_pause_even_one_made_before(client, tenant_id):
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"described-{uuid.uuid4().hex[:6]}"
    await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    try:
        old = await client.create_work_queue(
            name=f"{tenant_id}.normal", work_pool_name=pool, description="tenant x, band normal"
        )
        names = await ensure_tenant_queues(client, pool, tenant_id)
        queues = {q.name: q for q in await read_pool_queues(client, pool)}
        assert sorted(names) == sorted(f"{tenant_id}.{b.value}" for b in Priority)
        for band in Priority:
            description = queues[f"{tenant_id}.{band.value}"].description
            assert description == queue_description(tenant_id, band)
            assert f"band {band.value}" in description and "dispatcher" in description
            assert "`setlist queue status`" in description
        assert queues[f"{tenant_id}.normal"].id == old.id  # updated in place, not remade
    finally:
        await client.delete_work_pool(pool)
