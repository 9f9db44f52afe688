"""The CLI in-process against the session server: exit codes, messages, no side effects."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from setlist.cli import app

pytestmark = pytest.mark.server


@pytest.fixture
def cli(prefect_server):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke


def test_tenant_lifecycle(cli, tenant_id):
    r = cli("tenant", "create", tenant_id, "--concurrent-jobs", "2", "--priority", "high")
    assert r.exit_code == 0, r.output
    assert "5 queues" in r.output
    r = cli("tenant", "show", tenant_id)
    shown = json.loads(r.output)
    assert shown["quota"]["concurrent_jobs"] == 2 and shown["default_priority"] == "high"
    r = cli("tenant", "list", "--json")
    assert tenant_id in {t["tenant_id"] for t in json.loads(r.output)}
    r = cli("tenant", "update", tenant_id, "--weight", "3", "--tier", "canary=small")
    assert r.exit_code == 0, r.output
    assert json.loads(cli("tenant", "show", tenant_id).output)["quota"]["weight"] == 3
    r = cli("tenant", "create", tenant_id)
    assert r.exit_code == 2 and "already exists" in r.output
    r = cli("tenant", "delete", tenant_id, "--yes")
    assert r.exit_code == 0, r.output
    r = cli("tenant", "show", tenant_id)
    assert r.exit_code == 2 and "unknown tenant" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (("tenant", "create", "Not_Valid"), "DNS-1123"),
        (("tenant", "create", "fine-id", "--concurrent-jobs", "0"), "concurrent_jobs"),
        (("tenant", "create", "fine-id", "--cpu", "lots"), "cpu quantity"),
        (("tenant", "update", "fine-id", "--status", "gone"), "unknown"),
        (("jobs", "list", "--state", "sleeping"), "unknown state"),
        (("jobs", "cancel", "not-a-run"), "no flow run named 'not-a-run'"),
        (("audit", "--tenant", "../x"), "DNS-1123"),
    ],
)
def test_bad_input_exits_2_with_reason(cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_submit_dry_run_and_env_defaults(cli, tenant_id, monkeypatch):
    assert cli("tenant", "create", tenant_id).exit_code == 0
    monkeypatch.setenv("PRIORITY", "low")
    monkeypatch.setenv("RESOURCE_TIER", "small")
    from setlist.core.settings import get_settings

    get_settings.cache_clear()
    try:
        r = cli("submit", "canary", "--tenant", tenant_id, "--dry-run")
    finally:
        get_settings.cache_clear()
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["work_queue"] == f"{tenant_id}.low" and plan["tier"] == "small"
    assert plan["flow_run_id"] is None
    r = cli("jobs", "list", "--tenant", tenant_id, "--json")
    assert json.loads(r.output) == []


def test_submit_then_list_and_audit(cli, tenant_id):
    assert cli("tenant", "create", tenant_id).exit_code == 0
    r = cli("submit", "canary", "--tenant", tenant_id, "--priority", "critical", "--json")
    run_id = json.loads(r.output)["flow_run_id"]
    rows = json.loads(cli("jobs", "list", "--tenant", tenant_id, "--json").output)
    assert [(x["id"], x["band"], x["state"]) for x in rows] == [(run_id, "critical", "Scheduled")]
    r = cli("jobs", "cancel", run_id, "--tenant", tenant_id)
    assert r.exit_code == 0 and "Cancelled" in r.output
    import time

    for _ in range(40):
        trail = json.loads(cli("audit", "--tenant", tenant_id, "--json").output)
        if len(trail) >= 3:
            break
        time.sleep(0.5)
    assert [e["event"] for e in trail] == [
        "setlist.job.cancelled",
        "setlist.job.submitted",
        "setlist.tenant.created",
    ]
    assert {e["actor"] for e in trail} == {"pytest"}


def test_render_job_prints_the_gpu_job_and_refuses_over_quota(cli, tenant_id):
    import yaml

    assert cli("tenant", "create", tenant_id, "--gpu", "2").exit_code == 0
    r = cli("render-job", "ml-training", "--tenant", tenant_id, "--priority", "high", "--gpu", "2")
    assert r.exit_code == 0, r.output
    job = yaml.safe_load(r.output)
    assert job["metadata"]["namespace"] == f"tenant-{tenant_id}"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["cpu"] == "8000m"  # ml-training's default: xlarge
    r = cli("render-job", "ml-training", "--tenant", tenant_id, "--gpu", "3")
    assert r.exit_code == 2 and "GPU quota of 2" in r.output
    r = cli("render-job", "canary", "--tenant", tenant_id, "--tier", "huge")
    assert r.exit_code == 2 and "unknown resource tier" in r.output


def test_small_tenant_needs_tier_overrides_and_gets_them(cli, tenant_id):
    r = cli("tenant", "create", tenant_id, "--cpu", "1", "--memory", "2Gi")
    assert r.exit_code == 2 and "exceeds the tenant quota" in r.output
    tiers = ("--tier", "data-etl=medium", "--tier", "ml-training=medium")
    tiers += ("--tier", "tenant-backup=medium")
    r = cli("tenant", "create", tenant_id, "--cpu", "1", "--memory", "2Gi", *tiers)
    assert r.exit_code == 0, r.output
    shown = json.loads(cli("tenant", "show", tenant_id).output)
    assert shown["tier_overrides"] == {
        "data-etl": "medium",
        "ml-training": "medium",
        "tenant-backup": "medium",
    }
    r = cli("tenant", "create", f"{tenant_id}x", "--tier", "data-etl")
    assert r.exit_code == 2 and "not JOB_TYPE=TIER" in r.output
