"""Onboarding against the real server: queues, quota limit, deployments, profile, audit."""

from __future__ import annotations

import pytest
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

from blocks import TenantProfile
from setlist.core import audit
from setlist.core.catalog import load_catalog
from setlist.core.tenancy import (
    InvalidTenantId,
    Priority,
    SetlistError,
    TenantQuota,
    parse_queue_name,
)
from setlist.dispatch.queues import read_pool_queues
from setlist.tenants.onboarding import (
    TenantExists,
    TenantSpec,
    UnknownTenant,
    create_tenant,
    delete_tenant,
    read_profile,
    update_tenant,
)
from tests.helpers import wait_for_events

pytestmark = pytest.mark.server


async def test_create_tenant_builds_queues_limit_and_deployments(client, tenant_id):
    result = await create_tenant(
        client, TenantSpec(tenant_id=tenant_id, quota=TenantQuota(concurrent_jobs=3))
    )
    assert result["queues"] == [f"{tenant_id}.{b.value}" for b in Priority]

    limit = await client.read_global_concurrency_limit_by_name(f"setlist-tenant-{tenant_id}")
    assert limit.limit == 3

    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    assert dep.work_queue_name == f"{tenant_id}.normal"
    assert dep.parameters["tenant_id"] == tenant_id
    assert dep.job_variables == {
        "tenant": tenant_id,
        "job_type": "canary",
        "band": "normal",
        "tier": "small",
        "cpu": "250m",
        "memory": "512Mi",
        "active_deadline_seconds": 600,
    }
    assert dep.global_concurrency_limit is not None
    assert dep.global_concurrency_limit.id == limit.id
    assert "tenant_id" in dep.parameter_openapi_schema["properties"]

    profile = await read_profile(tenant_id)
    assert profile.quota.concurrent_jobs == 3
    assert profile.namespace == f"tenant-{tenant_id}"

    events = await wait_for_events(client, tenant_id, "setlist.tenant.created")
    assert events[0].payload["actor"] == "pytest"


async def test_queue_priorities_keep_bands_in_order(client, tenant_id):
    for suffix in ("a", "b"):
        await create_tenant(client, TenantSpec(tenant_id=f"{tenant_id}{suffix}"))
    queues = sorted(await read_pool_queues(client, "setlist-local"), key=lambda q: q.priority)
    ranks = [parsed[1].rank for q in queues if (parsed := parse_queue_name(q.name))]
    assert ranks == sorted(ranks), "a lower band sits ahead of a higher one"
    assert len(ranks) >= 10


async def test_create_is_refused_twice_and_converges_with_exist_ok(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    with pytest.raises(TenantExists, match="already exists"):
        await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    again = await create_tenant(client, TenantSpec(tenant_id=tenant_id), exist_ok=True)
    assert again["deployments"]["canary"]
    queues = [
        q
        for q in await read_pool_queues(client, "setlist-local")
        if q.name.startswith(tenant_id + ".")
    ]
    assert len(queues) == 5


async def test_bad_tenant_id_changes_nothing(client):
    before = len(await client.read_block_documents_by_type(TenantProfile.get_block_type_slug()))
    with pytest.raises(InvalidTenantId, match="DNS-1123"):
        await create_tenant(client, TenantSpec(tenant_id="Bad_Tenant"))
    after = len(await client.read_block_documents_by_type(TenantProfile.get_block_type_slug()))
    assert before == after
    names = [q.name for q in await read_pool_queues(client, "setlist-local")]
    assert not any(n.startswith("Bad_Tenant") for n in names)


async def test_update_changes_quota_limit_and_tier(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    await update_tenant(
        client,
        tenant_id,
        {
            "quota": {"concurrent_jobs": 7},
            "tier_overrides": {"canary": "small"},
            "default_priority": "high",
        },
    )
    limit = await client.read_global_concurrency_limit_by_name(f"setlist-tenant-{tenant_id}")
    assert limit.limit == 7
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    assert dep.job_variables["cpu"] == "250m" and dep.job_variables["memory"] == "512Mi"
    assert dep.job_variables["band"] == "high" and dep.job_variables["tier"] == "small"
    assert dep.work_queue_name == f"{tenant_id}.high"


async def test_update_refuses_tier_beyond_quota(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    with pytest.raises(Exception, match="exceeds the tenant quota"):
        await update_tenant(client, tenant_id, {"quota": {"cpu": "50m"}})
    assert (await read_profile(tenant_id)).quota.cpu == "32"


async def test_delete_removes_everything_but_data(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    result = await delete_tenant(client, tenant_id)
    assert result["queues"] == 5 and result["deployments"] == len(load_catalog())
    with pytest.raises(UnknownTenant):
        await read_profile(tenant_id)
    deps = await client.read_deployments(
        deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[f"tenant:{tenant_id}"]))
    )
    assert deps == []
    await wait_for_events(client, tenant_id, "setlist.tenant.deleted")
    assert audit.tenant_resource_id(tenant_id).endswith(tenant_id)


async def test_runs_scheduled_for_later_neither_block_offboarding_nor_wait(client, tenant_id):
    """A schedule keeps upcoming runs; they are not work waiting, and go with the tenant."""
    from datetime import UTC, datetime, timedelta

    from prefect.exceptions import ObjectNotFound
    from prefect.states import Scheduled

    from setlist.dispatch.status import queue_status

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    later = datetime.now(UTC) + timedelta(days=1)
    future = await client.create_flow_run_from_deployment(
        dep.id, state=Scheduled(scheduled_time=later)
    )
    due = await client.create_flow_run_from_deployment(dep.id)
    rows = await queue_status(client, [await read_profile(tenant_id)])
    assert sum(r.waiting for r in rows) == 1  # only the due run
    with pytest.raises(SetlistError, match="1 active run"):
        await delete_tenant(client, tenant_id)
    await client.delete_flow_run(due.id)
    result = await delete_tenant(client, tenant_id)
    assert result["deployments"] == len(load_catalog())
    with pytest.raises(ObjectNotFound):  # Prefect drops a deleted deployment's scheduled runs
        await client.read_flow_run(future.id)


async def test_catalogue_schedules_become_tenant_schedules(
    client, tenant_id, tmp_path, monkeypatch
):
    """A cron in prefect.yaml becomes a schedule of each tenant's own deployment."""
    import yaml

    from setlist.core.settings import REPO_ROOT, get_settings

    catalog = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    catalog["deployments"][0]["schedules"] = [
        {"cron": "15 2 * * *", "timezone": "UTC", "parameters": {"payload_bytes": 7}}
    ]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(catalog))
    monkeypatch.setenv("SETLIST_CATALOG", str(path))
    get_settings.cache_clear()
    try:
        await create_tenant(client, TenantSpec(tenant_id=tenant_id))
        await create_tenant(client, TenantSpec(tenant_id=tenant_id), exist_ok=True)
    finally:
        monkeypatch.delenv("SETLIST_CATALOG")
        get_settings.cache_clear()
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    assert [(s.schedule.cron, s.parameters) for s in dep.schedules] == [
        ("15 2 * * *", {"payload_bytes": 7})
    ]
    # The scheduler service's own code path, through the API: runs of this deployment.
    response = await client.request(
        "POST", f"/deployments/{dep.id}/schedule", json={"min_runs": 2, "max_runs": 2}
    )
    response.raise_for_status()
    runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}))
    assert len(runs) == 2
    for run in runs:
        assert run.work_queue_name == f"{tenant_id}.normal"
        assert run.parameters == {"tenant_id": tenant_id, "payload_bytes": 7}
        assert f"tenant:{tenant_id}" in run.tags
        assert f"env:{get_settings().environment}" in run.tags  # a schedule's run too
    assert dep.job_variables["tier"] == "small" and dep.job_variables["tenant"] == tenant_id


async def test_onboarding_writes_the_tenant_kit(client, tenant_id, setlist_home):
    import yaml

    result = await create_tenant(
        client, TenantSpec(tenant_id=tenant_id, quota=TenantQuota(concurrent_jobs=6))
    )
    docs = list(yaml.safe_load_all(open(result["kit"])))
    assert result["kit"] == str(setlist_home / "kits" / f"{tenant_id}.yaml")
    assert docs[0]["metadata"]["name"] == f"tenant-{tenant_id}"
    quota = next(d for d in docs if d["kind"] == "ResourceQuota")
    assert quota["spec"]["hard"]["pods"] == "6"
    assert result["kit_applied"] == []  # no cluster configured


async def test_kubernetes_pools_get_the_templates_and_tenant_queues(
    client, tenant_id, monkeypatch, setlist_home
):
    from setlist import stack
    from setlist.core.settings import get_settings
    from setlist.k8s.templates import load_template

    monkeypatch.setenv("SETLIST_KUBERNETES_POOLS", "true")
    get_settings.cache_clear()
    try:
        await stack.bootstrap_platform(setlist_home / "storage")
        await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    finally:
        monkeypatch.delenv("SETLIST_KUBERNETES_POOLS")
        get_settings.cache_clear()
    for pool, kind in (("setlist-k8s", "cpu"), ("setlist-k8s-gpu", "gpu")):
        wp = await client.read_work_pool(pool)
        assert wp.type == "setlist-kubernetes"
        assert wp.base_job_template == load_template(kind)
        names = {q.name for q in await read_pool_queues(client, pool)}
        assert {f"{tenant_id}.{b.value}" for b in Priority} <= names


def test_environment_tags_every_deployment_and_a_bad_one_is_refused(monkeypatch):
    from pydantic import ValidationError

    from setlist.core.settings import get_settings
    from setlist.core.tenancy import JobType
    from setlist.tenants.onboarding import deployment_tags

    monkeypatch.setenv("ENVIRONMENT", "staging")
    get_settings.cache_clear()
    try:
        assert "env:staging" in deployment_tags("acme", JobType("canary"))
        monkeypatch.setenv("ENVIRONMENT", "Prod ction!")
        get_settings.cache_clear()
        with pytest.raises(ValidationError, match="ENVIRONMENT"):
            get_settings()
    finally:
        monkeypatch.delenv("ENVIRONMENT")
        get_settings.cache_clear()
