"""Usage aggregation, price plans and invoice lines: exact money from exact usage.

Pure: nothing here touches the network or the disk.

Usage is metered in integer *base* quantities (a usage record's ``quantity``), so sums
are exact and any engine (pyarrow here, DuckDB in the benchmark) gets the same totals.
A line shows its quantity in the metric's billing unit, which is an exact decimal of the
base quantity (every ``per_unit`` divides a power of ten):

| metric    | billing unit  | base quantity           | base per unit |
|-----------|---------------|-------------------------|---------------|
| cpu       | cpu-second    | millicpu x millisecond  | 1,000,000     |
| memory    | GiB-second    | MiB x millisecond       | 1,024,000     |
| gpu       | GPU-second    | GPU x millisecond       | 1,000         |
| storage   | GB-second     | byte x second           | 1,000,000,000 |
| rows      | row           | row                     | 1             |

Rounding rule: a line's amount is ``quantity x unit price`` computed exactly, then
rounded once, half up (half a cent goes away from zero), to the cent. Credits (included
allowances, discounts) are lines of their own, rounded the same way; the invoice total
is the plain sum of its rounded lines and is never rounded again. A credit never takes
a metric's charges (allowance) or the invoice (discount) below zero.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from setlist.core.tenancy import SetlistError, validate_tenant_id

if TYPE_CHECKING:  # pyarrow is imported where usage is aggregated: plans stay light to import
    import pyarrow as pa

CENT = Decimal("0.01")
# Every computation that must be exact runs in this context: an inexact result raises
# instead of being rounded silently. 200 digits hold any product of a quantity and a rate.
EXACT = Context(prec=200, traps=[Inexact, InvalidOperation, Overflow, DivisionByZero])
_MONEY = Context(prec=200, rounding=ROUND_HALF_UP, traps=[InvalidOperation, Overflow])
INT64_MAX = 2**63 - 1


class Metric(StrEnum):
    """What is metered. The declaration order is the order of an invoice's lines."""

    cpu = "cpu"
    memory = "memory"
    gpu = "gpu"
    storage = "storage"
    rows = "rows"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {m: n for n, m in enumerate(Metric)}


@dataclass(frozen=True)
class MetricUnit:
    unit: str  # what a line's quantity counts
    base: str  # what a usage record's integer quantity counts
    per_unit: int  # base quantities in one unit
    label: str  # how an invoice names the metric


UNITS: dict[Metric, MetricUnit] = {
    Metric.cpu: MetricUnit("cpu-second", "millicpu-millisecond", 1_000_000, "CPU time"),
    Metric.memory: MetricUnit("GiB-second", "MiB-millisecond", 1_024_000, "Memory"),
    Metric.gpu: MetricUnit("GPU-second", "GPU-millisecond", 1_000, "GPU time"),
    Metric.storage: MetricUnit("GB-second", "byte-second", 1_000_000_000, "Storage held"),
    Metric.rows: MetricUnit("row", "row", 1, "Rows loaded (data-etl)"),
}


def to_units(metric: Metric, base_quantity: int) -> Decimal:
    """The exact quantity in the metric's billing unit."""
    return EXACT.divide(Decimal(base_quantity), Decimal(UNITS[metric].per_unit))


def money(value: Decimal) -> Decimal:
    """Round once to the cent, half away from zero."""
    return value.quantize(CENT, context=_MONEY)


def plain(value: Decimal) -> str:
    """A decimal as people write it: no exponent, no trailing zeros past the point."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


# ----------------------------------------------------------------------------- plans

# The platform's list prices per billing unit (≈ 0.0403 per cpu-hour, 0.0043 per
# GiB-hour, 2.97 per GPU-hour, 0.023 per GB-month of storage, 1.00 per million rows).
LIST_PRICES: dict[Metric, Decimal] = {
    Metric.cpu: Decimal("0.0000112"),
    Metric.memory: Decimal("0.0000012"),
    Metric.gpu: Decimal("0.000825"),
    Metric.storage: Decimal("0.0000000089"),
    Metric.rows: Decimal("0.000001"),
}
DEFAULT_PLAN = "standard"
RATE_MAX_PLACES = 18


def _check_decimal(value: Decimal, what: str, places: int) -> Decimal:
    if not value.is_finite():
        raise ValueError(f"{what} {value} is not a finite number")
    if value < 0:
        raise ValueError(f"{what} {plain(value)} is negative; use 0 or more")
    if value.as_tuple().exponent < -places:  # type: ignore[operator]
        raise ValueError(f"{what} {plain(value)} has more than {places} decimal places")
    if value >= Decimal(10) ** 15:
        raise ValueError(f"{what} {plain(value)} is implausibly large")
    return value


class Discount(BaseModel):
    """A percentage off the charges of some metrics (all when ``metrics`` is empty)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=80, description="shown on the invoice line")
    percent: Decimal = Field(gt=0, le=100, description="0 < percent <= 100")
    metrics: list[Metric] = Field(default_factory=list, description="empty: every metric")

    @field_validator("percent")
    @classmethod
    def _percent(cls, v: Decimal) -> Decimal:
        return _check_decimal(v, "discount percent", 6)

    @field_serializer("percent")
    def _ser_percent(self, v: Decimal) -> str:
        return plain(v)

    def applies_to(self) -> list[Metric]:
        return list(self.metrics) or list(Metric)


class PricePlan(BaseModel):
    """What a tenant pays: unit rates, monthly allowances and minimum, discounts.

    ``rates`` are per billing unit (see the module's table); a metric left out is
    charged at the list price. ``included`` (per month, in billing units) and
    ``minimum_charge`` (per month) apply to month invoices; day reports are statements
    at the rates and discounts only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default=DEFAULT_PLAN, description="DNS-1123 label, e.g. 'standard'")
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code")
    rates: dict[Metric, Decimal] = Field(
        default_factory=lambda: dict(LIST_PRICES), description="price per billing unit"
    )
    included: dict[Metric, Decimal] = Field(
        default_factory=dict, description="billing units included per month, per metric"
    )
    minimum_charge: Decimal = Field(default=Decimal(0), description="per month")
    discounts: list[Discount] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return validate_tenant_id(v)
        except SetlistError:
            raise ValueError(
                f"plan name {v!r} is not a DNS-1123 label (lower-case letters, digits, '-')"
            ) from None

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: dict[Metric, Decimal]) -> dict[Metric, Decimal]:
        given = {m: _check_decimal(r, f"rate of {m.value}", RATE_MAX_PLACES) for m, r in v.items()}
        return {m: given.get(m, LIST_PRICES[m]) for m in Metric}

    @field_validator("included")
    @classmethod
    def _included(cls, v: dict[Metric, Decimal]) -> dict[Metric, Decimal]:
        return {
            m: _check_decimal(q, f"included {m.value}", 13)
            for m, q in sorted(v.items(), key=lambda kv: kv[0].rank)
            if q
        }

    @field_validator("minimum_charge")
    @classmethod
    def _minimum(cls, v: Decimal) -> Decimal:
        return _check_decimal(v, "minimum charge", 2)

    @model_validator(mode="after")
    def _discounts_fit(self) -> PricePlan:
        for metric in Metric:
            total = sum((d.percent for d in self.discounts if metric in d.applies_to()), Decimal(0))
            if total > 100:
                raise ValueError(
                    f"discounts on {metric.value} add up to {plain(total)}%; at most 100% allowed"
                )
        return self

    @field_serializer("rates", "included")
    def _ser_map(self, v: dict[Metric, Decimal]) -> dict[str, str]:
        return {m.value: plain(q) for m, q in v.items()}

    @field_serializer("minimum_charge")
    def _ser_minimum(self, v: Decimal) -> str:
        return plain(v)

    def rate(self, metric: Metric) -> Decimal:
        return self.rates[metric]

    @cached_property
    def sha256(self) -> str:
        """A fingerprint of the plan's terms, recorded with every invoice priced by it."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


# ----------------------------------------------------------------------------- usage

USAGE_KEYS = ["tenant_id", "job_type", "metric"]


class BadUsage(SetlistError):
    """Usage records that can't be billed: negative, missing or of an unknown metric."""


@dataclass(frozen=True)
class UsageTotal:
    tenant_id: str
    job_type: str
    metric: Metric
    quantity: int  # base units, exact


def _group_sums(table: pa.Table, column: str) -> pa.Table:
    return table.group_by(USAGE_KEYS).aggregate([(column, "sum")])


def aggregate_usage(records: pa.Table) -> list[UsageTotal]:
    """Sum usage records per (tenant, job type, metric), exactly.

    ``records`` needs the columns tenant_id, job_type, metric (strings, plain or
    dictionary-encoded) and quantity (int64, base units, never negative). Sums are
    computed in int64 when no group can overflow it (rows x largest quantity fits) and
    otherwise from two 32-bit halves recombined in Python integers.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = [c for c in [*USAGE_KEYS, "quantity"] if c not in records.column_names]
    if missing:
        raise BadUsage(f"usage records lack column(s) {missing}")
    if records.num_rows == 0:
        return []
    table = records.select([*USAGE_KEYS, "quantity"])
    quantity = table["quantity"]
    if not pa.types.is_integer(quantity.type):
        raise BadUsage(f"usage quantity must be an integer column, not {quantity.type}")
    if quantity.null_count:
        raise BadUsage(f"{quantity.null_count} usage record(s) have no quantity")
    if any(pa.types.is_dictionary(table[c].type) for c in USAGE_KEYS):
        table = table.unify_dictionaries()
    bounds = pc.min_max(quantity)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low < 0:
        raise BadUsage(f"usage quantity {low} is negative; quantities are 0 or more")
    if table.num_rows * high <= INT64_MAX:
        grouped = _group_sums(table, "quantity")
        sums = grouped["quantity_sum"].to_pylist()
    else:  # a sum could overflow int64: add the high and low 32 bits separately
        q = pc.cast(quantity, pa.int64())
        halves = table.append_column("hi", pc.shift_right(q, 32)).append_column(
            "lo", pc.bit_wise_and(q, 2**32 - 1)
        )
        grouped = halves.group_by(USAGE_KEYS).aggregate([("hi", "sum"), ("lo", "sum")])
        sums = [
            (hi << 32) + lo
            for hi, lo in zip(
                grouped["hi_sum"].to_pylist(), grouped["lo_sum"].to_pylist(), strict=True
            )
        ]
    keys = [_plain_strings(grouped[c]).to_pylist() for c in USAGE_KEYS]
    metrics: dict[str, Metric] = {}
    for name in set(keys[2]):
        try:
            metrics[name] = Metric(name)
        except ValueError:
            accepted = ", ".join(m.value for m in Metric)
            raise BadUsage(f"unknown usage metric {name!r}; accepted: {accepted}") from None
    if None in keys[0] or None in keys[1]:
        raise BadUsage("usage records need a tenant_id and a job_type ('' for none)")
    totals = [
        UsageTotal(tenant, job_type, metrics[metric], total)
        for tenant, job_type, metric, total in zip(*keys, sums, strict=True)
    ]
    return sorted(totals, key=lambda t: (t.tenant_id, _RANK[t.metric], t.job_type))


def _plain_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-decoded: converting few decoded values to Python is far cheaper."""
    import pyarrow as pa

    return column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column


def totals_by_metric(totals: list[UsageTotal]) -> dict[Metric, int]:
    out = {m: 0 for m in Metric}
    for t in totals:
        out[t.metric] += t.quantity
    return out


# ----------------------------------------------------------------------------- invoices


class LineKind(StrEnum):
    usage = "usage"
    allowance = "allowance"
    discount = "discount"
    minimum = "minimum"


@dataclass(frozen=True)
class InvoiceLine:
    """One line: ``amount = round(quantity x unit_price)`` unless ``note`` says capped."""

    kind: LineKind
    description: str
    job_type: str
    metric: str
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount: Decimal
    note: str = ""


@dataclass(frozen=True)
class Invoice:
    tenant_id: str
    currency: str
    plan: str
    plan_sha256: str
    monthly_terms: bool
    lines: tuple[InvoiceLine, ...]
    usage: dict[Metric, int]  # base-unit totals per metric

    def _sum(self, kind: LineKind | None = None) -> Decimal:
        return sum(
            (line.amount for line in self.lines if kind is None or line.kind == kind),
            Decimal("0.00"),
        )

    @property
    def total(self) -> Decimal:
        return self._sum()

    def subtotals(self) -> dict[str, Decimal]:
        return {
            **{kind.value: self._sum(kind) for kind in LineKind},
            "total": self.total,
        }


def price(
    tenant_id: str, totals: list[UsageTotal], plan: PricePlan, *, monthly_terms: bool
) -> Invoice:
    """The invoice lines of one tenant's usage under ``plan``.

    One usage line per (metric, job type) with usage; with ``monthly_terms`` one credit
    line per metric with an included allowance, then one line per discount that applies,
    then a top-up to the minimum charge when the total falls short of it.
    """
    with localcontext(EXACT):
        lines: list[InvoiceLine] = []
        charges = {m: Decimal("0.00") for m in Metric}
        used = {m: 0 for m in Metric}
        for t in sorted(
            (t for t in totals if t.tenant_id == tenant_id),
            key=lambda t: (_RANK[t.metric], t.job_type),
        ):
            used[t.metric] += t.quantity
            if t.quantity == 0:
                continue
            unit = UNITS[t.metric]
            quantity = to_units(t.metric, t.quantity)
            rate = plan.rate(t.metric)
            amount = money(quantity * rate)
            charges[t.metric] += amount
            lines.append(
                InvoiceLine(
                    kind=LineKind.usage,
                    description=f"{unit.label}, {t.job_type}" if t.job_type else unit.label,
                    job_type=t.job_type,
                    metric=t.metric.value,
                    quantity=quantity,
                    unit=unit.unit,
                    unit_price=rate,
                    amount=amount,
                )
            )
        if monthly_terms:
            for metric, included in plan.included.items():
                if not used[metric]:
                    continue
                unit = UNITS[metric]
                credited = min(to_units(metric, used[metric]), included)
                amount = money(credited * -plan.rate(metric))
                note = ""
                if amount < -charges[metric]:
                    amount, note = -charges[metric], "capped at the metric's charges"
                if amount:
                    charges[metric] += amount
                    lines.append(
                        InvoiceLine(
                            kind=LineKind.allowance,
                            description=f"{unit.label}: included allowance",
                            job_type="",
                            metric=metric.value,
                            quantity=credited,
                            unit=unit.unit,
                            unit_price=-plan.rate(metric),
                            amount=amount,
                            note=note,
                        )
                    )
        running = sum((line.amount for line in lines), Decimal("0.00"))
        for discount in plan.discounts:
            metrics = discount.applies_to()
            base = sum((charges[m] for m in metrics), Decimal("0.00"))
            if base <= 0:
                continue
            factor = -discount.percent / 100
            amount = money(base * factor)
            note = ""
            if amount < -running:
                amount, note = -running, "capped at the invoice total"
            if amount:
                running += amount
                lines.append(
                    InvoiceLine(
                        kind=LineKind.discount,
                        description=discount.name,
                        job_type="",
                        metric=",".join(m.value for m in discount.metrics) or "all",
                        quantity=base,
                        unit=plan.currency,
                        unit_price=factor,
                        amount=amount,
                        note=note,
                    )
                )
        if monthly_terms and running < plan.minimum_charge:
            top_up = money(plan.minimum_charge - running)
            lines.append(
                InvoiceLine(
                    kind=LineKind.minimum,
                    description=f"Minimum monthly charge ({plain(plan.minimum_charge)} "
                    f"{plan.currency}): top-up",
                    job_type="",
                    metric="",
                    quantity=Decimal(1),
                    unit="month",
                    unit_price=top_up,
                    amount=top_up,
                )
            )
    return Invoice(
        tenant_id=tenant_id,
        currency=plan.currency,
        plan=plan.name,
        plan_sha256=plan.sha256,
        monthly_terms=monthly_terms,
        lines=tuple(lines),
        usage=used,
    )
