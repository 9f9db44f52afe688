"""``setlist submit``, ``render-job``, ``submit-all``, ``demo-data``, ``jobs …`` and
``queue …``: start runs, follow them, and see what the tenant queues hold."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import typer
from rich.table import Table

from setlist.cli._common import TenantOpt, _api_url, _client, _echo, _run, app, console
from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError

jobs_app = typer.Typer(help="List, follow and cancel jobs.", no_args_is_help=True)

app.add_typer(jobs_app, name="jobs")
queue_app = typer.Typer(
    help="Tenant queues: what waits, what runs, who is owed.", no_args_is_help=True
)
app.add_typer(queue_app, name="queue")

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
    upcoming: bool = typer.Option(
        False, "--upcoming", help="only runs scheduled for later, soonest first"
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Setlist runs whose time has come (due, running, finished), newest first, filtered
    by state, tenant and job type; --upcoming for what schedules have queued for later."""
    from setlist.tenants import submit as submitting

    async with _client() as client:
        runs = await submitting.list_jobs(
            client,
            tenant_id=tenant,
            state=state,
            job_type=job_type,
            limit=limit,
            upcoming=upcoming,
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


RUN_HELP = "the run's id, or its name (<job-type>-<tenant>-<YYYYMMDD-HHMMSS>)"


@jobs_app.command("watch")
@_run
async def jobs_watch(
    run_id: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
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
async def jobs_logs(
    run_id: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    tenant: str = typer.Option(None, "--tenant", "-t"),
) -> None:
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
async def jobs_cancel(
    run_id: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    tenant: str = typer.Option(None, "--tenant", "-t"),
) -> None:
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
    from prefect.settings import temporary_settings

    from setlist.core.credentials import client_settings
    from setlist.dispatch import dispatcher

    args = ["--interval", str(interval)]
    for p in pool or []:
        args += ["--pool", p]
    if expected_run_seconds:
        args += ["--expected-run-seconds", str(expected_run_seconds)]
    with temporary_settings(updates=client_settings(_api_url())):
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
