"""The ``setlist`` command: argument handling and presentation only.

Every command resolves to one function of the platform modules; errors the platform
raises (``SetlistError``) are printed as one clear line and exit with status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError

app = typer.Typer(help="Setlist: multi-tenant jobs on Prefect.", no_args_is_help=True)
tenant_app = typer.Typer(
    help="Onboard, inspect, change and offboard tenants.", no_args_is_help=True
)
jobs_app = typer.Typer(help="List, follow and cancel jobs.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(jobs_app, name="jobs")
queue_app = typer.Typer(
    help="Tenant queues: what waits, what runs, who is owed.", no_args_is_help=True
)
app.add_typer(queue_app, name="queue")
report_app = typer.Typer(
    help="How job types do against their SLAs, and what they really use.", no_args_is_help=True
)
app.add_typer(report_app, name="report")
models_app = typer.Typer(
    help="A tenant's trained recommenders: versions, metrics, champion.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
billing_app = typer.Typer(
    help="Metered usage, invoices and price plans per tenant.", no_args_is_help=True
)
app.add_typer(billing_app, name="billing")
billing_plan_app = typer.Typer(
    help="Price plans: unit rates, allowances, minimum charge, discounts.", no_args_is_help=True
)
billing_app.add_typer(billing_plan_app, name="plan")

console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="tenant id (env TENANT_ID)")]


def _api_url() -> str:
    """The API to talk to: PREFECT_API_URL if set, else the local stack's."""
    from prefect.settings import PREFECT_API_URL

    from setlist.stack import StackState, api_url

    configured = PREFECT_API_URL.value()
    if configured:
        return configured
    state = StackState.load(get_settings())
    return state.api_url if state else api_url()


def _run(coro_fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an async command against the API, turning platform errors into exit code 2."""

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from setlist.stack import healthy

        url = _api_url()
        if not healthy(url):
            err.print(f"[red]error:[/] Prefect API at {url} is not reachable; start it: make up")
            raise typer.Exit(2)
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                return asyncio.run(coro_fn(*args, **kwargs))
        except SetlistError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


@contextlib.asynccontextmanager
async def _client():
    from prefect.client.orchestration import get_client

    async with get_client() as c:
        yield c


def _echo(msg: str) -> None:
    console.print(msg, highlight=False)


# --------------------------------------------------------------------------- stack


@app.command()
def up(
    port: int = typer.Option(4200, help="server port (UI and API)"),
    database_url: str = typer.Option(
        None, "--database-url", help="e.g. postgresql+asyncpg://user@127.0.0.1/prefect"
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="start and return"),
    gateway_port: int = typer.Option(8787, help="port of the webhook gateway"),
    metrics_port: int = typer.Option(9464, help="port of the Prometheus exporter"),
) -> None:
    """Start the embedded stack: server + UI, pool, worker, demo tenant, webhook gateway.
    Idempotent."""
    from setlist import stack

    try:
        if detach:
            st = stack.start(
                port, database_url, _echo, gateway_port=gateway_port, metrics_port=metrics_port
            )
            _echo(f"up: UI {st.api_url.removesuffix('/api')}  (setlist down stops it)")
        else:
            stack.run_foreground(
                port, database_url, _echo, gateway_port=gateway_port, metrics_port=metrics_port
            )
    except SetlistError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def down() -> None:
    """Stop what `setlist up` started, and nothing else."""
    from setlist import stack

    stack.stop(_echo)


@app.command()
def health(
    as_json: bool = typer.Option(False, "--json"),
    deep: bool = typer.Option(False, "--deep", help="also run a canary job end to end"),
    tenant: str = typer.Option(None, "--tenant", "-t", help="tenant of the canary"),
    timeout: float = typer.Option(120, help="seconds to wait for the canary"),
) -> None:
    """Check every dependency of the platform; exit 1 if any check fails."""
    from setlist.observability.health import run_checks

    checks = asyncio.run(run_checks(_api_url(), deep=deep, tenant_id=tenant, timeout=timeout))
    failed = [c for c in checks if not c.ok]
    if as_json:
        print(
            json.dumps({"healthy": not failed, "checks": [c.as_dict() for c in checks]}, indent=2)
        )
    else:
        table = Table("check", "status", "reason")
        for c in checks:
            status = "[yellow]skip[/]" if c.skipped else "[green]ok[/]" if c.ok else "[red]FAIL[/]"
            table.add_row(c.name, status, c.reason)
        console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def metrics(
    port: int = typer.Option(9464, help="port to serve /metrics on"),
    addr: str = typer.Option("0.0.0.0", help="address to bind"),
    window_hours: int = typer.Option(24, help="window of the success ratio"),
) -> None:
    """Serve Prometheus metrics read from the Prefect API (runs until stopped)."""
    from setlist.observability.metrics import run

    run(_api_url(), get_settings().pools, port, addr, window_hours)


# --------------------------------------------------------------------------- tenants


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
        from flows.backup import tenant_backup

        final = await tenant_backup(tenant_id)
        _echo(f"final backup of {tenant_id}: snapshot {final.snapshot_id}")
    async with _client() as client:
        result = await delete_tenant(client, tenant_id, force=force)
    _echo(f"tenant {tenant_id} deleted: {result}; its stored data is kept")


# --------------------------------------------------------------------------- jobs


@app.command()
@_run
async def submit(
    job_type: str,
    tenant: TenantOpt = None,  # type: ignore[assignment]
    priority: str = typer.Option(None, "--priority", "-p", help="band (env PRIORITY)"),
    tier: str = typer.Option(None, "--tier", help="resource tier (env RESOURCE_TIER)"),
    param: list[str] = typer.Option(None, "--param", help="k=v flow parameter, repeatable"),
    dry_run: bool = typer.Option(None, "--dry-run", help="validate, print, create nothing"),
    wait: bool = typer.Option(False, "--wait", help="follow the run; non-zero exit on failure"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run JOB_TYPE for a tenant on its (tenant, band) queue with the tier's resources."""
    from setlist.tenants import submit as submitting

    settings = get_settings()
    tenant = tenant or settings.tenant_id
    priority = priority or settings.priority
    tier = tier or settings.resource_tier or None
    dry_run = settings.dry_run if dry_run is None else dry_run
    params = submitting.parse_params(param or [])
    async with _client() as client:
        sub = await submitting.submit(
            client, job_type, tenant, priority, tier, params, dry_run=dry_run
        )
        if as_json or dry_run:
            print(json.dumps(sub.as_dict(), indent=2))
        else:
            _echo(f"{sub.flow_run_id}  ({sub.flow_run_name}) on {sub.work_queue}")
        if wait and not dry_run:
            ok = await _follow(client, sub.flow_run_id)
            if not ok:
                raise typer.Exit(1)


@app.command("render-job")
@_run
async def render_job_cmd(
    job_type: str,
    tenant: TenantOpt = None,  # type: ignore[assignment]
    priority: str = typer.Option(None, "--priority", "-p"),
    tier: str = typer.Option(None, "--tier"),
    gpu: int = typer.Option(None, help="GPUs (default: 1 for ml-training, else 0)"),
) -> None:
    """Print the Kubernetes Job the worker would create for this submission (creates nothing)."""
    import yaml

    from setlist.core.tenancy import default_gpus, job_variables
    from setlist.k8s.templates import PoolKind
    from setlist.tenants import submit as submitting
    from setlist.workers.kubernetes import render_job

    settings = get_settings()
    profile, jt, band, res_tier = await submitting.resolve(
        job_type,
        tenant or settings.tenant_id,
        priority or settings.priority,
        tier or settings.resource_tier or None,
    )
    gpus = default_gpus(jt, profile.quota.gpu) if gpu is None else gpu
    if gpus > profile.quota.gpu:
        raise SetlistError(f"{gpus} GPU(s) exceed the tenant's GPU quota of {profile.quota.gpu}")
    values = job_variables(profile.tenant_id, jt, band, res_tier, gpu=gpus)
    async with _client() as client:
        manifest = await render_job(client, values, PoolKind.gpu if gpus else PoolKind.cpu)
    print(yaml.safe_dump(manifest, sort_keys=False), end="")


@app.command("submit-all")
@_run
async def submit_all(
    tenant: TenantOpt = None,  # type: ignore[assignment]
    priority: str = typer.Option(None, "--priority", "-p"),
    dry_run: bool = typer.Option(None, "--dry-run"),
) -> None:
    """One run of every deployable job type for a tenant (the old create-tenant-jobs)."""
    from setlist.core.catalog import load_catalog
    from setlist.tenants import submit as submitting

    settings = get_settings()
    tenant = tenant or settings.tenant_id
    dry_run = settings.dry_run if dry_run is None else dry_run
    async with _client() as client:
        for job_type in load_catalog():
            sub = await submitting.submit(
                client, job_type, tenant, priority or settings.priority, None, {}, dry_run=dry_run
            )
            _echo(f"{job_type.value:16} {sub.flow_run_id or '(dry run)'} on {sub.work_queue}")


async def _follow(client, run_id) -> bool:
    from setlist.tenants import submit as submitting

    async for update in submitting.watch(client, run_id):
        for log in update.new_logs:
            _echo(f"[dim]{log.timestamp:%H:%M:%S}[/] {log.message}")
        run = update.run
    state = run.state
    counts = Counter(t.state.type.value.lower() for t in update.task_runs if t.state)
    tasks = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    _echo(f"{run.name}: {state.name if state else '?'}  tasks: {tasks or '-'}")
    return bool(state and state.is_completed())


@jobs_app.command("list")
@_run
async def jobs_list(
    state: str = typer.Option(None, "--state", help="scheduled, pending, running, completed, …"),
    tenant: str = typer.Option(None, "--tenant", "-t"),
    job_type: str = typer.Option(None, "--type"),
    limit: int = typer.Option(50),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Setlist runs, newest first, filtered by state, tenant and job type."""
    from setlist.tenants import submit as submitting

    async with _client() as client:
        runs = await submitting.list_jobs(
            client, tenant_id=tenant, state=state, job_type=job_type, limit=limit
        )
    rows = [
        {
            "id": str(r.id),
            "name": r.name,
            "tenant": submitting.run_tenant(r),
            "type": submitting.run_tag(r, "job"),
            "band": submitting.run_tag(r, "band"),
            "tier": submitting.run_tag(r, "tier"),
            "state": r.state.name if r.state else "",
            "queue": r.work_queue_name,
            "expected_start": r.expected_start_time.isoformat() if r.expected_start_time else None,
        }
        for r in runs
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "name", "tenant", "type", "band", "tier", "state", "queue")
    for row in rows:
        table.add_row(
            row["id"],
            row["name"],
            row["tenant"] or "",
            row["type"] or "",
            row["band"] or "",
            row["tier"] or "",
            row["state"],
            row["queue"] or "",
        )
    console.print(table)


@jobs_app.command("watch")
@_run
async def jobs_watch(
    run_id: str,
    tenant: str = typer.Option(None, "--tenant", "-t", help="refuse other tenants' runs"),
) -> None:
    """Follow a run live: state, task states, logs; exit 1 unless it completes."""
    from setlist.tenants import submit as submitting

    async with _client() as client:
        run = await submitting.read_run(client, run_id, tenant)
        ok = await _follow(client, run.id)
    if not ok:
        raise typer.Exit(1)


@jobs_app.command("logs")
@_run
async def jobs_logs(run_id: str, tenant: str = typer.Option(None, "--tenant", "-t")) -> None:
    """Every log line of a run so far."""
    from setlist.tenants import submit as submitting

    async with _client() as client:
        run = await submitting.read_run(client, run_id, tenant)
        offset = 0
        while True:
            logs = await submitting.read_logs(client, run.id, offset)
            for log in logs:
                _echo(f"{log.timestamp:%Y-%m-%d %H:%M:%S} {log.message}")
            offset += len(logs)
            if len(logs) < 200:
                break


@jobs_app.command("cancel")
@_run
async def jobs_cancel(run_id: str, tenant: str = typer.Option(None, "--tenant", "-t")) -> None:
    """Cancel a run (waiting: at once; running: its worker stops it)."""
    from setlist.tenants import submit as submitting

    async with _client() as client:
        run = await submitting.cancel(client, run_id, tenant)
    _echo(f"{run.id}: {run.state.name if run.state else '?'}")


@app.command("demo-data")
@_run
async def demo_data(
    tenant_id: str,
    events: int = typer.Option(5000, min=1, help="events to generate"),
    files: int = typer.Option(4, min=1, help="raw files to spread them over"),
    defects: float = typer.Option(0.01, min=0, max=1, help="share of planted bad rows"),
    seed: int = typer.Option(7),
) -> None:
    """Write realistic raw listening events (taste clusters, planted defects) for a tenant."""
    from setlist.core.storage import load_storage_config, tenant_storage
    from setlist.etl.demo import write_sample_data
    from setlist.tenants.onboarding import read_profile

    profile = await read_profile(tenant_id)
    storage = tenant_storage(tenant_id, await load_storage_config(profile.storage_block))
    planted = write_sample_data(
        storage,
        events=events,
        files=files,
        defect_share=defects,
        seed=seed,
        prefix=f"raw/demo-{seed}",
    )
    print(json.dumps({"tenant": tenant_id, "storage": storage.describe(), **planted}))


@queue_app.command("status")
@_run
async def queue_status_cmd(
    tenant: str = typer.Option(None, "--tenant", "-t"),
    hours: float = typer.Option(24, help="usage window for the fair share"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per tenant and band: waiting, running, quota and fair-share standing."""
    from datetime import timedelta

    from setlist.dispatch.leadership import HEARTBEAT_TTL, read_heartbeat
    from setlist.dispatch.status import queue_status
    from setlist.tenants.onboarding import list_profiles, read_profile

    async with _client() as client:
        profiles = [await read_profile(tenant)] if tenant else await list_profiles(client)
        rows = await queue_status(client, profiles, window=timedelta(hours=hours))
        holder, age = await read_heartbeat(client)
    if as_json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return
    table = Table("tenant", "band", "waiting", "running", "quota", "weight", "usage s", "share")
    for r in rows:
        table.add_row(
            r.tenant_id,
            r.band,
            str(r.waiting),
            str(r.running),
            str(r.quota),
            f"{r.weight:g}",
            f"{r.usage_s:,.0f}",
            f"{r.share:.1%}",
        )
    console.print(table)
    if holder and age is not None and age < HEARTBEAT_TTL:
        _echo(f"dispatcher {holder} leads (heartbeat {age:.0f} s ago)")
    else:
        _echo(
            "no dispatcher leads: queues stay as it left them (held queues hand out nothing); "
            "start one (setlist queue dispatch) or open them (setlist queue release)"
        )


@queue_app.command("dispatch")
def queue_dispatch_cmd(
    interval: float = typer.Option(1.0, help="seconds between two decisions"),
    pool: list[str] = typer.Option(None, "--pool", help="pool to govern (default: Setlist's)"),
    expected_run_seconds: float = typer.Option(
        None, help="what a grant and a run under way are charged (default: recent median)"
    ),
) -> None:
    """Run the dispatcher in the foreground: bands, quotas and fair share on every pool.

    Safe to run twice (one leads, the other stands by); Ctrl-C steps down.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from setlist.dispatch import dispatcher

    args = ["--interval", str(interval)]
    for p in pool or []:
        args += ["--pool", p]
    if expected_run_seconds:
        args += ["--expected-run-seconds", str(expected_run_seconds)]
    with temporary_settings(updates={PREFECT_API_URL: _api_url()}):
        dispatcher.main(args)


@queue_app.command("release")
@_run
async def queue_release_cmd() -> None:
    """Open every tenant queue (unpaused, no limit), to run without a dispatcher.

    Prefect then dispatches by queue priority; the tenant and pool limits still hold.
    """
    from setlist.dispatch.dispatcher import release_queues
    from setlist.dispatch.leadership import dispatcher_active

    async with _client() as client:
        if await dispatcher_active(client):
            raise SetlistError("a dispatcher leads and would hold the queues again; stop it first")
        opened = await release_queues(client, get_settings().pools)
    _echo(f"{opened} queue(s) opened")


# --------------------------------------------------------------------------- audit


# --------------------------------------------------------------------------- reports


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        _echo("no finished Setlist runs in that period")
        return
    table = Table(*rows[0].keys())
    for row in rows:
        table.add_row(*("–" if v is None else str(v) for v in row.values()))
    console.print(table)


@report_app.command("performance")
@_run
async def report_performance(
    since: str = typer.Option("7d", help="period: 7d, 12h, 30m"),
    tenant: str = typer.Option(None, "--tenant", "-t", help="one tenant (default: all)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per job type: runs, success rate vs 99.5%, P50/P95 run time vs SLA, queue wait."""
    from setlist.core.tenancy import validate_tenant_id
    from setlist.observability.reports import parse_since, performance, read_finished

    if tenant:
        validate_tenant_id(tenant)
    async with _client() as client:
        runs = await read_finished(client, parse_since(since), tenant)
    _print_rows([r.as_dict() for r in performance(runs)], as_json)


@report_app.command("resources")
@_run
async def report_resources(
    since: str = typer.Option("7d", help="period: 7d, 12h, 30m"),
    tenant: str = typer.Option(None, "--tenant", "-t", help="one tenant (default: all)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per job type: requested vs used cpu/memory (P95) and the tier that fits."""
    from setlist.core.tenancy import validate_tenant_id
    from setlist.observability.reports import parse_since, read_finished, resources

    if tenant:
        validate_tenant_id(tenant)
    async with _client() as client:
        runs = await read_finished(client, parse_since(since), tenant)
    _print_rows([r.as_dict() for r in resources(runs)], as_json)


# --------------------------------------------------------------------------- models


@models_app.command("list")
@_run
async def models_list(tenant: TenantOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every registered version of the tenant's recommender; * marks the champion."""
    from setlist.ml.model_registry import tenant_registry

    _, registry = await tenant_registry(tenant)
    if as_json:
        print(registry.model_dump_json(indent=2))
        return
    table = Table("", "version", "created", "device", "epochs", "NDCG@10", "baseline", "decision")
    for v in registry.versions:
        table.add_row(
            "*" if v.version == registry.champion else "",
            v.version,
            v.created_at[:19],
            v.device,
            str(v.epochs),
            f"{v.metrics['ndcg_at_10']:.4f}",
            f"{v.baseline['ndcg_at_10']:.4f}",
            v.decision,
        )
    console.print(table)


@models_app.command("show")
@_run
async def models_show(
    tenant: TenantOpt,
    version: Annotated[str, typer.Argument(help="e.g. v0003; default: the champion")] = "",
) -> None:
    """A version's model card."""
    from setlist.ml.model_registry import read_card, tenant_registry

    storage, registry = await tenant_registry(tenant)
    version = version or registry.champion or ""
    if not version:
        raise SetlistError(f"tenant {tenant!r} has no champion model yet; train one first")
    print(read_card(storage, version), end="")


@models_app.command("promote")
@_run
async def models_promote(
    tenant: TenantOpt,
    version: Annotated[str, typer.Argument(help="the version to make champion")],
    reason: str = typer.Option("promoted by an operator", help="recorded in the audit trail"),
) -> None:
    """Make a version the champion by hand (e.g. roll back); audited."""
    from setlist.ml.model_registry import promote

    registry = await promote(tenant, version, reason)
    _echo(f"{registry.champion} is now the champion of {tenant}")


@app.command()
@_run
async def audit(
    tenant: str = typer.Option(None, "--tenant", "-t"),
    days: int = typer.Option(7, help="how far back"),
    limit: int = typer.Option(100),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Who did what to which job or tenant, and when (newest first)."""
    from setlist.core import audit as trail
    from setlist.core.tenancy import validate_tenant_id

    if tenant:
        validate_tenant_id(tenant)
    async with _client() as client:
        events = await trail.read_trail(client, tenant, since=timedelta(days=days), limit=limit)
    rows = [
        {
            "occurred": e.occurred.isoformat(),
            "event": e.event,
            "tenant": e.resource.get("setlist.tenant"),
            "actor": e.payload.get("actor"),
            "object": next((r.id for r in e.related if r.role != "actor"), None),
        }
        for e in events
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("when", "event", "tenant", "actor", "object")
    for r in rows:
        table.add_row(
            r["occurred"][:19], r["event"], r["tenant"] or "", r["actor"] or "", r["object"] or ""
        )
    console.print(table)


# --------------------------------------------------------------------------- billing


@billing_app.command("report")
@_run
async def billing_report_cmd(
    tenant: TenantOpt = None,  # type: ignore[assignment]
    period: str = typer.Option(
        ..., "--period", help="YYYY-MM-DD (a UTC day), YYYY-MM (a month), yesterday, …"
    ),
    refresh: bool = typer.Option(False, "--refresh", help="bill the period again first"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print a tenant's invoice for a day or month; bills the period first unless it
    already has a final report."""
    from setlist.billing import operations
    from setlist.billing.pricing import plain

    tenant = tenant or get_settings().tenant_id
    async with _client() as client:
        manifest, lines = await operations.obtain_report(client, tenant, period, refresh=refresh)
    rows = lines.to_pylist()
    if as_json:
        print(json.dumps({"report": manifest, "lines": rows}, indent=2, default=plain))
        return
    cur = manifest["currency"]
    table = Table(
        "#",
        "item",
        "quantity",
        "unit",
        "unit price",
        f"amount ({cur})",
        title=f"{tenant} {manifest['period']} ({manifest['status']}), "
        f"plan {manifest['plan']['name']}",
    )
    for r in rows:
        table.add_row(
            str(r["line"]),
            r["description"] + (f" ({r['note']})" if r["note"] else ""),
            plain(r["quantity"]),
            r["unit"],
            plain(r["unit_price"]),
            f"{r['amount']:.2f}",
        )
    if not rows:
        table.add_row("", "no usage in this period", "", "", "", "0.00")
    table.add_row("", "[bold]total[/]", "", "", "", f"[bold]{manifest['totals']['total']}[/]")
    console.print(table)
    _echo(f"files: {operations.manifest_key_of(manifest)} (as of {manifest['as_of']})")


@billing_plan_app.command("show")
@_run
async def billing_plan_show(tenant: TenantOpt = None) -> None:  # type: ignore[assignment]
    """The price plan a tenant is billed by, as JSON."""
    from setlist.billing import operations

    plan = await operations.effective_plan(tenant or get_settings().tenant_id)
    print(plan.model_dump_json(indent=2))


@billing_plan_app.command("set")
@_run
async def billing_plan_set(
    name: str,
    file: str = typer.Argument(..., help="YAML or JSON: currency, rates, included, …"),
    tenant: str = typer.Option(None, "--tenant", "-t", help="also put this tenant on the plan"),
) -> None:
    """Create or change the price plan NAME; with --tenant, put that tenant on it."""
    from setlist.billing import invoices, operations

    plan = operations.plan_from_file(name, file)
    await invoices.save_plan(plan)
    if tenant:
        async with _client() as client:
            await operations.assign_plan(client, tenant, name)
    _echo(f"price plan {name} saved" + (f"; tenant {tenant} is on it" if tenant else ""))


# --------------------------------------------------------------------------- events

webhook_app = typer.Typer(
    help="Webhook sources of the gateway: scheme, signing secret, template, rate.",
    no_args_is_help=True,
)
app.add_typer(webhook_app, name="webhook")
automations_app = typer.Typer(help="The platform's alert automations.", no_args_is_help=True)
app.add_typer(automations_app, name="automations")


@app.command()
def gateway(
    port: int = typer.Option(8787, help="port of POST /hooks/{source}"),
    host: str = typer.Option("127.0.0.1", help="address to bind"),
) -> None:
    """Serve the webhook gateway: signed webhooks → Prefect events (runs until stopped)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from setlist.gateway.app import serve

    url = _api_url()
    _echo(f"webhook gateway on http://{host}:{port}/hooks/{{source}} → events of {url}")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        serve(host=host, port=port)


@webhook_app.command("set")
@_run
async def webhook_set(
    source: str,
    scheme: str = typer.Option("setlist", help="github or setlist (timestamped)"),
    secret_env: str = typer.Option(
        None, help="read the signing secret from this environment variable (else: prompt)"
    ),
    template_file: str = typer.Option(None, help="Jinja event template (default: data arrived)"),
    rate: float = typer.Option(None, help="requests/s sustained"),
    burst: int = typer.Option(None, help="requests at once"),
) -> None:
    """Create or change a webhook source; its secret goes to its own Secret block."""
    from pathlib import Path

    from blocks.webhook import SignatureScheme
    from setlist.gateway.sources import save_source

    try:
        sig = SignatureScheme(scheme)
    except ValueError:
        raise SetlistError(f"unknown scheme {scheme!r}; accepted: github, setlist") from None
    if secret_env:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise SetlistError(f"environment variable {secret_env} is empty or not set")
    else:
        secret = typer.prompt("signing secret", hide_input=True)
    template = Path(template_file).read_text() if template_file else None
    try:
        block = await save_source(
            source, secret, scheme=sig, template=template, rate_limit_per_s=rate, burst=burst
        )
    except ValueError as exc:
        raise SetlistError(str(exc)) from None
    _echo(
        f"webhook source {source}: {block.scheme.value} signatures, "
        f"{block.rate_limit_per_s:g}/s (burst {block.burst}), secret in {block.secret_block}"
    )


@webhook_app.command("sign")
@_run
async def webhook_sign(source: str, file: str) -> None:
    """Print the headers that sign FILE for SOURCE (to try the gateway with curl)."""
    import uuid
    from pathlib import Path

    from prefect.blocks.system import Secret

    from blocks.webhook import SignatureScheme, WebhookSource, source_block_name
    from setlist.gateway.signatures import sign_github, sign_setlist

    try:
        config = await WebhookSource.aload(source_block_name(source))
    except ValueError:
        raise SetlistError(f"unknown webhook source {source!r}; `setlist webhook set`") from None
    secret = str((await Secret.aload(config.secret_block)).get())
    body = Path(file).read_bytes()
    if config.scheme == SignatureScheme.github:
        print(f"X-Hub-Signature-256: {sign_github(secret, body)}")
    else:
        print(f"X-Setlist-Signature: {sign_setlist(secret, body)}")
    print(f"{config.delivery_header_name}: {uuid.uuid4()}")


@automations_app.command("apply")
@_run
async def automations_apply(
    block: str = typer.Option("setlist-alerts", help="notification block the alerts use"),
    slack_url: str = typer.Option(None, help="(re)create the block as a Slack webhook"),
    webhook_url: str = typer.Option(None, help="(re)create the block as a JSON webhook"),
) -> None:
    """Create or update the alert automations: failed/crashed runs, Pending over SLA,
    critical security findings."""
    from setlist.observability import automations

    if slack_url or webhook_url:
        await automations.save_notification_block(
            block, slack_url=slack_url, webhook_url=webhook_url
        )
    async with _client() as client:
        done = await automations.apply(client, block)
    for name, what in done:
        _echo(f"{what:8} {name}")


# --------------------------------------------------------------------------- security

scan_app = typer.Typer(
    help="Security and compliance scans: posture, personal data, platform config.",
    no_args_is_help=True,
)
app.add_typer(scan_app, name="scan")


def _framework_row(report) -> list[str]:
    from setlist.security.checks import Framework

    return [f"{report.scores.get(f.value, 0.0):.1%}" for f in Framework]


@scan_app.command("run")
@_run
async def scan_run(
    tenant: TenantOpt = None,  # type: ignore[assignment]
    sample_rate: float = typer.Option(0.1, min=0.0001, max=1.0, help="curated rows sampled"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Scan one tenant now (a flow run of security-scan) and print its findings."""
    from flows.security_scan import security_scan

    report = await security_scan(tenant or get_settings().tenant_id, sample_rate=sample_rate)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    table = Table("id", "severity", "check", "resource", "evidence", title=report.tenant_id)
    for f in report.findings:
        table.add_row(f.id, f.severity.value, f.title, f.resource, "; ".join(f.evidence))
    console.print(table)
    _echo(f"score {report.score:.1%}; report: {report.report_key}")


@scan_app.command("all")
@_run
async def scan_all(
    parallel: int = typer.Option(None, help="scans at once (env PARALLEL_JOBS, default 4)"),
    sample_rate: float = typer.Option(0.1, min=0.0001, max=1.0, help="curated rows sampled"),
) -> None:
    """Scan every active tenant, a flow run each, a bounded number at once."""
    from blocks.tenant import TenantStatus
    from flows.security_scan import scan_tenants
    from setlist.tenants.onboarding import list_profiles

    async with _client() as client:
        profiles = await list_profiles(client)
    tenants = [p.tenant_id for p in profiles if p.status == TenantStatus.active]
    results = await scan_tenants(
        tenants, parallel or get_settings().parallel_jobs, sample_rate=sample_rate
    )
    failed = 0
    for tenant_id, result in results.items():
        if isinstance(result, BaseException):
            failed += 1
            _echo(f"{tenant_id}: scan failed: {result}")
        else:
            counts = ", ".join(f"{n} {s}" for s, n in result.counts().items() if n)
            _echo(f"{tenant_id}: {result.score:.1%} ({counts or 'no findings'})")
    if failed:
        raise typer.Exit(1)


@scan_app.command("compliance")
@_run
async def scan_compliance(
    target: float = typer.Option(0.95, help="lowest acceptable score"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-framework scores of every active tenant's latest scan; exits 1 when a tenant
    is below target or was never scanned."""
    from blocks.tenant import TenantStatus
    from flows.security_scan import latest_report
    from setlist.core.storage import load_storage_config, tenant_storage
    from setlist.security.checks import Framework
    from setlist.tenants.onboarding import list_profiles

    async with _client() as client:
        profiles = await list_profiles(client)
    rows, failing = [], 0
    for p in profiles:
        if p.status != TenantStatus.active:
            continue
        config = await load_storage_config(p.storage_block)
        report = latest_report(tenant_storage(p.tenant_id, config))
        ok = report is not None and all(
            report.scores.get(f.value, 0.0) >= target for f in Framework
        )
        failing += not ok
        rows.append((p.tenant_id, report, ok))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "tenant": t,
                        "scanned_at": r and r.scanned_at,
                        "ok": ok,
                        "scores": r.scores if r else None,
                    }
                    for t, r, ok in rows
                ],
                indent=2,
            )
        )
    else:
        table = Table("tenant", "scanned", *(f.value for f in Framework), "overall", "")
        for tenant_id, report, ok in rows:
            if report is None:
                table.add_row(tenant_id, "never", *([""] * len(Framework)), "", "[red]FAIL[/]")
                continue
            table.add_row(
                tenant_id,
                report.scanned_at,
                *_framework_row(report),
                f"{report.score:.1%}",
                "ok" if ok else "[red]FAIL[/]",
            )
        console.print(table)
    if failing:
        err.print(f"{failing} tenant(s) below {target:.0%} or never scanned")
        raise typer.Exit(1)


# --------------------------------------------------------------------------- config backup

config_app = typer.Typer(
    help="Back up and restore the platform's configuration (pools, queues, limits, "
    "deployments, automations, variables, blocks).",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")

PassphraseOpt = Annotated[
    str,
    typer.Option(
        "--passphrase",
        envvar="SETLIST_CONFIG_PASSPHRASE",
        help="passphrase of the archive's secrets (env SETLIST_CONFIG_PASSPHRASE; "
        "prompted for when missing on a terminal)",
        show_default=False,
        show_envvar=False,
    ),
]


def _ask_passphrase(confirm: bool) -> str:
    if not sys.stdin.isatty():
        raise SetlistError(
            "a passphrase is needed: pass --passphrase or set SETLIST_CONFIG_PASSPHRASE"
        )
    return typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


@config_app.command("export")
@_run
async def config_export(
    file: str,
    include_secrets: bool = typer.Option(
        False, "--include-secrets", help="also write secret values, encrypted with a passphrase"
    ),
    passphrase: PassphraseOpt = None,  # type: ignore[assignment]
    force: bool = typer.Option(False, "--force", help="overwrite FILE if it exists"),
) -> None:
    """Write the platform's configuration to FILE (.tar.gz); secret values are left out
    unless --include-secrets."""
    from pathlib import Path

    from setlist.backup.config.export import export_config

    if include_secrets and not passphrase:
        passphrase = _ask_passphrase(confirm=True)
    async with _client() as client:
        report = await export_config(
            client,
            Path(file),
            include_secrets=include_secrets,
            passphrase=passphrase if include_secrets else None,
            overwrite=force,
        )
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in report.counts.items())
    _echo(f"wrote {report.path} ({report.size} bytes): {counts}")
    if report.secrets_included:
        _echo("secret values included, encrypted with the passphrase")
    elif report.needs_secret:
        _echo(
            f"secret values left out; {len(report.needs_secret)} block(s) will need their "
            f"secret on import: {', '.join(report.needs_secret)}"
        )


@config_app.command("import")
@_run
async def config_import(
    file: str,
    passphrase: PassphraseOpt = None,  # type: ignore[assignment]
    replace: bool = typer.Option(
        False, "--replace", help="overwrite objects of the same name the server already holds"
    ),
) -> None:
    """Recreate the configuration of FILE on this server. Refuses when objects of the same
    names exist, unless --replace; the archive is checked in full before anything is written."""
    from pathlib import Path

    from setlist.backup.config.archive import load_archive
    from setlist.backup.config.entries import PassphraseRequired
    from setlist.backup.config.importer import import_archive

    try:
        archive = load_archive(Path(file), passphrase or None)
    except PassphraseRequired:
        archive = load_archive(Path(file), _ask_passphrase(confirm=False))
    async with _client() as client:
        report = await import_archive(client, archive, replace=replace)
    for kind, names in report.created.items():
        _echo(f"created  {len(names):4} {kind}")
    for kind, names in report.replaced.items():
        _echo(f"replaced {len(names):4} {kind}")
    for kind, name, reason in report.skipped:
        _echo(f"skipped  {kind} {name}: {reason}")


# ----------------------------------------------------------------------------- backups

backup_app = typer.Typer(
    help="Tenant backups: encrypted, deduplicated snapshots of data and configuration.",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")


@backup_app.command("create")
@_run
async def backup_create(
    tenant: TenantOpt,
    prune_after: bool = typer.Option(False, "--prune", help="apply the retention policy after"),
) -> None:
    """Snapshot the tenant now (a flow run of tenant-backup)."""
    from flows.backup import tenant_backup

    r = await tenant_backup(tenant, prune_after=prune_after)
    _echo(
        f"snapshot {r.snapshot_id}: {r.files} files, {r.bytes:,} bytes; {r.files_read} read, "
        f"{r.new_bytes:,} new bytes stored"
        + (f"; pruned {len(r.pruned)} snapshot(s)" if r.pruned else "")
    )


@backup_app.command("list")
@_run
async def backup_list(tenant: TenantOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """The tenant's snapshots, oldest first."""
    from setlist.backup.platform import tenant_repository
    from setlist.backup.snapshots import list_snapshots

    rows = list_snapshots(await tenant_repository(tenant))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("snapshot", "created", "files", "bytes", "new bytes", "config", "from")
    for r in rows:
        table.add_row(
            r["snapshot_id"],
            (r["created_at"] or "")[:19],
            str(r["files"]),
            f"{r['bytes'] or 0:,}",
            f"{r['new_bytes'] or 0:,}",
            "yes" if r["config"] else "no",
            r["migrated_from"] or "",
        )
    console.print(table)


@backup_app.command("verify")
@_run
async def backup_verify(
    tenant: TenantOpt,
    snapshot: str = typer.Option("latest", help="snapshot id or latest"),
    sample: float = typer.Option(
        1.0, min=0.0001, max=1.0, help="share of chunks to read back; 1: every file's sha256"
    ),
) -> None:
    """Read a snapshot back and check every hash; exits 1 on any damage."""
    from setlist.backup.platform import tenant_repository
    from setlist.backup.snapshots import verify_snapshot

    done = verify_snapshot(await tenant_repository(tenant), snapshot, sample=sample)
    for error in done.errors:
        _echo(f"DAMAGED {error}")
    _echo(
        f"snapshot {done.snapshot_id}: {done.files_checked} files, {done.chunks_checked} of "
        f"{done.chunks_total} chunks, {done.bytes_checked:,} bytes checked; "
        + ("ok" if done.ok else f"{len(done.errors)} error(s)")
    )
    if not done.ok:
        raise typer.Exit(1)


@backup_app.command("restore")
@_run
async def backup_restore(
    tenant: TenantOpt,
    snapshot: str = typer.Option("latest", help="snapshot id or latest"),
    path: list[str] = typer.Option([], "--path", help="only this key or prefix (repeatable)"),
    restore_config: bool = typer.Option(False, "--config", help="also restore the configuration"),
    yes: bool = typer.Option(False, "--yes", "-y", help="don't ask"),
) -> None:
    """Restore one of the tenant's snapshots into the tenant (a flow run of tenant-restore)."""
    from flows.backup import tenant_restore

    if not yes:
        typer.confirm(
            f"replace {'/'.join(path) or 'all'} of {tenant}'s data with snapshot {snapshot}?",
            abort=True,
        )
    r = await tenant_restore(tenant, snapshot, paths=path, restore_config=restore_config)
    _echo(
        f"restored {r.snapshot_id}: {r.files} files, {r.bytes:,} bytes; {r.removed} removed, "
        f"{r.kept} kept" + (f"; config: {', '.join(r.config)}" if r.config else "")
    )


@backup_app.command("migrate")
@_run
async def backup_migrate(
    source: str = typer.Option(..., "--from", help="tenant whose snapshot is copied"),
    target: str = typer.Option(..., "--to", help="tenant whose data it replaces"),
    snapshot: str = typer.Option("latest", help="snapshot id of the source, or latest"),
    yes: bool = typer.Option(False, "--yes", "-y", help="don't ask"),
) -> None:
    """Copy a tenant's snapshot into another tenant, re-encrypted, and restore it there."""
    from flows.backup import tenant_migrate

    if not yes:
        typer.confirm(f"replace {target}'s data with {source}'s snapshot {snapshot}?", abort=True)
    r = await tenant_migrate(source, target, snapshot, confirm=f"{source}->{target}")
    _echo(f"{target} now holds {source}'s data: {r.files} files, {r.bytes:,} bytes")


@backup_app.command("prune")
@_run
async def backup_prune(
    tenant: TenantOpt,
    daily: int = typer.Option(7, min=0),
    weekly: int = typer.Option(4, min=0),
    monthly: int = typer.Option(12, min=0),
) -> None:
    """Keep the newest snapshot of the last N days, M weeks and K months; drop the rest
    and every chunk only they referenced."""
    from flows.backup import RetentionPolicy
    from flows.backup import backup_prune as prune_flow

    r = await prune_flow(tenant, RetentionPolicy(daily=daily, weekly=weekly, monthly=monthly))
    _echo(
        f"kept {len(r.kept)} snapshot(s), removed {len(r.removed)}; "
        f"{r.chunks_deleted} chunk(s) deleted, {r.chunks_kept} kept"
    )


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()
