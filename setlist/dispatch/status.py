"""``setlist queue status``: per tenant and band, what waits, what runs, and who is owed.

It reads the Prefect API directly, not the dispatcher's books, so it answers the same
with or without a dispatcher running. ``share`` decays usage as the dispatcher does (a
run's seconds count half after each half-life): the lower, the more the tenant is owed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType

from setlist.core.tenancy import Priority, parse_queue_name
from setlist.dispatch.queues import _PAGE

WAITING = (StateType.SCHEDULED,)
BUSY = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)


@dataclass
class QueueRow:
    tenant_id: str
    band: str
    waiting: int
    running: int
    quota: int
    weight: float
    usage_s: float
    share: float


def decayed_seconds(runs, now: datetime, half_life: timedelta) -> float:
    """Run-seconds, each run weighted by 0.5 ** (age / half_life), age from its end."""
    total = 0.0
    for run in runs:
        if not run.start_time:
            continue
        end = run.end_time or now
        age = max((now - end).total_seconds(), 0.0)
        total += (end - run.start_time).total_seconds() * 0.5 ** (age / half_life.total_seconds())
    return total


async def _runs(
    client: PrefectClient, types, since: datetime | None = None, due_by: datetime | None = None
) -> list:
    flt = FlowRunFilter(
        tags=FlowRunFilterTags(all_=["setlist"]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(types))),
        start_time=FlowRunFilterStartTime(after_=since) if since else None,
        expected_start_time=FlowRunFilterExpectedStartTime(before_=due_by) if due_by else None,
    )
    runs, offset = [], 0
    while True:
        page = await client.read_flow_runs(flow_run_filter=flt, limit=_PAGE, offset=offset)
        runs += page
        if len(page) < _PAGE:
            return runs
        offset += _PAGE


async def queue_status(
    client: PrefectClient,
    profiles: list,
    *,
    window: timedelta = timedelta(hours=24),
    half_life: timedelta = timedelta(hours=6),
) -> list[QueueRow]:
    """Per tenant and band: waiting and busy runs, the quota, and fair-share standing.

    ``share`` is the tenant's decayed run-seconds over the window divided by its weight,
    as a fraction of the sum over the listed tenants: the lower, the more it is owed.
    """
    now = datetime.now(UTC)
    tenants = {p.tenant_id: p for p in profiles}
    # Runs a schedule created for later are not waiting yet: only what is due counts.
    live = await _runs(client, WAITING + BUSY, due_by=now)
    recent = await _runs(
        client,
        (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED, *BUSY),
        since=now - window,
    )
    by_tenant: dict[str, list] = {t: [] for t in tenants}
    for run in recent:
        for tag in run.tags:
            if tag.startswith("tenant:") and tag[7:] in by_tenant:
                by_tenant[tag[7:]].append(run)
    usage = {t: decayed_seconds(runs, now, half_life) for t, runs in by_tenant.items()}
    weighted = {t: usage[t] / tenants[t].quota.weight for t in tenants}
    total = sum(weighted.values())
    counts: dict[tuple[str, str], list[int]] = {}
    for run in live:
        parsed = parse_queue_name(run.work_queue_name or "")
        if parsed is None or parsed[0] not in tenants:
            continue
        cell = counts.setdefault((parsed[0], parsed[1].value), [0, 0])
        cell[0 if run.state_type in WAITING else 1] += 1
    rows = []
    for (tenant, band), (waiting, running) in sorted(
        counts.items(), key=lambda kv: (kv[0][0], Priority(kv[0][1]).rank)
    ):
        p = tenants[tenant]
        rows.append(
            QueueRow(
                tenant_id=tenant,
                band=band,
                waiting=waiting,
                running=running,
                quota=p.quota.concurrent_jobs,
                weight=p.quota.weight,
                usage_s=round(usage[tenant], 3),
                share=round(weighted[tenant] / total, 4) if total else 0.0,
            )
        )
    return rows
