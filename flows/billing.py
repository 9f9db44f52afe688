"""Billing report: a tenant's metered usage priced into an exact invoice, per day or month.

A day (``YYYY-MM-DD``; ``yesterday`` on the daily schedule) is metered from the Prefect
API's flow-run history, the tenant's storage and its ETL loads
(``setlist.billing.metering``), priced by the tenant's plan (``setlist.billing.pricing``)
and published under ``billing/<day>/``.
A month (``YYYY-MM``; ``previous-month`` on the monthly schedule) first bills each of its
days that has no final report yet, then rolls the days' usage records up into the month
invoice under ``billing/<month>/``, with the plan's monthly allowances and minimum.
Billing a period again replaces its report atomically and never counts anything twice.
"""

from __future__ import annotations

import html
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from pydantic import Field

from blocks.tenant import TenantProfile
from setlist.billing import invoices
from setlist.billing.metering import PERIOD_FORMS, Period, PeriodKind, check_started, parse_period
from setlist.billing.pricing import PricePlan, plain
from setlist.billing.results import BillingSummary
from setlist.core.storage import TenantStorage
from setlist.dispatch.locks import tenant_lock
from setlist.tenants.runtime import JOB_FLOW, enter_tenant

__all__ = ["BillingSummary", "billing_report"]


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
async def bill_day(
    profile: TenantProfile,
    storage: TenantStorage,
    day: Period,
    plan: PricePlan,
    now: datetime,
    factor: Decimal,
) -> invoices.PeriodReport:
    """Meter, price and publish one day."""
    async with get_client() as client:
        return await invoices.produce_day(client, profile, storage, day, plan, now, factor)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def bill_month(
    profile: TenantProfile,
    storage: TenantStorage,
    month: Period,
    plan: PricePlan,
    now: datetime,
    factor: Decimal,
) -> invoices.PeriodReport:
    """Roll the month's day reports up into the month invoice and publish it."""
    return invoices.produce_month(profile, storage, month, plan, now, factor)


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|")


async def _artifact(report: invoices.PeriodReport) -> None:
    inv = report.invoice
    rows = "\n".join(
        f"| {n} | {_cell(line.description)} | {_cell(plain(line.quantity))} "
        f"| {_cell(line.unit)} | {_cell(plain(line.unit_price))} | {line.amount:.2f} |"
        for n, line in enumerate(inv.lines, start=1)
    )
    anomalies = "".join(
        f"\n- **{_cell(a['metric'])}**: {_cell(a['quantity'])} {_cell(a['unit'])}, "
        f"previous {_cell(a['previous_quantity'])} ({_cell(a['previous_period'])})"
        for a in (x.as_dict() for x in report.anomalies)
    )
    await acreate_markdown_artifact(
        key=f"billing-{report.tenant_id}",
        markdown=(
            f"# {'Invoice' if report.period.kind is PeriodKind.month else 'Usage statement'}: "
            f"`{report.tenant_id}`, {report.period.label} ({report.status})\n\n"
            f"Plan `{_cell(inv.plan)}`, {inv.currency}, metered up to "
            f"{report.as_of.isoformat()}.\n\n"
            "| # | item | quantity | unit | unit price | amount |\n|---|---|---|---|---|---|\n"
            f"{rows or '| – | no usage | | | | 0.00 |'}\n"
            f"| | **total** | | | | **{inv.total:.2f}** |\n\n"
            f"{report.runs.get('billed', 0)} run(s) billed, "
            f"{len(report.runs.get('excluded', []))} not billed (platform failures). "
            f"Files: `{invoices.manifest_key(report.period)}`.\n"
            + (
                f"\n## Anomalies (above the previous period's usage × factor){anomalies}\n"
                if anomalies
                else ""
            )
        ),
        description=f"billing-report {report.period.label}",
    )


def _reference_time() -> datetime:
    """When the run was due: 'yesterday' of a late scheduled run is still its due day."""
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None and ctx.flow_run.expected_start_time:
        return ctx.flow_run.expected_start_time
    return invoices.utcnow()


@flow(name="billing-report", log_prints=True, persist_result=True, **JOB_FLOW)
async def billing_report(
    tenant_id: str,
    period: Annotated[str, Field(min_length=1, max_length=20, description=PERIOD_FORMS)] = (
        "yesterday"
    ),
    anomaly_factor: Annotated[
        float,
        Field(ge=1, le=1000, description="alert when a metric exceeds this × its previous period"),
    ] = 3.0,
) -> BillingSummary:
    """Meter the tenant's usage of a UTC day or month and publish its invoice.

    Args:
        tenant_id: the tenant to bill
        period: YYYY-MM-DD (a UTC day), YYYY-MM (a UTC month, rolled up from its days),
            'yesterday' or 'previous-month' (counted from when the run was due)
        anomaly_factor: emit setlist.billing.anomaly for a metric whose usage is above
            this many times the previous period's
    """
    tenant = await enter_tenant(tenant_id)
    logger = get_run_logger()
    target = parse_period(period, _reference_time())
    now = invoices.utcnow()
    check_started(target, now)
    plan = await invoices.load_plan(tenant.profile)
    factor = Decimal(str(anomaly_factor))
    args = (tenant.profile, tenant.storage)
    async with tenant_lock(tenant_id, "billing"):
        if target.kind is PeriodKind.day:
            reports = [await bill_day(*args, target, plan, now, factor)]
        else:
            reports = [
                await bill_day(*args, day, plan, now, factor)
                for day in invoices.days_to_produce(tenant.storage, target, now)
            ]
            reports.append(bill_month(*args, target, plan, now, factor))
    report = reports[-1]
    await _artifact(report)
    async with get_client() as client:
        await invoices.emit_events(client, reports)
    for r in reports:
        logger.info(
            "%s %s: %s lines, total %s %s (%s)",
            r.period.kind.value,
            r.period.label,
            len(r.invoice.lines),
            f"{r.invoice.total:.2f}",
            r.invoice.currency,
            r.status,
        )
        for a in r.anomalies:
            logger.warning("anomaly in %s: %s", r.period.label, a.as_dict())
    return BillingSummary(
        tenant_id=tenant_id,
        period=report.period.label,
        status=report.status,
        currency=report.invoice.currency,
        total=f"{report.invoice.total:.2f}",
        totals=report.manifest["totals"],
        lines=len(report.invoice.lines),
        manifest=invoices.manifest_key(report.period),
        reports=[r.period.label for r in reports],
        anomalies=[{"period": r.period.label, **a.as_dict()} for r in reports for a in r.anomalies],
    )
