"""A rendered Job → ``podman run``: every restriction of the pod becomes a flag, and what
cannot be reproduced on one machine is refused, not dropped."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity

from setlist.core.tenancy import TIERS, JobType, Priority, ResourceTier, job_variables
from setlist.k8s.container_run import UntranslatableJob, podman_run
from setlist.k8s.templates import PoolKind
from setlist.tenants.onboarding import TenantSpec, create_tenant
from setlist.workers.kubernetes import render_job

pytestmark = pytest.mark.server


def _pairs(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


async def _canary_job(client, tenant: str = "acme") -> dict:
    values = job_variables(tenant, JobType.canary, Priority.high, ResourceTier.small)
    return await render_job(client, values, PoolKind.cpu)


async def test_every_restriction_of_the_rendered_pod_becomes_a_flag(client):
    job = await _canary_job(client)
    run = podman_run(job, extra=["--network", "host"])
    args = run.args
    assert _pairs(args, "--user") == ["10001:10001"]
    assert _pairs(args, "--group-add") == ["10001"]  # fsGroup
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    assert _pairs(args, "--cap-drop") == ["ALL"] and "--cap-add" not in args
    assert _pairs(args, "--security-opt") == ["no-new-privileges"]
    assert "--privileged" not in args
    (scratch,) = job["spec"]["template"]["spec"]["volumes"]
    size = int(parse_quantity(scratch["emptyDir"]["sizeLimit"]))
    assert size > 0
    assert _pairs(args, "--mount") == [
        f"type=tmpfs,destination=/tmp,tmpfs-mode=1777,tmpfs-size={size}"
    ]
    small = TIERS[ResourceTier.small]
    assert _pairs(args, "--cpus") == [f"{float(parse_quantity(small.cpu)):g}"]
    assert _pairs(args, "--memory") == [str(int(parse_quantity(small.memory)))]
    assert _pairs(args, "--timeout") == [str(job["spec"]["activeDeadlineSeconds"])]
    assert "--device" not in args
    # the image, then the Job's args: the guard in front of Prefect's command
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    tail = args[args.index(image) :]
    assert tail == [
        image,
        "python",
        "-m",
        "setlist.job_guard",
        "--",
        "prefect",
        "flow-run",
        "execute",
    ]
    assert args[args.index(image) - 2 : args.index(image)] == ["--network", "host"]
    # variables by name only: their values (the run's token among them) never in argv
    assert set(_pairs(args, "--env")) == set(run.env)
    assert "PREFECT_API_AUTH_STRING" in run.env
    assert not any(v and v in args for v in run.env.values() if len(v) > 8)


async def test_the_gpu_pods_devices_and_larger_limits(client):
    values = job_variables("acme", JobType.ml_training, Priority.critical, ResourceTier.xlarge, 2)
    run = podman_run(await render_job(client, values, PoolKind.gpu))
    assert _pairs(run.args, "--device") == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    xlarge = TIERS[ResourceTier.xlarge]
    assert _pairs(run.args, "--cpus") == [f"{float(parse_quantity(xlarge.cpu)):g}"]
    assert _pairs(run.args, "--memory") == [str(int(parse_quantity(xlarge.memory)))]


def _with(job: dict, change) -> dict:
    job = copy.deepcopy(job)
    change(job["spec"]["template"]["spec"])
    return job


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["securityContext"].update(runAsUser=0), "runAsUser is 0"),
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}) or
         p["containers"][0]["volumeMounts"].append({"name": "h", "mountPath": "/host"}),
         "hostPath: only emptyDir"),
        (lambda p: p.update(hostPID=True), "hostPID cannot be run locally"),
        (lambda p: p.update(initContainers=[{"name": "i", "image": "x:1"}]),
         "initContainers cannot be run locally"),
        (lambda p: p["containers"].append(dict(p["containers"][0], name="b")), "2 containers"),
        (lambda p: p.update(automountServiceAccountToken=True), "service account token"),
        (lambda p: p["containers"][0]["securityContext"].update(
            seccompProfile={"type": "Localhost", "localhostProfile": "x"}), "Localhost"),
        (lambda p: p["containers"][0]["env"].append(
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}),
         "secret s/k was not given"),
        (lambda p: p["containers"][0]["env"].append(
            {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
         "only values and secretKeyRef"),
        (lambda p: p["containers"][0]["resources"]["limits"].update({"example.com/fpga": "1"}),
         "example.com/fpga"),
    ],
)  # fmt: skip
async def test_what_cannot_run_as_the_pod_would_is_refused(client, change, reason):
    job = _with(await _canary_job(client), change)
    with pytest.raises(UntranslatableJob, match=reason):
        podman_run(job, image_user="10001")


async def test_a_secret_reference_takes_the_given_value_by_name(client):
    def add(pod):
        ref = {"secretKeyRef": {"name": "creds", "key": "token"}}
        pod["containers"][0]["env"].append({"name": "TOKEN", "valueFrom": ref})

    job = _with(await _canary_job(client), add)
    run = podman_run(job, secrets={("creds", "token"): "s3cr3t-value"})
    assert run.env["TOKEN"] == "s3cr3t-value"
    assert "TOKEN" in _pairs(run.args, "--env") and "s3cr3t-value" not in run.args
    assert "s3cr3t-value" not in run.shell()


async def test_render_job_output_translates_on_the_command_line(client, tenant_id, tmp_path):
    """``setlist render-job … | python -m setlist.k8s.container_run``."""
    from tests.e2e.conftest import setlist_cli

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    rendered = await setlist_cli("render-job", "canary", "--tenant", tenant_id)
    assert rendered.returncode == 0, rendered.stderr
    manifest = yaml.safe_load(rendered.stdout)
    assert manifest["metadata"]["namespace"] == f"tenant-{tenant_id}"
    path = Path(tmp_path / "job.yaml")
    path.write_text(rendered.stdout)
    out = subprocess.run(
        [sys.executable, "-m", "setlist.k8s.container_run", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    name = manifest["metadata"]["generateName"].rstrip("-")
    assert line.startswith(f"podman run --rm --name {name} ")
    assert "--user 10001:10001" in line and "--read-only" in line and "--cap-drop ALL" in line
    assert line.endswith("setlist.job_guard -- prefect flow-run execute")
    token = next(e["value"] for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]
                 if e["name"] == "PREFECT_API_AUTH_STRING")  # fmt: skip
    assert token not in line

    path.write_text(yaml.safe_dump({**manifest, "kind": "Deployment"}))
    out = subprocess.run(
        [sys.executable, "-m", "setlist.k8s.container_run", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "only a Job is translated" in out.stderr
