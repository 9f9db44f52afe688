"""The platform's automations, kept on the Prefect server by name.

The platform's own (``platform_automations``, applied by ``apply_platform`` whether or
not anyone is notified):

- a flow run that stops beating (its process or node died: SIGKILL, node loss, OOM
  kill) → Crashed. Nothing else would ever end it: Prefect learns of a crash from the
  process that watches the run, and that one died with it. A Crashed run is the
  platform's failure, so it is not billed (``setlist.billing.metering``), and it frees
  its tenant's concurrency slot.

The alerts (``alert_automations``, applied by ``apply``), each of one severity:

- critical — the platform broke its promise or a tenant is exposed, so someone must act
  now: a run Crashed (its process or node died: the platform's failure, not the job's);
  a critical- or high-band run Pending over its SLA (those bands are sold on latency); a
  critical security finding (``setlist.security.finding`` on a tenant's resource whose
  ``setlist.severity`` label is ``critical``);
- warning — worth a look within the day, and the tenant sees it anyway: a run Failed
  (its own code or data); a normal-, low- or batch-band run Pending over its SLA.

Each severity notifies its own notification block (PagerDuty for critical, Slack for
warnings…; any Prefect notification block), falling back to ``setlist-alerts`` so that a
setup with one block keeps working. A digest block, where configured, gets every
warning of a period in one notification (``digest.py``). The routes are kept in a
Prefect variable, so a bare ``apply`` (``setlist up`` runs one) keeps the routing an
operator chose. ``apply`` and ``apply_platform`` create
the missing automations and update the others in place, so they can run on every
``setlist up``; ``apply`` also deletes the alert automations no route needs any more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from setlist.core import audit
from setlist.core.settings import get_settings
from setlist.core.tenancy import Priority, SetlistError

ALERT_BLOCK = "setlist-alerts"
ALERT_TAG = "setlist:alert"
TAGS = ["setlist", ALERT_TAG]
ROUTES_VARIABLE = "setlist_alert_routes"
# Prefect's own PagerDuty block needs a REST API key besides the routing key and posts
# to a fixed host; the Events API v2 needs only the routing key, and its URL can be
# pointed at the EU endpoint (or at a test sink).
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


class Severity(StrEnum):
    critical = "critical"
    warning = "warning"


# Bands sold on latency: their runs waiting past the SLA page someone.
URGENT_BANDS = frozenset({Priority.critical, Priority.high})


def pending_severity(band: Priority) -> Severity:
    return Severity.critical if band in URGENT_BANDS else Severity.warning


@dataclass(frozen=True)
class Routes:
    """Notification block names per severity, and of the warnings' digest. ``digest`` has
    no fallback: without one the warnings already reach ``warning``, and a second copy
    there would be noise."""

    critical: str = ALERT_BLOCK
    warning: str = ALERT_BLOCK
    digest: str | None = None

    @classmethod
    def of(
        cls,
        block: str | None = None,
        *,
        critical: str | None = None,
        warning: str | None = None,
        digest: str | None = None,
    ) -> Routes:
        fallback = block or ALERT_BLOCK
        return cls(critical or fallback, warning or fallback, digest or None)

    def blocks(self) -> set[str]:
        return {self.critical, self.warning} | ({self.digest} if self.digest else set())


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


def _alert(
    name: str,
    severity: Severity,
    description: str,
    trigger: EventTrigger,
    subject: str,
    body: str,
    block_document_id: Any,
) -> AutomationCore:
    return AutomationCore(
        name=name,
        description=f"{description} Severity: {severity.value}.",
        tags=[*TAGS, f"setlist:severity:{severity.value}"],
        trigger=trigger,
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject=f"[{severity.value}] {subject}",
                body=body,
            )
        ],
    )


def alert_automations(
    critical_block_id: Any,
    warning_block_id: Any = None,
    sla: dict[Priority, timedelta] | None = None,
) -> list[AutomationCore]:
    """One automation per alert, notifying the block of its severity. The digest needs
    none of its own: it reads what the warning automations fired (``digest.py``).
    ``warning_block_id`` defaults to the critical block, as one block for everything did
    before severities."""
    warning_block_id = warning_block_id or critical_block_id
    block_of = {Severity.critical: critical_block_id, Severity.warning: warning_block_id}
    sla = sla or PENDING_SLA
    run_body = (
        "Flow run {{ flow_run.name }} ({{ flow.name }}) is {{ flow_run.state.name }}.\n"
        "Tags: {{ flow_run.tags | join(', ') }}\n{{ flow_run | ui_url }}"
    )
    run_subject = "Setlist: {{ flow_run.name }} {{ flow_run.state.name }}"
    alerts: list[tuple[str, Severity, str, EventTrigger, str, str]] = []
    for state, severity, why in (
        ("Crashed", Severity.critical, "its process or node died: the platform's failure"),
        ("Failed", Severity.warning, "its own code or data failed it"),
    ):
        alerts.append(
            (
                f"setlist: run {state.lower()}",
                severity,
                f"A Setlist job ended {state}: {why}.",
                EventTrigger(
                    match=_RUN,
                    match_related=_SETLIST_RUN,
                    expect={f"prefect.flow-run.{state}"},
                    posture=Posture.Reactive,
                    threshold=1,
                ),
                run_subject,
                run_body,
            )
        )
    for band, within in sla.items():
        minutes = f"{within.total_seconds() / 60:g}"
        alerts.append(
            (
                f"setlist: {band.value} run pending over SLA",
                pending_severity(band),
                f"A {band.value}-band run stayed Pending over {minutes} min.",
                EventTrigger(
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
                    within=within,
                ),
                f"Setlist: {{{{ flow_run.name }}}} pending over {minutes} min",
                f"A {band.value}-band run waits for a worker longer than its SLA "
                f"({minutes} min).\n" + run_body,
            )
        )
    alerts.append(
        (
            "setlist: critical security finding",
            Severity.critical,
            "A security scan reported a critical finding for a tenant.",
            EventTrigger(
                match={"prefect.resource.id": "setlist.tenant.*", "setlist.severity": "critical"},
                expect={"setlist.security.finding"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            "Setlist: critical security finding for {{ event.resource['setlist.tenant'] }}",
            "{{ event.payload | tojson }}",
        )
    )
    return [_alert(*alert, block_of[alert[1]]) for alert in alerts]


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
        "UI or pass --slack-url / --webhook-url (or, per severity, --pagerduty-key, "
        "--warning-slack-url, --digest-webhook-url) to `setlist automations apply`"
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


async def save_email_block(
    name: str,
    *,
    smtp_server: str,
    to: list[str],
    sender: str,
    port: int = 587,
    security: str = "starttls",
    username: str | None = None,
    password: str | None = None,
) -> None:
    """Create or replace ``name`` as an e-mail through an SMTP relay (the digest's usual
    channel). A malformed address, host or port is refused before anything is saved."""
    from pydantic import ValidationError

    from blocks.smtp_email import SmtpEmail, SmtpSecurity

    try:
        block = SmtpEmail(
            smtp_server=smtp_server,
            smtp_port=port,
            security=SmtpSecurity(security),
            username=username,
            password=password,
            from_address=sender,
            to_addresses=to,
        )
    except (ValidationError, ValueError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"msg": str(exc)}]
        raise SetlistError(
            "e-mail block refused: " + "; ".join(str(e["msg"]) for e in errors)
        ) from None
    await block.asave(name, overwrite=True)


async def save_pagerduty_block(
    name: str, routing_key: str, *, url: str = PAGERDUTY_EVENTS_URL
) -> None:
    """Create or replace ``name`` as a PagerDuty Events API v2 trigger. The routing key
    is kept as the block's secret, never in its plain fields."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    await CustomWebhookNotificationBlock(
        name="setlist-alerts-pagerduty",
        url=url,
        json_data={
            "routing_key": "{{routing_key}}",
            "event_action": "trigger",
            "payload": {
                "summary": "{{subject}}",
                "source": "setlist",
                "severity": "critical",
                "custom_details": {"body": "{{body}}"},
            },
        },
        secrets={"routing_key": routing_key},
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


async def stored_routes(client: PrefectClient) -> Routes | None:
    variable = await client.read_variable_by_name(ROUTES_VARIABLE)
    return Routes(**variable.value) if variable and isinstance(variable.value, dict) else None


async def _store_routes(client: PrefectClient, routes: Routes) -> None:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    value = asdict(routes)
    if await client.read_variable_by_name(ROUTES_VARIABLE) is None:
        await client.create_variable(VariableCreate(name=ROUTES_VARIABLE, value=value))
    else:
        await client.update_variable(VariableUpdate(name=ROUTES_VARIABLE, value=value))


async def tagged_automations(client: PrefectClient) -> list:
    """The platform's alert automations, asked of the server by their tag: a read of
    every automation stops at the server's page (200), and each tenant's deployments own
    several of their own."""
    from prefect.events.filters import AutomationFilter, AutomationFilterTags

    return await client.read_automations(
        automations=AutomationFilter(tags=AutomationFilterTags(all_=[ALERT_TAG]))
    )


async def apply(
    client: PrefectClient,
    block: str | None = None,
    *,
    critical: str | None = None,
    warning: str | None = None,
    digest: str | None = None,
    sla: dict[Priority, timedelta] | None = None,
) -> list[tuple[str, str]]:
    """Create or update every alert automation, and delete the alert automations no
    route needs any more (a digest dropped, a name from an earlier release); → (name,
    created|updated|deleted) pairs.

    With no block named at all, the routes stored by the last ``apply`` are kept: ``setlist
    up`` re-applies on every start and must not undo the operator's routing. Any block
    named replaces all the routes: a severity left out falls back to ``block``, or
    ``setlist-alerts``."""
    explicit = any((block, critical, warning, digest))
    routes = Routes.of(block, critical=critical, warning=warning, digest=digest)
    if not explicit:
        routes = await stored_routes(client) or routes
    ids = {name: await notification_block_id(client, name) for name in sorted(routes.blocks())}
    wanted = alert_automations(ids[routes.critical], ids[routes.warning], sla)
    done = [(a.name, await _upsert(client, a)) for a in wanted]
    names = {a.name for a in wanted}
    for stale in await tagged_automations(client):
        if stale.name not in names:
            await client.delete_automation(stale.id)
            done.append((stale.name, "deleted"))
    await _store_routes(client, routes)
    await audit.emit(
        client,
        "setlist.automations.applied",
        None,
        payload={"block": block or ALERT_BLOCK, "routes": asdict(routes), "done": dict(done)},
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
