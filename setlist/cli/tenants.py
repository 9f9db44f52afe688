"""``setlist tenant …``: onboard, inspect, change and offboard tenants."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.table import Table

from setlist.cli._common import _client, _echo, _flow, _run, app, console
from setlist.core.tenancy import SetlistError

tenant_app = typer.Typer(
    help="Onboard, inspect, change and offboard tenants.", no_args_is_help=True
)

app.add_typer(tenant_app, name="tenant")


@tenant_app.command("create")
@_run
async def tenant_create(
    tenant_id: str,
    concurrent_jobs: int = typer.Option(4, help="max runs Pending+Running at once"),
    cpu: str = typer.Option("32", help="cpu quota"),
    memory: str = typer.Option("64Gi", help="memory quota"),
    gpu: int = typer.Option(1, help="GPU quota"),
    storage_gb: int = typer.Option(100, help="storage quota (GB)"),
    weight: float = typer.Option(1.0, help="fair-share weight"),
    priority: str = typer.Option("normal", help="default band of the tenant's runs"),
    tier: list[str] = typer.Option(None, help="JOB_TYPE=TIER override, repeatable"),
    display_name: str = typer.Option("", help="human name"),
    training: str = typer.Option("manual", help="manual, or after-etl: retrain after each load"),
) -> None:
    """Onboard a tenant: profile, quota limit, queues in every pool, deployments."""
    from pydantic import ValidationError

    from setlist.core.tenancy import TenantQuota, parse_priority, validate_tenant_id
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    validate_tenant_id(tenant_id)
    try:
        quota = TenantQuota(
            concurrent_jobs=concurrent_jobs,
            cpu=cpu,
            memory=memory,
            gpu=gpu,
            storage_gb=storage_gb,
            weight=weight,
        )
    except ValidationError as exc:
        raise SetlistError(_pydantic_reason(exc)) from None
    spec = TenantSpec(
        tenant_id=tenant_id,
        display_name=display_name,
        quota=quota,
        default_priority=parse_priority(priority),
        tier_overrides=_tier_overrides(tier or []),
        training_policy=_training_policy(training),
    )
    async with _client() as client:
        result = await create_tenant(client, spec)
    _echo(
        f"tenant {tenant_id} created: {len(result['queues'])} queues, "
        f"deployments: {', '.join(result['deployments'])}"
    )


def _tier_overrides(pairs: list[str]) -> dict:
    """``JOB_TYPE=TIER`` pairs → overrides, each part checked."""
    from setlist.core.tenancy import parse_job_type, parse_tier

    overrides = {}
    for pair in pairs:
        job_type, sep, tier = pair.partition("=")
        if not sep:
            raise SetlistError(f"tier override {pair!r} is not JOB_TYPE=TIER")
        overrides[parse_job_type(job_type)] = parse_tier(tier)
    return overrides


def _training_policy(value: str):
    from blocks.tenant import TrainingPolicy

    try:
        return TrainingPolicy(value)
    except ValueError:
        accepted = ", ".join(p.value for p in TrainingPolicy)
        raise SetlistError(f"unknown training policy {value!r}; accepted: {accepted}") from None


def _pydantic_reason(exc) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


@tenant_app.command("list")
@_run
async def tenant_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every tenant with its quota and defaults."""
    from setlist.tenants.onboarding import list_profiles

    async with _client() as client:
        profiles = await list_profiles(client)
    if as_json:
        print(json.dumps([p.model_dump(mode="json") for p in profiles], indent=2))
        return
    table = Table("tenant", "status", "jobs", "cpu", "memory", "gpu", "weight", "band")
    for p in profiles:
        q = p.quota
        table.add_row(
            p.tenant_id,
            p.status.value,
            str(q.concurrent_jobs),
            q.cpu,
            q.memory,
            str(q.gpu),
            f"{q.weight:g}",
            p.default_priority.value,
        )
    console.print(table)


@tenant_app.command("show")
@_run
async def tenant_show(tenant_id: str) -> None:
    """One tenant's profile, as JSON."""
    from setlist.tenants.onboarding import read_profile

    profile = await read_profile(tenant_id)
    print(json.dumps(profile.model_dump(mode="json", exclude={"block_type_slug"}), indent=2))


@tenant_app.command("kit")
@_run
async def tenant_kit(tenant_id: str) -> None:
    """Print the tenant's Kubernetes kit (namespace, quota, policies, RBAC, Kueue)."""
    from setlist.k8s.tenant_kit import kit_yaml
    from setlist.tenants.onboarding import read_profile

    print(kit_yaml(await read_profile(tenant_id)), end="")


@tenant_app.command("update")
@_run
async def tenant_update(
    tenant_id: str,
    concurrent_jobs: int = typer.Option(None),
    cpu: str = typer.Option(None),
    memory: str = typer.Option(None),
    gpu: int = typer.Option(None),
    storage_gb: int = typer.Option(None),
    weight: float = typer.Option(None),
    priority: str = typer.Option(None, help="default band"),
    tier: list[str] = typer.Option(None, help="JOB_TYPE=TIER override, repeatable"),
    status: str = typer.Option(None, help="active or suspended"),
    display_name: str = typer.Option(None),
    training: str = typer.Option(None, help="manual, or after-etl: retrain after each load"),
) -> None:
    """Change quotas, defaults or status; re-converges queues, limit and deployments."""
    from pydantic import ValidationError

    from setlist.core.tenancy import parse_priority
    from setlist.tenants.onboarding import update_tenant

    quota = {
        k: v
        for k, v in dict(
            concurrent_jobs=concurrent_jobs,
            cpu=cpu,
            memory=memory,
            gpu=gpu,
            storage_gb=storage_gb,
            weight=weight,
        ).items()
        if v is not None
    }
    changes: dict[str, Any] = {}
    if quota:
        changes["quota"] = quota
    if priority:
        changes["default_priority"] = parse_priority(priority)
    if tier:
        changes["tier_overrides"] = _tier_overrides(tier)
    if status:
        if status not in ("active", "suspended"):
            raise SetlistError(f"unknown status {status!r}; accepted: active, suspended")
        changes["status"] = status
    if display_name is not None:
        changes["display_name"] = display_name
    if training:
        changes["training_policy"] = _training_policy(training)
    if not changes:
        raise SetlistError("nothing to change; see `setlist tenant update --help`")
    async with _client() as client:
        try:
            await update_tenant(client, tenant_id, changes)
        except ValidationError as exc:
            raise SetlistError(_pydantic_reason(exc)) from None
    _echo(f"tenant {tenant_id} updated")


@tenant_app.command("delete")
@_run
async def tenant_delete(
    tenant_id: str,
    force: bool = typer.Option(False, "--force", help="cancel active runs first"),
    yes: bool = typer.Option(False, "--yes", "-y", help="don't ask"),
    backup: bool = typer.Option(
        True, "--backup/--no-backup", help="take a final backup first (default)"
    ),
) -> None:
    """Offboard a tenant (deployments, queues, limit, profile). Its stored data is kept,
    and a final backup is taken first: if it fails, nothing is removed."""
    from setlist.tenants.onboarding import delete_tenant

    if not yes and sys.stdin.isatty():
        typer.confirm(f"offboard tenant {tenant_id}?", abort=True)
    if backup:
        final = await _flow("flows/backup.py:tenant_backup")(tenant_id)
        _echo(f"final backup of {tenant_id}: snapshot {final.snapshot_id}")
    async with _client() as client:
        result = await delete_tenant(client, tenant_id, force=force)
    _echo(f"tenant {tenant_id} deleted: {result}; its stored data is kept")


@tenant_app.command("purge")
@_run
async def tenant_purge(
    tenant_id: str,
    yes: bool = typer.Option(False, "--yes", "-y", help="don't ask"),
) -> None:
    """Erase an offboarded tenant's stored data, backups and keys, so its id may be used
    again. Cannot be undone; refused while the tenant exists."""
    from setlist.tenants.purge import leftovers, purge_tenant

    async with _client() as client:
        left = await leftovers(client, tenant_id)
        if not left:
            _echo(f"nothing of tenant {tenant_id} remains")
            return
        if not yes:
            if not sys.stdin.isatty():
                raise SetlistError("purging erases data for good: pass --yes")
            typer.confirm(f"erase {left.describe()} of tenant {tenant_id} for good?", abort=True)
        done = await purge_tenant(client, tenant_id)
    _echo(
        f"tenant {tenant_id} purged: {done['data_objects']} object(s), "
        f"{done['backup_objects']} backup object(s), blocks {done['blocks'] or 'none'}"
    )
