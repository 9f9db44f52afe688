"""Per-tenant work queues and the quota that Prefect enforces on them.

Layout, in every Setlist work pool: one queue per (tenant, band), named
``<tenant>.<band>``. Queue priorities put every ``critical`` queue before every ``high``
queue and so on, so a worker always takes the highest band first. The tenant's
concurrent-jobs quota is a Prefect global concurrency limit shared by all the tenant's
deployments: the server refuses the Pending transition of a run beyond the quota (the run
waits as ``AwaitingConcurrencySlot``), whichever queue or band it came from.

On top of that layout, the dispatcher (``setlist.dispatch.dispatcher``) holds every
tenant queue (paused) and grants, each cycle, runs one by one — bands first, fair share
among tenants, never past a quota or the pool limit; Setlist's workers take exactly the
granted runs. While a dispatcher leads, new tenant queues are created held; without one
they are created open and Prefect's own order and limits apply.
"""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.client.schemas.objects import WorkQueue
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.workers.process import ProcessWorker

from setlist.core.tenancy import Priority, concurrency_limit_name, parse_queue_name, queue_name
from setlist.dispatch.leadership import dispatcher_active
from setlist.dispatch.locks import LOCK_NAMES, lock_name
from setlist.k8s.templates import load_template, shared_variables

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


def queue_description(tenant_id: str, band: Priority) -> str:
    """What the UI shows beside a tenant queue that reads *Paused*: while a dispatcher
    leads, paused is how its runs wait for their turn, not a stop."""
    return (
        f"Tenant {tenant_id}, band {band.value}. Shown as paused while Setlist's dispatcher "
        "leads: it holds the queue and starts its runs one by one, in band, quota and "
        "fair-share order; the runs still run. `setlist queue status` shows who waits "
        "and why; `setlist queue release` hands the queue back to Prefect's own dispatch."
    )


async def ensure_tenant_queues(client: PrefectClient, pool: str, tenant_id: str) -> list[str]:
    """Create the tenant's five band queues in ``pool`` where missing; idempotent.

    While a dispatcher leads they are created held (paused), so a first run can't slip
    past its decisions: only the runs it grants leave them.
    """
    existing = await read_pool_queues(client, pool)
    names = {q.name for q in existing}
    for q in existing:  # queues made before the description said what the pause means
        parsed = parse_queue_name(q.name)
        if parsed is not None and parsed[0] == tenant_id:
            wanted = queue_description(*parsed)
            if q.description != wanted:
                await client.update_work_queue(q.id, description=wanted)
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
                description=queue_description(tenant_id, band),
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
