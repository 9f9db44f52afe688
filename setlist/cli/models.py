"""``setlist models …``: a tenant's trained recommenders, their metrics and champion."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from setlist.cli._common import TenantOpt, _echo, _run, app, console
from setlist.core.tenancy import SetlistError

models_app = typer.Typer(
    help="A tenant's trained recommenders: versions, metrics, champion.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


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
