"""Operator reports over the Prefect API's run history.

``performance`` answers, per job type over a period: how many runs finished, what
share succeeded (SEED's floor: 99.5%), P50/P95 run time against the job type's SLA,
and how long runs waited in their queue (start minus expected start).

``resources`` compares what runs asked for (their tier's cpu and memory) with what they
used — the CPU seconds and peak memory each flow's process labels its run with when it
ends (``setlist.tenants.runtime.record_usage``) — and recommends the smallest tier that keeps
P95 use under SEED's targets (CPU < 80%, memory < 85% of the request). Runs without
usage labels (started before the hook existed, or killed) are left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType

from setlist.core.tenancy import JOB_DEADLINE_SECONDS, JobType, SetlistError
from setlist.observability.metrics import SLA_SUCCESS_RATIO

PAGE = 200
FINISHED = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
FINISHED_NAMES = ("completed", "failed", "crashed", "cancelled")

CPU_TARGET, MEMORY_TARGET = 0.80, 0.85
CPU_LABEL, RSS_LABEL = "setlist.usage.cpu_s", "setlist.usage.max_rss_mib"


@dataclass(frozen=True)
class FinishedRun:
    job_type: str
    state: str  # completed / failed / crashed / cancelled
    seconds: float  # time in Running
    wait_seconds: float | None  # start − expected start; None if it never started
    tier: str | None = None
    cpu_s: float | None = None  # CPU seconds the run's process used
    max_rss_mib: float | None = None


@dataclass
class JobTypePerformance:
    job_type: str
    runs: int
    completed: int
    failed: int
    crashed: int
    cancelled: int
    success_rate: float | None
    p50_s: float | None
    p95_s: float | None
    sla_s: int | None
    p95_within_sla: bool | None
    wait_p50_s: float | None
    wait_p95_s: float | None
    meets_success_sla: bool | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_since(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m`` → a duration; anything else is refused."""
    units = {"d": "days", "h": "hours", "m": "minutes"}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit() or int(number) == 0:
        raise SetlistError(f"period {text!r} is not like 7d, 12h or 30m")
    return timedelta(**{units[unit]: int(number)})


def _q(values: list[float], q: float) -> float | None:
    return round(float(np.quantile(values, q, method="linear")), 3) if values else None


def performance(runs: list[FinishedRun]) -> list[JobTypePerformance]:
    """Per job type: counts, success rate, P50/P95 of completed runs' time, queue wait."""
    rows = []
    for job_type in sorted({r.job_type for r in runs}):
        mine = [r for r in runs if r.job_type == job_type]
        n = {s: sum(1 for r in mine if r.state == s) for s in FINISHED_NAMES}
        decided = n["completed"] + n["failed"] + n["crashed"]
        times = [r.seconds for r in mine if r.state == "completed"]
        waits = [r.wait_seconds for r in mine if r.wait_seconds is not None]
        try:
            sla = JOB_DEADLINE_SECONDS[JobType(job_type)]
        except ValueError:
            sla = None
        p95 = _q(times, 0.95)
        rate = round(n["completed"] / decided, 5) if decided else None
        rows.append(
            JobTypePerformance(
                job_type=job_type,
                runs=len(mine),
                **n,
                success_rate=rate,
                p50_s=_q(times, 0.5),
                p95_s=p95,
                sla_s=sla,
                p95_within_sla=(p95 <= sla) if p95 is not None and sla else None,
                wait_p50_s=_q(waits, 0.5),
                wait_p95_s=_q(waits, 0.95),
                meets_success_sla=(rate >= SLA_SUCCESS_RATIO) if rate is not None else None,
            )
        )
    return rows


def finished_run(run: Any) -> FinishedRun | None:
    job = next((t[4:] for t in run.tags if t.startswith("job:")), None)
    if job is None or run.state_type is None:
        return None
    wait = None
    if run.start_time and run.expected_start_time:
        wait = max((run.start_time - run.expected_start_time).total_seconds(), 0.0)
    labels = run.labels or {}
    tier = (run.job_variables or {}).get("tier") or next(
        (t[5:] for t in run.tags if t.startswith("tier:")), None
    )
    return FinishedRun(
        job_type=job,
        state=run.state_type.value.lower(),
        seconds=run.total_run_time.total_seconds(),
        wait_seconds=wait,
        tier=tier,
        cpu_s=_number(labels.get(CPU_LABEL)),
        max_rss_mib=_number(labels.get(RSS_LABEL)),
    )


def _ratio(used: float | None, requested: float | None) -> float | None:
    return round(used / requested, 4) if used is not None and requested else None


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


@dataclass
class JobTypeResources:
    job_type: str
    runs_measured: int
    runs_unmeasured: int
    requested_tier: str | None
    requested_cpu: float | None  # cores
    requested_memory_mib: int | None
    cpu_p95: float | None  # cores, averaged over each run's time
    memory_p95_mib: float | None
    cpu_use: float | None  # P95 cores ÷ requested cores
    memory_use: float | None
    recommended_tier: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resources(runs: list[FinishedRun]) -> list[JobTypeResources]:
    """Requested vs used per job type, and the smallest tier that fits P95 use."""
    from setlist.core.tenancy import DEFAULT_TIER, TIERS, ResourceTier

    rows = []
    for job_type in sorted({r.job_type for r in runs}):
        mine = [r for r in runs if r.job_type == job_type]
        measured = [r for r in mine if r.cpu_s is not None and r.max_rss_mib and r.seconds > 0]
        tiers = [r.tier for r in measured if r.tier] or [r.tier for r in mine if r.tier]
        tier_name = max(set(tiers), key=tiers.count) if tiers else None
        if tier_name is None:
            try:
                tier_name = DEFAULT_TIER[JobType(job_type)].value
            except ValueError:
                tier_name = None
        known = tier_name in {t.value for t in ResourceTier}
        req = TIERS[ResourceTier(tier_name)] if known else None
        cores = _q([r.cpu_s / r.seconds for r in measured], 0.95)
        rss = _q([r.max_rss_mib for r in measured], 0.95)
        recommended = None
        if cores is not None and rss is not None:
            fits = [
                t
                for t in ResourceTier
                if TIERS[t].millicpu / 1000 * CPU_TARGET >= cores
                and TIERS[t].memory_mib * MEMORY_TARGET >= rss
            ]
            recommended = fits[0].value if fits else ResourceTier.enterprise.value
        rows.append(
            JobTypeResources(
                job_type=job_type,
                runs_measured=len(measured),
                runs_unmeasured=len(mine) - len(measured),
                requested_tier=tier_name,
                requested_cpu=req.millicpu / 1000 if req else None,
                requested_memory_mib=req.memory_mib if req else None,
                cpu_p95=cores,
                memory_p95_mib=rss,
                cpu_use=_ratio(cores, req.millicpu / 1000 if req else None),
                memory_use=_ratio(rss, req.memory_mib if req else None),
                recommended_tier=recommended,
            )
        )
    return rows


async def read_finished(
    client: PrefectClient, since: timedelta, tenant_id: str | None = None
) -> list[FinishedRun]:
    """Setlist runs (of one tenant, or all) that finished within ``since``."""
    tags = ["setlist"] + ([f"tenant:{tenant_id}"] if tenant_id else [])
    flt = FlowRunFilter(
        tags=FlowRunFilterTags(all_=tags),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINISHED)),
        end_time=FlowRunFilterEndTime(after_=datetime.now(UTC) - since),
    )
    found, offset = [], 0
    while True:
        page = await client.read_flow_runs(flow_run_filter=flt, limit=PAGE, offset=offset)
        found += [f for run in page if (f := finished_run(run))]
        if len(page) < PAGE:
            return found
        offset += PAGE
