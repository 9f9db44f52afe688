"""The stream-ingest flow on the test server: onboarding gives the tenant a broker user of
its own, a run commits the tenant's events, a second run at once finds the stream held,
and offboarding takes the user away."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from blocks.stream import StreamBrokerConfig
from setlist.brokers.base import BrokerKind, open_broker
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.core.tenancy import stream_block_name
from setlist.etl.curated import read_events, read_manifest
from setlist.etl.demo import iter_raw_lines
from setlist.stream.ingest import Outcome
from tests.conftest import STREAM_REDIS_URL as REDIS

pytestmark = pytest.mark.server


@pytest.fixture
async def streaming_tenant(client, tenant_id, streaming):
    from setlist.tenants.onboarding import TenantSpec, create_tenant, delete_tenant

    created = await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    assert created["stream_block"] == stream_block_name(tenant_id)
    yield tenant_id
    await delete_tenant(client, tenant_id, force=True)
    async with open_broker(BrokerKind.redis, REDIS) as broker:
        await broker.delete_stream(tenant_id)


def _lines(tenant: str, n: int) -> list[bytes]:
    return [x for x, _ in iter_raw_lines(tenant, events=n, defect_share=0.0, seed=5)]


async def test_onboarding_gives_a_user_of_the_tenants_own(streaming_tenant):
    block = await StreamBrokerConfig.aload(stream_block_name(streaming_tenant))
    assert block.kind is BrokerKind.redis and block.username.endswith(streaming_tenant)
    assert "@" not in block.url and block.password is not None
    async with open_broker(BrokerKind.redis, REDIS) as platform:
        await platform.send("someone-else", [b'{"event_id": "theirs"}'])
        try:
            async with block.open() as own:
                await own.send(streaming_tenant, [b"{}"])  # its own stream: allowed
                with pytest.raises(Exception, match="(?i)noperm|permission"):
                    await own.send("someone-else", [b'{"event_id": "forged"}'])
                with pytest.raises(Exception, match="(?i)noperm|permission"):
                    async with own.consumer("someone-else") as theirs:
                        await theirs.fetch(10, 0.1)
            assert await platform.stream_length("someone-else") == 1
        finally:
            await platform.delete_stream("someone-else")


async def test_a_run_commits_the_stream_and_a_second_finds_it_held(client, streaming_tenant):
    from flows.stream_ingest import stream_ingest

    tenant = streaming_tenant
    lines = _lines(tenant, 2_500)
    async with open_broker(BrokerKind.redis, REDIS) as broker:
        await broker.send(tenant, lines)
    first, second = await asyncio.gather(
        stream_ingest(tenant_id=tenant, run_minutes=0.25, max_batch_seconds=0.3),
        _later(stream_ingest(tenant_id=tenant, run_minutes=0.1, max_batch_seconds=0.3)),
    )
    assert first.rows == 2_500 and first.replayed_messages == 0
    assert second.outcome is Outcome.held_elsewhere and second.batches == 0
    storage = tenant_storage(tenant, await load_storage_config("setlist-storage"))
    assert read_events(storage).num_rows == 2_500
    assert read_manifest(storage).streams["redis"] == first.last_position


async def _later(coro, delay: float = 3.0):
    await asyncio.sleep(delay)
    return await coro


async def test_a_tenant_that_never_streamed_ends_at_once(client, streaming_tenant):
    from flows.stream_ingest import stream_ingest

    report = await stream_ingest(tenant_id=streaming_tenant, run_minutes=5)
    assert report.outcome is Outcome.nothing_sent and report.messages == 0


async def test_offboarding_takes_the_user_away(client, tenant_id, streaming):
    from setlist.tenants.onboarding import TenantSpec, create_tenant, delete_tenant

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    block = await StreamBrokerConfig.aload(stream_block_name(tenant_id))
    admin = aioredis.from_url(REDIS)
    try:
        assert await admin.acl_getuser(block.username)
        await delete_tenant(client, tenant_id, force=True)
        assert not await admin.acl_getuser(block.username)
    finally:
        await admin.aclose()
    with pytest.raises(ValueError):
        await StreamBrokerConfig.aload(stream_block_name(tenant_id))


async def _runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


async def _wait_runs(client, deployment_id, count: int, timeout: float = 30) -> list:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        runs = await _runs(client, deployment_id)
        if len(runs) >= count or asyncio.get_running_loop().time() > deadline:
            return runs
        await asyncio.sleep(0.25)


async def test_a_crashed_run_is_started_again_and_only_its_own(client, streaming_tenant, tenant_id):
    """The deployment's own-runs trigger: a crash of its run starts the next one; a crash
    of another tenant's stream-ingest run starts nothing here."""
    from prefect.states import Crashed

    from setlist.tenants.onboarding import TenantSpec, create_tenant, delete_tenant

    ours = await client.read_deployment_by_name(f"stream-ingest/{streaming_tenant}")
    other_id = f"{tenant_id}-b"
    await create_tenant(client, TenantSpec(tenant_id=other_id))
    try:
        theirs = await client.read_deployment_by_name(f"stream-ingest/{other_id}")
        run = await client.create_flow_run_from_deployment(theirs.id)
        await client.set_flow_run_state(run.id, Crashed(message="node lost"), force=True)
        run = await client.create_flow_run_from_deployment(ours.id)
        await client.set_flow_run_state(run.id, Crashed(message="node lost"), force=True)
        runs = await _wait_runs(client, ours.id, 2)
        assert len(runs) == 2
        (restart,) = [r for r in runs if r.id != run.id]
        assert restart.parameters["tenant_id"] == streaming_tenant
        assert len(await _runs(client, theirs.id)) == 2  # its own restart, nothing more
    finally:
        await delete_tenant(client, other_id, force=True)
