"""The operator's live view: ``setlist monitor`` (``make monitor-performance``,
``make monitor-all``).

A frame is one read of the API as the Prometheus exporter makes it (``Exporter.snapshot``:
due and busy runs, the runs finished since the last frame, workers, tenant quotas, so a
refresh costs a few calls, never one per tenant) and, when asked, the health checks of
``setlist health``. It shows:

- runs due or under way by tenant and band: waiting (due, not started) and the oldest
  wait, then pending, running, cancelling, paused and late;
- per tenant: busy runs against the concurrent-jobs quota;
- runs finished in the window by job type (``reports.performance``): counts, success
  ratio against SEED's 99.5%, P95 run time against the job type's SLA; and the overall
  success ratio;
- workers online per pool, and each health check with its reason.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from setlist.core.tenancy import Priority
from setlist.observability.health import Check, run_checks
from setlist.observability.metrics import (
    SLA_SUCCESS_RATIO,
    Exporter,
    RunFacts,
    Snapshot,
    queue_waits,
)
from setlist.observability.reports import FinishedRun, performance

BUSY_STATES = ("pending", "running", "cancelling", "paused")
BAND_ORDER = {band.value: i for i, band in enumerate(Priority)}


@dataclass
class Frame:
    api_url: str
    tenant: str | None
    window: timedelta
    snapshot: Snapshot | None  # None when the API could not be read
    error: str = ""
    checks: list[Check] | None = None  # None when health is not shown
    active: list[RunFacts] = field(default_factory=list)
    finished: list[RunFacts] = field(default_factory=list)


class Monitor:
    """Reads frames for one view; finished runs are read once each across frames."""

    def __init__(
        self,
        api_url: str,
        pools: list[str],
        *,
        tenant: str | None = None,
        window: timedelta = timedelta(hours=24),
        health: bool = True,
    ):
        self.api_url = api_url
        self.tenant = tenant
        self.window = window
        self.health = health
        self.exporter = Exporter(api_url, pools, window=window, profile_ttl=60)

    async def read(self) -> Frame:
        frame = Frame(self.api_url, self.tenant, self.window, None)
        try:
            frame.snapshot = await asyncio.to_thread(self.exporter.snapshot)
        except httpx.HTTPError as exc:
            frame.error = f"the Prefect API at {self.api_url} could not be read: {exc}"
        if frame.snapshot:
            mine = self.tenant
            frame.active = [f for f in frame.snapshot.active if not mine or f.tenant == mine]
            frame.finished = [f for f in frame.snapshot.finished if not mine or f.tenant == mine]
        if self.health:
            frame.checks = await run_checks(self.api_url)
        return frame


def success_ratio(runs: list[RunFacts]) -> tuple[float | None, int, int]:
    """(completed ÷ decided, completed, decided); cancelled runs decide nothing."""
    n = Counter(r.state for r in runs)
    decided = n["completed"] + n["failed"] + n["crashed"]
    return (n["completed"] / decided if decided else None), n["completed"], decided


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2%}"


def _runs_table(frame: Frame) -> Table | Text:
    assert frame.snapshot is not None
    waits = queue_waits(frame.active, frame.snapshot.at)
    states = Counter((f.tenant, f.band, f.state) for f in frame.active)
    late = Counter((f.tenant, f.band) for f in frame.active if f.late)
    keys = sorted(
        {(f.tenant, f.band) for f in frame.active},
        key=lambda k: (k[0], BAND_ORDER.get(k[1], len(BAND_ORDER)), k[1]),
    )
    if not keys:
        return Text("no runs due or under way", style="dim")
    table = Table(
        "tenant",
        "band",
        "waiting",
        "oldest wait",
        *BUSY_STATES,
        "late",
        title="runs due or under way",
        title_justify="left",
    )
    for tenant, band in keys:
        ages = waits.get((tenant, band), [])
        table.add_row(
            tenant,
            band,
            str(len(ages)),
            _age(max(ages)) if ages else "–",
            *(str(states[(tenant, band, s)]) for s in BUSY_STATES),
            str(late[(tenant, band)]),
        )
    return table


def _tenants_table(frame: Frame) -> Table | None:
    assert frame.snapshot is not None
    quotas = frame.snapshot.quotas
    busy = Counter(
        f.tenant for f in frame.active if f.state in ("pending", "running", "cancelling")
    )
    waiting = Counter(f.tenant for f in frame.active if f.state == "scheduled")
    tenants = sorted(set(busy) | set(waiting) | ({frame.tenant} if frame.tenant else set()))
    if not tenants:
        return None
    table = Table("tenant", "busy / quota", "waiting", "success", title="tenants")
    table.title_justify = "left"
    for tenant in tenants:
        quota = quotas.get(tenant)
        ratio, _, _ = success_ratio([f for f in frame.finished if f.tenant == tenant])
        limit = str(quota.concurrent_jobs) if quota else "?"
        table.add_row(tenant, f"{busy[tenant]} / {limit}", str(waiting[tenant]), _pct(ratio))
    return table


def _finished_table(frame: Frame) -> Table | Text:
    hours = int(frame.window.total_seconds() // 3600)
    rows = performance(
        [
            FinishedRun(job_type=f.job_type, state=f.state, seconds=f.seconds, wait_seconds=None)
            for f in frame.finished
        ]
    )
    if not rows:
        return Text(f"no runs finished in the last {hours} h", style="dim")
    table = Table(
        "job type",
        "finished",
        "completed",
        "failed",
        "crashed",
        "cancelled",
        f"success (target {SLA_SUCCESS_RATIO:.1%})",
        "p95 run time",
        "SLA",
        title=f"finished in the last {hours} h",
        title_justify="left",
    )
    for row in rows:
        meets = row.meets_success_sla
        mark = "" if meets is None else " [green]ok[/]" if meets else " [red]below[/]"
        table.add_row(
            row.job_type,
            str(row.runs),
            str(row.completed),
            str(row.failed),
            str(row.crashed),
            str(row.cancelled),
            _pct(row.success_rate) + mark,
            _age(row.p95_s),
            _age(row.sla_s),
        )
    return table


def _success_line(frame: Frame) -> Text:
    ratio, completed, decided = success_ratio(frame.finished)
    if ratio is None:
        return Text.from_markup(
            f"success ratio: – (no decided runs; target {SLA_SUCCESS_RATIO:.1%})"
        )
    verdict = "[green]meets[/]" if ratio >= SLA_SUCCESS_RATIO else "[red]below[/]"
    return Text.from_markup(
        f"success ratio: [bold]{ratio:.2%}[/] ({completed} of {decided} completed) — "
        f"{verdict} the {SLA_SUCCESS_RATIO:.1%} target"
    )


def _health_table(checks: list[Check]) -> Table:
    failed = sum(1 for c in checks if not c.ok)
    title = f"health: {'[red]' + str(failed) + ' failing[/]' if failed else '[green]healthy[/]'}"
    table = Table("check", "status", "reason", title=title, title_justify="left")
    for c in checks:
        status = "[yellow]skip[/]" if c.skipped else "[green]ok[/]" if c.ok else "[red]FAIL[/]"
        table.add_row(c.name, status, escape(c.reason))
    return table


def render(frame: Frame) -> Group:
    """One frame as rich renderables, top to bottom."""
    who = f"tenant {frame.tenant}" if frame.tenant else "all tenants"
    at = frame.snapshot.at if frame.snapshot else datetime.now().astimezone()
    parts: list = [
        Text.from_markup(
            f"[bold]Setlist monitor[/] · {escape(frame.api_url)} · {who} · "
            f"{at:%Y-%m-%d %H:%M:%S %Z}"
        )
    ]
    if frame.snapshot is None:
        parts.append(Text(frame.error, style="red"))
    else:
        parts += [_runs_table(frame)]
        if tenants := _tenants_table(frame):
            parts.append(tenants)
        parts += [_finished_table(frame), _success_line(frame)]
        workers = ", ".join(f"{p} {n} online" for p, n in sorted(frame.snapshot.workers.items()))
        parts.append(Text(f"workers: {workers or 'no Setlist pool found'}"))
    if frame.checks is not None:
        parts.append(_health_table(frame.checks))
    return Group(*parts)
