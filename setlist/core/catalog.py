"""The job catalogue: which job types are deployable, read from deployments/prefect.yaml.

prefect.yaml stays the one place a deployment is described (entrypoint, description,
pull steps, schedules); this module resolves it for the current settings and loads each
flow to get the parameter schema the UI renders as a form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema

from setlist.core.settings import REPO_ROOT, Settings, get_settings
from setlist.core.tenancy import JobType, SetlistError

_VAR = re.compile(r"\{\{\s*\$([A-Z0-9_]+)\s*\}\}")


@dataclass(frozen=True)
class JobSpec:
    job_type: JobType
    entrypoint: str
    description: str
    tags: tuple[str, ...]
    parameters: dict[str, Any]
    pull_steps: list[dict[str, Any]]
    work_pool: str
    schedules: list[dict[str, Any]] = field(default_factory=list)
    triggers: list[dict[str, Any]] = field(default_factory=list)

    def load_flow(self) -> Flow:
        return load_flow(self.entrypoint)

    def parameter_schema(self) -> dict[str, Any]:
        return parameter_schema(self.load_flow()).model_dump_for_openapi()


@lru_cache
def load_flow(entrypoint: str) -> Flow:
    """The flow at ``entrypoint`` (``flows/x.py:name``), loaded as a worker loads it.

    Platform code reaches the flows that run on it only this way, never by import: a
    command that runs a flow in-process (a final backup, a scan) names its entrypoint.
    """
    path, _, name = entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{REPO_ROOT / path}:{name}")


def _substitute(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _VAR.sub(lambda m: variables.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def load_catalog(settings: Settings | None = None) -> dict[JobType, JobSpec]:
    settings = settings or get_settings()
    path = settings.catalog
    raw = yaml.safe_load(path.read_text())
    variables = {
        "SETLIST_CODE_DIR": str(settings.code_dir),
        "SETLIST_WORK_POOL": settings.work_pool,
        "SETLIST_GPU_WORK_POOL": settings.gpu_work_pool or settings.work_pool,
    }
    pull = _substitute(raw.get("pull") or [], variables)
    specs: dict[JobType, JobSpec] = {}
    for entry in raw.get("deployments") or []:
        entry = _substitute(entry, variables)
        try:
            job_type = JobType(entry["name"])
        except ValueError:
            raise SetlistError(f"{path}: deployment {entry['name']!r} is not a job type") from None
        for sched in entry.get("schedules") or []:
            if "tenant_id" in (sched.get("parameters") or {}):
                raise SetlistError(f"{path}: a schedule of {job_type.value} sets tenant_id")
        specs[job_type] = JobSpec(
            job_type=job_type,
            entrypoint=entry["entrypoint"],
            description=" ".join(str(entry.get("description", "")).split()),
            tags=tuple(entry.get("tags") or ()),
            parameters=dict(entry.get("parameters") or {}),
            pull_steps=list(entry.get("pull") or pull),
            work_pool=(entry.get("work_pool") or {}).get("name") or settings.work_pool,
            schedules=list(entry.get("schedules") or []),
            triggers=[_check_trigger(path, job_type, t) for t in entry.get("triggers") or []],
        )
    return specs


# A catalogue trigger is a Prefect deployment trigger without a tenant: onboarding adds
# the match on the tenant's resource. ``if_tenant`` (Setlist's own key) names profile
# fields the tenant must have for its deployment to get the trigger.
_TRIGGER_KEYS = {
    "name",
    "description",
    "enabled",
    "expect",
    "after",
    "match_related",
    "for_each",
    "posture",
    "threshold",
    "within",
    "parameters",
    "if_tenant",
    "own_runs",
    "type",
}


def _check_trigger(path: Any, job_type: JobType, trigger: dict[str, Any]) -> dict[str, Any]:
    where = f"{path}: a trigger of {job_type.value}"
    unknown = set(trigger) - _TRIGGER_KEYS
    if "match" in unknown:
        raise SetlistError(f"{where} sets match; the tenant's resource is matched per tenant")
    if unknown:
        raise SetlistError(
            f"{where} has {sorted(unknown)}; accepted: {', '.join(sorted(_TRIGGER_KEYS))}"
        )
    if trigger.get("type", "event") != "event":
        raise SetlistError(f"{where} is of type {trigger['type']!r}; accepted: event")
    if not trigger.get("expect"):
        raise SetlistError(f"{where} expects no event; name the event(s) under expect")
    if "tenant_id" in (trigger.get("parameters") or {}):
        raise SetlistError(f"{where} sets tenant_id")
    if not isinstance(trigger.get("if_tenant") or {}, dict):
        raise SetlistError(f"{where}: if_tenant must map profile fields to values")
    own = trigger.get("own_runs", False)
    if not isinstance(own, bool):
        raise SetlistError(f"{where}: own_runs must be true or false")
    if own and any(not str(e).startswith("prefect.flow-run.") for e in _names(trigger["expect"])):
        raise SetlistError(f"{where}: own_runs triggers expect prefect.flow-run.* events only")
    return dict(trigger)


def _names(expect: Any) -> list[str]:
    return [expect] if isinstance(expect, str) else list(expect)


_SCHEDULE_KEYS = ("cron", "timezone", "day_or", "interval", "anchor_date", "rrule")


def schedule_payloads(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """prefect.yaml schedule entries → the API's deployment schedule objects."""
    payloads = []
    for entry in entries:
        schedule = {k: entry[k] for k in _SCHEDULE_KEYS if k in entry}
        if not any(k in schedule for k in ("cron", "interval", "rrule")):
            raise SetlistError(f"schedule {entry!r} needs one of cron, interval or rrule")
        payloads.append(
            {
                "schedule": schedule,
                "active": bool(entry.get("active", True)),
                "parameters": dict(entry.get("parameters") or {}),
                **({"slug": entry["slug"]} if entry.get("slug") else {}),
            }
        )
    return payloads


def require_deployable(job_type: JobType, catalog: dict[JobType, JobSpec]) -> JobSpec:
    if job_type not in catalog:
        built = ", ".join(sorted(j.value for j in catalog)) or "none"
        raise SetlistError(
            f"job type {job_type.value!r} has no deployment yet (its flow is not built); "
            f"deployable job types: {built}"
        )
    return catalog[job_type]
