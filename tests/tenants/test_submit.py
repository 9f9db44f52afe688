"""Submission against the real server: queue, job variables, tags, refusals, UI path."""

from __future__ import annotations

import pytest

from setlist.core.run_names import is_run_id, run_name
from setlist.core.tenancy import JobType, ResourceTier, SetlistError, TenantQuota
from setlist.tenants import submit as submitting
from setlist.tenants.onboarding import TenantSpec, create_tenant
from setlist.tenants.runtime import TenantMismatch, check_run_tenant
from tests.helpers import wait_for_events

pytestmark = pytest.mark.server


@pytest.fixture
async def tenant(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    return tenant_id


async def _run_count(client) -> int:
    return len(await client.read_flow_runs(limit=200))


async def test_submit_lands_on_tenant_band_queue_with_tier(client, tenant):
    sub = await submitting.submit(client, "canary", tenant, "high", "small", {"payload_bytes": 64})
    run = await client.read_flow_run(sub.flow_run_id)
    assert run.work_queue_name == f"{tenant}.high"
    assert run.job_variables == {
        "tenant": tenant,
        "job_type": "canary",
        "band": "high",
        "tier": "small",
        "cpu": "250m",
        "memory": "512Mi",
        "active_deadline_seconds": 600,
    }
    assert run.parameters == {"payload_bytes": 64, "tenant_id": tenant}
    assert {f"tenant:{tenant}", "band:high", "tier:small", "job:canary"} <= set(run.tags)
    assert run.state.is_scheduled()
    events = await wait_for_events(client, tenant, "setlist.job.submitted")
    assert events[0].related[1].id == f"prefect.flow-run.{run.id}"
    assert events[0].payload["work_queue"] == f"{tenant}.high"


async def test_defaults_come_from_the_profile(client, tenant):
    sub = await submitting.submit(client, "canary", tenant)
    assert sub.priority.value == "normal" and sub.tier.value == "small"


async def test_training_asks_for_one_gpu_by_default(client, tenant):
    sub = await submitting.submit(client, "ml-training", tenant, dry_run=True)
    assert sub.job_variables["gpu"] == 1 and sub.tier.value == "xlarge"
    deployment = await client.read_deployment_by_name(f"ml-training/{tenant}")
    assert deployment.job_variables["gpu"] == 1
    canary = await client.read_deployment_by_name(f"canary/{tenant}")
    assert "gpu" not in canary.job_variables


async def test_dry_run_creates_nothing(client, tenant):
    before = await _run_count(client)
    sub = await submitting.submit(client, "canary", tenant, "batch", "medium", dry_run=True)
    assert sub.flow_run_id is None and sub.work_queue == f"{tenant}.batch"
    assert await _run_count(client) == before


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"job_type": "mining"}, "unknown job type"),
        ({"priority": "urgent"}, "unknown priority"),
        ({"tier": "huge"}, "unknown resource tier"),
        ({"params": {"tenant_id": "other"}}, "set by the platform"),
        ({"params": {"nonsense": 1}}, "unknown parameter"),
        ({"tenant_id": "Nope!"}, "DNS-1123"),
        ({"tenant_id": "never-onboarded"}, "unknown tenant"),
    ],
)
async def test_bad_input_is_refused_and_creates_nothing(client, tenant, kwargs, message):
    args = {"job_type": "canary", "tenant_id": tenant, **kwargs}
    before = await _run_count(client)
    with pytest.raises(SetlistError, match=message):
        await submitting.submit(client, **args)
    assert await _run_count(client) == before


async def test_tier_beyond_quota_is_refused(client, tenant_id):
    quota = TenantQuota(cpu="2", memory="4Gi")  # just fits data-etl's default tier, large
    small_training = {JobType.ml_training: ResourceTier.large}
    await create_tenant(
        client, TenantSpec(tenant_id=tenant_id, quota=quota, tier_overrides=small_training)
    )
    with pytest.raises(SetlistError, match="exceeds the tenant quota"):
        await submitting.submit(client, "canary", tenant_id, tier="xlarge")
    # below what a flow run's process needs: refused with the reason, not OOM-killed later
    with pytest.raises(SetlistError, match="tier micro .128Mi. is too small for a job"):
        await submitting.submit(client, "canary", tenant_id, tier="micro")


async def test_server_validates_parameter_values(client, tenant):
    with pytest.raises(Exception, match="payload_bytes|Validation|422|409"):
        await submitting.submit(client, "canary", tenant, params={"payload_bytes": -5})


async def test_ui_run_button_lands_like_submit(client, tenant):
    """The UI's Run posts to create_flow_run on the deployment; the run must be routed."""
    dep = await client.read_deployment_by_name(f"canary/{tenant}")
    response = await client.request(
        "POST",
        f"/deployments/{dep.id}/create_flow_run",
        json={
            "parameters": {"tenant_id": tenant, "payload_bytes": 10},
            "state": {"type": "SCHEDULED"},
        },
    )
    response.raise_for_status()
    run = await client.read_flow_run(response.json()["id"])
    assert run.work_queue_name == f"{tenant}.normal"
    # What the worker applies: deployment job variables, then the run's own on top.
    effective = {**dep.job_variables, **(run.job_variables or {})}
    assert effective["tenant"] == tenant and effective["band"] == "normal"
    assert (effective["cpu"], effective["memory"]) == ("250m", "512Mi")  # small, the default
    assert f"tenant:{tenant}" in run.tags
    check_run_tenant(tenant, run.work_queue_name, run.tags)  # accepted


async def test_ui_run_for_another_tenant_is_refused_at_start(client, tenant, tenant_id):
    """Editing tenant_id in A's run form must not let the run act as B."""
    other = f"{tenant_id}x"
    await create_tenant(client, TenantSpec(tenant_id=other))
    dep = await client.read_deployment_by_name(f"canary/{tenant}")
    response = await client.request(
        "POST",
        f"/deployments/{dep.id}/create_flow_run",
        json={"parameters": {"tenant_id": other}},
    )
    run = await client.read_flow_run(response.json()["id"])
    with pytest.raises(TenantMismatch):
        check_run_tenant(other, run.work_queue_name, run.tags)
    with pytest.raises(TenantMismatch, match="queue"):
        check_run_tenant(other, f"{tenant}.normal", [])


def test_a_run_from_the_pools_default_queue_is_no_tenants_run():
    """`default` skips bands, quotas and grants: a tenant job never starts from it."""
    with pytest.raises(TenantMismatch, match="not a Setlist tenant queue"):
        check_run_tenant("acme", "default", ["tenant:acme"])


async def test_other_tenants_runs_are_invisible_and_uncancellable(client, tenant, tenant_id):
    other = f"{tenant_id}y"
    await create_tenant(client, TenantSpec(tenant_id=other))
    sub = await submitting.submit(client, "canary", other)
    with pytest.raises(SetlistError, match=f"no flow run {sub.flow_run_id} for tenant {tenant}"):
        await submitting.cancel(client, sub.flow_run_id, tenant)
    with pytest.raises(SetlistError, match="no flow run"):
        await submitting.read_run(client, sub.flow_run_id, tenant)
    listed = await submitting.list_jobs(client, tenant_id=tenant)
    assert sub.flow_run_id not in {r.id for r in listed}
    assert (await client.read_flow_run(sub.flow_run_id)).state.is_scheduled()


async def test_list_and_cancel(client, tenant):
    a = await submitting.submit(client, "canary", tenant, "low")
    b = await submitting.submit(client, "canary", tenant, "critical")
    listed = {r.id for r in await submitting.list_jobs(client, tenant_id=tenant, state="scheduled")}
    assert {a.flow_run_id, b.flow_run_id} <= listed
    run = await submitting.cancel(client, a.flow_run_id, tenant)
    assert run.state.is_cancelled()
    cancelled = await submitting.list_jobs(client, tenant_id=tenant, state="cancelled")
    assert [r.id for r in cancelled] == [a.flow_run_id]
    with pytest.raises(SetlistError, match="already cancelled"):
        await submitting.cancel(client, a.flow_run_id, tenant)
    with pytest.raises(SetlistError, match="unknown state"):
        await submitting.list_jobs(client, state="sleeping")
    await wait_for_events(client, tenant, "setlist.job.cancelled")


def test_param_parsing():
    assert submitting.parse_params(["a=1", "b=x", 'c={"k": 2}', "d="]) == {
        "a": 1,
        "b": "x",
        "c": {"k": 2},
        "d": "",
    }
    with pytest.raises(SetlistError, match="not key=value"):
        submitting.parse_params(["novalue"])
    with pytest.raises(SetlistError, match="set by the platform"):
        submitting.parse_params(["tenant_id=evil"])


async def test_suspended_tenant_gets_no_jobs(client, tenant):
    from setlist.tenants.onboarding import update_tenant

    await update_tenant(client, tenant, {"status": "suspended"})
    before = await _run_count(client)
    with pytest.raises(SetlistError, match="is suspended; jobs are refused"):
        await submitting.submit(client, "canary", tenant)
    assert await _run_count(client) == before
    await update_tenant(client, tenant, {"status": "active"})
    assert (await submitting.submit(client, "canary", tenant)).flow_run_id


def test_run_names_are_seed_style_in_utc():
    from datetime import UTC, datetime, timedelta, timezone

    at = datetime(2025, 7, 17, 14, 30, 22, 999_000, tzinfo=UTC)
    name = "ml-training-enterprise-001-20250717-143022"
    assert run_name("ml-training", "enterprise-001", at) == name
    assert (
        run_name("ml-training", "enterprise-001", at.astimezone(timezone(timedelta(hours=2))))
        == name
    )
    assert run_name("ml-training", "enterprise-001", "2025-07-17T14:30:22.5+00:00") == name
    assert is_run_id("0b6a6b1e-58a4-4a4e-8b7c-0b0b0b0b0b0b") and not is_run_id(name)


async def test_runs_are_named_and_found_by_name(client, tenant, tenant_id):
    sub = await submitting.submit(client, "canary", tenant, "low")
    run = await client.read_flow_run(sub.flow_run_id)
    assert run.name == sub.flow_run_name == run_name("canary", tenant, run.expected_start_time)
    assert (await submitting.read_run(client, run.name, tenant)).id == run.id
    assert (await submitting.read_run(client, run.name, None)).id == run.id

    # another tenant's name is not found for this tenant, as an id would not be
    other = f"{tenant_id}n"
    await create_tenant(client, TenantSpec(tenant_id=other))
    theirs = await submitting.submit(client, "canary", other)
    with pytest.raises(SetlistError, match=f"no flow run named .* for tenant {tenant}"):
        await submitting.read_run(client, theirs.flow_run_name, tenant)
    with pytest.raises(SetlistError, match="no flow run named"):
        await submitting.cancel(client, f"canary-{tenant}-19990101-000000", tenant)

    # two runs of one second share a name: the lookup lists both ids
    twin = await client.create_flow_run_from_deployment(
        (await client.read_deployment_by_name(f"canary/{tenant}")).id, name=run.name
    )
    with pytest.raises(SetlistError, match="2 runs are named") as refused:
        await submitting.read_run(client, run.name, tenant)
    assert str(twin.id) in str(refused.value) and str(run.id) in str(refused.value)


async def test_list_shows_work_whose_time_has_come_and_upcoming_apart(client, tenant):
    from datetime import UTC, datetime, timedelta

    from prefect.states import Scheduled

    now = await submitting.submit(client, "canary", tenant, "low")
    dep = await client.read_deployment_by_name(f"canary/{tenant}")
    later = await client.create_flow_run_from_deployment(
        dep.id, state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=6))
    )
    listed = {r.id for r in await submitting.list_jobs(client, tenant_id=tenant)}
    assert now.flow_run_id in listed and later.id not in listed
    upcoming = await submitting.list_jobs(client, tenant_id=tenant, upcoming=True)
    assert [r.id for r in upcoming] == [later.id]
