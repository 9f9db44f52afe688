"""The audit trail: every action on jobs and tenants is a Prefect event.

Events are the server's own record (they show in the UI's event feed and can drive
automations), so the trail needs no store of its own. Each event names the actor (who),
the event (what), the tenant as its resource and the object acted on as a related
resource; ``occurred`` is when.

Only platform processes write ``setlist.*`` audit events: the CLI, the dispatcher, the
workers. A job's run token is refused them at the gate (``controlplane.policy``), so a
job can't forge an entry about anyone. Every run, however it was created (the CLI, the
UI's Run button, a schedule, an automation or a deployment trigger), passes through a
Setlist worker, which records ``setlist.job.started`` with the creator Prefect recorded
on the run (``run_origin``). A cancel, however requested, is on the server's own record
as the run's ``prefect.flow-run.Cancelling`` (or, for a run that never started, its
``Cancelled``) event; ``read_trail`` reads those back as ``setlist.job.cancelled`` unless
the CLI already recorded that cancel with its actor.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4, uuid5

from prefect.client.orchestration import PrefectClient
from prefect.events import Event
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventRelatedFilter,
    EventResourceFilter,
)

from setlist.core.settings import get_settings
from setlist.core.tenancy import run_tenant

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

EVENT_PREFIX = "setlist."
STARTED = "setlist.job.started"
CANCELLED = "setlist.job.cancelled"
# The actor of what reached the API with the operator credential and left no other trace
# (the UI's Run and Cancel buttons, a script): open-source Prefect has no users.
OPERATOR = "UI/API (operator credential)"
# The label Setlist's submit puts on the runs it creates: who submitted the run.
SUBMITTED_BY = "setlist.submitted-by"


def current_actor() -> str:
    """Who is acting: SETLIST_ACTOR when set (CI, services), else the OS user."""
    actor = get_settings().actor or os.environ.get("SETLIST_ACTOR", "")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return f"uid-{os.getuid()}"


def tenant_resource_id(tenant_id: str) -> str:
    return f"setlist.tenant.{tenant_id}"


PLATFORM_RESOURCE = "setlist.platform"


def build_event(
    name: str,
    tenant_id: str | None,
    *,
    obj: tuple[str, str] | None = None,
    payload: dict[str, Any] | None = None,
    actor: str | None = None,
    also: Sequence[tuple[str, str]] = (),
    event_id: UUID | None = None,
    occurred: datetime | None = None,
) -> Event:
    """An audit event; ``obj`` is (resource id, role), e.g. a flow run and 'flow-run';
    ``also``, more related resources after it. ``tenant_id`` None: an act on the platform
    itself (alerts applied, a configuration imported, queues released), whose resource
    is ``setlist.platform``. ``event_id`` makes a record idempotent: the server keeps one
    event per id, so a retried write is not a second entry."""
    actor = actor or current_actor()
    related = [
        {
            "prefect.resource.id": f"setlist.actor.{actor}",
            "prefect.resource.role": "actor",
            "prefect.resource.name": actor,
        }
    ]
    for rid, role in [*([obj] if obj else []), *also]:
        related.append({"prefect.resource.id": rid, "prefect.resource.role": role})
    return Event(
        id=event_id or uuid4(),
        occurred=occurred or datetime.now(UTC),
        event=name,
        resource=(
            {
                "prefect.resource.id": tenant_resource_id(tenant_id),
                "prefect.resource.name": tenant_id,
                "setlist.tenant": tenant_id,
            }
            if tenant_id
            else {"prefect.resource.id": PLATFORM_RESOURCE, "prefect.resource.name": "platform"}
        ),
        related=related,
        payload={"actor": actor, **(payload or {})},
    )


async def record(client: PrefectClient, event: Event) -> Event:
    """Send the event synchronously, so a command that returns has been audited."""
    response = await client.request(
        "POST",
        "/events",
        json=[event.model_dump(mode="json")],  # type: ignore[arg-type]
    )
    response.raise_for_status()
    return event


async def emit(client: PrefectClient, name: str, tenant_id: str | None, **kwargs: Any) -> Event:
    return await record(client, build_event(name, tenant_id, **kwargs))


# ------------------------------------------------------------------------ who made a run


@dataclass(frozen=True)
class Origin:
    """Who made a run: ``kind`` is cli, schedule, automation, trigger, api, or the
    lower-cased creator type Prefect recorded (Prefect Cloud's user, deployment…)."""

    kind: str
    actor: str


def run_origin(run: FlowRun, *, trigger: bool = False) -> Origin:
    """The creator of ``run`` as Prefect recorded it (``created_by``, ``auto_scheduled``),
    else the submitter Setlist's CLI labelled it with, else the operator credential.
    ``trigger``: the automation that made it is one of its deployment's own triggers."""
    by = run.created_by
    kind = (by.type or "").lower() if by else ""
    name = (by.display_value or (str(by.id) if by.id else "")) if by else ""
    if kind == "automation":
        kind = "trigger" if trigger else "automation"
        return Origin(kind, f"{kind}:{name}")
    if kind == "schedule" or run.auto_scheduled:
        return Origin("schedule", f"schedule:{name or 'deployment schedule'}")
    if kind:
        return Origin(kind, f"{kind}:{name}")
    submitter = (run.labels or {}).get(SUBMITTED_BY)
    if submitter:
        return Origin("cli", str(submitter))
    return Origin("api", OPERATOR)


_STARTS = UUID("6f1c3c52-3f0e-4d57-9a43-2a3d1f0c5e11")


def started_event(run: FlowRun, origin: Origin, *, worker: str | None = None) -> Event:
    """``setlist.job.started`` for ``run``, taken by a worker from its Scheduled state.
    Its id is made from the run and that state: a worker that records it twice (a retry)
    leaves one entry, and a run scheduled again and taken again gets a new one."""
    by = run.created_by
    job = next((t.split(":", 1)[1] for t in run.tags if t.startswith("job:")), None)
    return build_event(
        STARTED,
        run_tenant(run.tags, run.work_queue_name),
        obj=(f"prefect.flow-run.{run.id}", "flow-run"),
        also=[(f"prefect.deployment.{run.deployment_id}", "deployment")]
        if run.deployment_id
        else (),
        actor=origin.actor,
        event_id=uuid5(_STARTS, f"{run.id}:{run.state_id}"),
        payload={
            "actor_kind": origin.kind,
            "created_by": by.model_dump(mode="json") if by else None,
            "auto_scheduled": run.auto_scheduled,
            "flow_run_name": run.name,
            "job_type": job,
            "work_queue": run.work_queue_name,
            "worker": worker,
        },
    )


# ------------------------------------------------------------------------------ reading

# Prefect's own record of a cancel: Cancelling for a run under way; Cancelled straight
# from Scheduled (or Paused) for one that never started, which the server cancels at once.
CANCEL_STATES = ("prefect.flow-run.Cancelling", "prefect.flow-run.Cancelled")
_BY_AUTOMATION = re.compile(r"by Automation ([0-9a-fA-F-]{36})")


def cancel_requests(
    states: Iterable[Event], trail: Iterable[Event], automations: dict[str, str] | None = None
) -> list[Event]:
    """The cancels in Prefect's state events (newest first) that ``trail`` (Setlist's own
    events) does not already hold, as ``setlist.job.cancelled``: one per run, the first
    request. A Cancelled that ends a Cancelling is the same cancel, not a second one.
    ``automations``: id → name, for cancels an automation made."""
    recorded = {
        r.id for e in trail if e.event == CANCELLED for r in e.related if r.role == "flow-run"
    }
    first: dict[str, Event] = {}
    for e in states:
        if e.event not in CANCEL_STATES or e.resource.id in recorded:
            continue
        intended = e.payload.get("intended") or {}
        if e.event.endswith(".Cancelled") and intended.get("from") == "CANCELLING":
            continue
        if e.resource.id not in first or e.occurred < first[e.resource.id].occurred:
            first[e.resource.id] = e
    return [_as_cancel(e, automations or {}) for e in first.values()]


def _cancelling_automation(state: Event) -> str | None:
    """The automation a state message names as the cancel's author (its id)."""
    found = _BY_AUTOMATION.search(state.resource.get("prefect.state-message") or "")
    return found[1] if found else None


def _as_cancel(state: Event, automations: dict[str, str]) -> Event:
    tags = [r.id.removeprefix("prefect.tag.") for r in state.related if r.role == "tag"]
    automation = _cancelling_automation(state)
    creator = next((r for r in state.related if r.role == "creator"), None)
    return build_event(
        CANCELLED,
        run_tenant(tags, None),
        obj=(state.resource.id, "flow-run"),
        also=[(r.id, r.role) for r in state.related if r.role == "deployment"],
        actor=f"automation:{automations.get(automation, automation)}" if automation else OPERATOR,
        event_id=state.id,
        occurred=state.occurred,
        payload={
            "actor_kind": "automation" if automation else "api",
            "source": state.event,
            "from": (state.payload.get("intended") or {}).get("from"),
            "state_message": state.resource.get("prefect.state-message") or "",
            "flow_run_name": state.resource.name,
            "run_created_by": creator.id if creator else None,
        },
    )


async def _read(client: PrefectClient, flt: EventFilter, limit: int) -> list[Event]:
    page = await client.read_events(filter=flt, limit=min(limit, 50))
    events = list(page.events)
    while page.next_page and len(events) < limit:
        page = await client.read_events_page(page.next_page)
        events.extend(page.events)
    return events[:limit]


async def _automation_names(client: PrefectClient, states: list[Event]) -> dict[str, str]:
    """The names of the automations that cancelled runs (a state message has the id)."""
    names = {}
    for automation_id in {a for e in states if (a := _cancelling_automation(e))}:
        try:
            found = await client.read_automation(UUID(automation_id))
        except Exception:  # noqa: BLE001 - not an id after all: the message says which
            found = None
        names[automation_id] = found.name if found else automation_id  # deleted since
    return names


async def read_trail(
    client: PrefectClient,
    tenant_id: str | None = None,
    since: timedelta = timedelta(days=7),
    limit: int = 200,
) -> list[Event]:
    """Setlist's audit events and the cancels on Prefect's own record, newest first,
    optionally for one tenant."""
    when = EventOccurredFilter(since=datetime.now(UTC) - since)
    own = await _read(
        client,
        EventFilter(
            occurred=when,
            event=EventNameFilter(prefix=[EVENT_PREFIX]),
            resource=EventResourceFilter(id=[tenant_resource_id(tenant_id)]) if tenant_id else None,
            order="DESC",
        ),
        limit,
    )
    tag = f"prefect.tag.tenant:{tenant_id}" if tenant_id else "prefect.tag.setlist"
    states = await _read(
        client,
        EventFilter(
            occurred=when,
            event=EventNameFilter(name=list(CANCEL_STATES)),
            related=EventRelatedFilter(resources_in_roles=[(tag, "tag")]),
            order="DESC",
        ),
        limit,
    )
    cancels = cancel_requests(states, own, await _automation_names(client, states))
    return sorted([*own, *cancels], key=lambda e: e.occurred, reverse=True)[:limit]
