"""stream-ingest on the process worker with nothing but its run token and the tenant's own
broker user: the events reach the table through the gate's seals, and the run's end
starts the next one through the deployment's trigger."""

from __future__ import annotations

import asyncio
import time

import pytest

from setlist.brokers.base import BrokerKind, open_broker
from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.etl.curated import read_events, read_manifest
from setlist.etl.demo import iter_raw_lines
from setlist.tenants import submit as submitting
from setlist.tenants.onboarding import TenantSpec, create_tenant, delete_tenant
from tests.conftest import STREAM_REDIS_URL as REDIS
from tests.e2e.conftest import wait_final
from tests.e2e.test_jobs_through_the_gate import _refusals

pytestmark = [pytest.mark.e2e, pytest.mark.server, pytest.mark.timeout(600)]


async def _next_run(client, deployment_id, after, timeout: float = 60):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
        later = [r for r in runs if r.id != after]
        if later:
            return later[0]
        await asyncio.sleep(0.5)
    return None


async def test_stream_ingest_runs_with_only_its_run_token(
    client, worker, tenant_id, setlist_home, streaming
):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    try:
        planted = list(iter_raw_lines(tenant_id, events=3_000, defect_share=0.02))
        lines = [line for line, _ in planted]
        valid = sum(1 for _, defect in planted if defect is None)
        async with open_broker(BrokerKind.redis, REDIS) as broker:
            await broker.send(tenant_id, lines)
        sub = await submitting.submit(
            client, "stream-ingest", tenant_id, "high", params={"run_minutes": 0.2}
        )
        (run,) = await wait_final(client, [sub.flow_run_id], timeout=300)
        assert run.state.is_completed(), run.state
        assert _refusals(setlist_home, [str(sub.flow_run_id)]) == []
        storage = tenant_storage(tenant_id, await load_storage_config(get_settings().storage_block))
        manifest = read_manifest(storage)  # sealed by the gate for the job: verifies here
        assert manifest.streams.get("redis")
        report = await run.state.result()
        assert report.messages == len(lines) and report.rejected > 0
        assert read_events(storage).num_rows == valid  # each good event once
        # Its end started the next run, through the deployment's own trigger.
        dep = await client.read_deployment_by_name(f"stream-ingest/{tenant_id}")
        assert await _next_run(client, dep.id, run.id) is not None
    finally:
        await delete_tenant(client, tenant_id, force=True)  # cancels the next run
        async with open_broker(BrokerKind.redis, REDIS) as broker:
            await broker.delete_stream(tenant_id)
