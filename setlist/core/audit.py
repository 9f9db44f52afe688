"""The audit trail: every action on jobs and tenants is a Prefect event.

Events are the server's own record (they show in the UI's event feed and can drive
automations), so the trail needs no store of its own. Each event names the actor (who),
the event (what), the tenant as its resource and the object acted on as a related
resource; ``occurred`` is when.
"""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from prefect.client.orchestration import PrefectClient
from prefect.events import Event
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)

from setlist.core.settings import get_settings

EVENT_PREFIX = "setlist."


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
) -> Event:
    """An audit event; ``obj`` is (resource id, role), e.g. a flow run and 'flow-run'.
    ``tenant_id`` None: an act on the platform itself (alerts applied, a configuration
    imported, queues released), whose resource is ``setlist.platform``."""
    actor = actor or current_actor()
    related = [
        {
            "prefect.resource.id": f"setlist.actor.{actor}",
            "prefect.resource.role": "actor",
            "prefect.resource.name": actor,
        }
    ]
    if obj:
        related.append({"prefect.resource.id": obj[0], "prefect.resource.role": obj[1]})
    return Event(
        id=uuid4(),
        occurred=datetime.now(UTC),
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


async def read_trail(
    client: PrefectClient,
    tenant_id: str | None = None,
    since: timedelta = timedelta(days=7),
    limit: int = 200,
) -> list[Event]:
    """Setlist's audit events, newest first, optionally for one tenant."""
    flt = EventFilter(
        occurred=EventOccurredFilter(since=datetime.now(UTC) - since),
        event=EventNameFilter(prefix=[EVENT_PREFIX]),
        resource=EventResourceFilter(id=[tenant_resource_id(tenant_id)]) if tenant_id else None,
        order="DESC",
    )
    page = await client.read_events(filter=flt, limit=min(limit, 50))
    events = list(page.events)
    while page.next_page and len(events) < limit:
        page = await client.read_events_page(page.next_page)
        events.extend(page.events)
    return events[:limit]
