"""``setlist report …`` and ``setlist audit``: SLA and resource reports over finished
runs, and the audit trail."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table

from setlist.cli._common import _client, _echo, _run, app, console

report_app = typer.Typer(
    help="How job types do against their SLAs, and what they really use.", no_args_is_help=True
)
app.add_typer(report_app, name="report")

# --------------------------------------------------------------------------- reports

SinceOpt = Annotated[str, typer.Option(help="period: 7d, 12h, 30m")]
AllTenantsOpt = Annotated[
    str | None, typer.Option("--tenant", "-t", help="one tenant (default: all)")
]
JsonOpt = Annotated[bool, typer.Option("--json")]


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


async def _print_report(kind: str, since: str, tenant: str | None, as_json: bool) -> None:
    """One report over the Setlist runs that finished in the period."""
    from setlist.core.tenancy import validate_tenant_id
    from setlist.observability import reports

    if tenant:
        validate_tenant_id(tenant)
    async with _client() as client:
        runs = await reports.read_finished(client, reports.parse_since(since), tenant)
    build = {"performance": reports.performance, "resources": reports.resources}[kind]
    _print_rows([r.as_dict() for r in build(runs)], as_json)


@report_app.command("performance")
@_run
async def report_performance(
    since: SinceOpt = "7d", tenant: AllTenantsOpt = None, as_json: JsonOpt = False
) -> None:
    """Per job type: runs, success rate vs 99.5%, P50/P95 run time vs SLA, queue wait."""
    await _print_report("performance", since, tenant, as_json)


@report_app.command("resources")
@_run
async def report_resources(
    since: SinceOpt = "7d", tenant: AllTenantsOpt = None, as_json: JsonOpt = False
) -> None:
    """Per job type: requested vs used cpu/memory (P95) and the tier that fits."""
    await _print_report("resources", since, tenant, as_json)


# --------------------------------------------------------------------------- audit


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
