"""Durable event intake: an event the control plane acknowledged is an event it keeps.

Prefect's ``POST /api/events`` answers as soon as the events are on its in-memory bus;
its event persister writes them to the database up to
``PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL`` (5 s) later. A server that
stops in between has acknowledged events it never keeps, and the callers that trust the
answer lose them: the webhook gateway forgets a spooled event once it is acknowledged,
and the audit trail is made of these events (``bench/chaos.py --only
server-restart-postgres`` lost them so). While the database is down the answer is still
204, and the persister drops what it could not write after a few tries.

So the gate takes ``POST /api/events`` itself (``Gate._events``):

1. events whose id the database already has are dropped: a sender that did not see the
   answer sends again, and its redelivery must not reach the triggers twice, also on a
   server started since (Prefect's own memory of the events it saw does not survive a
   restart);
2. the others go to Prefect's handler as before (the bus: triggers, automations);
3. then they are written, and only then is the answer sent. A database that can't be
   read or written is a 503: the sender keeps the events and retries.

The bus before the write: a server stopping between the two has written nothing and
answered nothing, so the sender's retry reaches the triggers (at least once). The other
order would leave an event written that no trigger saw, and step 1 would drop its retry.
The persister's later write of the same events changes nothing (same ids).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

if TYPE_CHECKING:
    from prefect.server.events.schemas.events import Event

PATHS = ("/api/events", "/api/events/")
WRITE_TRIES = 3  # SQLite's single writer: a busy database is worth a second try


class Ledger(Protocol):
    """Which events the database holds, and writing them there."""

    async def known(self, ids: Sequence[UUID]) -> set[UUID]: ...

    async def write(self, events: Sequence[Event]) -> None: ...


class DatabaseLedger:
    """The events table of this server's database, through Prefect's own layer."""

    async def known(self, ids: Sequence[UUID]) -> set[UUID]:
        import sqlalchemy as sa
        from prefect.server.database import provide_database_interface

        db = provide_database_interface()
        async with db.session_context() as session:
            rows = await session.scalars(sa.select(db.Event.id).where(db.Event.id.in_(ids)))
            return set(rows.all())

    async def write(self, events: Sequence[Event]) -> None:
        from prefect.server.database import provide_database_interface
        from prefect.server.events.storage.database import write_events

        db = provide_database_interface()
        for attempt in range(WRITE_TRIES):
            try:
                async with db.session_context(begin_transaction=True) as session:
                    await write_events(session, [e.receive() for e in events])
                return
            except Exception:
                if attempt + 1 == WRITE_TRIES:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))


def parse(raw: bytes) -> list[Event]:
    """The events of a request body, each id once (the first one kept); ValueError when
    the body is not a list of events (Prefect then answers it as it always does)."""
    from prefect.server.events.schemas.events import Event
    from pydantic import ValidationError

    try:
        items = json.loads(raw)
        if not isinstance(items, list):
            raise ValueError("not a list")
        events = [Event.model_validate(item) for item in items]
    except (ValidationError, TypeError) as exc:
        raise ValueError(str(exc)) from None
    unique: dict[UUID, Event] = {}
    for event in events:
        unique.setdefault(event.id, event)
    return list(unique.values())


def dumps(events: Sequence[Event]) -> bytes:
    body: list[Any] = [e.model_dump(mode="json") for e in events]
    return json.dumps(body).encode()
