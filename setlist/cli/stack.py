"""``setlist up|down|health|metrics``: the local stack and its checks."""

from __future__ import annotations

import asyncio
import json

import typer
from rich.table import Table

from setlist.cli._common import _api_url, _echo, app, console, err
from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError


@app.command()
def up(
    port: int = typer.Option(4200, help="server port (UI and API)"),
    database: str = typer.Option(
        None,
        "--database",
        help="postgres (default: the embedded one under .setlist/postgres/) or sqlite",
    ),
    database_url: str = typer.Option(
        None, "--database-url", help="another server: postgresql+asyncpg://user@host/prefect"
    ),
    postgres_port: int = typer.Option(
        None, help="port of the embedded PostgreSQL (default: the last one while free)"
    ),
    ha: bool = typer.Option(
        False,
        "--ha",
        help="two API replicas and two services processes on PostgreSQL and Redis "
        "(Prefect's multi-replica shape) in place of one server",
    ),
    redis_url: str = typer.Option(
        None, "--redis-url", help="with --ha: Redis (default redis://127.0.0.1:6379)"
    ),
    replica_port: int = typer.Option(
        None, help="with --ha: the second replica's port (default: port + 1)"
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="start and return"),
    gateway_port: int = typer.Option(8787, help="port of the webhook gateway"),
    metrics_port: int = typer.Option(9464, help="port of the Prometheus exporter"),
) -> None:
    """Start the embedded stack: PostgreSQL, server + UI, pool, worker, demo tenant,
    webhook gateway. Idempotent. --ha: two API replicas (the worker on the first; the
    dispatcher, gateway and metrics on the second) and Prefect's services on Redis."""
    from setlist import stack

    if database in ("postgresql", "pg"):
        database = "postgres"
    if not ha and (redis_url or replica_port):
        err.print("[red]error:[/] --redis-url and --replica-port go with --ha")
        raise typer.Exit(2)
    options = dict(
        gateway_port=gateway_port,
        metrics_port=metrics_port,
        database=database,
        postgres_port=postgres_port,
        ha=ha,
        redis_url=redis_url,
        replica_port=replica_port,
    )
    try:
        if detach:
            st = stack.start(port, database_url, _echo, **options)
            _echo(f"up: UI {st.api_url.removesuffix('/api')}  (setlist down stops it)")
        else:
            stack.run_foreground(port, database_url, _echo, **options)
    except SetlistError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def down() -> None:
    """Stop what `setlist up` started (the embedded PostgreSQL last), and nothing else."""
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
