"""`setlist queue status`: waiting/running per tenant and band, quota, decayed fair share."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from prefect.states import Completed, Running
from typer.testing import CliRunner

from setlist.cli import app
from setlist.core.tenancy import TenantQuota
from setlist.dispatch.status import decayed_seconds, queue_status
from setlist.tenants import submit as submitting
from setlist.tenants.onboarding import TenantSpec, create_tenant, read_profile

pytestmark = pytest.mark.server


class _Run:
    def __init__(self, start, end):
        self.start_time, self.end_time = start, end


def test_decay_halves_usage_per_half_life():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    fresh = _Run(now - timedelta(seconds=100), now)
    old = _Run(now - timedelta(hours=6, seconds=100), now - timedelta(hours=6))
    assert decayed_seconds([fresh], now, timedelta(hours=6)) == pytest.approx(100)
    assert decayed_seconds([old], now, timedelta(hours=6)) == pytest.approx(50)


async def test_status_counts_bands_and_ranks_usage_by_weight(client, tenant_id):
    heavy, light = f"{tenant_id}h", f"{tenant_id}l"
    await create_tenant(client, TenantSpec(tenant_id=heavy, quota=TenantQuota(concurrent_jobs=2)))
    await create_tenant(
        client, TenantSpec(tenant_id=light, quota=TenantQuota(concurrent_jobs=3, weight=2))
    )
    for band in ("high", "high", "batch"):
        await submitting.submit(client, "canary", heavy, band)
    # one finished run each, of equal length: the weight-2 tenant is owed more. (Long
    # enough that the API's latency on a busy machine can't make them differ much.)
    for tid in (heavy, light):
        sub = await submitting.submit(client, "canary", tid, "low")
        await client.set_flow_run_state(sub.flow_run_id, Running(), force=True)
        await asyncio.sleep(1.5)
        await client.set_flow_run_state(sub.flow_run_id, Completed(), force=True)
    profiles = [await read_profile(heavy), await read_profile(light)]
    rows = {(r.tenant_id, r.band): r for r in await queue_status(client, profiles)}
    assert (rows[(heavy, "high")].waiting, rows[(heavy, "high")].running) == (2, 0)
    assert rows[(heavy, "batch")].waiting == 1 and rows[(heavy, "high")].quota == 2
    assert (light, "low") not in rows  # nothing waits or runs there any more
    share = rows[(heavy, "high")].share
    assert rows[(heavy, "high")].usage_s > 0
    assert share == pytest.approx(2 / 3, abs=0.1)  # usage/1 against usage/2


def test_cli_json(prefect_server, tenant_id):
    runner = CliRunner()
    assert runner.invoke(app, ["tenant", "create", tenant_id]).exit_code == 0
    assert (
        runner.invoke(app, ["submit", "canary", "--tenant", tenant_id, "-p", "critical"]).exit_code
        == 0
    )
    result = runner.invoke(app, ["queue", "status", "--tenant", tenant_id, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (row["band"], row["waiting"], row["quota"]) == ("critical", 1, 4)
