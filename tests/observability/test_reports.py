"""`setlist report performance`: per job type against SLAs, from real run history."""

from __future__ import annotations

import asyncio

import pytest
from prefect.states import Completed, Crashed, Failed, Running

from setlist.core.tenancy import SetlistError
from setlist.observability.reports import (
    FinishedRun,
    parse_since,
    performance,
    read_finished,
    resources,
)
from setlist.tenants.onboarding import TenantSpec, create_tenant


def test_performance_of_known_runs():
    runs = [FinishedRun("canary", "completed", s, w) for s, w in ((10, 1), (20, 2), (30, 3))]
    runs += [FinishedRun("canary", "failed", 5, 0), FinishedRun("canary", "cancelled", 0, None)]
    runs += [FinishedRun("data-etl", "completed", 4 * 3600, 60)]  # over its 3 h SLA
    canary, etl = performance(runs)
    assert (canary.runs, canary.completed, canary.failed, canary.cancelled) == (5, 3, 1, 1)
    assert canary.success_rate == pytest.approx(0.75) and canary.meets_success_sla is False
    assert canary.p50_s == 20 and canary.p95_s == pytest.approx(29)
    assert canary.sla_s == 600 and canary.p95_within_sla is True
    assert canary.wait_p50_s == pytest.approx(1.5)  # the cancelled run never waited to start
    assert etl.success_rate == 1.0 and etl.meets_success_sla is True
    assert etl.p95_within_sla is False


@pytest.mark.parametrize("text", ["7", "d", "0d", "1w", "-3h", "soon"])
def test_bad_periods_are_refused(text):
    with pytest.raises(SetlistError, match="like 7d"):
        parse_since(text)


@pytest.mark.server
async def test_report_reads_the_tenants_finished_runs(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    for end, pause in ((Completed, 0.0), (Completed, 1.2), (Failed, 0.0), (Crashed, 0.0)):
        run = await client.create_flow_run_from_deployment(dep.id)
        await client.set_flow_run_state(run.id, Running(), force=True)
        await asyncio.sleep(pause)
        await client.set_flow_run_state(run.id, end(), force=True)
    await client.create_flow_run_from_deployment(dep.id)  # still waiting: not in the report

    (row,) = performance(await read_finished(client, parse_since("1h"), tenant_id))
    assert row.job_type == "canary" and row.runs == 4
    assert (row.completed, row.failed, row.crashed) == (2, 1, 1)
    assert row.success_rate == pytest.approx(0.5)
    assert 1.0 < row.p95_s < 3.0 and row.wait_p50_s is not None


def test_resources_recommend_the_smallest_tier_under_the_targets():
    # canary asks for micro (0.1 core, 128 MiB): these runs use 0.15 cores and 300 MiB
    runs = [
        FinishedRun("canary", "completed", 100, 0, "micro", cpu_s=15, max_rss_mib=300)
        for _ in range(10)
    ] + [FinishedRun("canary", "completed", 100, 0, "micro")]  # no usage recorded
    (row,) = resources(runs)
    assert (row.runs_measured, row.runs_unmeasured) == (10, 1)
    assert row.requested_tier == "micro" and row.requested_cpu == 0.1
    assert row.cpu_p95 == pytest.approx(0.15) and row.cpu_use == pytest.approx(1.5)
    assert row.memory_use == pytest.approx(300 / 128, rel=1e-3)
    # small (0.25 core, 512 MiB): 0.15 ≤ 0.8 × 0.25 and 300 ≤ 0.85 × 512
    assert row.recommended_tier == "small"


@pytest.mark.server
async def test_finished_flows_label_their_runs_with_usage(client, tenant_id):
    from flows.canary import canary

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    state = await canary(tenant_id, return_state=True)
    run = await client.read_flow_run(state.state_details.flow_run_id)
    assert float(run.labels["setlist.usage.cpu_s"]) > 0
    assert float(run.labels["setlist.usage.max_rss_mib"]) > 10


@pytest.mark.server
def test_report_commands(prefect_server, tenant_id):
    import json

    import anyio
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from setlist.cli import app

    async def seed():
        async with get_client() as client:
            await create_tenant(client, TenantSpec(tenant_id=tenant_id))
            dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
            for end in (Completed, Failed):
                run = await client.create_flow_run_from_deployment(dep.id)
                await client.set_flow_run_state(run.id, Running(), force=True)
                await client.set_flow_run_state(run.id, end(), force=True)

    anyio.run(seed)
    runner = CliRunner()
    r = runner.invoke(app, ["report", "performance", "--since", "1h", "-t", tenant_id, "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert (row["job_type"], row["runs"], row["success_rate"]) == ("canary", 2, 0.5)
    r = runner.invoke(app, ["report", "resources", "--since", "1h", "-t", tenant_id, "--json"])
    (row,) = json.loads(r.output)
    assert row["requested_tier"] == "small" and row["runs_unmeasured"] == 2
    r = runner.invoke(app, ["report", "resources", "--since", "soon"])
    assert r.exit_code == 2 and "like 7d" in r.output
