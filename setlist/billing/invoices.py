"""Billing reports: a tenant's invoice for a UTC day or month, published atomically.

Layout under the tenant's storage::

    billing/<PERIOD>/_manifest.json          the report: status, totals, plan, runs, files
    billing/<PERIOD>/usage-<sha>.parquet     every usage record of the period
    billing/<PERIOD>/lines-<sha>.parquet     the invoice lines
    billing/<PERIOD>/lines-<sha>.csv         the same lines as CSV
    billing/<PERIOD>/invoice-<sha>.html      the invoice for people
    billing/samples/storage/<DAY>.json       a day's storage sample (an input, kept)

PERIOD is ``YYYY-MM-DD`` (a day report) or ``YYYY-MM`` (a month invoice). Files are
content-addressed and deterministic, and one PUT of the manifest publishes them, as for
the curated tables: a reader sees the previous report or the new one, never half of one,
and billing a period again with the same inputs gives the same bytes. A month invoice
rolls up the usage records of its day reports (producing the days that are missing) and
prices them once with the month's terms, so a month is the exact sum of its days.

A period that has not ended is billed up to now and published as ``provisional``; once
it has ended it is billed to its end as ``final``. The operators' commands around these
reports (which need the tenant's profile and lock) are ``setlist.billing.operations``.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pyarrow as pa
import pyarrow.parquet as pq
from prefect.client.orchestration import PrefectClient
from pydantic import ValidationError

from blocks.billing import PricePlanBlock
from blocks.tenant import TenantProfile
from setlist.billing.metering import (
    BILLING_PREFIX,
    USAGE_SCHEMA,
    Period,
    PeriodKind,
    as_of,
    canonical_usage,
    check_started,
    meter_day,
)
from setlist.billing.pricing import (
    DEFAULT_PLAN,
    EXACT,
    UNITS,
    Invoice,
    Metric,
    PricePlan,
    aggregate_usage,
    plain,
    price,
    to_units,
)
from setlist.core import audit, records
from setlist.core.storage import ObjectNotFound, TenantStorage
from setlist.core.tenancy import SetlistError

MANIFEST_NAME = "_manifest.json"
log = logging.getLogger(__name__)
PLAN_LABEL = "price-plan"
ANOMALY_FACTOR = Decimal(3)
FINAL, PROVISIONAL = "final", "provisional"

LINES_SCHEMA = pa.schema(
    [
        ("line", pa.int32()),
        ("kind", pa.string()),
        ("description", pa.string()),
        ("job_type", pa.string()),
        ("metric", pa.string()),
        ("quantity", pa.decimal128(38, 13)),
        ("unit", pa.string()),
        ("unit_price", pa.decimal128(38, 18)),
        ("amount", pa.decimal128(38, 2)),
        ("currency", pa.string()),
        ("note", pa.string()),
    ]
)


class NoReport(SetlistError):
    pass


def utcnow() -> datetime:
    """The billing clock (one place, so a test can move it)."""
    return datetime.now(UTC)


# ----------------------------------------------------------------------------- plans


async def load_plan(profile: TenantProfile) -> PricePlan:
    """The tenant's price plan: the plan block its ``price-plan`` label names.

    Without the label the tenant is on ``standard``; without a ``standard`` block that is
    the platform's list prices. A label naming a plan that doesn't exist is an error, so
    a tenant is never billed at list prices by accident.
    """
    name = profile.labels.get(PLAN_LABEL, DEFAULT_PLAN)
    try:
        block = await PricePlanBlock.aload(name)
    except ValidationError as exc:  # a plan edited into something invalid: never guess
        raise SetlistError(f"price plan {name!r} is invalid: {exc.errors()[0]['msg']}") from None
    except ValueError:
        if name == DEFAULT_PLAN:
            return PricePlan()
        raise SetlistError(
            f"tenant {profile.tenant_id!r} is on price plan {name!r}, which does not exist; "
            f"create it (setlist billing plan set {name} FILE) or change the tenant's plan"
        ) from None
    if block.plan.name != name:  # a block copied in the UI under another name
        return PricePlan.model_validate({**block.plan.model_dump(), "name": name})
    return block.plan


async def save_plan(plan: PricePlan) -> None:
    await PricePlanBlock(plan=plan).asave(plan.name, overwrite=True)


# ----------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class Anomaly:
    metric: Metric
    quantity: int
    previous: int
    previous_period: str
    factor: Decimal

    def as_dict(self) -> dict[str, Any]:
        unit = UNITS[self.metric]
        ratio = (
            plain((Decimal(self.quantity) / Decimal(self.previous)).quantize(Decimal("0.01")))
            if self.previous
            else "new usage"
        )
        return {
            "metric": self.metric.value,
            "unit": unit.unit,
            "quantity": plain(to_units(self.metric, self.quantity)),
            "previous_quantity": plain(to_units(self.metric, self.previous)),
            "previous_period": self.previous_period,
            "factor": plain(self.factor),
            "ratio": ratio,
        }


def detect_anomalies(
    usage: dict[Metric, int], previous: dict[str, Any] | None, factor: Decimal = ANOMALY_FACTOR
) -> list[Anomaly]:
    """Metrics whose usage is above ``factor`` times the previous period's.

    Compared only when the previous period has a report; usage of a metric that had
    none in the previous period is above any multiple of it, so it is reported too.
    """
    if previous is None:
        return []
    before = {m: int(previous.get("usage", {}).get(m.value, {}).get("base", 0)) for m in Metric}
    return [
        Anomaly(m, usage[m], before[m], previous["period"], factor)
        for m in Metric
        if usage[m] > 0 and EXACT.multiply(factor, Decimal(before[m])) < usage[m]
    ]


@dataclass
class PeriodReport:
    tenant_id: str
    period: Period
    status: str
    as_of: datetime
    invoice: Invoice
    usage: pa.Table
    runs: dict[str, Any] = field(default_factory=dict)
    storage_sample: dict[str, Any] | None = None
    days: list[str] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return period_prefix(self.period)


def period_prefix(period: Period) -> str:
    return f"{BILLING_PREFIX}{period.label}/"


def manifest_key(period: Period) -> str:
    return period_prefix(period) + MANIFEST_NAME


def read_manifest(storage: TenantStorage, period: Period) -> dict[str, Any] | None:
    """The period's report, or None when there is none, or none the platform sealed: a
    planted or edited manifest counts as no report, so the period is billed again and
    the platform's own report replaces it."""
    key = manifest_key(period)
    try:
        return records.read_record(storage, key)
    except ObjectNotFound:
        return None
    except records.UnsealedRecord as exc:
        log.warning("billing of %s: %s; billing the period again", storage.tenant_id, exc)
        return None


def _read_parquet(storage: TenantStorage, file: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """A file the sealed manifest names, refused unless its bytes are those it names."""
    data = records.check_bytes(file["key"], storage.get_bytes(file["key"]), file["sha256"])
    return pq.read_table(io.BytesIO(data), schema=schema)


def read_usage(storage: TenantStorage, manifest: dict[str, Any]) -> pa.Table:
    return _read_parquet(storage, manifest["files"]["usage"], USAGE_SCHEMA)


def read_lines(storage: TenantStorage, manifest: dict[str, Any]) -> pa.Table:
    return _read_parquet(storage, manifest["files"]["lines"], LINES_SCHEMA)


def _report(
    tenant_id: str,
    period: Period,
    now: datetime,
    records: pa.Table,
    plan: PricePlan,
    storage: TenantStorage,
    factor: Decimal,
    **extra: Any,
) -> PeriodReport:
    until = as_of(period, now)
    monthly = period.kind is PeriodKind.month
    totals = aggregate_usage(records)
    foreign = sorted({t.tenant_id for t in totals} - {tenant_id})
    if foreign:
        raise SetlistError(f"usage of tenant(s) {foreign} reached the report of {tenant_id!r}")
    invoice = price(tenant_id, totals, plan, monthly_terms=monthly)
    previous = read_manifest(storage, period.previous())
    return PeriodReport(
        tenant_id=tenant_id,
        period=period,
        status=FINAL if until == period.end else PROVISIONAL,
        as_of=until,
        invoice=invoice,
        usage=records,
        anomalies=detect_anomalies(invoice.usage, previous, factor),
        **extra,
    )


async def produce_day(
    client: PrefectClient,
    profile: TenantProfile,
    storage: TenantStorage,
    day: Period,
    plan: PricePlan,
    now: datetime,
    factor: Decimal = ANOMALY_FACTOR,
) -> PeriodReport:
    """Meter, price and publish one day of the tenant."""
    used = await meter_day(
        client,
        storage,
        profile.tenant_id,
        day,
        now,
        profile.tier_overrides,
        billable_from=profile.created_at,
    )
    billed = [m for m in used.runs if m.billed]
    report = _report(
        profile.tenant_id,
        day,
        now,
        used.records,
        plan,
        storage,
        factor,
        runs={
            "billed": len(billed),
            "running_ms": sum(m.running_ms for m in billed),
            "excluded": [m.as_dict() for m in used.runs if not m.billed],
        },
        storage_sample=used.storage.__dict__ if used.storage else None,
    )
    publish(storage, report)
    return report


def days_to_produce(storage: TenantStorage, month: Period, now: datetime) -> list[Period]:
    """Days of the month (begun by ``now``) without a report as final as it can be."""
    check_started(month, now)
    wanted = []
    for day in month.days():
        if day.start > now:
            break
        manifest = read_manifest(storage, day)
        if manifest is None or manifest["status"] != FINAL:
            wanted.append(day)
    return wanted


def produce_month(
    profile: TenantProfile,
    storage: TenantStorage,
    month: Period,
    plan: PricePlan,
    now: datetime,
    factor: Decimal = ANOMALY_FACTOR,
) -> PeriodReport:
    """Roll the month's day reports up into the month invoice and publish it."""
    check_started(month, now)
    days, tables, excluded = [], [], []
    running_ms = 0
    for day in month.days():
        if day.start > now:
            break
        manifest = read_manifest(storage, day)
        if manifest is None:
            raise NoReport(f"day {day.label} of {profile.tenant_id!r} has no report yet")
        days.append({"period": day.label, "status": manifest["status"]})
        tables.append(read_usage(storage, manifest))
        running_ms += manifest["runs"]["running_ms"]
        excluded += [{"period": day.label, **r} for r in manifest["runs"]["excluded"]]
    records = canonical_usage(pa.concat_tables(tables)) if tables else USAGE_SCHEMA.empty_table()
    # A run across midnight has a record in each day: count runs, not run-days.
    billed = len({s for s in records["source"].to_pylist() if s.startswith("flow-run/")})
    report = _report(
        profile.tenant_id,
        month,
        now,
        records,
        plan,
        storage,
        factor,
        runs={"billed": billed, "running_ms": running_ms, "excluded": excluded},
        days=[d["period"] for d in days],
    )
    if report.status == FINAL and any(d["status"] != FINAL for d in days):
        report.status = PROVISIONAL
    publish(storage, report)
    return report


async def produce(
    client: PrefectClient,
    profile: TenantProfile,
    storage: TenantStorage,
    period: Period,
    plan: PricePlan,
    now: datetime,
    factor: Decimal = ANOMALY_FACTOR,
) -> list[PeriodReport]:
    """Every report a period needs, the period's own last (the flow runs the same steps
    as tasks)."""
    if period.kind is PeriodKind.day:
        return [await produce_day(client, profile, storage, period, plan, now, factor)]
    reports = [
        await produce_day(client, profile, storage, day, plan, now, factor)
        for day in days_to_produce(storage, period, now)
    ]
    reports.append(produce_month(profile, storage, period, plan, now, factor))
    return reports


# ----------------------------------------------------------------------------- files


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


def lines_table(invoice: Invoice) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "line": n,
                "kind": line.kind.value,
                "description": line.description,
                "job_type": line.job_type,
                "metric": line.metric,
                "quantity": line.quantity,
                "unit": line.unit,
                "unit_price": line.unit_price,
                "amount": line.amount,
                "currency": invoice.currency,
                "note": line.note,
            }
            for n, line in enumerate(invoice.lines, start=1)
        ],
        schema=LINES_SCHEMA,
    )


def _csv_text(value: str) -> str:
    """Text a spreadsheet would run as a formula is quoted (numbers are written as such)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def lines_csv(invoice: Invoice) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f.name for f in LINES_SCHEMA])
    for n, line in enumerate(invoice.lines, start=1):
        writer.writerow(
            [
                n,
                line.kind.value,
                _csv_text(line.description),
                _csv_text(line.job_type),
                line.metric,
                plain(line.quantity),
                line.unit,
                plain(line.unit_price),
                f"{line.amount:.2f}",
                invoice.currency,
                _csv_text(line.note),
            ]
        )
    return out.getvalue().encode()


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}"
    "th,td{border-bottom:1px solid #ddd;padding:.3rem .6rem;text-align:left}"
    "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}"
    "tfoot td{font-weight:bold;border-top:2px solid #222}.muted{color:#666}"
)


def invoice_html(report: PeriodReport) -> bytes:
    """The invoice for people. Every value is escaped; nothing secret is in it."""
    e = html.escape
    inv = report.invoice
    title = "Invoice" if report.period.kind is PeriodKind.month else "Usage statement"
    rows = (
        "".join(
            f"<tr><td class=n>{n}</td><td>{e(line.description)}"
            f"{f' <span class=muted>({e(line.note)})</span>' if line.note else ''}</td>"
            f"<td class=n>{e(plain(line.quantity))}</td><td>{e(line.unit)}</td>"
            f"<td class=n>{e(plain(line.unit_price))}</td>"
            f"<td class=n>{e(f'{line.amount:.2f}')}</td></tr>"
            for n, line in enumerate(inv.lines, start=1)
        )
        or "<tr><td colspan=6 class=muted>No usage in this period.</td></tr>"
    )
    sub = inv.subtotals()
    subtotal_rows = "".join(
        f"<tr><td colspan=5>{e(name)}</td><td class=n>{e(f'{sub[key]:.2f}')}</td></tr>"
        for key, name in (
            ("usage", "Usage"),
            ("allowance", "Included allowances"),
            ("discount", "Discounts"),
            ("minimum", "Minimum charge top-up"),
        )
        if sub[key]
    )
    excluded = report.runs.get("excluded", [])
    not_billed = (
        "<h2>Runs not billed</h2><table><thead><tr><th>Run</th><th>Job type</th>"
        "<th>State</th><th>Reason</th></tr></thead><tbody>"
        + "".join(
            f"<tr><td>{e(str(r.get('run_id', '')))} ({e(str(r.get('name', '')))})</td>"
            f"<td>{e(str(r.get('job_type', '')))}</td><td>{e(str(r.get('state', '')))}</td>"
            f"<td>{e(str(r.get('reason', '')))}</td></tr>"
            for r in excluded
        )
        + "</tbody></table>\n"
        if excluded
        else ""
    )
    terms = (
        ""
        if inv.monthly_terms
        else " Included allowances and the minimum charge apply to the month invoice."
    )
    days = (
        f"<p>Rolled up from {len(report.days)} day report(s): "
        f"{e(report.days[0])} … {e(report.days[-1])}.</p>"
        if report.days
        else ""
    )
    doc = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{e(title)} {e(report.tenant_id)} {e(report.period.label)}</title>"
        f"<style>{_CSS}</style></head><body>\n"
        f"<h1>{e(title)}: {e(report.tenant_id)}, {e(report.period.label)}</h1>\n"
        f"<p>Period {e(report.period.start.isoformat())} to {e(report.period.end.isoformat())} "
        f"(UTC), metered up to {e(report.as_of.isoformat())}; status "
        f"<b>{e(report.status)}</b>. Price plan <b>{e(inv.plan)}</b> "
        f"(<span class=muted>{e(inv.plan_sha256[:16])}</span>), currency {e(inv.currency)}.</p>\n"
        f"{days}"
        "<table><thead><tr><th class=n>#</th><th>Item</th><th class=n>Quantity</th>"
        "<th>Unit</th><th class=n>Unit price</th>"
        f"<th class=n>Amount ({e(inv.currency)})</th></tr></thead>\n<tbody>{rows}</tbody>\n"
        f"<tfoot>{subtotal_rows}<tr><td colspan=5>Total</td>"
        f"<td class=n>{e(f'{inv.total:.2f}')}</td></tr></tfoot></table>\n"
        f"<p class=muted>{report.runs.get('billed', 0)} run(s) billed; {len(excluded)} run(s) "
        "not billed because they failed for a reason inside the platform (crashed, or "
        "never started). Each amount is quantity × unit price, rounded once to the cent "
        f"(half up); the total is the sum of the lines.{terms}</p>\n"
        f"{not_billed}"
        "</body></html>\n"
    )
    return doc.encode()


def _manifest(report: PeriodReport, files: dict[str, Any], retired: list[str]) -> dict[str, Any]:
    inv = report.invoice
    return {
        "format": 1,
        "tenant_id": report.tenant_id,
        "period": report.period.label,
        "kind": report.period.kind.value,
        "status": report.status,
        "start": report.period.start.isoformat(),
        "end": report.period.end.isoformat(),
        "as_of": report.as_of.isoformat(),
        "currency": inv.currency,
        "plan": {"name": inv.plan, "sha256": inv.plan_sha256},
        "totals": {k: f"{v:.2f}" for k, v in inv.subtotals().items()},
        "lines": len(inv.lines),
        "usage": {
            m.value: {
                "base": inv.usage[m],
                "quantity": plain(to_units(m, inv.usage[m])),
                "unit": UNITS[m].unit,
            }
            for m in Metric
        },
        "records": report.usage.num_rows,
        "runs": report.runs,
        "storage_sample": report.storage_sample,
        "days": report.days,
        "anomalies": [a.as_dict() for a in report.anomalies],
        "files": files,
        "retired": retired,
    }


def publish(storage: TenantStorage, report: PeriodReport) -> dict[str, Any]:
    """Write the report's files, then publish them with one PUT of the manifest."""
    prefix = report.prefix
    outputs = [
        ("usage", "usage", "parquet", _parquet(canonical_usage(report.usage))),
        ("lines", "lines", "parquet", _parquet(lines_table(report.invoice))),
        ("csv", "lines", "csv", lines_csv(report.invoice)),
        ("html", "invoice", "html", invoice_html(report)),
    ]
    files = {}
    for kind, name, ext, data in outputs:
        sha = hashlib.sha256(data).hexdigest()
        key = f"{prefix}{name}-{sha[:20]}.{ext}"
        if not storage.exists(key):
            storage.put_bytes(key, data)
        files[kind] = {"key": key, "bytes": len(data), "sha256": sha}
    live = {f["key"] for f in files.values()}
    previous = read_manifest(storage, report.period)
    before = {f["key"] for f in previous["files"].values()} if previous else set()
    manifest = _manifest(report, files, sorted(before - live))
    records.write_record(storage, manifest_key(report.period), manifest)
    # Files neither this version nor the previous one references: no reader can need them.
    keep = live | set(manifest["retired"]) | {manifest_key(report.period)}
    for key in storage.list_keys(prefix):
        if key not in keep:
            storage.delete(key)
    report.manifest = manifest
    return manifest


# ----------------------------------------------------------------------------- events


def report_resource(tenant_id: str, period: Period) -> str:
    return f"setlist.billing.{tenant_id}.{period.label}"


async def emit_events(client: PrefectClient, reports: list[PeriodReport]) -> None:
    """``setlist.billing.completed`` per report, ``setlist.billing.anomaly`` per anomaly.

    An anomaly's event id derives from what it reports, so billing a period again
    does not raise the same alert twice.
    """
    for r in reports:
        obj = (report_resource(r.tenant_id, r.period), "billing-report")
        for a in r.anomalies:
            event = audit.build_event(
                "setlist.billing.anomaly",
                r.tenant_id,
                obj=obj,
                payload={"period": r.period.label, "status": r.status, **a.as_dict()},
            )
            ident = f"{r.tenant_id}/{r.period.label}/{a.metric.value}/{a.quantity}/{a.previous}"
            event = event.model_copy(
                update={"id": uuid5(NAMESPACE_URL, f"setlist-billing-anomaly:{ident}")}
            )
            await audit.record(client, event)
        await audit.emit(
            client,
            "setlist.billing.completed",
            r.tenant_id,
            obj=obj,
            payload={
                "period": r.period.label,
                "status": r.status,
                "currency": r.invoice.currency,
                "totals": r.manifest.get("totals", {}),
                "manifest": manifest_key(r.period),
            },
        )
