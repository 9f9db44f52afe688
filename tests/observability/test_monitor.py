"""`setlist monitor` (`make monitor-performance`, `make monitor-all`) against the session
server, with runs of a tenant of its own in known states."""

from __future__ import annotations

import types
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.states import Cancelled, Completed, Failed, Running, Scheduled
from typer.testing import CliRunner

from setlist.cli import app
from setlist.core.tenancy import TenantQuota
from setlist.tenants.onboarding import TenantSpec, create_tenant

pytestmark = pytest.mark.server


def _monitor(*args: str):
    return CliRunner().invoke(app, ["monitor", *args])


def _row(output: str, *first: str, table: str = "") -> list[str]:
    """The cells of the first row whose first cells are ``first`` (in the table whose
    title starts with ``table``)."""
    lines = output.splitlines()
    if table:
        lines = lines[next(i for i, line in enumerate(lines) if line.startswith(table)) :]
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells[: len(first)] == list(first):
            return cells
    raise AssertionError(f"no row {first} in:\n{output}")


@pytest.fixture(scope="module")
async def busy_tenant(prefect_server):
    """A tenant of this module with two due runs in band normal (one waiting ten
    minutes), one running in band high, and, finished, three completed, one failed and
    one cancelled."""
    from prefect.client.orchestration import get_client

    tenant_id = f"monitor-{uuid.uuid4().hex[:6]}"
    async with get_client() as client:
        await _make_busy(client, tenant_id)
    return tenant_id


async def _make_busy(client, tenant_id: str) -> None:
    await create_tenant(
        client, TenantSpec(tenant_id=tenant_id, quota=TenantQuota(concurrent_jobs=3))
    )
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")

    async def run(*states, queue="normal", scheduled=None):
        flow_run = await client.create_flow_run_from_deployment(
            dep.id,
            state=Scheduled(scheduled_time=scheduled) if scheduled else None,
            work_queue_name=f"{tenant_id}.{queue}",
        )
        for state in states:
            await client.set_flow_run_state(flow_run.id, state, force=True)

    await run(scheduled=datetime.now(UTC) - timedelta(minutes=10))
    await run()
    await run(scheduled=datetime.now(UTC) + timedelta(days=1))  # not due: not shown
    await run(Running(), queue="high")
    for end in (Completed, Completed, Completed, Failed):
        await run(Running(), end())
    await run(Cancelled())


def test_one_frame_shows_runs_by_band_and_state_and_the_success_ratio(busy_tenant):
    result = _monitor("--once", "--tenant", busy_tenant, "--no-health")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"tenant {busy_tenant}" in out
    # tenant, band, waiting, oldest wait, pending, running, cancelling, paused, late
    normal = _row(out, busy_tenant, "normal")
    assert normal[2] == "2" and normal[3].startswith(("9m", "10m")) and normal[5] == "0"
    high = _row(out, busy_tenant, "high")
    assert high[2] == "0" and high[5] == "1"
    # busy against the quota, and the tenant's success over its finished runs
    assert _row(out, busy_tenant, table="tenants")[1:4] == ["1 / 3", "2", "75.00%"]
    canary = _row(out, "canary", table="finished")
    assert canary[1:6] == ["5", "3", "1", "0", "1"]
    assert "75.00% below" in canary[6]
    assert "success ratio: 75.00% (3 of 4 completed) — below the 99.5% target" in out
    assert "health" not in out


def test_all_tenants_with_health_and_a_live_refresh(busy_tenant, monkeypatch):
    once = _monitor("--once")
    assert once.exit_code == 0, once.output
    assert "all tenants" in once.output
    assert _row(once.output, busy_tenant, "high")[5] == "1"
    status = _row(once.output, "pool:setlist-local")
    assert status[1] == "FAIL" and "no worker online" in status[2]

    # Live: a frame, a refresh after --interval, until Ctrl-C.
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("setlist.cli.monitor.time", types.SimpleNamespace(sleep=sleep))
    live = _monitor("--interval", "2", "--tenant", busy_tenant, "--no-health")
    assert live.exit_code == 0, live.output
    assert naps == [2.0, 2.0]
    assert _row(live.output, busy_tenant, "normal")[2] == "2"


def test_an_unknown_tenant_id_is_refused(prefect_server):
    result = _monitor("--once", "--tenant", "Not_A_Tenant")
    assert result.exit_code == 2
