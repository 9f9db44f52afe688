"""Per-run dispatch grants: the dispatcher's decision written on the run it chose.

While a dispatcher leads, every Setlist tenant queue stays paused, so neither Prefect's
own dispatch nor a stock worker takes a tenant run. The dispatcher grants runs one by
one instead: it tags each run it chooses with ``setlist:granted`` and
``setlist:grant:<state id>:<mac>``, naming the Scheduled state it was chosen in. Setlist's
workers read the granted runs of their pool (one indexed read beside the usual poll) and
take a tenant run only with the grant for its current state. A run that ends frees
nothing by itself, and a run rescheduled (a new Scheduled state, e.g. marked Late) needs
a new grant.

Anyone with API access can write a run's tags, so a grant is signed: its MAC, made with
a key derived from the platform key, binds the run and the state, and a tag written by
hand, or copied from another run or an earlier state, grants nothing.

Granting needs no queue write: a cycle costs its reads and one tag write per grant
(the dispatcher sends a cycle's writes together, a bounded number in flight), whatever
the number of queues, and the worker's poll skips the paused queues at once.

The gate applies only while a dispatcher leads (its heartbeat is fresh). Without one the
queues stay held, and ``setlist queue release`` opens them to plain Prefect dispatch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prefect.exceptions import ObjectNotFound

from setlist.core.credentials import derived_key
from setlist.core.tenancy import parse_queue_name
from setlist.dispatch.leadership import dispatcher_active
from setlist.dispatch.queues import read_pool_queues

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.responses import WorkerFlowRunResponse

log = logging.getLogger("setlist.grants")

GRANT_TAG_PREFIX = "setlist:grant:"
GRANTED_TAG = "setlist:granted"  # on every granted run: what the worker's read selects


MAC_HEX = 32  # 128 bits of HMAC-SHA256


@functools.lru_cache(maxsize=1)
def _key() -> bytes:
    """The grant key, read once per process: a cycle checks many runs."""
    return derived_key("grant")


def _mac(run_id: Any, state_id: Any, key: bytes | None) -> str:
    msg = f"{run_id}:{state_id}".encode()
    return hmac.new(_key() if key is None else key, msg, hashlib.sha256).hexdigest()[:MAC_HEX]


def grant_tag(run_id: Any, state_id: Any, key: bytes | None = None) -> str:
    """The grant of run ``run_id`` for its Scheduled state ``state_id``."""
    return f"{GRANT_TAG_PREFIX}{state_id}:{_mac(run_id, state_id, key)}"


def is_granted(tags: Iterable[str], run_id: Any, state_id: Any, key: bytes | None = None) -> bool:
    """Whether ``tags`` hold the dispatcher's grant of run ``run_id`` for its Scheduled
    state ``state_id``."""
    if run_id is None or state_id is None:
        return False
    expected = grant_tag(run_id, state_id, key)
    return any(hmac.compare_digest(t, expected) for t in tags if t.startswith(GRANT_TAG_PREFIX))


def with_grant(
    tags: Iterable[str], run_id: Any, state_id: Any, key: bytes | None = None
) -> list[str]:
    """``tags`` with the grant of ``run_id`` for ``state_id`` in place of any earlier one."""
    kept = [t for t in tags if t != GRANTED_TAG and not t.startswith(GRANT_TAG_PREFIX)]
    return [*kept, GRANTED_TAG, grant_tag(run_id, state_id, key)]


def gated(queue_name: str | None) -> bool:
    """Runs of Setlist tenant queues wait for a grant; other queues are not dispatched."""
    return bool(queue_name) and parse_queue_name(queue_name) is not None


async def read_granted(
    client: PrefectClient, pool: str, scheduled_before: datetime, page: int = 200, pages: int = 5
) -> list[FlowRun]:
    """The pool's Scheduled runs due by ``scheduled_before`` that carry the grant for
    their current state, earliest first. A run rescheduled after its grant keeps the
    ``setlist:granted`` tag until it is granted again, so the read goes on past a page
    of such runs (up to ``pages``)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterNextScheduledStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    granted: list[FlowRun] = []
    for n in range(pages):
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[GRANTED_TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(
                    before_=scheduled_before
                ),
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
            limit=page,
            offset=n * page,
        )
        granted += [r for r in runs if is_granted(r.tags, r.id, r.state_id)]
        if len(runs) < page:
            break
    return granted


class GrantedRunsOnly:
    """Worker mixin for Setlist's workers.

    While a dispatcher leads, a poll takes the granted runs of the pool (one read, see
    ``read_granted``) and Prefect's poll of the queues that are not tenant queues; of
    what Prefect's poll returns, only runs outside tenant queues or granted for their
    current state are kept. Prefect's poll without queue names reads and marks every
    queue of the pool (5,000 with 1,000 tenants), so it runs only every
    ``full_poll_s``: often enough that the queues and deployments stay *ready* in the
    UI. In between it names the other queues and those of the granted runs. Without a
    dispatcher: Prefect's poll as it is.
    """

    gate_check_s = 2.0  # how long a read of the dispatcher's heartbeat is trusted
    full_poll_s = 30.0  # Prefect marks queues not polled for 60 s as not ready
    queue_list_s = 60.0  # how long the list of the pool's other queues is trusted

    _gate: tuple[float, bool] | None = None
    _full_polled: float = -math.inf
    _other_queues: tuple[float, list[str]] | None = None

    async def _dispatcher_leads(self) -> bool:
        now = time.monotonic()
        if self._gate is None or now - self._gate[0] >= self.gate_check_s:
            self._gate = (now, await dispatcher_active(self.client))  # type: ignore[attr-defined]
        return self._gate[1]

    async def _queues_besides_tenants(self) -> list[str]:
        """The queues this worker polls that are not tenant queues."""
        named = list(self._work_queues)  # type: ignore[attr-defined]
        if named:
            return [q for q in named if not gated(q)]
        now = time.monotonic()
        if self._other_queues is None or now - self._other_queues[0] >= self.queue_list_s:
            queues = await read_pool_queues(self.client, self._work_pool_name)  # type: ignore[attr-defined]
            self._other_queues = (now, [q.name for q in queues if not gated(q.name)])
        return self._other_queues[1]

    async def _get_scheduled_flow_runs(self) -> list[WorkerFlowRunResponse]:
        from uuid import UUID

        from prefect.client.schemas.responses import WorkerFlowRunResponse
        from prefect.types._datetime import now

        if not await self._dispatcher_leads():
            return await super()._get_scheduled_flow_runs()  # type: ignore[misc]
        client = self.client  # type: ignore[attr-defined]
        pool_name = self._work_pool_name  # type: ignore[attr-defined]
        named = set(self._work_queues)  # type: ignore[attr-defined]
        before = now("UTC") + timedelta(seconds=int(self._prefetch_seconds))  # type: ignore[attr-defined]
        granted = [
            r
            for r in await read_granted(client, pool_name, before)
            if gated(r.work_queue_name)
            and r.work_queue_id
            and (not named or r.work_queue_name in named)
        ]
        if time.monotonic() - self._full_polled >= self.full_poll_s:
            polled = await super()._get_scheduled_flow_runs()  # type: ignore[misc]
            self._full_polled = time.monotonic()
        else:
            names = set(await self._queues_besides_tenants())
            names |= {r.work_queue_name for r in granted if r.work_queue_name}
            polled = []
            if names:  # no names would mean every queue
                with contextlib.suppress(ObjectNotFound):  # a queue deleted meanwhile
                    polled = await client.get_scheduled_flow_runs_for_work_pool(
                        work_pool_name=pool_name,
                        scheduled_before=before,
                        work_queue_names=sorted(names),
                    )
        kept = [
            r
            for r in polled
            if not gated(r.flow_run.work_queue_name)
            or is_granted(r.flow_run.tags, r.flow_run.id, r.flow_run.state_id)
        ]
        if len(kept) < len(polled):
            log.debug("%d run(s) of open queues left for lack of a grant", len(polled) - len(kept))
        seen = {r.flow_run.id for r in kept}
        pool_id = getattr(self._work_pool, "id", None) or UUID(int=0)  # type: ignore[attr-defined]
        # Highest band first, should the worker's own limit cut the list short.
        granted.sort(key=lambda r: _band_rank(r.work_queue_name))
        kept += [
            WorkerFlowRunResponse(work_pool_id=pool_id, work_queue_id=r.work_queue_id, flow_run=r)
            for r in granted
            if r.id not in seen
        ]
        return kept


def _band_rank(queue_name: str | None) -> int:
    parsed = parse_queue_name(queue_name or "")
    return parsed[1].rank if parsed else -1
