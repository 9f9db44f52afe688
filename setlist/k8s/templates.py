"""Kubernetes job templates: loading, variable checks and the per-run namespace rule.

The templates in ``k8s/job-templates`` are prefect-kubernetes base job templates. Their
variables schema forbids unknown variables and checks every value (pattern, enum,
bounds), so a bad job variable is refused by the Prefect server when a run is created and
by ``check_job_variables`` before anything is rendered. Rendering lives beside the
worker's configuration (``setlist.workers.kubernetes.render_job``), so a dry run goes
through prefect-kubernetes' own ``KubernetesWorkerJobConfiguration`` exactly as the worker
does.
"""

from __future__ import annotations

import copy
import json
from enum import StrEnum
from functools import lru_cache
from typing import Any
from uuid import uuid4

import jsonschema

from setlist.core.settings import REPO_ROOT, get_settings
from setlist.core.tenancy import SetlistError, parse_queue_name, tenant_namespace

TEMPLATE_DIR = REPO_ROOT / "k8s" / "job-templates"


class PoolKind(StrEnum):
    cpu = "cpu"
    gpu = "gpu"


class JobVariablesError(SetlistError):
    """Job variables a template refuses, or a namespace that is not the run's tenant's."""


@lru_cache
def _template(kind: PoolKind) -> str:
    return (TEMPLATE_DIR / f"{kind.value}.json").read_text()


def load_template(kind: PoolKind | str) -> dict[str, Any]:
    """A fresh copy of the base job template of a pool kind, naming the image of the
    settings (``SETLIST_IMAGE``, ``SETLIST_GPU_IMAGE``)."""
    kind = PoolKind(kind)
    template = json.loads(_template(kind))
    settings = get_settings()
    image = settings.gpu_image if kind is PoolKind.gpu else settings.image
    template["variables"]["properties"]["image"]["default"] = image
    return template


def shared_variables() -> dict[str, Any]:
    """The variables every Setlist pool takes, the local process pool included."""
    props = load_template(PoolKind.gpu)["variables"]["properties"]
    keys = ("tenant", "job_type", "band", "tier", "cpu", "memory", "active_deadline_seconds", "gpu")
    return {k: copy.deepcopy(props[k]) for k in keys}


def check_job_variables(kind: PoolKind | str, values: dict[str, Any]) -> None:
    """Refuse values the pool's template would refuse, naming each problem."""
    schema = load_template(kind)["variables"]
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(values), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in error.path) or "job variables"
        if error.validator == "additionalProperties":
            allowed = ", ".join(sorted(schema["properties"]))
            problems.append(f"{error.message} (the {PoolKind(kind).value} pool accepts: {allowed})")
        else:
            problems.append(f"{where}: {error.message}")
    if problems:
        raise JobVariablesError("; ".join(problems))


def check_run_namespace(manifest: dict[str, Any], work_queue_name: str | None) -> None:
    """The Job must go to the namespace of the tenant whose queue dispatched the run."""
    parsed = parse_queue_name(work_queue_name or "")
    if parsed is None:
        raise JobVariablesError(f"work queue {work_queue_name!r} is not a Setlist tenant queue")
    expected = tenant_namespace(parsed[0])
    namespace = manifest["metadata"].get("namespace")
    if namespace != expected:
        raise JobVariablesError(
            f"Job namespace {namespace!r} is not {expected!r}, the namespace of the tenant "
            f"whose queue {work_queue_name!r} dispatched the run"
        )
    labels = manifest["metadata"].get("labels", {})
    if labels.get("setlist.io/tenant") != parsed[0]:
        raise JobVariablesError(
            f"Job tenant label {labels.get('setlist.io/tenant')!r} is not {parsed[0]!r}"
        )


def sample_flow_run(values: dict[str, Any], flow_name: str = "canary"):
    """A flow run as the worker would see it, for a dry-run render."""
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(
        id=uuid4(),
        name=f"dry-run-{values.get('job_type', flow_name)}",
        flow_id=uuid4(),
        work_queue_name=f"{values['tenant']}.{values.get('band', 'normal')}",
        tags=[f"tenant:{values['tenant']}"],
    )
