"""The warnings' digest: one notification per period listing every warning alert that
fired in it, sent to the digest route's block (typically e-mail, ``blocks/smtp_email.py``).

Warnings are worth a look within the day, not a message each: the digest collects them
from Prefect's own record, the ``prefect.automation.triggered`` events of the warning
automations (``automations.alert_automations``), so it needs no copy of any alert and
misses none that fired while nobody was sending. The period's end is kept in a Prefect
variable (``setlist_alert_digest_until``), so consecutive digests neither overlap nor
leave a gap, whoever sends them and however long the sender was away; a period without
a warning sends nothing. Sent by the metrics exporter every ``SETLIST_ALERT_DIGEST_MINUTES``
(``setlist metrics``, which ``make up`` runs and ``k8s/base/metrics.yaml`` deploys once),
or on demand by ``setlist automations digest --send``.

What an alert names (a run, a tenant) is the platform's, not the sender's: run names are
Setlist's seed-style names, and the body is plain text the block sends as it is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import PrefectClient
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

from setlist.observability.automations import (
    Severity,
    notification_block_id,
    stored_routes,
    tagged_automations,
)

UNTIL_VARIABLE = "setlist_alert_digest_until"
TRIGGERED = "prefect.automation.triggered"
# Events reach the record a moment after they occur: a period ends this far in the past.
SETTLE = timedelta(seconds=30)
FIRST_PERIOD = timedelta(hours=24)  # how far back the very first digest looks
MAX_LINES = 500


@dataclass(frozen=True)
class Fired:
    occurred: datetime
    alert: str  # the automation's name, e.g. "setlist: run failed"
    subject: str  # what it is about: a run's name, or the resource id


def _subject(event: Any) -> str:
    payload = event.payload or {}
    triggering = payload.get("triggering_event") or {}
    resource = triggering.get("resource") or {}
    if resource.get("prefect.resource.name"):
        return str(resource["prefect.resource.name"])
    labels = payload.get("triggering_labels") or {}
    return str(resource.get("prefect.resource.id") or labels.get("prefect.resource.id") or "?")


async def warning_automations(client: PrefectClient) -> dict[str, str]:
    """Automation id → name, for every warning alert automation."""
    tag = f"setlist:severity:{Severity.warning.value}"
    return {str(a.id): a.name for a in await tagged_automations(client) if tag in a.tags}


async def collect(client: PrefectClient, since: datetime, until: datetime) -> list[Fired]:
    """Every warning alert that fired in [since, until), oldest first."""
    names = await warning_automations(client)
    if not names:
        return []
    flt = EventFilter(
        occurred=EventOccurredFilter(since=since, until=until),
        event=EventNameFilter(name=[TRIGGERED]),
        order="ASC",
    )
    found: list[Fired] = []
    page = await client.read_events(filter=flt, limit=50)
    while True:
        for event in page.events:
            automation_id = event.resource.id.removeprefix("prefect.automation.")
            if automation_id in names and since <= event.occurred < until:
                found.append(Fired(event.occurred, names[automation_id], _subject(event)))
        if not page.next_page:
            return found
        page = await client.read_events_page(page.next_page)


def render(warnings: list[Fired], since: datetime, until: datetime) -> tuple[str, str]:
    """(subject, body): the count per alert, then each warning with its time."""
    end = f"{until:%H:%M}" if until.date() == since.date() else f"{until:%Y-%m-%d %H:%M}"
    span = f"{since:%Y-%m-%d %H:%M}–{end} UTC"
    subject = f"[warning] Setlist digest: {len(warnings)} warnings, {span}"
    by_alert: dict[str, list[Fired]] = defaultdict(list)
    for w in warnings:
        by_alert[w.alert].append(w)
    lines = [f"{len(warnings)} warnings between {span}.", ""]
    for alert, items in sorted(by_alert.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"{alert.removeprefix('setlist: ')} ({len(items)})")
        lines += [f"  {w.occurred:%H:%M:%S}  {w.subject}" for w in items[:MAX_LINES]]
        if len(items) > MAX_LINES:
            lines.append(f"  … and {len(items) - MAX_LINES} more")
        lines.append("")
    return subject, "\n".join(lines).rstrip() + "\n"


async def _until_stored(client: PrefectClient) -> datetime | None:
    variable = await client.read_variable_by_name(UNTIL_VARIABLE)
    if variable is None or not isinstance(variable.value, str):
        return None
    try:
        return datetime.fromisoformat(variable.value)
    except ValueError:
        return None


async def _store_until(client: PrefectClient, until: datetime) -> None:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    if await client.read_variable_by_name(UNTIL_VARIABLE) is None:
        await client.create_variable(VariableCreate(name=UNTIL_VARIABLE, value=until.isoformat()))
    else:
        await client.update_variable(VariableUpdate(name=UNTIL_VARIABLE, value=until.isoformat()))


@dataclass
class DigestResult:
    since: datetime
    until: datetime
    warnings: int
    sent_to: str | None  # the block, when something was sent


async def send_due(
    client: PrefectClient, *, now: datetime | None = None, dry_run: bool = False
) -> DigestResult | None:
    """The digest of the period since the last one, sent to the digest route's block;
    None when no digest route is set. A period with no warning sends nothing; either
    way the period is done (unless ``dry_run``). A failed send raises and the period
    stays due, so the next try sends it."""
    from prefect.blocks.core import Block

    routes = await stored_routes(client)
    until = (now or datetime.now(UTC)) - SETTLE
    since = await _until_stored(client) or until - FIRST_PERIOD
    if routes is None or not routes.digest or since >= until:
        return None
    warnings = await collect(client, since, until)
    sent_to = None
    if warnings and not dry_run:
        block_id = await notification_block_id(client, routes.digest)
        document = await client.read_block_document(block_id, include_secrets=False)
        block_cls = Block.get_block_class_from_schema(document.block_schema)  # type: ignore[arg-type]
        block = await block_cls.aload(routes.digest)
        subject, body = render(warnings, since, until)
        with block.raise_on_failure():
            await block.notify(body=body, subject=subject)
        sent_to = routes.digest
    if not dry_run:
        await _store_until(client, until)
    return DigestResult(since, until, len(warnings), sent_to)
