"""``setlist cluster init``: what a cluster's platform needs in the Prefect API before
its workers start; ``setlist cluster check``: is the platform ready to run jobs, on the
local stack and, with a Kubernetes context, in the cluster."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from setlist.cli._common import _api_url, _echo, _run, app, console

cluster_app = typer.Typer(help="The cluster Setlist runs on.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")

STATUS = {"ok": "[green]ok  [/]", "skip": "[yellow]skip[/]", "fail": "[red]FAIL[/]"}


def _status(check) -> str:
    return "skip" if check.skipped else "ok" if check.ok else "fail"


@cluster_app.command("init")
@_run
async def cluster_init() -> None:
    """Register Setlist's block types, create or update the Kubernetes pools with their
    templates, naming the images of SETLIST_IMAGE and SETLIST_GPU_IMAGE, and the
    platform's automations (a run whose pod or node died is marked Crashed). Run it
    before the workers start (a worker would create a missing pool with the CPU
    template) and after each release; idempotent. Says which storage blocks are missing."""
    from prefect.client.orchestration import get_client

    from blocks import register_all
    from setlist.core.settings import KUBERNETES_POOLS, get_settings
    from setlist.core.storage import load_storage_config
    from setlist.core.tenancy import SetlistError
    from setlist.stack import ensure_platform_automations, ensure_pools

    settings = get_settings()
    await register_all()
    await ensure_pools(list(KUBERNETES_POOLS))
    await ensure_platform_automations()
    _echo(
        f"runs silent for {settings.unresponsive_seconds} s are marked Crashed "
        f"(jobs beat every {settings.heartbeat_seconds} s)"
    )
    async with get_client() as client:
        for name in KUBERNETES_POOLS:
            pool = await client.read_work_pool(name)
            image = pool.base_job_template["variables"]["properties"]["image"]["default"]
            _echo(f"pool {name}: {pool.type}, jobs run {image}")
    for block in (settings.storage_block, settings.backup_block):
        try:
            await load_storage_config(block)
            _echo(f"storage block {block}: present")
        except SetlistError:
            _echo(
                f"[yellow]storage block {block} is missing[/]: create it in the UI (Blocks → "
                "Setlist S3 Storage) before onboarding tenants"
            )


@cluster_app.command("check")
def cluster_check(
    kube_context: Annotated[
        str | None,
        typer.Option(
            "--kube-context", help="kubeconfig context (default: in-cluster, else current)"
        ),
    ] = None,
    pool: Annotated[
        list[str] | None,
        typer.Option("--pool", help="a work pool to check (repeat; default: the platform's)"),
    ] = None,
    manifests: Annotated[
        Path | None, typer.Option(help="the kustomization the cluster was set up from")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One line per check with its reason: the local stack, then (with a kube context) the
    API, CRDs, PriorityClasses, namespaces, RBAC, workloads and tenant kits. Exit 1 when
    any check fails; the cluster skipped for want of a kube context is no failure."""
    from setlist.observability.cluster import BASE, check_cluster

    checks = asyncio.run(
        check_cluster(
            _api_url(), kube_context=kube_context, pools=pool or None, manifests=manifests or BASE
        )
    )
    failed = [c for c in checks if not c.ok]
    if as_json:
        print(json.dumps({"ready": not failed, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            console.print(
                f"{STATUS[_status(c)]}  {c.name:<{width}}  {escape(c.reason)}", highlight=False
            )
        # checks skipped because another failed are not counted twice
        broken = sum(1 for c in failed if not c.skipped) or len(failed)
        summary = f"{broken} of {len(checks)} checks failed" if failed else "ready"
        console.print(f"[{'red' if failed else 'green'}]{summary}[/]", highlight=False)
    if failed:
        raise typer.Exit(1)
