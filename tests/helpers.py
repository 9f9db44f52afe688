"""Small waits shared by server tests: the server records some things asynchronously."""

from __future__ import annotations

import asyncio
import time

from setlist.core import audit


async def wait_for_events(client, tenant_id: str, name: str, count: int = 1, timeout: float = 20):
    """Events are persisted by a server service a moment after they are accepted."""
    deadline = time.monotonic() + timeout
    while True:
        events = [e for e in await audit.read_trail(client, tenant_id) if e.event == name]
        if len(events) >= count or time.monotonic() > deadline:
            assert len(events) >= count, f"expected {count} {name} events, got {len(events)}"
            return events
        await asyncio.sleep(0.5)
