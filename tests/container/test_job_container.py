"""The container contract: the runtime image runs Setlist's Jobs exactly as the
Kubernetes worker renders them — uid 10001, read-only root, no capabilities, no
privilege escalation, /tmp an emptyDir — and the flow runs end Completed.

Each Job is the one the real worker creates (resolved from the tenant's deployment on
a Kubernetes pool, submitted into an emulated API), translated into ``podman run`` by
``setlist.k8s.container_run`` and run against this session's server and moto's S3 on
loopback. ``make test-container`` builds the image and names it in
``SETLIST_TEST_IMAGE``; without it these tests are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest
from prefect.states import Cancelled

from setlist.core.settings import get_settings
from setlist.core.storage import tenant_storage
from setlist.dispatch.queues import ensure_kubernetes_pool
from setlist.etl.curated import read_manifest
from setlist.etl.demo import write_sample_data
from setlist.k8s.container_run import UntranslatableJob, podman_run
from setlist.tenants import submit as submitting
from setlist.tenants.onboarding import TenantSpec, create_tenant
from setlist.workers.kubernetes import SetlistKubernetesWorker
from tests.helpers import fresh_s3_store
from tests.kube import emulated_cluster, worker_submits

IMAGE = os.environ.get("SETLIST_TEST_IMAGE", "")
GPU_IMAGE = os.environ.get("SETLIST_TEST_GPU_IMAGE", "")
pytestmark = [
    pytest.mark.container,
    pytest.mark.server,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not IMAGE, reason="SETLIST_TEST_IMAGE unset: `make test-container`"),
]
PODMAN = ["podman", *(["--runtime", r] if (r := os.environ.get("PODMAN_RUNTIME")) else [])]
# What a pod gets from its cluster and this machine's podman needs: the network to
# reach the server and the store (loopback here), rlimits it may not raise here.
MACHINE = ["--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
POOL, GPU_POOL = "setlist-k8s", "setlist-k8s-gpu"


def _image_user(image: str) -> str:
    out = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{.Config.User}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


async def _run_container(job: dict, image: str = IMAGE) -> subprocess.CompletedProcess:
    run = podman_run(job, image_user=_image_user(image), image=image, extra=MACHINE)
    env = {"PATH": os.environ["PATH"], **run.env}
    return await asyncio.to_thread(
        subprocess.run, run.command(PODMAN), env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
async def k8s_tenant(client, tenant_id, s3_endpoint, monkeypatch):
    """A tenant onboarded for the Kubernetes pools, as an operator of a cluster does it:
    its deployments on ``setlist-k8s`` (GPU jobs on ``setlist-k8s-gpu``) with the
    image's code directory and image, its data on an S3 store (moto) through its own
    IAM key."""
    monkeypatch.setenv("SETLIST_WORK_POOL", POOL)
    monkeypatch.setenv("SETLIST_GPU_WORK_POOL", GPU_POOL)
    monkeypatch.setenv("SETLIST_CODE_DIR", "/opt/setlist")
    monkeypatch.setenv("SETLIST_IMAGE", IMAGE)
    get_settings.cache_clear()
    store = fresh_s3_store(s3_endpoint)
    await store.asave(f"{tenant_id}-store", overwrite=True, client=client)
    await ensure_kubernetes_pool(client, POOL, "cpu")
    await ensure_kubernetes_pool(client, GPU_POOL, "gpu")
    await create_tenant(client, TenantSpec(tenant_id=tenant_id, storage_block=f"{tenant_id}-store"))
    yield tenant_storage(tenant_id, store)
    monkeypatch.undo()
    get_settings.cache_clear()


async def _submitted_job(client, kube, tenant_id: str, job_type: str) -> tuple[dict, object]:
    sub = await submitting.submit(client, job_type, tenant_id)
    worker = SetlistKubernetesWorker(work_pool_name=POOL)
    worker._client = client  # not started: only its submission path runs
    job = await worker_submits(client, worker, sub.flow_run_id, kube)
    return job, sub.flow_run_id


async def test_rendered_jobs_run_to_completed_under_the_restricted_pod(
    client, tenant_id, k8s_tenant
):
    async with emulated_cluster() as kube:
        job, run_id = await _submitted_job(client, kube, tenant_id, "canary")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == IMAGE  # the pool's image is the setting's
        out = await _run_container(job)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        run = await client.read_flow_run(run_id)
        assert run.state.is_completed(), (run.state, out.stdout[-2000:])

        # Re-admitted after its run finished: the Job's second pod leaves it alone.
        again = await _run_container(job)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "moved on" in again.stdout
        after = await client.read_flow_run(run_id)
        assert after.state_id == run.state_id and after.run_count == run.run_count

        # A data load on the tenant's S3 prefix, through the tenant's own key.
        expected = write_sample_data(k8s_tenant, events=2_000, files=2, defect_share=0.02)
        job, run_id = await _submitted_job(client, kube, tenant_id, "data-etl")
        out = await _run_container(job)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        run = await client.read_flow_run(run_id)
        assert run.state.is_completed(), (run.state, out.stdout[-2000:])
        assert read_manifest(k8s_tenant).rows == expected["valid"]


async def test_the_pod_runs_as_its_uid_and_writes_only_to_tmp(client, tenant_id, k8s_tenant):
    """What the image must cope with: a flow that wrote outside /tmp, or needed root,
    fails here before it fails in a cluster."""
    async with emulated_cluster() as kube:
        job, run_id = await _submitted_job(client, kube, tenant_id, "canary")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    probe = (
        "id -u; id -G; touch /tmp/ok && echo tmp-writable; "
        "for d in /opt/setlist /opt/setlist/.venv /etc /var/tmp /run $HOME/..; do "
        "touch $d/x 2>/dev/null && echo writable:$d; done; "
        'python -c "import os; os.setuid(0)" 2>/dev/null && echo became-root; '
        "grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; true"
    )
    container["args"] = ["sh", "-c", probe]
    out = await _run_container(job)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "10001"
    assert "tmp-writable" in lines
    assert not [line for line in lines if line.startswith(("writable:", "became-root"))]
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines
    # The probe ran in place of the flow, which never started.
    assert (await client.read_flow_run(run_id)).state.name == "Submitting"
    await client.set_flow_run_state(run_id, Cancelled(), force=True)


def test_the_image_is_labelled_and_keeps_no_build_secret():
    out = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{json .Config}}", IMAGE],
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(out.stdout)
    labels = config["Labels"]
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HOME"] == "/tmp" and env["PREFECT_HOME"].startswith("/tmp/")
    assert "SSL_CERT_FILE" not in env  # the build's CA was a secret, not a setting
    listing = subprocess.run(
        [*PODMAN, "run", "--rm", "--network", "none", *MACHINE[2:], IMAGE, "sh", "-c",
         "ls /run/secrets 2>/dev/null; ls /opt/uv /root/.cache /var/cache/uv 2>/dev/null;"
         " command -v gcc cc uv pip || true"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert listing.stdout.strip() == "", listing.stdout  # no secret, build tool or cache


def test_a_root_image_is_refused_when_the_pod_sets_no_uid():
    job = {
        "kind": "Job",
        "spec": {
            "template": {
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True},
                    "containers": [{"name": "c", "image": IMAGE, "args": ["true"]}],
                }
            }
        },
    }
    assert "10001" in _image_user(IMAGE)
    podman_run(job, image_user=_image_user(IMAGE))  # the image's own user: accepted
    with pytest.raises(UntranslatableJob, match="runs as 'root'"):
        podman_run(job, image_user="")


@pytest.mark.skipif(not GPU_IMAGE, reason="SETLIST_TEST_GPU_IMAGE unset")
async def test_the_gpu_image_imports_cupy_and_trains_on_the_cpu_without_a_device(
    client, tenant_id, k8s_tenant
):
    """The GPU image on a machine without a GPU: CuPy imports, the trainer's backend
    choice finds no device and falls back to the CPU, under the same restricted pod."""
    async with emulated_cluster() as kube:
        job, _ = await _submitted_job(client, kube, tenant_id, "canary")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    container["args"] = [
        "python",
        "-c",
        "import json, cupy; from setlist.ml.als_solver import cuda_backend, resolve_device; "
        "print(json.dumps({'cupy': cupy.__version__, 'cuda': cuda_backend() is not None, "
        "'device': resolve_device('auto').value}))",
    ]
    out = await _run_container(job, image=GPU_IMAGE)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cuda"] is False and got["device"] == "cpu" and got["cupy"]
