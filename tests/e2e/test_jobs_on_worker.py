"""Whole-platform paths: CLI submit → tenant queue → real worker → storage → result."""

from __future__ import annotations

import json

import pytest
from prefect.client.schemas.objects import StateType

from setlist.core import audit
from setlist.core.run_names import run_name
from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.core.tenancy import TenantQuota
from setlist.tenants import submit as submitting
from setlist.tenants.onboarding import TenantSpec, create_tenant
from tests.e2e.conftest import setlist_cli, wait_final
from tests.helpers import wait_for_events

pytestmark = [pytest.mark.e2e, pytest.mark.server]


async def logs_text(client, run_id, expect: str, timeout: float = 15) -> str:
    """A run's log text; log lines reach the server in batches, so wait for ``expect``."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        text = "\n".join(log.message for log in await submitting.read_logs(client, run_id))
        if expect in text or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.5)


BUSY = {StateType.PENDING, StateType.RUNNING, StateType.CANCELLING}


async def test_cli_submit_completes_on_a_real_worker(client, worker, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    result = await setlist_cli(
        "submit",
        "canary",
        "--tenant",
        tenant_id,
        "--priority",
        "high",
        "--param",
        "payload_bytes=4096",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["flow_run_id"]
    (run,) = await wait_final(client, [run_id])
    assert run.state.is_completed(), run.state
    assert run.work_queue_name == f"{tenant_id}.high"
    report = await run.state.result(raise_on_failure=True)
    assert report.tenant_id == tenant_id and report.bytes == 4096
    assert "canary ok" in await logs_text(client, run.id, "canary ok")
    watched = await setlist_cli("jobs", "watch", run_id, "--tenant", tenant_id)
    assert watched.returncode == 0 and "Completed" in watched.stdout
    refused = await setlist_cli("jobs", "watch", run_id, "--tenant", f"{tenant_id}-other")
    assert refused.returncode == 2 and "no flow run" in refused.stderr

    # A run from the UI's Run button gets Prefect's random name; the flow names itself as
    # it starts (through the gate, with its run token), and the name finds it.
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    created = await client.request(
        "POST",
        f"/deployments/{dep.id}/create_flow_run",
        json={"parameters": {"tenant_id": tenant_id}, "state": {"type": "SCHEDULED"}},
    )
    ui_run = await client.read_flow_run(created.json()["id"])
    seed_name = run_name("canary", tenant_id, ui_run.expected_start_time)
    assert ui_run.name != seed_name
    (ui_run,) = await wait_final(client, [ui_run.id])
    assert ui_run.state.is_completed() and ui_run.name == seed_name
    by_name = await setlist_cli("jobs", "watch", seed_name, "--tenant", tenant_id)
    assert by_name.returncode == 0 and "Completed" in by_name.stdout

    # The worker put each start on the audit trail once, with who made the run.
    starts = await wait_for_events(client, tenant_id, audit.STARTED, count=2)
    actors = {
        next(r.id for r in e.related if r.role == "flow-run"): e.payload["actor"] for e in starts
    }
    assert len(starts) == 2
    assert actors == {
        f"prefect.flow-run.{run_id}": "pytest",
        f"prefect.flow-run.{ui_run.id}": audit.OPERATOR,
    }
    trail = json.loads((await setlist_cli("audit", "--tenant", tenant_id, "--json")).stdout)
    assert {(e["event"], e["actor"]) for e in trail} >= {
        (audit.STARTED, "pytest"),
        (audit.STARTED, audit.OPERATOR),
    }


async def test_tenant_never_exceeds_its_concurrent_jobs_quota(client, worker, tenant_id):
    await create_tenant(
        client, TenantSpec(tenant_id=tenant_id, quota=TenantQuota(concurrent_jobs=2))
    )
    from prefect.client.schemas.actions import WorkPoolUpdate

    bands = ["normal", "high", "low", "critical", "normal"]
    # All five wait before the worker sees any: on a slow machine, runs submitted one by
    # one may each end before the next arrives, and the quota is then never reached.
    await client.update_work_pool("setlist-local", WorkPoolUpdate(is_paused=True))
    try:
        subs = [
            await submitting.submit(client, "canary", tenant_id, band, params={"hold_seconds": 4})
            for band in bands
        ]
    finally:
        await client.update_work_pool("setlist-local", WorkPoolUpdate(is_paused=False))
    peak = 0

    def observe(runs):
        nonlocal peak
        busy = sum(1 for r in runs if r.state and r.state.type in BUSY)
        peak = max(peak, busy)
        assert busy <= 2, f"{busy} runs Pending/Running for a quota of 2"

    runs = await wait_final(client, [s.flow_run_id for s in subs], timeout=240, on_poll=observe)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    assert peak == 2  # the quota was reached and never passed
    # Which layer held the others back is not asserted: alone, the server's slot wait
    # (AwaitingConcurrencySlot); in the full suite on PostgreSQL no run's history showed
    # one in two runs, so something else (likely the pool's limit) held them first.


async def test_run_on_another_tenants_queue_fails_without_touching_data(client, worker, tenant_id):
    victim = f"{tenant_id}v"
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    await create_tenant(client, TenantSpec(tenant_id=victim))
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    run = await client.create_flow_run_from_deployment(dep.id, parameters={"tenant_id": victim})
    (run,) = await wait_final(client, [run.id])
    assert run.state.is_failed()
    # named for the tenant whose queue and token it has, not the one its form names
    assert run.name == run_name("canary", tenant_id, run.expected_start_time)
    logs = await logs_text(client, run.id, "TenantMismatch")
    assert "runs may only use their own tenant's queues" in logs
    config = await load_storage_config(get_settings().storage_block)
    assert tenant_storage(victim, config).list_keys() == []


async def test_data_etl_runs_on_the_worker_and_reports(client, worker, tenant_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from setlist.etl.curated import read_events
    from setlist.etl.demo import write_sample_data

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    storage = tenant_storage(tenant_id, await load_storage_config(get_settings().storage_block))
    planted = write_sample_data(storage, events=3_000, files=2, defect_share=0.02)
    sub = await submitting.submit(client, "data-etl", tenant_id, "high")
    (run,) = await wait_final(client, [sub.flow_run_id], timeout=240)
    assert run.state.is_completed(), run.state
    report = await run.state.result()
    assert report.loaded_rows == planted["valid"]
    assert read_events(storage).num_rows == planted["valid"]
    (event,) = await wait_for_events(client, tenant_id, "setlist.etl.completed")
    assert event.payload["loaded_rows"] == planted["valid"]
    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"etl-quality-{tenant_id}"]))
    )
    assert artifacts and "Rejects by reason" in artifacts[0].data


async def test_deep_health_runs_a_canary_through_the_worker(client, worker, tenant_id):
    from prefect.settings import PREFECT_API_URL

    from setlist.observability.health import run_checks

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    checks = {
        c.name: c
        for c in await run_checks(
            PREFECT_API_URL.value(), deep=True, tenant_id=tenant_id, timeout=120
        )
    }
    assert checks["pool:setlist-local"].ok, checks["pool:setlist-local"]
    canary = checks[f"canary:{tenant_id}"]
    assert canary.ok and "completed" in canary.reason
    assert all(c.ok for c in checks.values()), [c for c in checks.values() if not c.ok]
