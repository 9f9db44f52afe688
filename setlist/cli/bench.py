"""``setlist bench list|run``: the benchmarks of ``bench/`` as one performance test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from setlist.cli._common import _echo, app, console, err
from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError

bench_app = typer.Typer(help="Benchmarks: quick runs of bench/*.py.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

STATUS = {"ok": "[green]ok[/]", "skipped": "[yellow]skip[/]"}


@bench_app.command("list")
def bench_list() -> None:
    """Each benchmark and the arguments of its quick run."""
    from setlist.observability.benchmarks import QUICK, available

    for name in available():
        args = " ".join(QUICK[name]) if name in QUICK else "(no quick sizes)"
        _echo(f"{name:<10} {args}")


@bench_app.command("run")
def bench_run(
    quick: Annotated[
        bool, typer.Option("--quick/--full", help="small sizes (default) or the scripts' own")
    ] = True,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run only this benchmark (repeat)")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(min=1, help="seconds each may take (quick: 300, the gateway 600; full: 3600)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="JSON report (default .setlist/reports/performance-test-*.json)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Run the benchmarks one after another, each in its own process with a time limit;
    print a table of their figures and write them to a JSON file. Exit 1 when one fails
    or overruns."""
    from setlist.observability import benchmarks

    try:
        names = benchmarks.select(only)
    except SetlistError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None

    def started(name: str) -> None:
        if not as_json:
            err.print(f"running {name} …", highlight=False)

    results = benchmarks.run(names, quick=quick, timeout=timeout, on_start=started)
    data = benchmarks.report(results, quick=quick)
    path = benchmarks.write_report(data, out or benchmarks.default_report_path(get_settings().home))
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        table = Table("benchmark", "status", "time", "figures")
        for r in results:
            status = STATUS.get(r.status, f"[red]{r.status.upper()}[/]")
            detail = benchmarks.headline(r.figures) if r.status == "ok" else r.reason
            table.add_row(r.name, status, f"{r.seconds:.1f} s", escape(detail))
        console.print(table)
        _echo(f"figures written to {path}")
    if not data["ok"]:
        raise typer.Exit(1)
