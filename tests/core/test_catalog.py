"""Every deployment in deployments/prefect.yaml loads and is a real, typed job flow."""

from __future__ import annotations

import pytest

from setlist.core.catalog import load_catalog, require_deployable
from setlist.core.settings import Settings
from setlist.core.tenancy import JobType, SetlistError
from setlist.tenants.runtime import TenantMismatch, check_run_tenant


def test_every_catalog_entry_loads_a_flow_named_for_its_job_type():
    catalog = load_catalog()
    assert JobType.canary in catalog
    for job_type, spec in catalog.items():
        flow = spec.load_flow()
        assert flow.name == job_type.value
        schema = spec.parameter_schema()
        assert schema["properties"]["tenant_id"]["type"] == "string"
        assert "tenant_id" in schema["required"]


def test_catalog_resolves_settings(tmp_path):
    settings = Settings(code_dir=tmp_path, work_pool="pool-x")
    spec = load_catalog(settings)[JobType.canary]
    assert spec.work_pool == "pool-x"
    step = spec.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == str(tmp_path)


def test_unbuilt_job_types_are_refused_by_name():
    with pytest.raises(SetlistError, match="no deployment yet"):
        require_deployable(JobType.billing_report, {})


def test_canary_schema_has_bounds_the_ui_renders():
    props = load_catalog()[JobType.canary].parameter_schema()["properties"]
    assert props["payload_bytes"]["minimum"] == 1
    assert props["hold_seconds"]["maximum"] == 3600


@pytest.mark.parametrize(
    "queue,tags",
    [("acme.normal", []), ("acme.critical", ["tenant:acme"]), (None, ["tenant:acme"])],
)
def test_run_guard_accepts_own_tenant(queue, tags):
    check_run_tenant("acme", queue, tags)


@pytest.mark.parametrize(
    "queue,tags",
    [("bravo.normal", []), ("acme.normal", ["tenant:bravo"]), ("random-queue", [])],
)
def test_run_guard_refuses_foreign_queue_or_tags(queue, tags):
    with pytest.raises(TenantMismatch):
        check_run_tenant("acme", queue, tags)
