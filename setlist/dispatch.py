"""Per-tenant work queues and the quota that Prefect enforces on them.

Layout, in every Setlist work pool: one queue per (tenant, band), named
``<tenant>.<band>``. Queue priorities put every ``critical`` queue before every ``high``
queue and so on, so a worker always takes the highest band first. The tenant's
concurrent-jobs quota is a Prefect global concurrency limit shared by all the tenant's
deployments: the server refuses the Pending transition of a run beyond the quota (the run
waits as ``AwaitingConcurrencySlot``), whichever queue or band it came from.

On top of that layout, the dispatcher (``setlist.dispatcher``) holds every tenant queue
(paused) and grants, each cycle, runs one by one — bands first, fair share among
tenants, never past a quota or the pool limit; Setlist's workers take exactly the
granted runs. While a dispatcher leads, new tenant queues are created held; without one
they are created open and Prefect's own order and limits apply.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType, WorkQueue
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.workers.process import ProcessWorker

from setlist.k8s_jobs import shared_variables
from setlist.tenancy import (
    Priority,
    concurrency_limit_name,
    parse_queue_name,
    queue_name,
)

_PAGE = 200


def process_pool_template() -> dict[str, Any]:
    """The process worker's template plus the tier variables the Kubernetes pools take.

    The local pool accepts the same job variables as the Kubernetes pools so a
    submission is identical on both; the process worker records but can't enforce them.
    """
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"].update(shared_variables())
    return template


async def ensure_process_pool(client: PrefectClient, name: str, parallel_jobs: int) -> None:
    """Create the local process pool, or bring its template and limit up to date."""
    template = process_pool_template()
    try:
        await client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="setlist-process",
                base_job_template=template,
                concurrency_limit=parallel_jobs,
                description="Setlist local pool: the same tenant queues as the Kubernetes pools",
            )
        )
    except ObjectAlreadyExists:
        await client.update_work_pool(
            name,
            WorkPoolUpdate(base_job_template=template, concurrency_limit=parallel_jobs),
        )


async def ensure_kubernetes_pool(client: PrefectClient, name: str, kind: str) -> None:
    """A Kubernetes pool with Setlist's hardened template of ``kind`` (cpu or gpu)."""
    from setlist.k8s_jobs import load_template

    template = load_template(kind)
    try:
        await client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="setlist-kubernetes",
                base_job_template=template,
                description=f"Setlist Kubernetes pool ({kind} jobs)",
            )
        )
    except ObjectAlreadyExists:
        await client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


async def read_pool_queues(client: PrefectClient, pool: str) -> list[WorkQueue]:
    queues: list[WorkQueue] = []
    offset = 0
    while True:
        page = await client.read_work_queues(work_pool_name=pool, limit=_PAGE, offset=offset)
        queues.extend(page)
        if len(page) < _PAGE:
            return queues
        offset += _PAGE


def insertion_priority(existing: list[WorkQueue], band: Priority) -> int:
    """Where a new queue of ``band`` goes: after every Setlist queue of its band or higher."""
    ahead = 0
    for q in existing:
        parsed = parse_queue_name(q.name)
        if parsed is not None and parsed[1].rank <= band.rank:
            ahead += 1
    return ahead + 1


async def ensure_tenant_queues(client: PrefectClient, pool: str, tenant_id: str) -> list[str]:
    """Create the tenant's five band queues in ``pool`` where missing; idempotent.

    While a dispatcher leads they are created held (paused), so a first run can't slip
    past its decisions: only the runs it grants leave them.
    """
    from setlist.dispatcher import dispatcher_active

    existing = await read_pool_queues(client, pool)
    names = {q.name for q in existing}
    held = None
    for band in Priority:
        name = queue_name(tenant_id, band)
        if name in names:
            continue
        if held is None:
            held = await dispatcher_active(client)
        try:
            queue = await client.create_work_queue(
                name=name,
                work_pool_name=pool,
                priority=insertion_priority(existing, band),
                description=f"tenant {tenant_id}, band {band.value}",
                is_paused=held or None,
            )
        except ObjectAlreadyExists:  # a concurrent onboarding got there first
            continue
        existing.append(queue)
    return [queue_name(tenant_id, b) for b in Priority]


async def delete_tenant_queues(client: PrefectClient, pool: str, tenant_id: str) -> int:
    deleted = 0
    for q in await read_pool_queues(client, pool):
        parsed = parse_queue_name(q.name)
        if parsed is not None and parsed[0] == tenant_id:
            try:
                await client.delete_work_queue_by_id(q.id)
                deleted += 1
            except ObjectNotFound:
                pass
    return deleted


async def ensure_tenant_limit(client: PrefectClient, tenant_id: str, concurrent_jobs: int):
    """Create or update the tenant's global concurrency limit; returns it."""
    name = concurrency_limit_name(tenant_id)
    try:
        await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=concurrent_jobs, active=True)
            )
        except ObjectAlreadyExists:
            pass
    await client.update_global_concurrency_limit(
        name, GlobalConcurrencyLimitUpdate(limit=concurrent_jobs, active=True)
    )
    return await client.read_global_concurrency_limit_by_name(name)


async def delete_tenant_limit(client: PrefectClient, tenant_id: str) -> None:
    for name in (concurrency_limit_name(tenant_id), *(lock_name(tenant_id, n) for n in LOCK_NAMES)):
        try:
            await client.delete_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass


LOCK_NAMES = ("etl", "models", "billing", "backup")


def lock_name(tenant_id: str, name: str) -> str:
    return f"setlist-lock-{tenant_id}-{name}"


@asynccontextmanager
async def tenant_lock(tenant_id: str, name: str, timeout_seconds: float = 3600):
    """One holder at a time per (tenant, name), across workers: a Prefect limit of 1.

    Used by flows that rewrite a tenant's dataset, so two runs never publish at once.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.asyncio import concurrency

    if name not in LOCK_NAMES:
        raise ValueError(f"unknown lock {name!r}; known: {', '.join(LOCK_NAMES)}")
    full = lock_name(tenant_id, name)
    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(full)
        except ObjectNotFound:
            try:
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=full, limit=1, active=True)
                )
            except ObjectAlreadyExists:
                pass
    async with concurrency(full, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


# ----------------------------------------------------------------------------- status

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
