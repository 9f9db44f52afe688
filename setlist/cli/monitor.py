"""``setlist monitor``: the live terminal view of runs, queues, success and health."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Annotated

import typer

from setlist.cli._common import _api_url, app, console, err
from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError


@app.command()
def monitor(
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="seconds between frames")] = 5.0,
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="one tenant (default: all)")
    ] = None,
    hours: Annotated[int, typer.Option(min=1, help="window of the success ratio")] = 24,
    health: Annotated[
        bool, typer.Option("--health/--no-health", help="also run the health checks")
    ] = True,
) -> None:
    """A live view of runs, queues, success against 99.5%, workers and health.

    Runs due or under way by tenant, band and state with queue depth and oldest wait,
    busy runs against each tenant's quota, per job type the success ratio against 99.5%
    and P95 run time against its SLA, workers online and the health checks; refreshed
    every --interval seconds until Ctrl-C (--once: one frame)."""
    from prefect.settings import temporary_settings
    from rich.live import Live

    from setlist.core.credentials import client_settings
    from setlist.core.tenancy import validate_tenant_id
    from setlist.observability.monitor import Monitor, render
    from setlist.stack import healthy

    url = _api_url()
    try:
        if tenant:
            validate_tenant_id(tenant)
    except SetlistError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if not healthy(url):
        err.print(f"[red]error:[/] Prefect API at {url} is not reachable; start it: make up")
        raise typer.Exit(2)
    view = Monitor(
        url, get_settings().pools, tenant=tenant, window=timedelta(hours=hours), health=health
    )
    with temporary_settings(updates=client_settings(url)):
        frame = render(asyncio.run(view.read()))
        if once:
            console.print(frame)
            return
        with Live(frame, console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(render(asyncio.run(view.read())), refresh=True)
            except KeyboardInterrupt:
                pass
