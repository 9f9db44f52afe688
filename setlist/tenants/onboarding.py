"""Create, update and offboard tenants: profile block, storage credentials, quota limit,
queues, deployments.

Every step is idempotent (create-or-update), so ``setlist up`` can re-run it and a
half-finished onboarding is completed by running it again.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterTags,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field

from blocks.storage import S3StorageConfig
from blocks.tenant import TenantProfile, TenantStatus, TrainingPolicy
from setlist.core import audit
from setlist.core.catalog import JobSpec, load_catalog, schedule_payloads
from setlist.core.settings import Settings, get_settings
from setlist.core.storage import load_storage_config
from setlist.core.tenancy import (
    JobType,
    Priority,
    ResourceTier,
    SetlistError,
    TenantQuota,
    check_tier_allowed,
    default_gpus,
    profile_block_name,
    queue_name,
    tenant_namespace,
    tier_for,
    validate_tenant_id,
)
from setlist.core.tenancy import job_variables as build_job_variables
from setlist.dispatch.queues import (
    delete_tenant_limit,
    delete_tenant_queues,
    ensure_tenant_limit,
    ensure_tenant_queues,
)
from setlist.k8s import tenant_kit
from setlist.tenants.purge import leftovers
from setlist.tenants.storage_identity import ensure_identity, identity_user_name, revoke_identity
from setlist.tenants.stream_access import ensure_stream_access, revoke_stream_access

ACTIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


class TenantSpec(BaseModel):
    """What an operator says about a tenant when creating or updating it."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: str
    display_name: str = ""
    quota: TenantQuota = Field(default_factory=TenantQuota)
    default_priority: Priority = Priority.normal
    tier_overrides: dict[JobType, ResourceTier] = Field(default_factory=dict)
    storage_block: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    training_policy: TrainingPolicy = TrainingPolicy.manual


class TenantExists(SetlistError):
    pass


class UnknownTenant(SetlistError):
    pass


async def read_profile(tenant_id: str, client: PrefectClient | None = None) -> TenantProfile:
    validate_tenant_id(tenant_id)
    try:
        return await TenantProfile.aload(profile_block_name(tenant_id), client=client)
    except ValueError:
        raise UnknownTenant(
            f"unknown tenant {tenant_id!r}; `setlist tenant list` shows the tenants"
        ) from None


async def read_active_profile(tenant_id: str) -> TenantProfile:
    """The profile of a tenant that may run jobs; a suspended tenant is refused."""
    profile = await read_profile(tenant_id)
    if profile.status != TenantStatus.active:
        raise SetlistError(f"tenant {tenant_id!r} is {profile.status.value}; jobs are refused")
    return profile


async def list_profiles(client: PrefectClient) -> list[TenantProfile]:
    docs = await client.read_block_documents_by_type(
        TenantProfile.get_block_type_slug(), include_secrets=False
    )
    profiles = [TenantProfile._from_block_document(d) for d in docs]
    return sorted(profiles, key=lambda p: p.tenant_id)


def _check_tiers(profile: TenantProfile, catalog: dict[JobType, JobSpec]) -> None:
    for job_type in catalog:
        check_tier_allowed(profile.quota, tier_for(job_type, profile.tier_overrides))


async def _flow_id(client: PrefectClient, spec: JobSpec):
    return await client.create_flow_from_name(spec.job_type.value)


def deployment_tags(tenant_id: str, job_type: JobType) -> list[str]:
    """Prefect puts a deployment's tags on each of its runs, whoever starts them (UI,
    schedule, trigger, ``setlist submit``): ``env:`` is ``ENVIRONMENT``, so runs of a
    shared server or a merged export say which environment made them."""
    environment = get_settings().environment
    return ["setlist", f"tenant:{tenant_id}", f"job:{job_type.value}", f"env:{environment}"]


async def ensure_deployment(
    client: PrefectClient, profile: TenantProfile, spec: JobSpec, limit_id: Any
) -> Any:
    """The tenant's deployment of one job type: its queue, tier, quota and parameters.

    Runs started from the UI or a schedule on this deployment land on the tenant's
    default-band queue with the tier's job variables, exactly like ``setlist submit``.
    """
    tier = tier_for(spec.job_type, profile.tier_overrides)
    fields: dict[str, Any] = {
        "work_queue_name": queue_name(profile.tenant_id, profile.default_priority),
        "entrypoint": spec.entrypoint,
        "pull_steps": spec.pull_steps,
        "parameters": {**spec.parameters, "tenant_id": profile.tenant_id},
        "parameter_openapi_schema": spec.parameter_schema(),
        "enforce_parameter_schema": True,
        "job_variables": build_job_variables(
            profile.tenant_id,
            spec.job_type,
            profile.default_priority,
            tier,
            gpu=default_gpus(spec.job_type, profile.quota.gpu),
        ),
        "tags": [*spec.tags, *deployment_tags(profile.tenant_id, spec.job_type)],
        "description": f"{spec.description} Tenant {profile.tenant_id}, tier {tier.value}.",
    }
    try:
        existing = await client.read_deployment_by_name(
            f"{spec.job_type.value}/{profile.tenant_id}"
        )
    except ObjectNotFound:
        existing = None
    if existing is None:
        deployment_id = await client.create_deployment(
            flow_id=await _flow_id(client, spec),
            name=profile.tenant_id,
            work_pool_name=spec.work_pool,
            **fields,
        )
    else:
        # Never upsert an existing deployment through create_deployment: it sends
        # concurrency_limit=None, and the server then deletes the attached limit — which
        # here is the tenant's shared one. A PATCH without that field leaves it alone.
        deployment_id = existing.id
    # The client has no argument for it: point the deployment at the tenant's shared limit.
    response = await client.request(
        "PATCH",
        f"/deployments/{deployment_id}",  # type: ignore[arg-type]
        json={
            **fields,
            # Schedules of the catalogue entry, per tenant: a scheduled run is a run of
            # this deployment, so it lands on the tenant's queue with its tier.
            "schedules": schedule_payloads(spec.schedules),
            "work_pool_name": spec.work_pool,
            "global_concurrency_limit_id": str(limit_id),
        },
    )
    response.raise_for_status()
    return deployment_id


def tenant_triggers(
    profile: TenantProfile, spec: JobSpec, deployment_id: Any = None
) -> list[DeploymentEventTrigger]:
    """The catalogue triggers of a job type that apply to this tenant, matched to its
    resource (``setlist.tenant.<id>``): only the tenant's own events start its runs.
    An ``own_runs`` trigger matches instead the flow-run events of the tenant's own
    deployment (``deployment_id``), e.g. a stream-ingest run that crashed."""
    triggers = []
    for entry in spec.triggers:
        wanted = entry.get("if_tenant") or {}
        for name in wanted:
            if name not in TenantProfile.model_fields:
                raise SetlistError(
                    f"a trigger of {spec.job_type.value} asks for profile field {name!r}, "
                    "which tenants do not have"
                )
        if any(str(getattr(profile, k)) != str(v) for k, v in wanted.items()):
            continue
        fields = {k: v for k, v in entry.items() if k not in ("if_tenant", "own_runs")}
        expect = fields.get("expect") or []
        label = fields.get("name") or ", ".join([expect] if isinstance(expect, str) else expect)
        fields["name"] = f"{spec.job_type.value}/{profile.tenant_id}: {label}"
        fields["match"] = {"prefect.resource.id": audit.tenant_resource_id(profile.tenant_id)}
        if entry.get("own_runs"):
            if deployment_id is None:
                continue  # matched to a deployment that does not exist yet
            fields["match"] = {"prefect.resource.id": "prefect.flow-run.*"}
            fields["match_related"] = {
                "prefect.resource.role": "deployment",
                "prefect.resource.id": f"prefect.deployment.{deployment_id}",
            }
        # A suspended tenant's triggers stay, switched off, so resuming restores them.
        fields["enabled"] = bool(fields.get("enabled", True)) and (
            profile.status == TenantStatus.active
        )
        triggers.append(DeploymentEventTrigger.model_validate(fields))
    return triggers


async def ensure_triggers(
    client: PrefectClient, profile: TenantProfile, spec: JobSpec, deployment_id: Any
) -> int:
    """Make the deployment's own automations exactly the tenant's triggers of the job type.

    Like ``prefect deploy``, the automations are owned by the deployment; they are
    replaced only when what they should be has changed (a digest in their tags), so
    re-running onboarding does not churn them.
    """
    owner = f"prefect.deployment.{deployment_id}"
    automations = []
    for trigger in tenant_triggers(profile, spec, deployment_id):
        trigger.set_deployment_id(deployment_id)
        automations.append(trigger.as_automation())
    canonical = json.dumps(
        [a.model_dump(mode="json", exclude={"trigger": {"id"}}) for a in automations],
        sort_keys=True,
    )
    digest = "spec:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    # The API does not return owner_resource; the ones this function made carry its tags.
    existing = [
        a
        for a in await client.read_resource_related_automations(owner)
        if f"tenant:{profile.tenant_id}" in a.tags
    ]
    if len(existing) == len(automations) and all(digest in a.tags for a in existing):
        return len(automations)
    await client.delete_resource_owned_automations(owner)
    for automation in automations:
        automation.tags = ["setlist", f"tenant:{profile.tenant_id}", digest]
        await client.create_automation(automation)
    return len(automations)


async def detach_limit(client: PrefectClient, deployment_id: Any) -> None:
    """Unlink the shared tenant limit first: deleting a deployment deletes its limit."""
    response = await client.request(
        "PATCH",
        f"/deployments/{deployment_id}",  # type: ignore[arg-type]
        json={"global_concurrency_limit_id": None},
    )
    response.raise_for_status()


def _stores(profile: TenantProfile, settings: Settings) -> list[tuple[str, str]]:
    """(purpose, storage block) of every store a tenant's jobs open."""
    return [("data", profile.storage_block), ("backup", settings.backup_block)]


async def _platform_store(name: str):
    """The platform's storage block ``name`` with its credential; None if there is none
    (onboarding never required the store to exist first)."""
    try:
        return await load_storage_config(name)
    except SetlistError:
        return None


async def ensure_storage_identities(
    client: PrefectClient, profile: TenantProfile, settings: Settings
) -> dict[str, str]:
    """Give the tenant its own credential on each S3 store it uses (a local store has
    none to give); returns the IAM user of each purpose that got one."""
    users = {}
    for purpose, block in _stores(profile, settings):
        config = await _platform_store(block)
        if isinstance(config, S3StorageConfig):
            await ensure_identity(profile.tenant_id, config, purpose=purpose, client=client)
            users[purpose] = identity_user_name(profile.tenant_id, purpose)
    return users


async def revoke_storage_identities(
    client: PrefectClient, profile: TenantProfile, settings: Settings
) -> list[str]:
    """Take the tenant's store credentials away (users, keys, blocks); the purposes done."""
    done = []
    for purpose, block in _stores(profile, settings):
        config = await _platform_store(block)
        if await revoke_identity(profile.tenant_id, config, purpose, client=client):
            done.append(purpose)
    return done


async def _materialise(
    client: PrefectClient, profile: TenantProfile, settings: Settings
) -> dict[str, Any]:
    catalog = load_catalog(settings)
    _check_tiers(profile, catalog)
    limit = await ensure_tenant_limit(client, profile.tenant_id, profile.quota.concurrent_jobs)
    queues: list[str] = []
    for pool in settings.pools:
        queues += await ensure_tenant_queues(client, pool, profile.tenant_id)
    deployments = {}
    triggers = {}
    for job_type, spec in catalog.items():
        deployment_id = await ensure_deployment(client, profile, spec, limit.id)
        deployments[job_type.value] = str(deployment_id)
        if n := await ensure_triggers(client, profile, spec, deployment_id):
            triggers[job_type.value] = n
    stream = await ensure_stream_access(profile.tenant_id, settings)
    kit = tenant_kit.write_kit(profile, settings.home / "kits")
    applied = tenant_kit.apply_kit(profile) if settings.kube_apply else []
    return {
        "queues": queues,
        "deployments": deployments,
        "triggers": triggers,
        "concurrency_limit": limit.name,
        "stream_block": stream,
        "kit": str(kit),
        "kit_applied": applied,
    }


def _profile_from_spec(spec: TenantSpec, settings: Settings) -> TenantProfile:
    return TenantProfile(
        tenant_id=validate_tenant_id(spec.tenant_id),
        display_name=spec.display_name or spec.tenant_id,
        quota=spec.quota,
        default_priority=spec.default_priority,
        tier_overrides=spec.tier_overrides,
        namespace=tenant_namespace(spec.tenant_id),
        storage_block=spec.storage_block or settings.storage_block,
        labels=spec.labels,
        training_policy=spec.training_policy,
    )


async def create_tenant(
    client: PrefectClient,
    spec: TenantSpec,
    *,
    exist_ok: bool = False,
    adopt_leftovers: bool = False,
) -> dict[str, Any]:
    """Onboard a tenant. Refuses an existing one unless ``exist_ok`` (then: converge),
    and an id whose former tenant's data remains unless ``adopt_leftovers`` (the local
    stack's demo tenant, whose data is the stack's own sample)."""
    settings = get_settings()
    profile = _profile_from_spec(spec, settings)
    try:
        existing = await read_profile(profile.tenant_id)
    except UnknownTenant:
        existing = None
    if existing is not None and not exist_ok:
        raise TenantExists(
            f"tenant {profile.tenant_id!r} already exists; use `setlist tenant update`"
        )
    if (
        existing is None
        and not adopt_leftovers
        and (left := await leftovers(client, profile.tenant_id))
    ):
        raise TenantExists(
            f"tenant id {profile.tenant_id!r} was used before and its {left.describe()} "
            f"remain; a new tenant must not inherit them: erase them first with "
            f"`setlist tenant purge {profile.tenant_id}`, or pick another id"
        )
    profile = existing or profile
    _check_tiers(profile, load_catalog(settings))
    await profile.asave(profile_block_name(profile.tenant_id), overwrite=True)
    # Before the deployments: a run must find the tenant's own store credential.
    identities = await ensure_storage_identities(client, profile, settings)
    result = {**await _materialise(client, profile, settings), "storage_identities": identities}
    if existing is None:
        await audit.emit(
            client,
            "setlist.tenant.created",
            profile.tenant_id,
            obj=(audit.tenant_resource_id(profile.tenant_id), "tenant"),
            payload={"quota": profile.quota.model_dump(), **result},
        )
    return {"tenant": profile, **result}


async def update_tenant(
    client: PrefectClient, tenant_id: str, changes: dict[str, Any]
) -> dict[str, Any]:
    """Apply changes (quota fields, default_priority, tier_overrides, display_name, status)."""
    settings = get_settings()
    profile = await read_profile(tenant_id)
    allowed = {
        "display_name",
        "quota",
        "default_priority",
        "tier_overrides",
        "status",
        "labels",
        "training_policy",
    }
    unknown = set(changes) - allowed
    if unknown:
        raise SetlistError(
            f"cannot change {sorted(unknown)}; changeable: {', '.join(sorted(allowed))}"
        )
    data = profile.model_dump(exclude={"block_type_slug"})
    if "quota" in changes:
        data["quota"] = {**data["quota"], **changes.pop("quota")}
    data.update(changes)
    updated = TenantProfile.model_validate(data)
    _check_tiers(updated, load_catalog(settings))
    await updated.asave(profile_block_name(tenant_id), overwrite=True)
    identities = await ensure_storage_identities(client, updated, settings)
    result = {**await _materialise(client, updated, settings), "storage_identities": identities}
    await audit.emit(
        client,
        "setlist.tenant.updated",
        tenant_id,
        obj=(audit.tenant_resource_id(tenant_id), "tenant"),
        payload={"changes": TenantProfile.model_validate(data).model_dump(mode="json")},
    )
    return {"tenant": updated, **result}


async def set_status(client: PrefectClient, tenant_id: str, status: TenantStatus) -> None:
    await update_tenant(client, tenant_id, {"status": status})


async def active_runs(client: PrefectClient, tenant_id: str) -> list:
    """Runs that are due or under way. Runs a schedule created for later are not: they
    go with the tenant's deployments (Prefect deletes a deployment's scheduled runs)."""
    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=["setlist", f"tenant:{tenant_id}"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES)),
            expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(UTC)),
        ),
        limit=200,
    )


async def delete_tenant(client: PrefectClient, tenant_id: str, *, force: bool = False) -> dict:
    """Offboard: deployments, queues, quota limit, store credentials and profile go;
    stored data stays.

    Refused while the tenant has active runs unless ``force`` (then they are cancelled).
    Data is kept on purpose: back it up or erase it with the backup flows, explicitly.
    """
    settings = get_settings()
    profile = await read_profile(tenant_id)
    runs = await active_runs(client, tenant_id)
    if runs and not force:
        raise SetlistError(
            f"tenant {tenant_id!r} has {len(runs)} active run(s); cancel them or pass --force"
        )
    from prefect.states import Cancelling

    for run in runs:
        await client.set_flow_run_state(run.id, Cancelling(message="tenant offboarded"), force=True)
        await audit.emit(
            client,
            audit.CANCELLED,
            tenant_id,
            obj=(f"prefect.flow-run.{run.id}", "flow-run"),
            payload={"flow_run_name": run.name, "actor_kind": "cli", "reason": "tenant offboarded"},
        )
    deployments = await client.read_deployments(
        deployment_filter=DeploymentFilter(
            tags=DeploymentFilterTags(all_=["setlist", f"tenant:{tenant_id}"])
        )
    )
    for dep in deployments:
        try:
            # The deployment's triggers go with it (the server keeps owned automations).
            await client.delete_resource_owned_automations(f"prefect.deployment.{dep.id}")
            await detach_limit(client, dep.id)
            await client.delete_deployment(dep.id)
        except ObjectNotFound:
            pass
    queues = 0
    for pool in settings.pools:
        queues += await delete_tenant_queues(client, pool, tenant_id)
    await delete_tenant_limit(client, tenant_id)
    # The kit file goes; a namespace already applied to a cluster stays until an operator
    # removes it (its jobs' data and logs may still be needed).
    (settings.home / "kits" / f"{tenant_id}.yaml").unlink(missing_ok=True)
    # Its store credentials go while the profile still names the stores (a retry of a
    # half-done offboarding finds them again); the data they reached stays.
    revoked = await revoke_storage_identities(client, profile, settings)
    if await revoke_stream_access(tenant_id, settings):
        revoked.append("stream")
    try:
        await client.delete_block_document(
            (
                await client.read_block_document_by_name(
                    profile_block_name(tenant_id), TenantProfile.get_block_type_slug()
                )
            ).id
        )
    except ObjectNotFound:
        pass
    await audit.emit(
        client,
        "setlist.tenant.deleted",
        tenant_id,
        obj=(audit.tenant_resource_id(tenant_id), "tenant"),
        payload={
            "deployments": len(deployments),
            "queues": queues,
            "cancelled": len(runs),
            "storage_identities_revoked": revoked,
        },
    )
    return {
        "deployments": len(deployments),
        "queues": queues,
        "cancelled_runs": len(runs),
        "storage_identities_revoked": revoked,
    }
