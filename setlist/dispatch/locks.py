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

A holder that can't reach the server (a restart, a PostgreSQL failover) keeps renewing,
from a thread of its own, with back-off for as long as its lease is still good: the
slot is its own until the lease runs out, whoever else is waiting. Prefect's own
renewal gives up after three tries (about three seconds) and, for a strict limit,
cancels the holder: a data-etl run that took its lock just before a server restart
ended Crashed ("cancelled by the runtime environment") with nothing wrong but the wait
(``bench/chaos.py --only server-restart-postgres``). Only a lease that did run out, or
that the server no longer knows, stops the holder, with ``LockLost``: another run may
hold the lock by then.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from uuid import UUID

import httpx
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from setlist.core.reach import waiting_out_outages
from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError

log = logging.getLogger("setlist.locks")

RENEW_EVERY = 1 / 3  # of the lease: a renewal that fails leaves two thirds to retry in

# ``table``: held briefly around each rewrite of the curated table's manifest (a load's
# publish, a stream micro-batch); ``stream``: the one stream-ingest run of a tenant.
LOCK_NAMES = ("etl", "models", "billing", "backup", "table", "stream")


def lock_name(tenant_id: str, name: str) -> str:
    return f"setlist-lock-{tenant_id}-{name}"


class LockLost(SetlistError):
    """A tenant lock's lease ran out (or the server no longer knows it) while its holder
    still worked: another run may hold the lock now, so the holder stops."""


class _Stopped(Exception):
    """The holder left the lock: its keeper stops waiting."""


def _worth_retrying(exc: Exception) -> bool:
    """Any failure but the server saying it no longer holds the lease is worth a retry
    (it is away, or its database is)."""
    gone = isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (404, 410)
    return not gone


def _keep_lease(
    lease_id: UUID, lease_s: float, name: str, stop: threading.Event, lose: Callable[[str], None]
) -> None:
    """Renew the lease every ``RENEW_EVERY`` of it until ``stop``; a renewal that fails
    is tried again with back-off (``waiting_out_outages``) while the lease is still
    good. When it can't be kept, ``lose(why)``. Runs in a thread of its own, as
    Prefect's renewal does: a holder may block its event loop for minutes (a data-etl
    load runs in it)."""
    from prefect.client.orchestration import get_client

    def pause(seconds: float) -> None:
        if stop.wait(seconds):
            raise _Stopped

    good_until = time.monotonic() + lease_s
    with get_client(sync_client=True) as client:
        while not stop.wait(lease_s * RENEW_EVERY):
            asked = time.monotonic()
            try:
                waiting_out_outages(
                    lambda: client.renew_concurrency_lease(lease_id, lease_duration=lease_s),
                    what=f"lock {name}: lease renewal",
                    budget_s=good_until - asked,
                    sleep=pause,
                    retry=_worth_retrying,
                )
            except _Stopped:
                return
            except Exception as exc:  # noqa: BLE001 - told to the holder
                why = (
                    f"its lease ran out while the server was unreachable ({type(exc).__name__})"
                    if _worth_retrying(exc)
                    else "the server no longer holds its lease"
                )
                return lose(f"lock {name}: {why}; another run may hold it now")
            good_until = asked + lease_s


@asynccontextmanager
async def tenant_lock(tenant_id: str, name: str, timeout_seconds: float = 3600):
    """One holder at a time per (tenant, name), across workers: a Prefect limit of 1.

    Used by flows that rewrite a tenant's dataset, so two runs never publish at once.
    Raises ``LockLost`` in the holder if the lease could not be kept.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency._asyncio import (
        _discard_cleanup_lease,
        aacquire_concurrency_slots_with_lease,
    )

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
    lease_s = get_settings().unresponsive_seconds
    # Prefect's acquisition: it waits for the slot, and leaves the lease with the run's
    # concurrency context until it is released (so a cancelled holder's slot is freed)
    granted = await aacquire_concurrency_slots_with_lease(
        names=[full], slots=1, timeout_seconds=timeout_seconds, lease_duration=lease_s,
        strict=True,
    )  # fmt: skip
    holder, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert holder is not None
    lost: list[str] = []
    stop, guard = threading.Event(), threading.Lock()

    def lose(why: str) -> None:  # from the keeper's thread: stop the holder
        with guard:
            if not stop.is_set():
                lost.append(why)
                loop.call_soon_threadsafe(holder.cancel)

    keep = (_keep_lease, granted.lease_id, lease_s, full, stop, lose)
    threading.Thread(
        target=contextvars.copy_context().run, args=keep, name=f"lease-{full}", daemon=True
    ).start()

    def lock_lost() -> LockLost:
        """Called while a cancellation is handled: the keeper's (delivered, or pending
        when the holder's work ended) as what it means; any other is raised again."""
        if not lost:
            raise
        holder.uncancel()
        return LockLost(lost[0])

    try:
        yield
    except asyncio.CancelledError:
        raise lock_lost() from None
    finally:
        with guard:
            stop.set()  # the keeper stops within its current call, and cancels nothing more
        try:
            async with get_client() as client:
                await client.release_concurrency_slots_with_lease(granted.lease_id)
            _discard_cleanup_lease(granted.lease_id)
        except asyncio.CancelledError:
            raise lock_lost() from None  # noqa: B012 - the lock was not held to the end
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("lock %s: not released (%s); its lease frees it", full,
                        type(exc).__name__)  # fmt: skip
