"""A job process that died before its flow run started gives the run back, not a crash.

Prefect's client retries a refused connection only once it has connected at least
once, so a job process that starts while the API is away (a server restart, a
PostgreSQL failover) exits at its first call. Prefect's worker then marks the run
Crashed, with ``run_count`` 0: the flow never ran, and nothing runs it again, since
flow retries apply only to runs that started. The chaos bench saw it in 2 of 6 server
restarts.

A run that never reached Running did no work, so running it from the start is safe:
the worker puts it back to Scheduled (``AwaitingRetry``, a new state, so the dispatcher
grants it afresh, in its band and quota) instead of letting it crash. Any run that did
start, ``run_count`` ≥ 1, is left to Prefect's crash handling and the flow's retries.
How many times a run may be given back is bounded (``MAX_GIVEBACKS``, counted in the
state history), so a job that can never start still ends Crashed, with its reason.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect.client.schemas.objects import StateType
from prefect.states import AwaitingRetry

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

log = logging.getLogger("setlist.workers.unstarted")

GIVEBACK_MESSAGE = "setlist: the job process exited before its flow run started"
MAX_GIVEBACKS = 3
DELAY_S = 10.0


async def _givebacks(client: PrefectClient, run_id: UUID) -> int:
    history = await client.read_flow_run_states(run_id)
    return sum(1 for state in history if (state.message or "").startswith(GIVEBACK_MESSAGE))


async def give_back_unstarted(client: PrefectClient, run_id: UUID, status_code: int) -> bool:
    """Put ``run_id`` back to Scheduled when its job exited (``status_code`` ≠ 0) before
    the flow started. → whether it was given back (the worker then reports no crash)."""
    if status_code == 0:
        return False
    run = await client.read_flow_run(run_id)
    state = run.state
    if run.run_count or state is None or state.type != StateType.PENDING:
        return False  # it ran, or something else moved it on: not ours to undo
    given = await _givebacks(client, run_id)
    if given >= MAX_GIVEBACKS:
        log.warning("flow run %s: its job never started after %d tries", run_id, given)
        return False
    due = datetime.now(UTC) + timedelta(seconds=DELAY_S * (given + 1))
    result = await client.set_flow_run_state(
        run_id,
        AwaitingRetry(
            scheduled_time=due,
            message=f"{GIVEBACK_MESSAGE} (exit status {status_code}); scheduled again",
        ),
    )
    accepted = result.status.value == "ACCEPT"
    if accepted:
        log.warning("flow run %s: job exited %s before the flow started; rescheduled",
                    run_id, status_code)  # fmt: skip
    return accepted


class GivesBackUnstarted:
    """Worker mixin: a job that exited before its flow run started reschedules the run
    (``give_back_unstarted``) and is reported to Prefect's worker as a clean exit."""

    async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
        result = await super().run(flow_run, configuration, task_status)  # type: ignore[misc]
        code = getattr(result, "status_code", 0)
        try:
            given = await give_back_unstarted(self.client, flow_run.id, code)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - Prefect's crash handling still applies
            log.exception("flow run %s: could not check whether its job started", flow_run.id)
            return result
        return result.model_copy(update={"status_code": 0}) if given else result
