"""The broker interface of the stream-ingest job: a tenant's stream, sent to and consumed.

Exactly-once into the tenant's table is the consumer's work, not the broker's: the job
commits a micro-batch, stores the last committed position in its table manifest, and
only then acks; after a crash it skips every redelivered message whose position is ≤
the committed one. That needs two things from a broker, which both adapters give:

- **at-least-once, oldest first after a restart.** A new ``Consumer`` gets every message
  its tenant's consumer was given and never acked *before* any new one (Redis: its
  pending entries, read from id ``0``; NATS: the durable consumer is made afresh, so
  delivery starts again at the oldest message the work-queue stream still holds). A
  redelivery that came after newer messages were committed would be skipped as
  "≤ committed" and lost, so a consumer that fails to commit a batch must not fetch past
  it: it closes and a new ``Consumer`` starts over.
- **positions totally ordered per tenant stream** (``position_key``).

Memory stays bounded by the tenant's lag: acked messages are dropped (Redis: ``XTRIM
MINID`` below the oldest unacked entry; NATS: work-queue retention), and ``send``
refuses with ``StreamFull`` once the stream would hold more than ``max_pending``
messages. Unconsumed events are never trimmed to make room (Redis ``MAXLEN``): losing
them is worse than a producer told to back off (HTTP 503/429). The check is one read
before the batch, so producers racing each other can overshoot it by a batch each.

Each stream has exactly one reader (group ``setlist-ingest``, consumer ``ingest``):
the platform runs one stream-ingest job per tenant. Names come from ``StreamNames`` only.

Import everything from here. The definitions live in ``_interface``, below the adapters,
so that ``open_broker`` can pick an adapter without an import cycle.
"""

from __future__ import annotations

from setlist.brokers._interface import (
    CONSUMER,
    DEFAULT_MAX_PENDING,
    GROUP,
    MAX_BATCH,
    POSITION_MAX,
    URL_SCHEMES,
    USER_PREFIX,
    Broker,
    BrokerError,
    BrokerKind,
    Consumer,
    Message,
    StreamFull,
    StreamNames,
    check_url,
    nats_inbox_prefix,
    position_key,
)

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerKind",
    "CONSUMER",
    "Consumer",
    "DEFAULT_MAX_PENDING",
    "GROUP",
    "MAX_BATCH",
    "Message",
    "POSITION_MAX",
    "StreamFull",
    "StreamNames",
    "URL_SCHEMES",
    "USER_PREFIX",
    "check_url",
    "nats_inbox_prefix",
    "open_broker",
    "position_key",
]


def open_broker(
    kind: BrokerKind,
    url: str,
    username: str | None = None,
    password: str | None = None,
    *,
    max_pending: int = DEFAULT_MAX_PENDING,
) -> Broker:
    """A broker of ``kind`` at ``url``, not yet connected (``async with`` it)."""
    try:
        kind = BrokerKind(kind)
    except ValueError:
        accepted = ", ".join(k.value for k in BrokerKind)
        raise BrokerError(f"unknown broker kind {kind!r}; accepted: {accepted}") from None
    # Imported on use: each client library takes a few hundred ms to import, and the
    # gateway and the CLI import this module without ever opening a broker. (No cycle:
    # the adapters import ``_interface``, not this module.)
    if kind is BrokerKind.redis:
        from setlist.brokers.redis_streams import RedisBroker

        return RedisBroker(url, username, password, max_pending=max_pending)
    from setlist.brokers.nats_jetstream import NatsBroker

    return NatsBroker(url, username, password, max_pending=max_pending)
