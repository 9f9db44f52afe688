"""Per-run dispatch grants: the dispatcher's decision written on the run it chose.

A queue's concurrency limit counts the runs under way in that queue, so when one of them
ends the queue has a free slot again until the dispatcher's next cycle closes it: in
that window a stock worker would take one more run the dispatcher never chose. A grant
closes the window. The dispatcher tags each run it chooses with
``setlist:grant:<state id>``, naming the Scheduled state it was chosen in, and Setlist's
workers take a run from a tenant queue only when it carries the grant for its current
state. A run that ends frees nothing; a run rescheduled (a new Scheduled state) needs a
new grant.

The gate applies only while a dispatcher leads (its heartbeat is fresh). Without one the
queues stay held, and ``setlist queue release`` opens them to plain Prefect dispatch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from setlist.tenancy import parse_queue_name

if TYPE_CHECKING:
    from prefect.client.schemas.responses import WorkerFlowRunResponse

log = logging.getLogger("setlist.grants")

GRANT_TAG_PREFIX = "setlist:grant:"


def grant_tag(state_id: Any) -> str:
    return f"{GRANT_TAG_PREFIX}{state_id}"


def is_granted(tags: Iterable[str], state_id: Any) -> bool:
    """Whether ``tags`` hold the grant for the Scheduled state ``state_id``."""
    return state_id is not None and grant_tag(state_id) in set(tags)


def gated(queue_name: str | None) -> bool:
    """Runs of Setlist tenant queues wait for a grant; other queues are not dispatched."""
    return bool(queue_name) and parse_queue_name(queue_name) is not None


class GrantedRunsOnly:
    """Worker mixin: of the runs a poll returns, keep those outside tenant queues and
    those granted for their current state (while a dispatcher leads)."""

    gate_check_s = 2.0  # how long a read of the dispatcher's heartbeat is trusted

    _gate: tuple[float, bool] | None = None

    async def _dispatcher_leads(self) -> bool:
        from setlist.dispatcher import dispatcher_active

        now = time.monotonic()
        if self._gate is None or now - self._gate[0] >= self.gate_check_s:
            self._gate = (now, await dispatcher_active(self.client))  # type: ignore[attr-defined]
        return self._gate[1]

    async def _get_scheduled_flow_runs(self) -> list[WorkerFlowRunResponse]:
        runs = await super()._get_scheduled_flow_runs()  # type: ignore[misc]
        if not runs or not await self._dispatcher_leads():
            return runs
        kept = [
            r
            for r in runs
            if not gated(r.flow_run.work_queue_name)
            or is_granted(r.flow_run.tags, r.flow_run.state_id)
        ]
        if len(kept) < len(runs):
            log.debug("%d run(s) of open queues left for lack of a grant", len(runs) - len(kept))
        return kept
