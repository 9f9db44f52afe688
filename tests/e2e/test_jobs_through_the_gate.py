"""Every job type runs to Completed on the process worker with nothing but its run
token, and a run form can't choose the command a job runs."""

from __future__ import annotations

import re

import pytest

from setlist.core import records
from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.etl.curated import read_manifest
from setlist.etl.demo import write_sample_data
from setlist.ml.model_registry import read_registry
from setlist.security.report import latest_report
from setlist.tenants import submit as submitting
from setlist.tenants.onboarding import TenantSpec, create_tenant
from tests.e2e.conftest import wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.server, pytest.mark.timeout(900)]


def _refusals(setlist_home, run_ids) -> list[str]:
    """The gate's refusals of these runs, in the log of every API process (one server,
    or the replicas of the multi-replica shape)."""
    logs = [setlist_home / "server.log", *sorted(setlist_home.glob("replica-*.log"))]
    logs = [log for log in logs if log.exists()]
    assert logs, f"no server log under {setlist_home}"
    text = "".join(log.read_text(errors="replace") for log in logs)
    return [
        line
        for line in text.splitlines()
        if re.search(r"refused|closed websocket", line) and any(r in line for r in run_ids)
    ]


async def test_every_job_type_completes_with_only_its_run_token(
    client, worker, tenant_id, setlist_home
):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    storage = tenant_storage(tenant_id, await load_storage_config(get_settings().storage_block))
    write_sample_data(storage, events=3_000, files=2, defect_share=0.02)
    etl = await submitting.submit(client, "data-etl", tenant_id, "high")
    (run,) = await wait_final(client, [etl.flow_run_id], timeout=300)
    assert run.state.is_completed(), run.state
    subs = [
        await submitting.submit(client, job, tenant_id)
        for job in ("canary", "ml-training", "billing-report", "tenant-backup", "security-scan")
    ]
    runs = await wait_final(client, [s.flow_run_id for s in subs], timeout=600)
    states = {s.job_type.value: r.state.name for s, r in zip(subs, runs, strict=True)}
    assert states == dict.fromkeys(states, "Completed")
    # Nothing a job did was refused: the policy covers every job, not just their ends.
    ids = [str(etl.flow_run_id)] + [str(s.flow_run_id) for s in subs]
    assert _refusals(setlist_home, ids) == []
    # The records the jobs wrote carry seals the gate made for them, and verify here.
    assert read_manifest(storage).rows > 0
    assert read_registry(storage).versions
    assert latest_report(storage).tenant_id == tenant_id
    billing = [k for k in storage.list_keys("billing/") if k.endswith("/_manifest.json")]
    assert billing and all(records.read_record(storage, k)["status"] for k in billing)


async def test_a_run_that_sets_its_own_command_is_refused(client, worker, tenant_id, tmp_path):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    sub = await submitting.plan("canary", tenant_id)
    deployment = await client.read_deployment_by_name(sub.deployment)
    planted = tmp_path / "pwned"
    run = await client.create_flow_run_from_deployment(
        deployment.id,
        parameters=sub.parameters,
        work_queue_name=sub.work_queue,
        job_variables={**sub.job_variables, "command": f"touch {planted}"},
        tags=sub.tags,
    )
    (run,) = await wait_final(client, [run.id], timeout=180)
    assert run.state.is_crashed(), run.state
    assert "sets command in its job variables" in run.state.message
    assert not planted.exists()
