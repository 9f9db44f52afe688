"""One leading dispatcher among its replicas, and whether any leads now.

The claim is a Prefect global concurrency limit of 1 (increments are atomic), liveness a
Prefect variable the leader rewrites every few seconds; ages are measured by the server's
clock (its Date header), so replicas with skewed clocks agree on who is stale. It needs
nothing beyond the Prefect server that every replica already talks to.

``dispatcher_active`` lives here, below the loop, because tenant queue creation and the
workers' grant gate ask it too: they import this module, never the dispatcher.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from email.utils import parsedate_to_datetime

from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound

from setlist.dispatch._api import _call, _ts

log = logging.getLogger("setlist.dispatcher")

LEADER_LIMIT = "setlist-dispatcher"
HEARTBEAT_VARIABLE = "setlist_dispatcher"
HEARTBEAT_TTL = 15.0  # a leader silent this long is presumed gone


def _server_now(resp) -> float:
    """The server's clock from the response's Date header (whole seconds: + 0.5)."""
    try:
        return parsedate_to_datetime(resp.headers["date"]).timestamp() + 0.5
    except (KeyError, TypeError, ValueError):
        return time.time()


async def read_heartbeat(client: PrefectClient) -> tuple[str | None, float | None]:
    """(holder, seconds since its last heartbeat by the server's clock), or (None, None)."""
    resp = await _call(client, "GET", f"/variables/name/{HEARTBEAT_VARIABLE}")
    if resp is None:
        return None, None
    raw = resp.json()
    value = raw.get("value") or {}
    updated = _ts(raw.get("updated"))
    age = max(_server_now(resp) - updated, 0.0) if updated else None
    return value.get("holder") if isinstance(value, dict) else None, age


async def dispatcher_active(client: PrefectClient) -> bool:
    """Whether a dispatcher leads now (its heartbeat is fresh)."""
    holder, age = await read_heartbeat(client)
    return holder is not None and age is not None and age < HEARTBEAT_TTL


class Leadership:
    """At most one leading replica: the claim is a Prefect global concurrency limit of 1
    (increments are atomic), liveness a heartbeat variable the leader rewrites each cycle.

    A standby claims when the slot is free, or — when the heartbeat is older than
    ``HEARTBEAT_TTL`` (the leader died, or the server lost its state) — resets the slot
    first. A leader that finds another holder in the heartbeat steps down.
    """

    def __init__(self, holder: str | None = None, beat_s: float = 3.0):
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.beat_s = beat_s  # how often a leader confirms itself and beats
        self.leading = False
        self._beaten = -math.inf

    async def _ensure_limit(self, client: PrefectClient) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            await client.read_global_concurrency_limit_by_name(LEADER_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=LEADER_LIMIT, limit=1, active=True)
                )

    async def _beat(self, client: PrefectClient) -> None:
        body = {"name": HEARTBEAT_VARIABLE, "value": {"holder": self.holder}}
        if await _call(client, "PATCH", f"/variables/name/{HEARTBEAT_VARIABLE}", json=body) is None:
            await _call(client, "POST", "/variables/", json=body)

    async def _claim(self, client: PrefectClient) -> bool:
        import httpx

        try:
            await client.increment_concurrency_slots([LEADER_LIMIT], 1, "concurrency")
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return False
            raise
        return True

    async def hold(self, client: PrefectClient) -> bool:
        """Claim or confirm leadership; returns whether this replica leads now."""
        if self.leading:
            if time.monotonic() - self._beaten < self.beat_s:
                return True
            holder, _ = await read_heartbeat(client)
            if holder not in (None, self.holder):
                log.warning("dispatcher %s took over; %s stands by", holder, self.holder)
                self.leading = False
                return False
            await self._beat(client)
            self._beaten = time.monotonic()
            return True
        await self._ensure_limit(client)
        if not await self._claim(client):
            holder, age = await read_heartbeat(client)
            if holder is not None and age is not None and age < HEARTBEAT_TTL:
                return False
            # The slot is held but nobody beats: the holder is gone. Reset, then claim.
            from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

            await client.update_global_concurrency_limit(
                LEADER_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0)
            )
            if not await self._claim(client):
                return False
        await self._beat(client)
        self._beaten = time.monotonic()
        self.leading = True
        log.info("dispatcher %s leads", self.holder)
        return True

    async def release(self, client: PrefectClient) -> None:
        """Step down so a standby takes over at once."""
        if not self.leading:
            return
        self.leading = False
        holder, _ = await read_heartbeat(client)
        if holder == self.holder:
            await _call(client, "DELETE", f"/variables/name/{HEARTBEAT_VARIABLE}")
            await client.release_concurrency_slots([LEADER_LIMIT], 1, 1.0)
