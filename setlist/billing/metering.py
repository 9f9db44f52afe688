"""Metering: a tenant's usage records for one UTC day, from the Prefect API and its storage.

A usage record is one row (period, tenant_id, job_type, tier, metric, quantity, source)
with an exact integer ``quantity`` in the metric's base unit (``setlist.billing.pricing.UNITS``).

Rules (the README's "Billing" section states them for tenants):

- Compute. Every flow run of the tenant (tags ``setlist`` and ``tenant:<id>``, and no
  other tenant's tag) is metered for the time it spent Running inside the day, so a run
  across midnight is split at midnight and never counted twice, times what it requested:
  cpu and memory from its job variables (the deployment's, overridden by the run's, as
  the worker resolves them), never less than its tier's (the process pool enforces no
  request, so a run asking for ``cpu: 1m`` still holds its tier's share); GPUs from its
  ``gpu`` job variable.
  Time in Scheduled or Pending is not billed.
- Failed runs. A run that ended Crashed (its infrastructure failed: pod evicted or
  preempted, node lost, worker or process died) or Failed with "Submission failed" (the
  worker could not start it) failed because of the platform and is not billed at all.
  A run that failed in the tenant's own code (Failed) or was cancelled is billed for the
  time it ran. A run still active when its day is billed is billed for its time so far.
- Storage. The bytes under the tenant's prefix (its ``billing/`` outputs excluded),
  sampled once per day and kept under ``billing/samples/``, times the seconds of the day
  since the tenant was onboarded: byte-seconds. A day's sample is taken the first time
  the ended day is billed (the daily schedule does so just after midnight) and reused
  when it is billed again; a day first billed long after it ended carries the last kept
  sample before it forward.
- Data processed. ``loaded_rows`` of every data-etl run that completed in the day, from
  the run's own load-summary table artifact; a load belongs to the day it ended in.
"""

from __future__ import annotations

import calendar
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

import pyarrow as pa
import pyarrow.compute as pc
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterStartTime,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound

from setlist.billing.pricing import Metric
from setlist.core import records
from setlist.core.storage import ObjectNotFound as NoObject
from setlist.core.storage import TenantStorage
from setlist.core.tenancy import (
    TIERS,
    JobType,
    ResourceTier,
    SetlistError,
    cpu_to_millicpu,
    memory_to_mib,
    tier_for,
)

BILLING_PREFIX = "billing/"
SAMPLES_PREFIX = "billing/samples/storage/"
log = logging.getLogger(__name__)
_PAGE = 200
_MS = timedelta(milliseconds=1)


# ----------------------------------------------------------------------------- periods


class InvalidPeriod(SetlistError):
    pass


class PeriodKind(StrEnum):
    day = "day"
    month = "month"


@dataclass(frozen=True, order=True)
class Period:
    """A UTC day or a UTC calendar month; ``end`` is exclusive."""

    kind: PeriodKind
    first: date

    @property
    def label(self) -> str:
        return (
            self.first.isoformat() if self.kind is PeriodKind.day else self.first.strftime("%Y-%m")
        )

    @property
    def start(self) -> datetime:
        return datetime.combine(self.first, time(0), tzinfo=UTC)

    @property
    def end(self) -> datetime:
        if self.kind is PeriodKind.day:
            return self.start + timedelta(days=1)
        days = calendar.monthrange(self.first.year, self.first.month)[1]
        return self.start + timedelta(days=days)

    def days(self) -> list[Period]:
        if self.kind is PeriodKind.day:
            return [self]
        count = (self.end - self.start).days
        return [Period(PeriodKind.day, self.first + timedelta(days=n)) for n in range(count)]

    def previous(self) -> Period:
        if self.kind is PeriodKind.day:
            return Period(PeriodKind.day, self.first - timedelta(days=1))
        last = self.first - timedelta(days=1)
        return Period(PeriodKind.month, last.replace(day=1))

    def __str__(self) -> str:
        return self.label


_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
PERIOD_FORMS = "YYYY-MM-DD (a UTC day), YYYY-MM (a UTC month), 'yesterday' or 'previous-month'"


def parse_period(value: str, reference: datetime | None = None) -> Period:
    """A period from its label; 'yesterday' and 'previous-month' count from ``reference``."""
    text = str(value).strip().lower()
    ref = (reference or datetime.now(UTC)).astimezone(UTC).date()
    if text == "yesterday":
        return Period(PeriodKind.day, ref - timedelta(days=1))
    if text == "previous-month":
        return Period(PeriodKind.month, (ref.replace(day=1) - timedelta(days=1)).replace(day=1))
    try:
        if m := _DAY.match(text):
            first = date(int(m[1]), int(m[2]), int(m[3]))
            kind = PeriodKind.day
        elif m := _MONTH.match(text):
            first = date(int(m[1]), int(m[2]), 1)
            kind = PeriodKind.month
        else:
            raise ValueError
    except ValueError:
        raise InvalidPeriod(f"period {value!r} not understood; use {PERIOD_FORMS}") from None
    if first.year < 2000:
        raise InvalidPeriod(f"period {value!r} is before 2000; nothing was metered then")
    return Period(kind, first)


def check_started(period: Period, now: datetime) -> None:
    if period.start > now:
        raise InvalidPeriod(
            f"period {period.label} starts {period.start.isoformat()}, in the future; "
            "only periods that have started can be metered"
        )


def as_of(period: Period, now: datetime) -> datetime:
    """Where metering of ``period`` stops: its end once it has ended, else now."""
    return min(period.end, now)


# ----------------------------------------------------------------------------- records

USAGE_SCHEMA = pa.schema(
    [
        ("period", pa.string()),
        ("tenant_id", pa.string()),
        ("job_type", pa.string()),
        ("tier", pa.string()),
        ("metric", pa.string()),
        ("quantity", pa.int64()),
        ("source", pa.string()),
    ]
)
_SORT = [(c, "ascending") for c in ("period", "metric", "job_type", "source", "tier")]


def usage_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Records in their canonical order: the same usage always gives the same table."""
    table = pa.Table.from_pylist(rows, schema=USAGE_SCHEMA)
    return canonical_usage(table)


def canonical_usage(table: pa.Table) -> pa.Table:
    table = table.select(USAGE_SCHEMA.names).cast(USAGE_SCHEMA)
    if table.num_rows == 0:
        return USAGE_SCHEMA.empty_table()
    return table.take(pc.sort_indices(table, sort_keys=_SORT)).combine_chunks()


# ----------------------------------------------------------------------------- runs


@dataclass
class RunMeter:
    """What one run of the tenant used inside the period, and whether it is billed."""

    run_id: str
    name: str
    job_type: str
    tier: str
    state: str
    end_time: datetime | None
    running_ms: int
    millicpu: int
    memory_mib: int
    gpu: int
    billed: bool
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "name": self.name,
            "job_type": self.job_type,
            "tier": self.tier,
            "state": self.state,
            "running_ms": self.running_ms,
            "reason": self.reason,
        }


def platform_failure(state_type: StateType | None, message: str | None) -> str:
    """Why a run's failure is the platform's (so it is not billed), or '' when it is not."""
    if state_type == StateType.CRASHED:
        return "crashed: its infrastructure failed"
    if state_type == StateType.FAILED and (message or "").startswith("Submission failed"):
        return "not started: the worker could not submit it"
    return ""


def run_tenants(run: FlowRun) -> set[str]:
    return {t.split(":", 1)[1] for t in run.tags if t.startswith("tenant:")}


def _tag(run: FlowRun, key: str) -> str | None:
    for t in run.tags:
        if t.startswith(f"{key}:"):
            return t.split(":", 1)[1]
    return None


async def read_period_runs(
    client: PrefectClient, tenant_id: str, start: datetime, until: datetime
) -> list[FlowRun]:
    """The tenant's runs that were started before ``until`` and had not ended by ``start``."""
    tags = FlowRunFilterTags(all_=["setlist", f"tenant:{tenant_id}"])
    filters = [
        FlowRunFilter(
            tags=tags,
            start_time=FlowRunFilterStartTime(before_=until),
            end_time=FlowRunFilterEndTime(after_=start),
        ),
        FlowRunFilter(
            tags=tags,
            start_time=FlowRunFilterStartTime(before_=until),
            end_time=FlowRunFilterEndTime(is_null_=True),
        ),
    ]
    runs: dict[UUID, FlowRun] = {}
    for flt in filters:
        offset = 0
        while True:
            page = await client.read_flow_runs(
                flow_run_filter=flt, sort=FlowRunSort.ID_DESC, limit=_PAGE, offset=offset
            )
            runs.update((r.id, r) for r in page)
            if len(page) < _PAGE:
                break
            offset += _PAGE
    return [runs[k] for k in sorted(runs, key=str)]


def _overlap(a: datetime, b: datetime, lo: datetime, hi: datetime) -> timedelta:
    return max(min(b, hi) - max(a, lo), timedelta(0))


async def running_time(
    client: PrefectClient, run: FlowRun, start: datetime, until: datetime
) -> timedelta:
    """Time the run spent Running between ``start`` and ``until``.

    A run that lies wholly inside uses the server's own running total; one that crosses
    a boundary (or is still active) is clipped interval by interval from its states.
    """
    if run.start_time is None:
        return timedelta(0)
    if run.end_time is not None and run.start_time >= start and run.end_time <= until:
        return run.total_run_time
    states = sorted(await client.read_flow_run_states(run.id), key=lambda s: s.timestamp)
    total = timedelta(0)
    for i, state in enumerate(states):
        if state.type != StateType.RUNNING:
            continue
        stop = states[i + 1].timestamp if i + 1 < len(states) else (run.end_time or until)
        total += _overlap(state.timestamp, stop, start, until)
    return total


class _Resources:
    """Resolves what a run requested, reading each deployment once."""

    def __init__(self, client: PrefectClient, tier_overrides: dict[JobType, ResourceTier]):
        self.client = client
        self.overrides = tier_overrides
        self.deployments: dict[UUID, dict[str, Any]] = {}
        self.flows: dict[UUID, str] = {}

    async def job_type(self, run: FlowRun) -> str:
        tagged = _tag(run, "job")
        if tagged:
            return tagged
        if run.flow_id not in self.flows:
            try:
                self.flows[run.flow_id] = (await self.client.read_flow(run.flow_id)).name
            except ObjectNotFound:
                self.flows[run.flow_id] = "unknown"
        return self.flows[run.flow_id]

    async def job_variables(self, run: FlowRun) -> dict[str, Any]:
        deployed: dict[str, Any] = {}
        if run.deployment_id is not None:
            if run.deployment_id not in self.deployments:
                try:
                    dep = await self.client.read_deployment(run.deployment_id)
                    self.deployments[run.deployment_id] = dict(dep.job_variables or {})
                except ObjectNotFound:
                    self.deployments[run.deployment_id] = {}
            deployed = self.deployments[run.deployment_id]
        return {**deployed, **(run.job_variables or {})}

    def tier(self, job_type: str, variables: dict[str, Any], run: FlowRun) -> ResourceTier:
        for candidate in (variables.get("tier"), _tag(run, "tier")):
            try:
                return ResourceTier(str(candidate))
            except ValueError:
                continue
        try:
            return tier_for(JobType(job_type), self.overrides)
        except ValueError:
            return ResourceTier.medium


def _quantity(parse, value: Any, floor: int) -> int:
    """What a run requested, never less than its tier's ``floor``."""
    try:
        return max(parse(str(value)), floor) if value is not None else floor
    except SetlistError:
        return floor


async def meter_runs(
    client: PrefectClient,
    tenant_id: str,
    start: datetime,
    until: datetime,
    tier_overrides: dict[JobType, ResourceTier] | None = None,
) -> list[RunMeter]:
    """One meter per run of the tenant active between ``start`` and ``until``."""
    resources = _Resources(client, tier_overrides or {})
    meters = []
    for run in await read_period_runs(client, tenant_id, start, until):
        if run_tenants(run) != {tenant_id}:
            continue  # a run naming another tenant is never billed to this one
        job_type = await resources.job_type(run)
        variables = await resources.job_variables(run)
        tier = resources.tier(job_type, variables, run)
        res = TIERS[tier]
        reason = platform_failure(run.state_type, run.state.message if run.state else None)
        elapsed = await running_time(client, run, start, until)
        try:
            gpu = max(int(variables.get("gpu") or 0), 0)
        except (TypeError, ValueError):
            gpu = 0
        meters.append(
            RunMeter(
                run_id=str(run.id),
                name=run.name,
                job_type=job_type,
                tier=tier.value,
                state=run.state_type.value if run.state_type else "UNKNOWN",
                end_time=run.end_time,
                running_ms=elapsed // _MS,
                millicpu=_quantity(cpu_to_millicpu, variables.get("cpu"), res.millicpu),
                memory_mib=_quantity(memory_to_mib, variables.get("memory"), res.memory_mib),
                gpu=gpu,
                billed=not reason,
                reason=reason,
            )
        )
    return meters


async def etl_loaded_rows(
    client: PrefectClient, tenant_id: str, meters: list[RunMeter], start: datetime, until: datetime
) -> dict[str, int]:
    """run id → rows loaded, for the data-etl runs that completed in [start, until)."""
    runs = [
        m
        for m in meters
        if m.job_type == JobType.data_etl.value
        and m.state == StateType.COMPLETED.value
        and m.end_time is not None
        and start <= m.end_time < until
    ]
    loaded: dict[str, tuple[datetime, int]] = {}
    for chunk in range(0, len(runs), _PAGE):
        ids = [UUID(m.run_id) for m in runs[chunk : chunk + _PAGE]]
        offset = 0
        while True:
            page = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=ids),
                    key=ArtifactFilterKey(any_=[f"etl-{tenant_id}"]),
                ),
                limit=_PAGE,
                offset=offset,
            )
            for artifact in page:
                rows = _loaded_rows(artifact.data)
                run_id = str(artifact.flow_run_id)
                created = artifact.created or datetime.min.replace(tzinfo=UTC)
                if rows is not None and (run_id not in loaded or loaded[run_id][0] < created):
                    loaded[run_id] = (created, rows)
            if len(page) < _PAGE:
                break
            offset += _PAGE
    return {run_id: rows for run_id, (_, rows) in sorted(loaded.items())}


def _loaded_rows(data: Any) -> int | None:
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            return None
    if not isinstance(data, list):
        return None
    for row in data:
        if isinstance(row, dict) and row.get("metric") == "loaded_rows":
            try:
                return max(int(row.get("value")), 0)
            except (TypeError, ValueError):
                return None
    return None


# ----------------------------------------------------------------------------- storage


# A day billed later than this after it ended gets no fresh sample (storage has changed
# since): it carries the last kept sample before it forward.
SAMPLE_GRACE = timedelta(hours=48)


@dataclass(frozen=True)
class StorageSample:
    day: str
    bytes: int
    objects: int
    sampled_at: str
    source: str = "measured"  # or "carried from YYYY-MM-DD"


def measure_storage(storage: TenantStorage) -> tuple[int, int]:
    """(bytes, objects) under the tenant's prefix, its billing outputs excluded."""
    size = count = 0
    for key, n in storage.iter_objects(""):
        if key.startswith(BILLING_PREFIX):
            continue
        size += n
        count += 1
    return size, count


def _sample_key(label: str) -> str:
    return f"{SAMPLES_PREFIX}{label}.json"


def _kept_sample(storage: TenantStorage, label: str) -> StorageSample | None:
    """The kept sample of the day; None when there is none, or none the platform sealed
    (a planted sample would set what storage costs: it is measured again instead)."""
    try:
        return StorageSample(**records.read_record(storage, _sample_key(label)))
    except NoObject:
        return None
    except (records.UnsealedRecord, TypeError) as exc:
        log.warning("storage sample %s of %s refused: %s", label, storage.tenant_id, exc)
        return None


def storage_sample(
    storage: TenantStorage, day: Period, now: datetime, *, keep: bool
) -> StorageSample:
    """The day's storage sample: the kept one if there is one, else a new one.

    A new sample is measured now, unless the day ended more than ``SAMPLE_GRACE`` ago:
    then the last kept sample before the day is carried forward (measured now only when
    there is none). With ``keep`` (the day has ended) a new sample is kept, so billing
    the day again gives the same quantity.
    """
    kept = _kept_sample(storage, day.label)
    if kept is not None:
        return kept
    stamp = now.astimezone(UTC).isoformat()
    earlier = sorted(
        key.removeprefix(SAMPLES_PREFIX).removesuffix(".json")
        for key in storage.list_keys(SAMPLES_PREFIX)
        if key.endswith(".json") and key.removeprefix(SAMPLES_PREFIX) < f"{day.label}.json"
    )
    carried = _kept_sample(storage, earlier[-1]) if earlier else None
    if now - day.end > SAMPLE_GRACE and carried is not None:
        sample = StorageSample(
            day.label, carried.bytes, carried.objects, stamp, f"carried from {carried.day}"
        )
    else:
        size, count = measure_storage(storage)
        sample = StorageSample(day.label, size, count, stamp)
    if keep:
        records.write_record(storage, _sample_key(day.label), sample.__dict__)
    return sample


# ----------------------------------------------------------------------------- a day


@dataclass
class DayUsage:
    period: Period
    as_of: datetime
    final: bool
    records: pa.Table
    runs: list[RunMeter] = field(default_factory=list)
    storage: StorageSample | None = None
    etl_rows: dict[str, int] = field(default_factory=dict)


async def meter_day(
    client: PrefectClient,
    storage: TenantStorage,
    tenant_id: str,
    day: Period,
    now: datetime,
    tier_overrides: dict[JobType, ResourceTier] | None = None,
    billable_from: datetime | None = None,
) -> DayUsage:
    """Every usage record of the tenant for one UTC day (up to now if it hasn't ended).

    Storage is billed from ``billable_from`` on (the tenant's onboarding), never before.
    """
    if day.kind is not PeriodKind.day:
        raise InvalidPeriod(f"{day.label} is not a day")
    check_started(day, now)
    until = as_of(day, now)
    final = until == day.end
    meters = await meter_runs(client, tenant_id, day.start, until, tier_overrides)
    rows: list[dict[str, Any]] = []

    def record(job_type: str, tier: str, metric: Metric, quantity: int, source: str) -> None:
        if quantity:
            rows.append(
                {
                    "period": day.label,
                    "tenant_id": tenant_id,
                    "job_type": job_type,
                    "tier": tier,
                    "metric": metric.value,
                    "quantity": quantity,
                    "source": source,
                }
            )

    for m in meters:
        if not m.billed:
            continue
        source = f"flow-run/{m.run_id}"
        record(m.job_type, m.tier, Metric.cpu, m.millicpu * m.running_ms, source)
        record(m.job_type, m.tier, Metric.memory, m.memory_mib * m.running_ms, source)
        record(m.job_type, m.tier, Metric.gpu, m.gpu * m.running_ms, source)
    etl = await etl_loaded_rows(client, tenant_id, meters, day.start, until)
    tiers = {m.run_id: m.tier for m in meters}
    for run_id, loaded in etl.items():
        record(JobType.data_etl.value, tiers[run_id], Metric.rows, loaded, f"flow-run/{run_id}")
    held_from = max(day.start, billable_from or day.start)
    seconds = max(int((until - held_from).total_seconds()), 0)
    sample = storage_sample(storage, day, now, keep=final) if seconds else None
    if sample is not None:
        record("", "", Metric.storage, sample.bytes * seconds, f"storage/{day.label}")
    return DayUsage(
        period=day,
        as_of=until,
        final=final,
        records=usage_table(rows),
        runs=meters,
        storage=sample,
        etl_rows=etl,
    )
