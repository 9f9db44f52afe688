"""The real Kubernetes worker creates Setlist Jobs in an emulated Kubernetes API (kmock)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from kubernetes_asyncio.client import BatchV1Api
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import PrefectHTTPStatusError

from setlist.core import runtokens
from setlist.core.tenancy import JobType, Priority, ResourceTier, job_variables
from setlist.job_guard import STATE_ENV
from setlist.k8s.templates import JobVariablesError, PoolKind, load_template
from setlist.tenants.onboarding import TenantSpec, create_tenant
from setlist.workers.kubernetes import SetlistJobConfiguration, SetlistKubernetesWorker
from tests.kube import emulated_cluster, worker_submits

pytestmark = pytest.mark.server


@pytest.fixture
async def kube():
    async with emulated_cluster() as api:
        yield api


async def _configuration(client, values, kind, queue):
    run = FlowRun(id=uuid.uuid4(), name="quiet-otter", flow_id=uuid.uuid4(), work_queue_name=queue)
    config = await SetlistJobConfiguration.from_template_and_values(
        load_template(kind), values, client=client
    )
    return run, config


async def test_worker_creates_the_gpu_job_in_the_tenant_namespace(client, kube):
    values = job_variables(
        "acme", JobType.ml_training, Priority.critical, ResourceTier.xlarge, gpu=2
    )
    run, config = await _configuration(client, values, PoolKind.gpu, "acme.critical")
    config.prepare_for_flow_run(run)
    worker = SetlistKubernetesWorker(work_pool_name="setlist-k8s-gpu")
    await worker._create_job(config, kube)

    jobs = (await BatchV1Api(kube).list_namespaced_job("tenant-acme")).items
    assert len(jobs) == 1
    job = jobs[0]
    assert job.metadata.name.startswith("quiet-otter-")
    assert job.metadata.labels["setlist.io/tenant"] == "acme"
    assert job.metadata.labels["prefect.io/flow-run-id"] == str(run.id)
    assert job.metadata.labels["kueue.x-k8s.io/priority-class"] == "setlist-critical"
    pod = job.spec.template.spec
    assert pod.priority_class_name == "setlist-critical"
    (container,) = pod.containers
    assert container.resources.limits == {"cpu": "8000m", "memory": "16Gi", "nvidia.com/gpu": "2"}
    assert container.resources.requests == container.resources.limits
    sc = container.security_context
    assert sc.run_as_non_root and sc.read_only_root_filesystem
    assert sc.allow_privilege_escalation is False and sc.capabilities.drop == ["ALL"]
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    assert pod.tolerations[0].key == "nvidia.com/gpu"
    assert pod.automount_service_account_token is False
    assert (await BatchV1Api(kube).list_namespaced_job("tenant-other")).items == []
    # The pod holds the run's own token, never the worker's operator credential.
    env = {e.name: e.value for e in container.env}
    token = runtokens.verify(env["PREFECT_API_AUTH_STRING"].removeprefix("run:"))
    assert (token.run_id, token.tenant_id) == (run.id, "acme")
    operator = os.environ["PREFECT_API_AUTH_STRING"]
    assert operator not in {e.value for e in container.env}
    assert not {"PREFECT_API_KEY", "PREFECT_SERVER_API_AUTH_STRING", "SETLIST_PLATFORM_KEY"} & set(
        env
    )


async def test_run_naming_another_tenant_creates_nothing(client, kube):
    values = job_variables("victim", JobType.canary, Priority.normal, ResourceTier.small)
    run, config = await _configuration(client, values, PoolKind.cpu, "acme.normal")
    with pytest.raises(JobVariablesError, match="tenant-victim"):
        config.prepare_for_flow_run(run)  # the worker calls this before _create_job
    assert (await BatchV1Api(kube).list_job_for_all_namespaces()).items == []


async def test_server_refuses_bad_job_variables_on_a_kubernetes_pool(client, tenant_id):
    """The pool's template is the server's schema for job variables: nothing is created."""
    pool = f"k8s-{uuid.uuid4().hex[:6]}"
    await client.create_work_pool(
        WorkPoolCreate(name=pool, type="setlist-kubernetes", base_job_template=load_template("cpu"))
    )
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    flow_id = await client.create_flow_from_name("canary")
    good = job_variables(tenant_id, JobType.canary, Priority.normal, ResourceTier.small)
    deployment_id = await client.create_deployment(
        flow_id=flow_id,
        name=f"{tenant_id}-k8s",
        work_pool_name=pool,
        work_queue_name="default",
        job_variables=good,
        parameters={"tenant_id": tenant_id},
        entrypoint="flows/canary.py:canary",
    )
    before = len(await client.read_flow_runs(limit=200))
    for bad in ({"cpu": "-500m"}, {"tier": "huge"}, {"gpu": 1}, {"namespace": "kube-system"}):
        with pytest.raises(
            PrefectHTTPStatusError, match="Error creating flow run: Validation failed"
        ):
            await client.create_flow_run_from_deployment(
                deployment_id, job_variables={**good, **bad}
            )
    assert len(await client.read_flow_runs(limit=200)) == before
    run = await client.create_flow_run_from_deployment(deployment_id, job_variables=good)
    assert run.job_variables["tier"] == "small"


def _guard_in_pod(job, api_url: str, command: list[str]) -> subprocess.CompletedProcess:
    """Run the Job's container command as its pod would (the guard with the Job's
    environment), with ``command`` in place of the flow run's own."""
    (container,) = job.spec.template.spec.containers
    env = {e.name: e.value for e in container.env if e.value is not None}
    args = container.args[: container.args.index("--") + 1] + command
    assert args[:3] == ["python", "-m", "setlist.job_guard"]
    return subprocess.run(
        [sys.executable, *args[1:]],
        env={**os.environ, **env, "PREFECT_API_URL": api_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_a_job_readmitted_after_its_run_moved_on_does_not_run_it_again(
    client, kube, tenant_id, prefect_server
):
    """Kueue preemption, as far as an emulated API shows it: Kueue suspends the first
    Job, its pod's SIGTERM puts the run back to Scheduled, a worker submits it again
    (a second Job), then Kueue re-admits the first Job. Its new pod must not run the
    flow run beside the second Job; the second Job's pod runs it."""
    from prefect.states import Scheduled

    pool = f"k8s-{uuid.uuid4().hex[:6]}"
    await client.create_work_pool(
        WorkPoolCreate(name=pool, type="setlist-kubernetes", base_job_template=load_template("cpu"))
    )
    flow_id = await client.create_flow_from_name("canary")
    values = job_variables(tenant_id, JobType.canary, Priority.normal, ResourceTier.small)
    deployment_id = await client.create_deployment(
        flow_id=flow_id, name=f"{tenant_id}-k8s", work_pool_name=pool, job_variables=values
    )
    run = await client.create_flow_run_from_deployment(deployment_id, tags=[f"tenant:{tenant_id}"])
    queue = f"{tenant_id}.normal"
    namespace = f"tenant-{tenant_id}"
    ran = [sys.executable, "-c", "print('flow run executed')"]

    async def submit(worker) -> str:
        """One submission; → the state id stamped into its Job."""
        job = await worker_submits(client, worker, run.id, kube, work_queue_name=queue)
        (container,) = job["spec"]["template"]["spec"]["containers"]
        return next(e["value"] for e in container["env"] if e["name"] == STATE_ENV)

    worker = SetlistKubernetesWorker(work_pool_name=pool)
    worker._client = client  # not started: its cluster observer needs a real cluster
    first = await submit(worker)
    (job_a,) = (await BatchV1Api(kube).list_namespaced_job(namespace)).items
    assert job_a.spec.template.spec.containers[0].args == [
        "python", "-m", "setlist.job_guard", "--", "prefect", "flow-run", "execute"
    ]  # fmt: skip
    # Admitted as submitted: the pod runs the flow run.
    assert "flow run executed" in _guard_in_pod(job_a, prefect_server, ran).stdout

    # Preempted: SIGTERM put the run back to Scheduled. Re-admitted now, the first
    # Job's new pod finds the run moved on and leaves it alone.
    await client.set_flow_run_state(run.id, Scheduled(), force=True)
    out = _guard_in_pod(job_a, prefect_server, ran)
    assert out.returncode == 0 and "flow run executed" not in out.stdout
    assert "moved on" in out.stdout and first in out.stdout

    # Granted again and submitted again: a second Job. The first, re-admitted
    # after that, still does not run; the second does.
    second = await submit(worker)
    assert second != first
    jobs = (await BatchV1Api(kube).list_namespaced_job(namespace)).items
    (job_b,) = [j for j in jobs if j.metadata.name != job_a.metadata.name]
    out = _guard_in_pod(job_a, prefect_server, ran)
    assert out.returncode == 0 and "flow run executed" not in out.stdout
    assert "flow run executed" in _guard_in_pod(job_b, prefect_server, ran).stdout
    state = (await client.read_flow_run(run.id)).state
    assert state.name == "Submitting" and str(state.id) == second  # the guard wrote nothing
