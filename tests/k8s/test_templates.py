"""Job manifests rendered by prefect-kubernetes' own code, validated strictly."""

from __future__ import annotations

import itertools
import uuid

import kubernetes_validate
import pytest
from prefect.client.schemas.objects import FlowRun

from setlist.core.tenancy import (
    JOB_DEADLINE_SECONDS,
    TIERS,
    JobType,
    Priority,
    ResourceTier,
    job_variables,
)
from setlist.k8s.templates import (
    JobVariablesError,
    PoolKind,
    check_job_variables,
    load_template,
)
from setlist.security.pod_security import restricted_violations
from setlist.workers.kubernetes import render_job

pytestmark = pytest.mark.server

K8S_VERSIONS = ["1.31", kubernetes_validate.latest_version()]


def _validate(obj):
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


async def test_every_tier_band_and_job_type_renders_valid_and_restricted(client):
    rendered = 0
    for job_type, band, tier in itertools.product(JobType, Priority, ResourceTier):
        kinds = [PoolKind.cpu, PoolKind.gpu] if job_type is JobType.ml_training else [PoolKind.cpu]
        for kind in kinds:
            gpu = 1 if kind is PoolKind.gpu else 0
            values = job_variables("acme-music", job_type, band, tier, gpu=gpu)
            manifest = await render_job(client, values, kind)
            _validate(manifest)
            assert restricted_violations(manifest) == []
            meta, spec = manifest["metadata"], manifest["spec"]
            pod = spec["template"]["spec"]
            (container,) = pod["containers"]
            assert meta["namespace"] == "tenant-acme-music"
            assert meta["labels"]["setlist.io/tenant"] == "acme-music"
            assert meta["labels"]["kueue.x-k8s.io/queue-name"] == f"tier-{tier.value}"
            assert meta["labels"]["kueue.x-k8s.io/priority-class"] == f"setlist-{band.value}"
            assert spec["template"]["metadata"]["labels"]["setlist.io/band"] == band.value
            assert pod["priorityClassName"] == f"setlist-{band.value}"
            assert pod["automountServiceAccountToken"] is False
            assert spec["activeDeadlineSeconds"] == JOB_DEADLINE_SECONDS[job_type]
            # Preemption/eviction: no pod-level retry inside the Job (the runner reschedules the
            # flow run on SIGTERM and a new Job takes it), no replacement pod while the old
            # one is still terminating, and an evicted pod ends its Job.
            assert spec["backoffLimit"] == 0 and "parallelism" not in pod
            assert spec["podReplacementPolicy"] == "Failed"
            assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
            sigterm = {e["name"]: e.get("value") for e in container["env"]}
            assert sigterm["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"
            res = container["resources"]
            assert res["requests"]["cpu"] == res["limits"]["cpu"] == TIERS[tier].cpu
            assert res["requests"]["memory"] == res["limits"]["memory"] == TIERS[tier].memory
            env = {e["name"] for e in container["env"]}
            assert not any(n.startswith("PREFECT_SERVER_") for n in env), env
            if kind is PoolKind.gpu:
                assert res["limits"]["nvidia.com/gpu"] == 1
                assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
                assert "nvidia.com/gpu.product" in pod["nodeSelector"]
                shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
                assert shm["emptyDir"]["medium"] == "Memory"
            else:
                assert "nvidia.com/gpu" not in res["limits"] and "tolerations" not in pod
            rendered += 1
    assert rendered == len(JobType) * 5 * 6 + 5 * 6


def test_pod_security_check_is_not_vacuous():
    manifest = {
        "kind": "Job",
        "spec": {
            "template": {
                "spec": {
                    "hostNetwork": True,
                    "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
                    "containers": [
                        {
                            "name": "bad",
                            "securityContext": {"privileged": True, "runAsUser": 0},
                            "ports": [{"containerPort": 80, "hostPort": 80}],
                        }
                    ],
                }
            }
        },
    }
    problems = "\n".join(restricted_violations(manifest))
    for expected in (
        "hostNetwork",
        "hostPath",
        "privileged",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "runAsUser is 0",
        "seccompProfile",
        "drop ALL",
        "hostPort",
        "writable",
        "limits",
    ):
        assert expected in problems


@pytest.mark.parametrize(
    "kind,change,message",
    [
        (PoolKind.cpu, {"cpu": "-1"}, "cpu"),
        (PoolKind.cpu, {"cpu": "0"}, "cpu"),
        (PoolKind.cpu, {"memory": "lots"}, "memory"),
        (PoolKind.cpu, {"tier": "huge"}, "tier"),
        (PoolKind.cpu, {"band": "urgent"}, "band"),
        (PoolKind.cpu, {"gpu": 1}, "gpu"),
        (PoolKind.cpu, {"namespace": "kube-system"}, "namespace"),
        (PoolKind.cpu, {"tenant": "../x"}, "tenant"),
        (PoolKind.cpu, {"image": "busybox:latest"}, "image"),
        (PoolKind.gpu, {"gpu": 0}, "gpu"),
        (PoolKind.gpu, {"gpu": 99}, "gpu"),
    ],
)
async def test_bad_job_variables_are_refused_before_rendering(client, kind, change, message):
    values = {
        **job_variables("acme", JobType.canary, Priority.normal, ResourceTier.small),
        **change,
    }
    if kind is PoolKind.gpu and "gpu" not in change:
        values["gpu"] = 1
    with pytest.raises(JobVariablesError, match=message):
        check_job_variables(kind, values)
    with pytest.raises(JobVariablesError):
        await render_job(client, values, kind)


async def test_run_from_another_tenants_queue_is_refused(client):
    values = job_variables("victim", JobType.canary, Priority.normal, ResourceTier.small)
    run = FlowRun(id=uuid.uuid4(), name="r", flow_id=uuid.uuid4(), work_queue_name="acme.normal")
    with pytest.raises(JobVariablesError, match="not 'tenant-acme'"):
        await render_job(client, values, PoolKind.cpu, flow_run=run)


def test_templates_forbid_unknown_variables_and_keep_upstream_fields():
    for kind in PoolKind:
        template = load_template(kind)
        assert template["variables"]["additionalProperties"] is False
        config = template["job_configuration"]
        assert config["namespace"] == "tenant-{{ tenant }}"
        assert config["job_manifest"]["metadata"]["namespace"] == "tenant-{{ tenant }}"
