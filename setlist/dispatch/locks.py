"""Tenant locks: one holder at a time per (tenant, name), across every worker and pool.

A flow that rewrites a tenant's dataset (ETL, models, billing, backup) takes its lock so
that two runs never publish at once. The lock is a Prefect global concurrency limit of 1,
so it needs nothing beyond the Prefect server the workers already share. The names are a
closed list (``LOCK_NAMES``), so offboarding can delete every lock of a tenant.

A holder keeps its slot by renewing a lease. A holder that dies without a word (SIGKILL,
node loss) stops renewing, and the server takes the slot back when the lease runs out:
the lease is ``SETLIST_UNRESPONSIVE_SECONDS`` long, the silence after which the
platform marks the holder's run Crashed, so the lock frees about when its run is
declared dead and the tenant's next run can go on.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from setlist.core.settings import get_settings

# ``table``: held briefly around each rewrite of the curated table's manifest (a load's
# publish, a stream micro-batch); ``stream``: the one stream-ingest run of a tenant.
LOCK_NAMES = ("etl", "models", "billing", "backup", "table", "stream")


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
    async with concurrency(
        full,
        occupy=1,
        timeout_seconds=timeout_seconds,
        strict=True,
        lease_duration=get_settings().unresponsive_seconds,
    ):
        yield
