"""Billing: exact pricing (property-tested), metering of real runs, atomic reproducible files."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from setlist.billing import invoices, operations
from setlist.billing.metering import (
    InvalidPeriod,
    Period,
    PeriodKind,
    parse_period,
    platform_failure,
    usage_table,
)
from setlist.billing.pricing import (
    UNITS,
    BadUsage,
    LineKind,
    Metric,
    PricePlan,
    aggregate_usage,
    price,
    to_units,
)
from setlist.core.storage import tenant_storage

CENT = Decimal("0.01")
PER_UNIT = {"cpu": 1_000_000, "memory": 1_024_000, "gpu": 1_000, "storage": 10**9, "rows": 1}


def _records(rows):
    return pa.table(
        {
            "tenant_id": [r[0] for r in rows],
            "job_type": [r[1] for r in rows],
            "metric": [r[2] for r in rows],
            "quantity": pa.array([r[3] for r in rows], pa.int64()),
        }
    )


def _round(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def independent_total(rows, tenant: str, plan: PricePlan, monthly: bool) -> Decimal:
    """The invoice total straight from the raw records, with nothing but Python and Decimal."""
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for t, job, metric, q in rows:
        if t == tenant:
            sums[(job, metric)] += q
    rate = {m.value: plan.rates[m] for m in Metric}
    with localcontext() as ctx:
        ctx.prec = 200
        charges: dict[str, Decimal] = defaultdict(Decimal)
        used: dict[str, int] = defaultdict(int)
        for (_job, metric), q in sums.items():
            used[metric] += q
            charges[metric] += _round(Decimal(q) / PER_UNIT[metric] * rate[metric])
        if monthly:
            for m, included in plan.included.items():
                if used[m.value]:
                    credit = min(Decimal(used[m.value]) / PER_UNIT[m.value], included)
                    charges[m.value] += max(-_round(credit * rate[m.value]), -charges[m.value])
        total = sum(charges.values(), Decimal(0))
        for d in plan.discounts:
            base = sum((charges[m.value] for m in (d.metrics or list(Metric))), Decimal(0))
            if base > 0:
                total += max(-_round(base * d.percent / 100), -total)
        if monthly and total < plan.minimum_charge:
            total = plan.minimum_charge
    return total


# ----------------------------------------------------------------------------- periods


def test_periods_parse_and_refuse_with_the_accepted_forms():
    ref = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
    assert parse_period("2026-02-28") == Period(PeriodKind.day, date(2026, 2, 28))
    assert parse_period(" 2026-02 ").label == "2026-02"
    assert parse_period("yesterday", ref).label == "2026-02-28"
    assert parse_period("previous-month", ref).label == "2026-02"
    month = parse_period("2024-02")
    assert len(month.days()) == 29 and month.end - month.start == timedelta(days=29)
    assert month.previous().label == "2024-01" and parse_period("2026-01-01").previous().label == (
        "2025-12-31"
    )
    for bad in ("2026-13", "2026-02-30", "last-week", "26-01", "", "1999-12"):
        with pytest.raises(InvalidPeriod, match="YYYY-MM-DD|before 2000"):
            parse_period(bad)


# ----------------------------------------------------------------------------- pricing


def test_quantities_are_exact_in_billing_units():
    assert to_units(Metric.memory, 1) == Decimal("0.0000009765625")  # 1 MiB·ms in GiB·s
    assert to_units(Metric.cpu, 500 * 1500) == Decimal("0.75")  # 500m for 1.5 s
    assert to_units(Metric.storage, 3 * 86_400) == Decimal("0.000259200")
    assert {u.per_unit for u in UNITS.values()} == set(PER_UNIT.values())


def test_rounding_is_half_up_once_per_line_not_on_the_total():
    plan = PricePlan(rates={"cpu": "0.005", "gpu": "0.004"})
    # one cpu-second: 0.005 exactly → 0.01 (half up); one GPU-second twice: 0.004 → 0.00 each
    totals = aggregate_usage(
        _records(
            [
                ("t", "a", "cpu", 1_000_000),
                ("t", "a", "gpu", 1_000),
                ("t", "b", "gpu", 1_000),
            ]
        )
    )
    inv = price("t", totals, plan, monthly_terms=False)
    assert [(line.description, line.amount) for line in inv.lines] == [
        ("CPU time, a", Decimal("0.01")),
        ("GPU time, a", Decimal("0.00")),
        ("GPU time, b", Decimal("0.00")),
    ]
    assert inv.total == Decimal("0.01")  # not 0.02: the GPU lines were rounded on their own


def test_month_terms_allowance_discount_minimum():
    plan = PricePlan(
        currency="USD",
        rates={"cpu": "0.01"},
        included={"cpu": "100"},
        discounts=[{"name": "CPU commitment", "percent": "10", "metrics": ["cpu"]}],
        minimum_charge="5",
    )
    totals = aggregate_usage(_records([("t", "etl", "cpu", 1_000 * 1_000_000)]))  # 1000 cpu-s
    month = price("t", totals, plan, monthly_terms=True)
    kinds = [(line.kind, line.amount) for line in month.lines]
    assert kinds == [
        (LineKind.usage, Decimal("10.00")),
        (LineKind.allowance, Decimal("-1.00")),
        (LineKind.discount, Decimal("-0.90")),
    ]
    assert month.total == Decimal("8.10") and month.currency == "USD"
    day = price("t", totals, plan, monthly_terms=False)  # statements: rates and discounts only
    assert day.total == Decimal("9.00")
    empty_month = price("t", [], plan, monthly_terms=True)
    assert [line.kind for line in empty_month.lines] == [LineKind.minimum]
    assert empty_month.total == Decimal("5.00")
    assert price("t", [], plan, monthly_terms=False).lines == ()


def test_credits_never_exceed_what_they_credit():
    # Two GPU lines of 0.0149 round to 0.01 each; their 0.0298 credit would round to 0.03.
    plan = PricePlan(rates={"gpu": "0.0149"}, included={"gpu": "10"})
    totals = aggregate_usage(_records([("t", "a", "gpu", 1_000), ("t", "b", "gpu", 1_000)]))
    inv = price("t", totals, plan, monthly_terms=True)
    credit = inv.lines[-1]
    assert (credit.kind, credit.amount, credit.note) == (
        LineKind.allowance,
        Decimal("-0.02"),
        "capped at the metric's charges",
    )
    assert inv.total == Decimal("0.00")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"rates": {"cpu": "-1"}}, "negative"),
        ({"rates": {"cpu": "0.0000000000000000001"}}, "decimal places"),
        ({"rates": {"cpu": "NaN"}}, "finite"),
        ({"rates": {"disk": "1"}}, "disk"),
        ({"currency": "euro"}, "pattern"),
        ({"minimum_charge": "1.005"}, "decimal places"),
        ({"name": "Gold Plan"}, "DNS-1123"),
        ({"discounts": [{"name": "a", "percent": 60}, {"name": "b", "percent": 50}]}, "100%"),
    ],
)
def test_plan_refuses_bad_terms_with_the_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        PricePlan.model_validate(fields)


def test_plan_left_out_rates_are_list_prices_and_it_round_trips():
    plan = PricePlan(rates={"gpu": 1.5})
    assert plan.rates[Metric.gpu] == Decimal("1.5") and plan.rates[Metric.cpu] > 0
    again = PricePlan.model_validate(json.loads(plan.model_dump_json()))
    assert again == plan and again.sha256 == plan.sha256


def test_aggregation_is_exact_beyond_int64_and_refuses_bad_records():
    big = 2**62
    totals = aggregate_usage(_records([("t", "a", "storage", big)] * 5 + [("t", "a", "rows", 1)]))
    assert {t.metric: t.quantity for t in totals} == {Metric.storage: 5 * big, Metric.rows: 1}
    with pytest.raises(BadUsage, match="negative"):
        aggregate_usage(_records([("t", "a", "cpu", -1)]))
    with pytest.raises(BadUsage, match="unknown usage metric 'disk'"):
        aggregate_usage(_records([("t", "a", "disk", 1)]))
    dictionary = _records([("t", "a", "cpu", 3), ("t", "a", "cpu", 4)])
    dictionary = dictionary.set_column(2, "metric", dictionary["metric"].dictionary_encode())
    assert [t.quantity for t in aggregate_usage(dictionary)] == [7]


_decimal = st.integers(0, 12).flatmap(
    lambda places: st.decimals(
        min_value=0, max_value=5, places=places, allow_nan=False, allow_infinity=False
    )
)
_plans = st.builds(
    lambda rates, included, minimum, discounts, currency: PricePlan(
        rates=rates,
        included=included,
        minimum_charge=minimum,
        discounts=discounts,
        currency=currency,
    ),
    st.dictionaries(st.sampled_from(list(Metric)), _decimal),
    st.dictionaries(
        st.sampled_from(list(Metric)),
        st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False),
    ),
    st.decimals(min_value=0, max_value=100, places=2, allow_nan=False),
    st.lists(
        st.builds(
            lambda n, p, ms: {"name": f"discount {n}", "percent": p, "metrics": ms},
            st.integers(0, 9),
            st.decimals(min_value="0.01", max_value=33, places=2, allow_nan=False),
            st.lists(st.sampled_from(list(Metric)), unique=True, max_size=3),
        ),
        max_size=3,
    ),
    st.sampled_from(["EUR", "USD", "SEK"]),
)
_rows = st.lists(
    st.tuples(
        st.sampled_from(["acme", "acme", "other"]),
        st.sampled_from(["canary", "data-etl", "ml-training", ""]),
        st.sampled_from([m.value for m in Metric]),
        st.one_of(st.integers(0, 10**6), st.integers(0, 10**14), st.integers(0, 2**62)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, plan=_plans, monthly=st.booleans())
def test_invoice_total_equals_an_independent_decimal_computation(rows, plan, monthly):
    totals = aggregate_usage(_records(rows)) if rows else []
    inv = price("acme", totals, plan, monthly_terms=monthly)
    assert inv.total == independent_total(rows, "acme", plan, monthly)
    assert inv.total >= 0 and (not monthly or inv.total >= plan.minimum_charge)
    for line in inv.lines:  # every line explains itself: amount = round(quantity × price)
        assert line.amount == line.amount.quantize(CENT)
        if not line.note:
            with localcontext() as ctx:
                ctx.prec = 200
                assert line.amount == _round(line.quantity * line.unit_price)
    assert all(line.job_type in ("canary", "data-etl", "ml-training", "") for line in inv.lines)


# ----------------------------------------------------------------------------- rules


def test_platform_failures_are_not_billed_tenant_failures_are():
    from prefect.client.schemas.objects import StateType

    assert platform_failure(StateType.CRASHED, "pod evicted")
    assert platform_failure(StateType.FAILED, "Submission failed. KeyError")
    assert not platform_failure(StateType.FAILED, "Flow run encountered an exception: boom")
    assert not platform_failure(StateType.CANCELLED, None)
    assert not platform_failure(StateType.COMPLETED, None)


async def test_a_run_across_midnight_is_split_and_never_counted_twice():
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun, State, StateType

    from setlist.billing.metering import running_time

    def at(hours: float) -> datetime:
        return datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=hours)

    # Runs 23:00-23:30, is preempted and rescheduled, runs again 23:45-01:00.
    states = [
        State(type=StateType.SCHEDULED, timestamp=at(22)),
        State(type=StateType.RUNNING, timestamp=at(23)),
        State(type=StateType.SCHEDULED, timestamp=at(23.5)),
        State(type=StateType.PENDING, timestamp=at(23.7)),
        State(type=StateType.RUNNING, timestamp=at(23.75)),
        State(type=StateType.COMPLETED, timestamp=at(25)),
    ]

    class History:
        def __init__(self, states):
            self.states = states

        async def read_flow_run_states(self, run_id):
            return list(reversed(self.states))

    run = FlowRun(
        flow_id=uuid4(),
        start_time=at(23),
        end_time=at(25),
        total_run_time=timedelta(minutes=105),
    )
    first, second = parse_period("2026-11-01"), parse_period("2026-11-02")
    a = await running_time(History(states), run, first.start, first.end)
    b = await running_time(History(states), run, second.start, second.end)
    assert (a, b) == (timedelta(minutes=45), timedelta(minutes=60))
    assert a + b == run.total_run_time
    # Still running when the open day is billed: counted up to then, not beyond.
    active = run.model_copy(update={"end_time": None})
    so_far = await running_time(History(states[:-1]), active, second.start, at(24.5))
    assert so_far == timedelta(minutes=30)


def test_anomaly_above_three_times_the_previous_period():
    usage = {m: 0 for m in Metric} | {Metric.cpu: 301, Metric.memory: 300, Metric.gpu: 5}
    previous = {
        "period": "2026-11-01",
        "usage": {"cpu": {"base": 100}, "memory": {"base": 100}, "gpu": {"base": 0}},
    }
    found = invoices.detect_anomalies(usage, previous)
    assert [(a.metric, a.as_dict()["ratio"]) for a in found] == [
        (Metric.cpu, "3.01"),
        (Metric.gpu, "new usage"),
    ]
    assert invoices.detect_anomalies(usage, None) == []


def _report(storage, period: Period, rows, plan: PricePlan | None = None, now=None):
    records = usage_table(
        [
            {
                "period": period.label,
                "tenant_id": storage.tenant_id,
                "job_type": job,
                "tier": "medium",
                "metric": metric,
                "quantity": q,
                "source": f"flow-run/{n}",
            }
            for n, (job, metric, q) in enumerate(rows)
        ]
    )
    return invoices._report(
        storage.tenant_id,
        period,
        now or period.end + timedelta(hours=1),
        records,
        plan or PricePlan(),
        storage,
        invoices.ANOMALY_FACTOR,
        runs={"billed": len(rows), "running_ms": 0, "excluded": []},
    )


def _files(storage, prefix="billing/"):
    return {k: storage.get_bytes(k) for k in storage.list_keys(prefix)}


def test_html_and_csv_outputs_neutralise_hostile_text(tmp_path):
    from blocks.storage import LocalStorageConfig

    storage = tenant_storage("acme", LocalStorageConfig(root=str(tmp_path)))
    report = _report(storage, parse_period("2026-11-02"), [("<script>x</script>", "cpu", 10**9)])
    page = invoices.invoice_html(report).decode()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "secret" not in page.lower() and str(tmp_path) not in page
    formula = _report(storage, parse_period("2026-11-02"), [("=HYPERLINK(1)", "cpu", 10**9)])
    assert ",'=HYPERLINK(1)," in invoices.lines_csv(formula.invoice).decode()


def test_storage_sample_is_kept_and_a_late_day_carries_the_last_one(tmp_path):
    from blocks.storage import LocalStorageConfig
    from setlist.billing.metering import SAMPLE_GRACE, storage_sample

    storage = tenant_storage("acme", LocalStorageConfig(root=str(tmp_path)))
    storage.put_bytes("raw/a.bin", b"x" * 100)
    first = parse_period("2026-11-01")
    kept = storage_sample(storage, first, first.end + timedelta(minutes=30), keep=True)
    assert (kept.bytes, kept.source) == (100, "measured")
    storage.put_bytes("raw/b.bin", b"y" * 50)  # the store grows; billing outputs don't count
    storage.put_bytes("billing/x/_manifest.json", b"{}" * 1000)
    again = storage_sample(storage, first, first.end + timedelta(days=9), keep=True)
    assert again == kept  # billing the day again gives the same sample
    late = parse_period("2026-11-05")  # not billed until long after it ended
    carried = storage_sample(storage, late, late.end + SAMPLE_GRACE * 2, keep=True)
    assert (carried.bytes, carried.source) == (100, "carried from 2026-11-01")
    recent = parse_period("2026-11-06")
    assert storage_sample(storage, recent, recent.end + SAMPLE_GRACE / 2, keep=False).bytes == 150


# ----------------------------------------------------------------------------- files


def test_publish_is_atomic_and_a_rerun_gives_identical_files(storage_config, monkeypatch):
    storage = tenant_storage("acme", storage_config)
    day = parse_period("2026-11-02")
    rows = [("canary", "cpu", 123_456_789), ("data-etl", "rows", 42), ("", "storage", 10**14)]
    first = invoices.publish(storage, _report(storage, day, rows))
    files = _files(storage)
    assert set(files) == {invoices.manifest_key(day)} | {f["key"] for f in first["files"].values()}
    invoices.publish(storage, _report(storage, day, rows))
    assert _files(storage) == files  # byte for byte, manifest included

    lines = invoices.read_lines(storage, first)
    assert lines.column_names[:3] == ["line", "kind", "description"]
    assert sum(lines["amount"].to_pylist()) == Decimal(first["totals"]["total"])
    csv_text = storage.get_text(first["files"]["csv"]["key"])
    assert csv_text.splitlines()[0].startswith("line,kind,description,job_type,metric,quantity")
    assert len(csv_text.splitlines()) == 1 + first["lines"]

    # A crash before the manifest PUT leaves the published report as it was.
    real_put = type(storage).put_bytes

    def dying_put(self, key, data):
        if key.endswith(invoices.MANIFEST_NAME):
            raise KeyboardInterrupt("killed")
        return real_put(self, key, data)

    monkeypatch.setattr(type(storage), "put_bytes", dying_put)
    with pytest.raises(KeyboardInterrupt):
        invoices.publish(storage, _report(storage, day, rows, PricePlan(currency="USD")))
    monkeypatch.setattr(type(storage), "put_bytes", real_put)
    assert invoices.read_manifest(storage, day) == first

    # A new version replaces the old one; its files go once no version references them.
    second = invoices.publish(storage, _report(storage, day, rows, PricePlan(currency="USD")))
    old = {f["key"] for f in first["files"].values()}
    new = {f["key"] for f in second["files"].values()}
    assert second["currency"] == "USD" and second["retired"] == sorted(old - new)
    assert len(old - new) == 3  # lines, CSV, HTML; the usage records did not change
    third = invoices.publish(storage, _report(storage, day, rows, PricePlan(currency="USD")))
    assert third["retired"] == []
    assert set(storage.list_keys("billing/")) == {invoices.manifest_key(day)} | {
        f["key"] for f in third["files"].values()
    }


def test_a_planted_or_edited_billing_record_is_refused_and_billed_again(tmp_path):
    """The attack: a ``final`` manifest with total 0.00 planted under the tenant's own
    ``billing/`` (its credential can write there). It is not read as a report: the day
    is billed again and the platform's report replaces it; a usage file swapped under a
    sealed manifest, and a planted storage sample, are refused too."""
    from blocks.storage import LocalStorageConfig
    from setlist.billing.metering import storage_sample
    from setlist.core import records

    storage = tenant_storage("acme", LocalStorageConfig(root=str(tmp_path)))
    day, month = parse_period("2026-11-02"), parse_period("2026-11")
    rows = [("canary", "cpu", 10**12), ("data-etl", "rows", 42)]
    real = invoices.publish(storage, _report(storage, day, rows))
    assert real["status"] == "final" and Decimal(real["totals"]["total"]) > 0
    key = invoices.manifest_key(day)
    sealed = storage.get_bytes(key)
    for planted in (
        {**json.loads(sealed), "totals": {**real["totals"], "total": "0.00"}},  # edited
        {**real, "totals": {**real["totals"], "total": "0.00"}},  # no seal at all
    ):
        storage.put_bytes(key, json.dumps(planted).encode())
        assert invoices.read_manifest(storage, day) is None
        now = datetime(2026, 11, 3, 1, tzinfo=UTC)
        assert day in invoices.days_to_produce(storage, month, now)
        assert invoices.publish(storage, _report(storage, day, rows)) == real
        assert storage.get_bytes(key) == sealed
    usage = real["files"]["usage"]["key"]
    storage.put_bytes(usage, invoices._parquet(invoices.USAGE_SCHEMA.empty_table()))
    with pytest.raises(records.UnsealedRecord, match="digest differs"):
        invoices.read_usage(storage, invoices.read_manifest(storage, day))

    storage.put_bytes("raw/a.bin", b"x" * 100)
    sample_key = "billing/samples/storage/2026-11-01.json"
    planted = {"day": "2026-11-01", "bytes": 0, "objects": 0, "sampled_at": "x"}
    storage.put_bytes(sample_key, json.dumps(planted).encode())
    first = parse_period("2026-11-01")
    kept = storage_sample(storage, first, first.end + timedelta(minutes=30), keep=True)
    assert kept.bytes == 100
    assert records.read_record(storage, sample_key)["bytes"] == 100


# ----------------------------------------------------------------------------- real runs

WORK_EVENTS = "\n".join(
    json.dumps(
        {
            "event_id": f"e{n}",
            "user_id": f"u{n % 3}",
            "track_id": f"t{n}",
            "artist_id": "a",
            "ts": "2026-11-02T10:00:00+00:00",
            "ms_played": 1000 + n,
        }
    )
    for n in range(7)
)


@pytest.fixture
async def tenants(client, tenant_id):
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    other = f"{tenant_id[:40]}-other"
    for tid in (tenant_id, other):
        await create_tenant(client, TenantSpec(tenant_id=tid))
    return tenant_id, other


async def _finish(client, run_id, final, pause: float = 0.05):
    """Move a submitted run through Pending and Running, as a worker would."""
    from prefect.states import Pending, Running

    await client.set_flow_run_state(run_id, Pending())
    if final.name == "Failed" and (final.message or "").startswith("Submission failed"):
        await client.set_flow_run_state(run_id, final)
        return
    await client.set_flow_run_state(run_id, Running())
    await asyncio.sleep(pause)
    await client.set_flow_run_state(run_id, final)


@pytest.mark.server
async def test_day_invoice_from_real_runs(client, tenants, monkeypatch):
    from prefect import tags
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.states import Completed, Crashed, Failed

    from flows.billing import billing_report
    from flows.etl import data_etl
    from setlist.billing.metering import storage_sample
    from setlist.core.storage import load_storage_config
    from setlist.core.tenancy import TIERS, ResourceTier
    from setlist.tenants import submit as submitting
    from tests.helpers import wait_for_events

    tid, other = tenants
    storage = tenant_storage(tid, await load_storage_config("setlist-storage"))
    storage.put_text("raw/events.jsonl", WORK_EVENTS)

    outcomes = {
        "completed": Completed(),
        "tenant-failed": Failed(message="Flow run encountered an exception: ValueError"),
        "crashed": Crashed(message="pod evicted"),
        "not-started": Failed(message="Submission failed. ApiException"),
    }
    runs = {}
    for label, state in outcomes.items():
        sub = await submitting.submit(client, "canary", tid, "normal", "small", {})
        await _finish(client, sub.flow_run_id, state)
        runs[label] = sub.flow_run_id
    # A run form asking for almost nothing still holds (and pays for) its tier's share.
    plan = await submitting.plan("canary", tid, "normal", "small")
    dep = await client.read_deployment_by_name(plan.deployment)
    cheap = await client.create_flow_run_from_deployment(
        dep.id,
        parameters=plan.parameters,
        work_queue_name=plan.work_queue,
        job_variables={**plan.job_variables, "cpu": "1m", "memory": "1Mi"},
        tags=plan.tags,
    )
    await _finish(client, cheap.id, Completed())
    runs["cheap"] = cheap.id
    foreign = await submitting.submit(client, "canary", other, "normal", None, {})
    await _finish(client, foreign.flow_run_id, Completed())
    with tags("setlist", f"tenant:{tid}", "job:data-etl", "tier:large"):
        etl = await data_etl(tenant_id=tid)
    assert etl.loaded_rows == 7

    ran = {k: await client.read_flow_run(v) for k, v in runs.items()}
    day = Period(PeriodKind.day, ran["completed"].start_time.astimezone(UTC).date())
    if any(r.end_time and r.end_time >= day.end for r in ran.values()):
        pytest.skip("the runs crossed midnight UTC; the split is tested with fixed states")
    monkeypatch.setattr(invoices, "utcnow", lambda: day.end + timedelta(minutes=30))

    previous = await billing_report(tenant_id=tid, period=day.previous().label)
    assert previous.status == "final" and previous.total == "0.00"
    summary = await billing_report(tenant_id=tid, period=day.label)
    assert summary.status == "final" and summary.period == day.label

    manifest = invoices.read_manifest(storage, day)
    usage = invoices.read_usage(storage, manifest).to_pylist()
    sources = {r["source"] for r in usage}
    assert f"flow-run/{foreign.flow_run_id}" not in sources
    assert all(r["tenant_id"] == tid for r in usage)
    billed = {label: f"flow-run/{runs[label]}" in sources for label in runs}
    assert billed == {
        "completed": True,
        "tenant-failed": True,
        "crashed": False,
        "not-started": False,
        "cheap": True,
    }
    assert {r["reason"][:7] for r in manifest["runs"]["excluded"]} == {"crashed", "not sta"}
    page = storage.get_text(manifest["files"]["html"]["key"])
    assert str(runs["crashed"]) in page and str(runs["not-started"]) in page

    small = TIERS[ResourceTier.small]
    for label in ("completed", "tenant-failed", "cheap"):
        ms = ran[label].total_run_time // timedelta(milliseconds=1)
        mine = {r["metric"]: r["quantity"] for r in usage if r["source"].endswith(str(runs[label]))}
        assert mine == {"cpu": small.millicpu * ms, "memory": small.memory_mib * ms}
    rows = [r for r in usage if r["metric"] == "rows"]
    assert [(r["job_type"], r["tier"], r["quantity"]) for r in rows] == [("data-etl", "large", 7)]
    sample = storage_sample(storage, day, day.end, keep=False)  # the kept sample
    (stored,) = [r["quantity"] for r in usage if r["metric"] == "storage"]
    onboarded = (await operations.tenant_handles(tid))[0].created_at
    held = int((day.end - max(onboarded, day.start)).total_seconds())  # not before onboarding
    assert sample.bytes > 0 and stored == sample.bytes * held
    assert manifest["storage_sample"]["bytes"] == sample.bytes

    expected = independent_total(
        [(r["tenant_id"], r["job_type"], r["metric"], r["quantity"]) for r in usage],
        tid,
        PricePlan(),
        monthly=False,
    )
    assert summary.total == f"{expected:.2f}" == manifest["totals"]["total"]
    # The day before had no usage at all (the tenant did not exist yet): all of it is new.
    assert {a["metric"] for a in summary.anomalies} == {"cpu", "memory", "rows", "storage"}

    before = _files(storage, f"billing/{day.label}")
    sample_bytes = storage.get_bytes(f"billing/samples/storage/{day.label}.json")
    storage.put_text("raw/more.jsonl", WORK_EVENTS)  # storage grows after the day ended
    again = await billing_report(tenant_id=tid, period=day.label)
    assert again == summary
    assert _files(storage, f"billing/{day.label}") == before
    assert storage.get_bytes(f"billing/samples/storage/{day.label}.json") == sample_bytes

    await wait_for_events(client, tid, "setlist.billing.completed", count=3)
    anomalies = await wait_for_events(client, tid, "setlist.billing.anomaly", count=4)
    assert len(anomalies) == 4  # the rerun raised no second alert
    assert anomalies[0].resource["setlist.tenant"] == tid
    artifacts = await client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"billing-{tid}"]))
    )
    assert artifacts and "| **total** |" in artifacts[0].data


@pytest.mark.server
async def test_empty_month_gives_a_minimum_invoice_rolled_up_from_valid_days(
    client, tenant_id, monkeypatch
):
    from flows.billing import billing_report
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    await create_tenant(client, TenantSpec(tenant_id=tenant_id, labels={"price-plan": "floor"}))
    with pytest.raises(Exception, match="price plan 'floor', which does not exist"):
        await operations.obtain_report(client, tenant_id, "2026-01-05")
    await invoices.save_plan(PricePlan(name="floor", currency="USD", minimum_charge="25"))
    month = parse_period("2026-02")
    monkeypatch.setattr(invoices, "utcnow", lambda: datetime(2026, 11, 1, tzinfo=UTC))

    summary = await billing_report(tenant_id=tenant_id, period="2026-02")
    assert (summary.status, summary.total, summary.currency) == ("final", "25.00", "USD")
    assert summary.reports == [d.label for d in month.days()] + ["2026-02"]
    _, storage = await operations.tenant_handles(tenant_id)
    manifest = invoices.read_manifest(storage, month)
    assert manifest["days"] == [d.label for d in month.days()]
    lines = invoices.read_lines(storage, manifest)
    assert lines["kind"].to_pylist() == ["minimum"]
    day = invoices.read_manifest(storage, month.days()[3])
    assert day["totals"]["total"] == "0.00" and day["lines"] == 0
    assert invoices.read_lines(storage, day).num_rows == 0
    assert "No usage in this period" in storage.get_text(day["files"]["html"]["key"])
    assert storage.get_text(day["files"]["csv"]["key"]).count("\n") == 1

    with pytest.raises(InvalidPeriod, match="in the future"):
        await billing_report(tenant_id=tenant_id, period="2026-12")


@pytest.mark.server
def test_cli_prints_the_invoice_table(prefect_server, tenant_id, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from setlist.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["tenant", "create", tenant_id]).exit_code == 0
    plan = tmp_path / "plan.yaml"
    plan.write_text('currency: SEK\nminimum_charge: "9.5"\nrates: {cpu: "0.00002"}\n')
    r = runner.invoke(app, ["billing", "plan", "set", "nordic", str(plan), "--tenant", tenant_id])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["billing", "plan", "show", "--tenant", tenant_id])
    assert json.loads(r.output)["rates"]["cpu"] == "0.00002"

    monkeypatch.setattr(invoices, "utcnow", lambda: datetime(2026, 11, 3, 1, tzinfo=UTC))
    r = runner.invoke(app, ["billing", "report", "--tenant", tenant_id, "--period", "2026-11-02"])
    assert r.exit_code == 0, r.output
    assert "2026-11-02 (final), plan nordic" in r.output and "0.00" in r.output
    r = runner.invoke(app, ["billing", "report", "-t", tenant_id, "--period", "2026-11", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)["report"]
    assert report["status"] == "provisional" and report["totals"]["total"] == "9.50"
    assert report["days"] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    r = runner.invoke(app, ["billing", "report", "-t", tenant_id, "--period", "2026-13"])
    assert r.exit_code == 2 and "not understood" in r.output
    r = runner.invoke(app, ["billing", "plan", "set", "bad", str(plan.with_suffix(".none"))])
    assert r.exit_code == 2 and "can't read plan file" in r.output
