"""``setlist scan …``: security scans of one or every tenant, and the compliance table."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from setlist.cli._common import TenantOpt, _client, _echo, _flow, _run, app, console, err
from setlist.core.settings import get_settings

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
    security_scan = _flow("flows/security_scan.py:security_scan")
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
    from setlist.security.report import scan_each
    from setlist.tenants.onboarding import list_profiles

    async with _client() as client:
        profiles = await list_profiles(client)
    tenants = [p.tenant_id for p in profiles if p.status == TenantStatus.active]
    results = await scan_each(
        _flow("flows/security_scan.py:security_scan"),
        tenants,
        parallel or get_settings().parallel_jobs,
        sample_rate=sample_rate,
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
    from botocore.exceptions import BotoCoreError, ClientError

    from blocks.tenant import TenantStatus
    from setlist.core.storage import load_storage_config, tenant_storage
    from setlist.security.checks import Framework
    from setlist.security.report import UnreadableReport, latest_report
    from setlist.tenants.onboarding import list_profiles

    async with _client() as client:
        profiles = await list_profiles(client)
    rows, failing = [], 0
    for p in profiles:
        if p.status != TenantStatus.active:
            continue
        config = await load_storage_config(p.storage_block)
        try:
            report = latest_report(tenant_storage(p.tenant_id, config))
        except UnreadableReport as exc:  # this tenant's line fails, not the command
            failing += 1
            rows.append((p.tenant_id, None, False, str(exc)))
            continue
        except (OSError, BotoCoreError, ClientError) as exc:  # nor does its store's outage
            failing += 1
            rows.append((p.tenant_id, None, False, f"store unreachable: {type(exc).__name__}"))
            continue
        ok = report is not None and all(
            report.scores.get(f.value, 0.0) >= target for f in Framework
        )
        failing += not ok
        rows.append((p.tenant_id, report, ok, None if report else "never scanned"))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "tenant": t,
                        "scanned_at": r and r.scanned_at,
                        "ok": ok,
                        "scores": r.scores if r else None,
                        "error": why if not r else None,
                    }
                    for t, r, ok, why in rows
                ],
                indent=2,
            )
        )
    else:
        table = Table("tenant", "scanned", *(f.value for f in Framework), "overall", "")
        for tenant_id, report, ok, why in rows:
            if report is None:
                shown = "never" if why == "never scanned" else f"unreadable: {why}"
                table.add_row(tenant_id, shown, *([""] * len(Framework)), "", "[red]FAIL[/]")
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
