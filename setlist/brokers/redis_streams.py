"""Redis Streams adapter: one stream key per tenant, one consumer group, one consumer.

A tenant's events live at ``setlist:stream:{<tenant>}:events``, each entry one field
``data``; its position is the entry id (``<ms>-<seq>``), whose ms part is the broker's
timestamp. The group ``setlist-ingest`` is made on the first fetch from id ``0``, so
events sent before any consumer existed are delivered too.

Redelivery: an entry read and never acked stays in the group's pending entries list
(PEL) under the consumer name ``ingest``. A new ``Consumer`` first pages through that
list (``XREADGROUP … 0``) and only then reads new entries (``>``): a restarted job gets
the dead one's unacked entries back at once, before anything newer. Within one
``Consumer``'s life nothing is redelivered; the job commits and acks each batch or
starts a new ``Consumer``.

Bounded memory: after ``XACK``, ``XTRIM MINID`` drops every entry below the oldest one
still pending (or, with none pending, up to the last delivered one). Everything there
is acked: pending entries are a subset of the delivered ones. The trim is exact, not
``~``, so ``stream_length`` counts what is really held; it assumes this group is the
stream's only reader.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from setlist.brokers._interface import (
    CONSUMER,
    DEFAULT_MAX_PENDING,
    GROUP,
    Broker,
    BrokerError,
    BrokerKind,
    Consumer,
    Message,
    StreamNames,
    position_key,
)

FIELD = b"data"
_SEQ_MAX = 2**64 - 1

log = logging.getLogger("setlist.brokers.redis")


@contextlib.asynccontextmanager
async def _errors(action: str, names: StreamNames | None = None) -> AsyncIterator[None]:
    """Redis failures as ``BrokerError`` naming what was attempted (never the URL, which
    may hold a password)."""
    try:
        yield
    except RedisError as exc:
        whose = f" of tenant {names.tenant_id!r}" if names else ""
        raise BrokerError(f"Redis could not {action}{whose}: {type(exc).__name__}: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _after(entry_id: str) -> str:
    """The smallest entry id greater than ``entry_id``."""
    ms, seq = position_key(entry_id)
    return f"{ms + 1}-0" if seq == _SEQ_MAX else f"{ms}-{seq + 1}"


def _our_group(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((g for g in groups if _text(g["name"]) == GROUP), None)


def trim_point(pending: dict[str, Any], group: dict[str, Any] | None) -> str | None:
    """Where ``XTRIM MINID`` may cut: every entry below it is acked. None: nothing to cut."""
    if pending.get("pending"):
        return _text(pending["min"])
    if group is None:
        return None
    last = _text(group["last-delivered-id"])
    return None if last == "0-0" else _after(last)


class RedisConsumer(Consumer):
    """The group's consumer ``ingest``: its own pending entries first, then new ones."""

    def __init__(self, client: aioredis.Redis, names: StreamNames) -> None:
        super().__init__(names)
        self._client = client
        self._key = names.redis_key
        self._group_ready = False
        # Where the replay of the pending entries list stands; None once it is done.
        self._replay_from: str | None = "0"

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._client.xgroup_create(self._key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(
        self, start: str, count: int, block_ms: int | None
    ) -> tuple[list[Message], str | None]:
        """→ (messages, id of the last entry read, deleted ones included)."""
        reply = await self._client.xreadgroup(
            GROUP, CONSUMER, {self._key: start}, count=count, block=block_ms
        )
        entries = reply[0][1] if reply else []
        messages, vanished = [], []
        for raw_id, fields in entries:
            position = _text(raw_id)
            if not fields or FIELD not in fields:
                vanished.append(position)  # deleted behind the group's back, or foreign
                continue
            ms = position_key(position)[0]
            messages.append(Message(position=position, data=fields[FIELD], produced_ms=ms))
        if vanished:
            log.warning(
                "tenant %s: %d pending entries have no %r field (deleted or foreign); acking them",
                self.tenant_id,
                len(vanished),
                FIELD.decode(),
            )
            await self._client.xack(self._key, GROUP, *vanished)
        return messages, (_text(entries[-1][0]) if entries else None)

    async def _fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        async with _errors("read the stream", self.names):
            await self._ensure_group()
            while self._replay_from is not None:
                messages, last = await self._read(self._replay_from, max_messages, None)
                self._replay_from = last
                if messages:
                    return messages
            # BLOCK 0 would wait forever: a zero timeout reads without blocking.
            block_ms = max(1, round(timeout_s * 1000)) if timeout_s > 0 else None
            messages, _ = await self._read(">", max_messages, block_ms)
            return messages

    async def ack(self, messages: Sequence[Message]) -> None:
        ids = [m.position for m in messages]
        for position in ids:
            position_key(position)
        if not ids:
            return
        async with _errors("ack and trim the stream", self.names):
            pipe = self._client.pipeline(transaction=False)
            pipe.xack(self._key, GROUP, *ids)
            pipe.xpending(self._key, GROUP)
            pipe.xinfo_groups(self._key)
            _, pending, groups = await pipe.execute()
            cut = trim_point(pending, _our_group(groups))
            if cut is not None:
                await self._client.xtrim(self._key, minid=cut, approximate=False)

    async def lag(self) -> int:
        async with _errors("measure the lag", self.names):
            held = await self._client.xlen(self._key)
            if not held:
                return 0  # pending entries are never trimmed, so none are left either
            group = _our_group(await self._client.xinfo_groups(self._key))
            if group is None or group.get("lag") is None:
                # No consumer yet, or Redis cannot count (entries deleted mid-stream):
                # what is held is at most acked entries between pending ones.
                return int(held)
            return int(group["pending"]) + int(group["lag"])

    async def aclose(self) -> None:
        """Nothing to release: the connection pool is the broker's."""


class RedisBroker(Broker):
    """A ``redis.asyncio`` client (a small connection pool) for every tenant's stream."""

    kind = BrokerKind.redis

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        super().__init__(url, username, password, max_pending=max_pending)
        credentials = {"username": username, "password": password}
        self._client = aioredis.Redis.from_url(
            url, **{k: v for k, v in credentials.items() if v is not None}
        )

    async def connect(self) -> None:
        async with _errors("answer a PING"):
            await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _append(self, names: StreamNames, batch: list[bytes]) -> list[str]:
        async with _errors("append to the stream", names):
            pipe = self._client.pipeline(transaction=False)
            for data in batch:
                pipe.xadd(names.redis_key, {FIELD: data})
            return [_text(entry_id) for entry_id in await pipe.execute()]

    def _consumer(self, names: StreamNames) -> RedisConsumer:
        return RedisConsumer(self._client, names)

    async def _length(self, names: StreamNames) -> int:
        async with _errors("measure the stream", names):
            return int(await self._client.xlen(names.redis_key))

    async def _delete(self, names: StreamNames) -> None:
        async with _errors("delete the stream", names):
            await self._client.delete(names.redis_key)
