"""``setlist.job.started``: the audit entry of every run a Setlist worker takes.

A run reaches a worker whoever made it: the CLI, the UI's Run button, a schedule, an
automation, a deployment trigger. The worker is the one platform process every run
passes through, and it holds the operator credential, so it records the start; the run
itself, with a run token, could not (``controlplane.policy``). Who made the run is what
Prefect recorded on it (``audit.run_origin``); that an automation is one of the
deployment's own triggers is read from the automation.

The entry is written once the worker's Pending is accepted, the moment the run is the
worker's: a run another worker took, or one cancelled meanwhile, gets none.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from setlist.core import audit
from setlist.core.tenancy import run_tenant

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger("setlist.workers.audited")


async def made_by_trigger(client: PrefectClient, run: FlowRun) -> bool:
    """Whether the automation that made ``run`` is one of its deployment's triggers, as
    onboarding makes them: tagged for the run's tenant, running this very deployment."""
    by = run.created_by
    if not (by and by.id and (by.type or "").upper() == "AUTOMATION" and run.deployment_id):
        return False
    try:
        automation = await client.read_automation(by.id)
    except Exception:  # noqa: BLE001 - deleted since: an automation, whatever it was
        return False
    tenant = run_tenant(run.tags, run.work_queue_name)
    if automation is None or "setlist" not in automation.tags:
        return False
    if f"tenant:{tenant}" not in automation.tags:
        return False
    return any(
        getattr(action, "type", None) == "run-deployment"
        and getattr(action, "deployment_id", None) == run.deployment_id
        for action in automation.actions
    )


async def record_start(client: PrefectClient, run: FlowRun, worker: str | None = None) -> None:
    origin = audit.run_origin(run, trigger=await made_by_trigger(client, run))
    await audit.record(client, audit.started_event(run, origin, worker=worker))


class AuditedStarts:
    """Worker mixin: records ``setlist.job.started`` for each run the worker takes."""

    async def _propose_pending_state(self, flow_run: FlowRun) -> bool:
        taken = await super()._propose_pending_state(flow_run)  # type: ignore[misc]
        if taken:
            try:
                await record_start(self.client, flow_run, worker=self.name)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - the run goes ahead; the gap is in the log
                log.exception("flow run %s started without its audit entry", flow_run.id)
        return taken
