"""``setlist billing …``: usage reports, invoices and price plans."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from setlist.cli._common import TenantOpt, _client, _echo, _run, app, console
from setlist.core.settings import get_settings

billing_app = typer.Typer(
    help="Metered usage, invoices and price plans per tenant.", no_args_is_help=True
)
app.add_typer(billing_app, name="billing")
billing_plan_app = typer.Typer(
    help="Price plans: unit rates, allowances, minimum charge, discounts.", no_args_is_help=True
)
billing_app.add_typer(billing_plan_app, name="plan")


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
