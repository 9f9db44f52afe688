"""A job's environment: its run token, none of the worker's credentials, no run-form command."""

from __future__ import annotations

import uuid

import pytest
from prefect.client.schemas.objects import FlowRun

from setlist.core import runtokens
from setlist.core.tenancy import SetlistError
from setlist.workers.job_credentials import check_run_overrides, job_environment
from setlist.workers.process import SetlistProcessWorker


def _run(queue="acme.normal", tags=("tenant:acme",), job_variables=None) -> FlowRun:
    return FlowRun(
        id=uuid.uuid4(),
        flow_id=uuid.uuid4(),
        work_queue_name=queue,
        tags=list(tags),
        job_variables=job_variables or {},
    )


WORKER_ENV = {
    "PATH": "/usr/bin",
    "PREFECT_API_URL": "http://127.0.0.1:4200/api",
    "PREFECT_API_AUTH_STRING": "setlist:operator-secret",
    "PREFECT_SERVER_API_AUTH_STRING": "setlist:operator-secret",
    "PREFECT_API_KEY": "pnu_x",
    "SETLIST_PLATFORM_KEY": "platform-key",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://postgres:db-secret@h/p",
    "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://postgres:db-secret@h/p",
    "PREFECT_API_DATABASE_PASSWORD": "db-secret",
}


def test_the_job_gets_its_run_token_and_none_of_the_workers_credentials():
    run = _run()
    env = job_environment(WORKER_ENV, run)
    assert "operator-secret" not in str(env) and "platform-key" not in str(env)
    assert "db-secret" not in str(env)
    assert not {"PREFECT_API_KEY", "PREFECT_SERVER_API_AUTH_STRING", "SETLIST_PLATFORM_KEY"} & set(
        env
    )
    token = runtokens.verify(env["PREFECT_API_AUTH_STRING"].removeprefix("run:"))
    assert (token.run_id, token.tenant_id) == (run.id, "acme")
    assert env["PREFECT_API_URL"] == WORKER_ENV["PREFECT_API_URL"]


@pytest.mark.parametrize(
    "run",
    [
        _run(queue="default", tags=()),  # not a tenant queue
        _run(queue="acme.normal", tags=("tenant:victim",)),  # tag and queue disagree
    ],
)
def test_no_token_for_a_run_that_is_not_plainly_one_tenants(run):
    with pytest.raises(SetlistError):
        job_environment(WORKER_ENV, run)


@pytest.mark.parametrize("key", ["command", "env", "image", "working_dir"])
def test_a_run_that_sets_what_the_platform_fixes_is_refused(key):
    with pytest.raises(SetlistError, match=f"sets {key}"):
        check_run_overrides(_run(job_variables={"tier": "small", key: "x"}))
    check_run_overrides(_run(job_variables={"tier": "small", "cpu": "500m"}))


async def test_the_process_worker_starts_the_job_with_the_token(monkeypatch):
    """What reaches Prefect's process runner: the scrubbed environment, or nothing."""
    from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

    seen = {}

    async def fake_run(self, flow_run, configuration, task_status=None):
        seen["env"] = dict(configuration.env)
        return "started"

    monkeypatch.setattr(ProcessWorker, "run", fake_run)
    worker = SetlistProcessWorker(work_pool_name="setlist-local")
    run = _run()
    config = ProcessJobConfiguration(env=dict(WORKER_ENV), command=None)
    assert await worker.run(run, config) == "started"
    assert seen["env"]["PREFECT_API_AUTH_STRING"].startswith("run:")
    assert "operator-secret" not in str(seen["env"])
    seen.clear()
    bad = _run(job_variables={"command": "sh -c id"})
    with pytest.raises(SetlistError):
        await worker.run(bad, ProcessJobConfiguration(env=dict(WORKER_ENV)))
    assert seen == {}


async def test_the_kubernetes_worker_never_swaps_the_token_for_the_workers_secret():
    """prefect-kubernetes' API_AUTH_STRING_SECRET_* settings would point the job's
    credential at the worker's Secret, i.e. the operator credential."""
    from setlist.workers.kubernetes import SetlistKubernetesWorker

    worker = SetlistKubernetesWorker(work_pool_name="setlist-k8s")

    class Config:
        job_manifest = {"spec": {"template": {"spec": {"containers": [{"env": [
            {"name": "PREFECT_API_AUTH_STRING", "value": "run:token"}]}]}}}}  # fmt: skip

    config = Config()
    await worker._replace_env_variable_with_secret(
        "PREFECT_API_AUTH_STRING",
        configuration=config,
        client=None,
        secret_name="prefect-worker",
        secret_key="auth",
    )
    await worker._replace_api_key_with_secret(configuration=config, client=None)
    (container,) = config.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "PREFECT_API_AUTH_STRING", "value": "run:token"}]
