"""``setlist cluster check``: is the platform ready to run jobs, on the local stack and,
with a Kubernetes context, in the cluster."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from setlist.cli._common import _api_url, app, console

cluster_app = typer.Typer(help="The cluster Setlist runs on.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")

STATUS = {"ok": "[green]ok  [/]", "skip": "[yellow]skip[/]", "fail": "[red]FAIL[/]"}


def _status(check) -> str:
    return "skip" if check.skipped else "ok" if check.ok else "fail"


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
