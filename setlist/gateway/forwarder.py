"""Sends the gateway's spool to Prefect's events API, in the background.

Requests never wait for Prefect: they end once the event is spooled, and the forwarder
posts batches from the outbox. While the API is down or refusing, the events stay spooled
and the forwarder retries with exponential backoff (0.25 s up to ``max_backoff``), so an
outage delays events and loses none. It also forgets old delivery ids, hourly, when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

from setlist.gateway.spool import Spool

log = logging.getLogger("setlist.gateway")


class Forwarder:
    """Sends the spool to Prefect's events API in batches; retries with backoff."""

    def __init__(
        self,
        spool: Spool,
        batch: int = 100,
        max_backoff: float = 10.0,
        client: PrefectClient | None = None,
    ):
        self.spool = spool
        self.client = client  # the app's own; None: one for the forwarder's lifetime
        self.batch_size = batch
        self.max_backoff = max_backoff
        self.wake = asyncio.Event()
        self.failures = 0
        self.sent_total = 0
        self._stop = False
        self._pruned = time.monotonic()

    async def _post(self, client, events: list[dict[str, Any]]) -> None:
        response = await client.request("POST", "/events", json=events)
        response.raise_for_status()

    async def flush_once(self, client) -> int:
        rows = self.spool.batch(self.batch_size)
        if not rows:
            return 0
        await self._post(client, [json.loads(e) for _, e in rows])
        self.spool.sent([seq for seq, _ in rows])
        self.sent_total += len(rows)
        return len(rows)

    async def run(self) -> None:
        from prefect.client.orchestration import get_client

        backoff = 0.25
        async with contextlib.nullcontext(self.client) if self.client else get_client() as client:
            while not self._stop:
                # Cleared before reading the spool: an event accepted while a batch is in
                # flight sets it again, so it is sent at once, not after the idle timeout.
                self.wake.clear()
                try:
                    sent = await self.flush_once(client)
                except Exception as exc:  # the server is down or refusing: keep the spool
                    self.failures += 1
                    log.warning(
                        "Prefect events API unavailable (%s); %d event(s) kept in the spool, "
                        "retry in %.1f s",
                        type(exc).__name__,
                        self.spool.pending,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                backoff = 0.25
                if sent:
                    continue
                if time.monotonic() - self._pruned > 3600:  # forget old delivery ids hourly
                    self.spool.prune()
                    self._pruned = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
