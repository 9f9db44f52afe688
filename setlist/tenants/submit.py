"""Submit, list, follow and cancel jobs through the Prefect API.

A submission is the tenant's deployment of the job type, run on the (tenant, band)
queue with the tier's job variables — the same deployment the UI's "Run" button and
schedules use, so every path lands in the same place.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, Log, StateType, TaskRun
from prefect.client.schemas.sorting import FlowRunSort, LogSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling, Scheduled

from blocks.tenant import TenantProfile
from setlist.core import audit, tenancy
from setlist.core.catalog import load_catalog, require_deployable
from setlist.core.run_names import is_run_id, run_name
from setlist.core.tenancy import (
    JobType,
    Priority,
    ResourceTier,
    SetlistError,
    check_tier_allowed,
    default_gpus,
    parse_job_type,
    parse_priority,
    parse_queue_name,
    parse_tier,
    queue_name,
    run_tags,
    tier_for,
)
from setlist.core.tenancy import job_variables as build_job_variables
from setlist.tenants.onboarding import read_active_profile, read_profile

RESERVED_PARAMS = {"tenant_id"}


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs → dict; values are JSON when they parse as JSON, else strings."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SetlistError(f"parameter {pair!r} is not key=value")
        if key in RESERVED_PARAMS:
            raise SetlistError(f"parameter {key!r} is set by the platform from --tenant")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


@dataclass
class Submission:
    job_type: JobType
    tenant_id: str
    priority: Priority
    tier: ResourceTier
    deployment: str
    work_pool: str
    work_queue: str
    parameters: dict[str, Any]
    job_variables: dict[str, Any]
    tags: list[str]
    flow_run_id: UUID | None = None
    flow_run_name: str | None = None
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_type": self.job_type.value,
            "tenant_id": self.tenant_id,
            "priority": self.priority.value,
            "tier": self.tier.value,
            "deployment": self.deployment,
            "work_pool": self.work_pool,
            "work_queue": self.work_queue,
            "parameters": self.parameters,
            "job_variables": self.job_variables,
            "tags": self.tags,
            "flow_run_id": str(self.flow_run_id) if self.flow_run_id else None,
            "flow_run_name": self.flow_run_name,
            "dry_run": self.dry_run,
        }


async def resolve(
    job_type: str | JobType,
    tenant_id: str,
    priority: str | Priority | None = None,
    tier: str | ResourceTier | None = None,
) -> tuple[TenantProfile, JobType, Priority, ResourceTier]:
    """Tenant, job type, band and tier of a request, each checked; defaults from the profile."""
    jt = parse_job_type(job_type)
    profile = await read_active_profile(tenant_id)
    band = parse_priority(priority) if priority else profile.default_priority
    res_tier = parse_tier(tier) if tier else tier_for(jt, profile.tier_overrides)
    check_tier_allowed(profile.quota, res_tier)
    return profile, jt, band, res_tier


async def plan(
    job_type: str | JobType,
    tenant_id: str,
    priority: str | Priority | None = None,
    tier: str | ResourceTier | None = None,
    params: dict[str, Any] | None = None,
) -> Submission:
    """Validate a submission completely and say what it would create; creates nothing."""
    profile, jt, band, res_tier = await resolve(job_type, tenant_id, priority, tier)
    spec = require_deployable(jt, load_catalog())
    params = dict(params or {})
    bad = RESERVED_PARAMS & params.keys()
    if bad:
        raise SetlistError(f"parameter(s) {sorted(bad)} are set by the platform from --tenant")
    schema_props = spec.parameter_schema().get("properties", {})
    unknown = set(params) - set(schema_props)
    if unknown:
        raise SetlistError(
            f"unknown parameter(s) {sorted(unknown)} for {jt.value}; accepted: "
            f"{', '.join(sorted(set(schema_props) - RESERVED_PARAMS))}"
        )
    return Submission(
        job_type=jt,
        tenant_id=profile.tenant_id,
        priority=band,
        tier=res_tier,
        deployment=f"{jt.value}/{profile.tenant_id}",
        work_pool=spec.work_pool,
        work_queue=queue_name(profile.tenant_id, band),
        parameters={**params, "tenant_id": profile.tenant_id},
        job_variables=build_job_variables(
            profile.tenant_id, jt, band, res_tier, gpu=default_gpus(jt, profile.quota.gpu)
        ),
        tags=run_tags(profile.tenant_id, jt, band, res_tier),
    )


async def submit(
    client: PrefectClient,
    job_type: str | JobType,
    tenant_id: str,
    priority: str | Priority | None = None,
    tier: str | ResourceTier | None = None,
    params: dict[str, Any] | None = None,
    *,
    dry_run: bool = False,
    idempotency_key: str | None = None,
) -> Submission:
    """Create the flow run (unless ``dry_run``) and record the audit event."""
    sub = await plan(job_type, tenant_id, priority, tier, params)
    if dry_run:
        sub.dry_run = True
        return sub
    try:
        deployment = await client.read_deployment_by_name(sub.deployment)
    except ObjectNotFound:
        raise SetlistError(
            f"deployment {sub.deployment} is missing; run `setlist tenant update "
            f"{sub.tenant_id}` (or `setlist up`) to re-create the tenant's deployments"
        ) from None
    # Named now, as the flow will name itself when it starts (``run_names``): the
    # expected start is this very second.
    due = datetime.now(UTC).replace(microsecond=0)
    actor = audit.current_actor()
    run = await client.create_flow_run_from_deployment(
        deployment.id,
        parameters=sub.parameters,
        work_queue_name=sub.work_queue,
        job_variables=sub.job_variables,
        tags=sub.tags,
        idempotency_key=idempotency_key,
        name=run_name(sub.job_type.value, sub.tenant_id, due),
        state=Scheduled(scheduled_time=due),
        # Who submitted it, for the worker's ``setlist.job.started`` (Prefect records no
        # creator for a run made through the API); a job's run token can't write it.
        labels={audit.SUBMITTED_BY: actor},
    )
    sub.flow_run_id = run.id
    sub.flow_run_name = run.name
    await audit.emit(
        client,
        "setlist.job.submitted",
        sub.tenant_id,
        obj=(f"prefect.flow-run.{run.id}", "flow-run"),
        payload={k: v for k, v in sub.as_dict().items() if k != "parameters"},
        actor=actor,
    )
    return sub


def run_tenant(run: FlowRun) -> str | None:
    return tenancy.run_tenant(run.tags, run.work_queue_name)


def run_tag(run: FlowRun, key: str) -> str | None:
    for tag in run.tags:
        if tag.startswith(f"{key}:"):
            return tag.split(":", 1)[1]
    if key == "band":
        parsed = parse_queue_name(run.work_queue_name or "")
        return parsed[1].value if parsed else None
    return None


async def read_run(client: PrefectClient, run_id: str | UUID, tenant_id: str | None) -> FlowRun:
    """A Setlist run by id or by its name (``<job-type>-<tenant>-<YYYYMMDD-HHMMSS>``);
    with ``tenant_id``, refused unless it is that tenant's run."""
    if not is_run_id(str(run_id)):
        run_id = await _run_id_by_name(client, str(run_id), tenant_id)
    try:
        run = await client.read_flow_run(UUID(str(run_id)))
    except ObjectNotFound:
        raise SetlistError(f"no flow run {run_id}") from None
    owner = run_tenant(run)
    if owner is None:
        raise SetlistError(f"flow run {run_id} is not a Setlist job")
    if tenant_id is not None and owner != tenant_id:
        # Same answer as for a missing run: don't confirm another tenant's run exists.
        raise SetlistError(f"no flow run {run_id} for tenant {tenant_id}")
    return run


async def _run_id_by_name(client: PrefectClient, name: str, tenant_id: str | None) -> UUID:
    """The one Setlist run named ``name`` (of ``tenant_id``'s, when given)."""
    tags = ["setlist", *([f"tenant:{tenant_id}"] if tenant_id else [])]
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[name]), tags=FlowRunFilterTags(all_=tags)
        ),
        limit=10,
    )
    if not runs:
        whose = f" for tenant {tenant_id}" if tenant_id else ""
        raise SetlistError(f"no flow run named {name!r}{whose} (give a run's name or its id)")
    if len(runs) > 1:
        ids = ", ".join(str(r.id) for r in runs)
        raise SetlistError(f"{len(runs)} runs are named {name!r}; give one of their ids: {ids}")
    return runs[0].id


async def list_jobs(
    client: PrefectClient,
    *,
    tenant_id: str | None = None,
    state: str | None = None,
    job_type: str | None = None,
    limit: int = 50,
    upcoming: bool = False,
) -> list[FlowRun]:
    """Setlist runs whose time has come (due, running, finished), newest first; with
    ``upcoming``, only the runs scheduled for later (what every schedule has queued up),
    soonest first. Without that split a list of 50 is all next week's scheduled runs."""
    tags = ["setlist"]
    if tenant_id:
        await read_profile(tenant_id)
        tags.append(f"tenant:{tenant_id}")
    if job_type:
        tags.append(f"job:{parse_job_type(job_type).value}")
    state_filter = None
    if state:
        try:
            st = StateType(state.strip().upper())
        except ValueError:
            accepted = ", ".join(s.value.lower() for s in StateType)
            raise SetlistError(f"unknown state {state!r}; accepted: {accepted}") from None
        state_filter = FlowRunFilterState(type=FlowRunFilterStateType(any_=[st]))
    now = datetime.now(UTC)
    if upcoming:
        when = FlowRunFilterExpectedStartTime(after_=now)
        order = FlowRunSort.EXPECTED_START_TIME_ASC
    else:
        when = FlowRunFilterExpectedStartTime(before_=now)
        order = FlowRunSort.EXPECTED_START_TIME_DESC
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=tags), state=state_filter, expected_start_time=when
        ),
        sort=order,
        limit=limit,
    )


async def read_logs(client: PrefectClient, run_id: UUID, offset: int = 0) -> list[Log]:
    return await client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
        sort=LogSort.TIMESTAMP_ASC,
        offset=offset,
        limit=200,
    )


async def read_task_runs(client: PrefectClient, run_id: UUID) -> list[TaskRun]:
    return await client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    )


@dataclass
class WatchUpdate:
    run: FlowRun
    task_runs: list[TaskRun]
    new_logs: list[Log]


async def watch(
    client: PrefectClient, run_id: UUID, poll_seconds: float = 1.0, timeout: float | None = None
) -> AsyncIterator[WatchUpdate]:
    """Yield the run, its task runs and new log lines until the run is final."""
    import anyio

    seen = 0
    with anyio.move_on_after(timeout) if timeout else contextlib.nullcontext():
        while True:
            run = await client.read_flow_run(run_id)
            logs = await read_logs(client, run_id, offset=seen)
            seen += len(logs)
            yield WatchUpdate(run, await read_task_runs(client, run_id), logs)
            if run.state and run.state.is_final():
                # Logs are shipped in batches: pick up stragglers once more.
                await anyio.sleep(poll_seconds)
                late = await read_logs(client, run_id, offset=seen)
                if late:
                    yield WatchUpdate(run, await read_task_runs(client, run_id), late)
                return
            await anyio.sleep(poll_seconds)


async def cancel(client: PrefectClient, run_id: str | UUID, tenant_id: str | None) -> FlowRun:
    """Cancel a run: a waiting run is cancelled at once, a running one via its worker."""
    run = await read_run(client, run_id, tenant_id)
    if run.state and run.state.is_final():
        raise SetlistError(f"flow run {run.id} is already {run.state.type.value.lower()}")
    await client.set_flow_run_state(run.id, Cancelling(message="cancelled by operator"))
    await audit.emit(
        client,
        audit.CANCELLED,
        run_tenant(run) or "unknown",
        obj=(f"prefect.flow-run.{run.id}", "flow-run"),
        payload={"flow_run_name": run.name, "actor_kind": "cli"},
    )
    return await client.read_flow_run(run.id)
