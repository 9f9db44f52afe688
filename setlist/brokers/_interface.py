"""The broker layer's definitions: errors, positions, names, ``Message``, ``Consumer``
and ``Broker``. Import them from ``base``, which adds ``open_broker``.

They live here, below the adapters, because ``open_broker`` needs the adapters and the
adapters need these: one module for both would be an import cycle. The behaviour every
adapter must give is described in ``base``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from setlist.core.tenancy import SetlistError, validate_tenant_id

DEFAULT_MAX_PENDING = 1_000_000
# The largest micro-batch one fetch may ask for; NATS's max_ack_pending is twice this.
MAX_BATCH = 10_000
GROUP = "setlist-ingest"
CONSUMER = "ingest"
USER_PREFIX = "setlist-stream-"
URL_SCHEMES: dict[str, tuple[str, ...]] = {
    "redis": ("redis", "rediss", "unix"),
    "nats": ("nats", "tls", "ws", "wss"),
}
# ASCII digits only: str.isdigit() and \d would take '١' or '²'. 64 characters cover
# Redis ids (two 64-bit numbers) with room to spare.
_POSITION = re.compile(r"[0-9]+(-[0-9]+)*")
POSITION_MAX = 64


class BrokerError(SetlistError):
    """A broker refused or failed a request; the message says which and why."""


class StreamFull(BrokerError):
    """The tenant's stream holds ``max_pending`` messages: the producer must back off."""


class BrokerKind(StrEnum):
    redis = "redis"
    nats = "nats"


def position_key(position: str) -> tuple[int, ...]:
    """The sort key of a broker position: ``"1733350000000-5"`` → ``(1733350000000, 5)``,
    ``"42"`` → ``(42,)``. Compare keys, never the strings (``"9" > "10"``)."""
    if not isinstance(position, str) or len(position) > POSITION_MAX:
        raise BrokerError(
            f"not a broker position: {position!r}; expected at most {POSITION_MAX} "
            "characters of '-'-separated non-negative integers like '42' or '1733350000000-5'"
        )
    if not _POSITION.fullmatch(position):
        raise BrokerError(
            f"not a broker position: {position!r}; expected '-'-separated non-negative "
            "integers like '42' or '1733350000000-5'"
        )
    return tuple(int(part) for part in position.split("-"))


@dataclass(frozen=True)
class StreamNames:
    """Every broker name of one tenant's stream, from a validated tenant id."""

    tenant_id: str

    @classmethod
    def of(cls, tenant_id: str) -> StreamNames:
        """Refuses a bad tenant id with the reason, before anything reaches a broker."""
        return cls(validate_tenant_id(tenant_id))

    @property
    def redis_key(self) -> str:
        # The hash tag {<tenant>} keeps all of a tenant's keys on one Redis Cluster slot.
        return f"setlist:stream:{{{self.tenant_id}}}:events"

    @property
    def redis_key_pattern(self) -> str:
        """The ACL key pattern of the tenant's Redis keys (``identity``)."""
        return f"setlist:stream:{{{self.tenant_id}}}:*"

    @property
    def nats_stream(self) -> str:
        # A tenant id is [a-z0-9-]: never '.', '*', '>', whitespace or a path separator,
        # which NATS forbids in stream names; '-' is allowed and kept.
        return f"SETLIST_EVENTS_{self.tenant_id}"

    @property
    def nats_subject(self) -> str:
        return f"setlist.events.{self.tenant_id}"

    @property
    def username(self) -> str:
        """The tenant's own broker user, where the broker has per-user permissions."""
        return f"{USER_PREFIX}{self.tenant_id}"


@dataclass(frozen=True)
class Message:
    """One event as delivered: ``produced_ms`` is the broker's own timestamp of it
    (epoch ms); ``handle`` is what the adapter needs to ack it."""

    position: str
    data: bytes
    produced_ms: int
    handle: Any = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[int, ...]:
        return position_key(self.position)


def nats_inbox_prefix(username: str | None) -> str:
    """Where a NATS connection's replies arrive: a subtree per user, so that a tenant's
    user may subscribe to its own replies and no one else's."""
    return f"_INBOX.{username}" if username else "_INBOX"


def check_url(kind: BrokerKind, url: str) -> str:
    """``url`` if its scheme suits ``kind``; the message never shows a password."""
    parts = urlsplit(url) if isinstance(url, str) else None
    accepted = URL_SCHEMES[BrokerKind(kind).value]
    if parts is None or parts.scheme not in accepted:
        scheme = parts.scheme if parts else type(url).__name__
        raise BrokerError(
            f"not a {kind} URL (scheme {scheme!r}); accepted: "
            + ", ".join(f"{s}://…" for s in accepted)
        )
    return url


def _payloads(events: Sequence[bytes]) -> list[bytes]:
    if isinstance(events, bytes | bytearray | str):
        raise BrokerError("send takes a sequence of events (bytes each), not one event")
    batch = list(events)
    for index, event in enumerate(batch):
        if not isinstance(event, bytes):
            raise BrokerError(
                f"event {index} is {type(event).__name__}; events are bytes (one JSON object "
                "each, encoded by the producer)"
            )
    return batch


class Consumer(ABC):
    """The single reader of one tenant's stream. Async context manager; closing it
    without acking is what a crash looks like to the broker."""

    def __init__(self, names: StreamNames) -> None:
        self.names = names

    @property
    def tenant_id(self) -> str:
        return self.names.tenant_id

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to ``max_messages``, oldest first: on the first fetch any messages given
        earlier to this tenant's consumer and never acked, then new ones; ``[]`` when
        nothing came within ``timeout_s``."""
        if not isinstance(max_messages, int) or not 1 <= max_messages <= MAX_BATCH:
            raise BrokerError(f"max_messages is {max_messages!r}; accepted: 1 to {MAX_BATCH}")
        if not timeout_s >= 0:
            raise BrokerError(f"timeout_s is {timeout_s!r}; accepted: 0 or more seconds")
        return await self._fetch(max_messages, float(timeout_s))

    @abstractmethod
    async def _fetch(self, max_messages: int, timeout_s: float) -> list[Message]: ...

    @abstractmethod
    async def ack(self, messages: Sequence[Message]) -> None:
        """Mark ``messages`` done (after their commit); the broker may then drop them."""

    @abstractmethod
    async def lag(self) -> int:
        """Messages of the stream not yet acked: delivered-unacked plus undelivered."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop consuming; unacked messages stay with the broker for the next consumer."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Broker(ABC):
    """One connection to a broker, for any number of tenants' streams. Async context
    manager (``async with broker: …``); methods also connect on first use."""

    kind: ClassVar[BrokerKind]

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise BrokerError(f"max_pending is {max_pending!r}; accepted: 1 or more messages")
        self.url = check_url(self.kind, url)
        self.username = username
        self.password = password
        self.max_pending = max_pending

    async def send(self, tenant_id: str, events: Sequence[bytes]) -> list[str]:
        """Append ``events`` to the tenant's stream in one batch → their positions, in
        order. Raises ``StreamFull`` (nothing sent) when the stream would then hold more
        than ``max_pending`` messages."""
        names = StreamNames.of(tenant_id)
        batch = _payloads(events)
        if not batch:
            return []
        held = await self._length(names)
        if held + len(batch) > self.max_pending:
            raise StreamFull(
                f"the stream of tenant {names.tenant_id!r} holds {held} messages; "
                f"{len(batch)} more would pass max_pending={self.max_pending}: retry after "
                "the consumer catches up"
            )
        return await self._append(names, batch)

    def consumer(self, tenant_id: str) -> Consumer:
        """The tenant's consumer (group ``setlist-ingest``, name ``ingest``)."""
        return self._consumer(StreamNames.of(tenant_id))

    async def stream_length(self, tenant_id: str) -> int:
        """Messages the broker holds for the tenant (neither trimmed nor acked away)."""
        return await self._length(StreamNames.of(tenant_id))

    async def delete_stream(self, tenant_id: str) -> None:
        """Drop the tenant's stream and its consumer state (offboarding)."""
        await self._delete(StreamNames.of(tenant_id))

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection now rather than on first use."""

    @abstractmethod
    async def aclose(self) -> None: ...

    @abstractmethod
    async def _append(self, names: StreamNames, batch: list[bytes]) -> list[str]: ...

    @abstractmethod
    def _consumer(self, names: StreamNames) -> Consumer: ...

    @abstractmethod
    async def _length(self, names: StreamNames) -> int: ...

    @abstractmethod
    async def _delete(self, names: StreamNames) -> None: ...

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
