"""The platform's automations, kept on the Prefect server by name.

The platform's own (``platform_automations``, applied by ``apply_platform`` whether or
not anyone is notified):

- a flow run that stops beating (its process or node died: SIGKILL, node loss, OOM
  kill) → Crashed. Nothing else would ever end it: Prefect learns of a crash from the
  process that watches the run, and that one died with it. A Crashed run is the
  platform's failure, so it is not billed (``setlist.billing.metering``), and it frees
  its tenant's concurrency slot.

The alerts (``alert_automations``, applied by ``apply``):

- a Setlist run ends Failed or Crashed → notification;
- a Setlist run stays Pending longer than its band's SLA → notification (one automation
  per band, a proactive trigger per flow run);
- a critical security finding (``setlist.security.finding`` on a tenant's resource whose
  ``setlist.severity`` label is ``critical``) → notification.

Every alert notifies through one notification block (Slack, a custom webhook, …; any
Prefect notification block). ``apply`` and ``apply_platform`` create the missing ones
and update the others in place, so they can run on every ``setlist up``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from setlist.core import audit
from setlist.core.settings import get_settings
from setlist.core.tenancy import Priority, SetlistError

ALERT_BLOCK = "setlist-alerts"
TAGS = ["setlist", "setlist:alert"]

# How long a run of each band may wait Pending (handed to a worker, not yet running).
PENDING_SLA: dict[Priority, timedelta] = {
    Priority.critical: timedelta(minutes=2),
    Priority.high: timedelta(minutes=5),
    Priority.normal: timedelta(minutes=15),
    Priority.low: timedelta(hours=1),
    Priority.batch: timedelta(hours=4),
}
LEFT_PENDING = {
    f"prefect.flow-run.{s}"
    for s in ("Running", "Completed", "Failed", "Crashed", "Cancelling", "Cancelled")
}
_RUN = {"prefect.resource.id": "prefect.flow-run.*"}
_SETLIST_RUN = {"prefect.resource.id": "prefect.tag.setlist", "prefect.resource.role": "tag"}

PLATFORM_TAGS = ["setlist", "setlist:platform"]
UNRESPONSIVE = "setlist: unresponsive run crashed"
HEARTBEAT = "prefect.flow-run.heartbeat"
# What a run may do instead of beating again: end, or leave Running without a process
# that keeps beating — rescheduled (a preempted pod's run goes back to Scheduled),
# awaiting a retry or a slot, paused or suspended, being cancelled. Each of these is
# alive or in other hands; only silence while Running is death.
LEFT_RUNNING = {
    f"prefect.flow-run.{s}"
    for s in (
        "Completed",
        "Failed",
        "Crashed",
        "Cancelled",
        "Cancelling",
        "Scheduled",
        "Late",
        "AwaitingRetry",
        "AwaitingConcurrencySlot",
        "Pending",
        "Paused",
        "Suspended",
    )
}


def unresponsive_automation(within: timedelta | None = None) -> AutomationCore:
    """Marks a flow run Crashed once it has sent no heartbeat for ``within`` (default:
    ``SETLIST_UNRESPONSIVE_SECONDS``). It watches every flow run on the server, so it
    needs the jobs to beat more often than that (``SETLIST_HEARTBEAT_SECONDS``, which
    Setlist's workers give every job). Not forced: a run that ended meanwhile stays as
    it ended."""
    within = within or timedelta(seconds=get_settings().unresponsive_seconds)
    seconds = int(within.total_seconds())
    return AutomationCore(
        name=UNRESPONSIVE,
        description=(
            f"A flow run sent no heartbeat for {seconds} s while Running: its process or "
            "node is gone. Marked Crashed (not billed; its slots are freed)."
        ),
        tags=PLATFORM_TAGS,
        trigger=EventTrigger(
            match=_RUN,
            after={HEARTBEAT},
            expect={HEARTBEAT, *LEFT_RUNNING},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {seconds} s: the run's process or node died "
                    "(marked Crashed by Setlist's unresponsive-run automation)"
                ),
            )
        ],
    )


def platform_automations(within: timedelta | None = None) -> list[AutomationCore]:
    return [unresponsive_automation(within)]


def alert_automations(block_document_id: Any) -> list[AutomationCore]:
    def notify(subject: str, body: str) -> list:
        return [SendNotification(block_document_id=block_document_id, subject=subject, body=body)]

    run_body = (
        "Flow run {{ flow_run.name }} ({{ flow.name }}) is {{ flow_run.state.name }}.\n"
        "Tags: {{ flow_run.tags | join(', ') }}\n{{ flow_run | ui_url }}"
    )
    automations = [
        AutomationCore(
            name="setlist: run failed or crashed",
            description="A Setlist job ended Failed or Crashed.",
            tags=TAGS,
            trigger=EventTrigger(
                match=_RUN,
                match_related=_SETLIST_RUN,
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=notify("Setlist: {{ flow_run.name }} {{ flow_run.state.name }}", run_body),
        )
    ]
    for band, sla in PENDING_SLA.items():
        minutes = int(sla.total_seconds() // 60)
        automations.append(
            AutomationCore(
                name=f"setlist: {band.value} run pending over SLA",
                description=f"A {band.value}-band run stayed Pending over {minutes} min.",
                tags=TAGS,
                trigger=EventTrigger(
                    match=_RUN,
                    match_related={
                        "prefect.resource.id": f"prefect.tag.band:{band.value}",
                        "prefect.resource.role": "tag",
                    },
                    after={"prefect.flow-run.Pending"},
                    expect=LEFT_PENDING,
                    for_each={"prefect.resource.id"},
                    posture=Posture.Proactive,
                    threshold=1,
                    within=sla,
                ),
                actions=notify(
                    f"Setlist: {{{{ flow_run.name }}}} pending over {minutes} min",
                    f"A {band.value}-band run waits for a worker longer than its SLA "
                    f"({minutes} min).\n" + run_body,
                ),
            )
        )
    automations.append(
        AutomationCore(
            name="setlist: critical security finding",
            description="A security scan reported a critical finding for a tenant.",
            tags=TAGS,
            trigger=EventTrigger(
                match={"prefect.resource.id": "setlist.tenant.*", "setlist.severity": "critical"},
                expect={"setlist.security.finding"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=notify(
                "Setlist: critical security finding for {{ event.resource['setlist.tenant'] }}",
                "{{ event.payload | tojson }}",
            ),
        )
    )
    return automations


async def notification_block_id(client: PrefectClient, name: str = ALERT_BLOCK) -> Any:
    """The id of the notification block ``name``, of whatever notification type it is."""
    from prefect.blocks.core import Block
    from prefect.exceptions import ObjectNotFound

    docs = [d for d in await client.read_block_documents(include_secrets=False) if d.name == name]
    for doc in docs:
        try:
            block_cls = Block.get_block_class_from_schema(doc.block_schema)  # type: ignore[arg-type]
        except (KeyError, ValueError, ObjectNotFound):
            continue
        if "notify" in getattr(block_cls, "get_block_capabilities", lambda: set())():
            return doc.id
    raise SetlistError(
        f"no notification block named {name!r}; create one (Slack, custom webhook, …) in the "
        "UI or pass --slack-url / --webhook-url to `setlist automations apply`"
    )


async def save_notification_block(
    name: str, *, slack_url: str | None = None, webhook_url: str | None = None
) -> None:
    """Create or replace the notification block ``name``: Slack or a custom JSON webhook."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook

    if slack_url:
        await SlackWebhook(url=slack_url).asave(name, overwrite=True)
    elif webhook_url:
        await CustomWebhookNotificationBlock(
            name="setlist-alerts",
            url=webhook_url,
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).asave(name, overwrite=True)


async def _upsert(client: PrefectClient, automation: AutomationCore) -> str:
    """One automation by name: updated in place (extra copies deleted), or created."""
    existing = await client.read_automations_by_name(automation.name)
    if existing:
        await client.update_automation(existing[0].id, automation)
        for extra in existing[1:]:
            await client.delete_automation(extra.id)
        return "updated"
    await client.create_automation(automation)
    return "created"


async def apply(client: PrefectClient, block: str = ALERT_BLOCK) -> list[tuple[str, str]]:
    """Create or update every alert automation; → (name, created|updated) pairs."""
    block_id = await notification_block_id(client, block)
    done = [(a.name, await _upsert(client, a)) for a in alert_automations(block_id)]
    await audit.emit(
        client, "setlist.automations.applied", None, payload={"block": block, "done": dict(done)}
    )
    return done


async def apply_platform(
    client: PrefectClient, within: timedelta | None = None
) -> list[tuple[str, str]]:
    """Create or update the platform's own automations, which notify nobody and so need
    no block: a platform without alerts must still end its dead runs. → (name,
    created|updated) pairs."""
    done = [(a.name, await _upsert(client, a)) for a in platform_automations(within)]
    await audit.emit(
        client, "setlist.automations.applied", None, payload={"block": None, "done": dict(done)}
    )
    return done
