"""Stream delivery (``deliver=stream``): a source's events into the tenant's broker stream.

A source of listening events sends many events a request; as Prefect events they would
flood an API made for lifecycle signals. Such a delivery's array at ``events_path`` goes
instead to the tenant's stream on the platform broker, one message per element, each
re-serialised compactly (orjson) as the JSON object it is. The stream-ingest job
validates and quarantines them exactly like data-etl, so fields are not checked here; an
element naming another tenant goes to the stream of the tenant the delivery is for (the
job quarantines it there as ``foreign_tenant``): a request reaches one stream, its own.

The broker's ack is the durability: the app answers 202 only once ``send`` has the
messages' positions, so this path needs no spool. Every other outcome leaves nothing for
the gateway to keep, and the sender's own retry delivers:

- no array at ``events_path``, or an element that is not a JSON object: 422 with the
  element's index, nothing sent; more than ``STREAM_EVENTS_MAX`` elements: 413;
- the tenant's stream over its bound (``StreamFull``): 429 with Retry-After;
- the broker unreachable, slower than ``timeout``, or not configured on this gateway
  (``SETLIST_STREAM_BROKER_URL``): 503 with Retry-After.

The sender retries (Standard Webhooks and GitHub senders do on any non-2xx): a batch is
sent whole or refused whole, except when the broker fails midway, and then the retry
sends the first events again. The table keeps the first row of each event id, so that
adds no row; the live figures may count them twice.

The gateway keeps one broker connection (``connect``, from the app's lifespan): a
connection per request would cost a TCP (and TLS) handshake each.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from blocks.stream import StreamBrokerConfig
from blocks.webhook import STREAM_EVENTS_MAX, WebhookSource
from setlist.brokers.base import DEFAULT_MAX_PENDING, Broker, BrokerError
from setlist.gateway.mapping import Unprocessable, extract_tenant, resolve_pointer

log = logging.getLogger("setlist.gateway")

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


class TooManyEvents(Unprocessable):
    """More events in one delivery than ``STREAM_EVENTS_MAX`` (413: split the batch)."""


class NoBroker(BrokerError):
    """This gateway has no stream broker configured."""


@dataclass(frozen=True)
class StreamBatch:
    """One delivery's events for one tenant's stream, each a compact JSON object."""

    tenant_id: str
    events: list[bytes]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), "a number")


def _encoded(index: int, element: Any) -> bytes:
    if not isinstance(element, dict):
        raise Unprocessable(f"event {index} is {_json_type(element)}, not a JSON object")
    try:
        return orjson.dumps(element)
    except orjson.JSONEncodeError as exc:  # an integer past 64 bits, which orjson refuses
        raise Unprocessable(f"event {index} can't be re-encoded: {exc}") from None


def stream_batch(config: WebhookSource, body: Any) -> StreamBatch:
    """The tenant (the source's ``tenant_path``) and its events (``events_path``) of a
    parsed body; ``Unprocessable`` naming the first element that is not a JSON object."""
    tenant_id = extract_tenant(config, body)
    elements = resolve_pointer(body, config.events_path)
    if not isinstance(elements, list):
        raise Unprocessable(f"no array of events at {config.events_path}")
    if len(elements) > STREAM_EVENTS_MAX:
        raise TooManyEvents(
            f"{len(elements)} events in one delivery; at most {STREAM_EVENTS_MAX}: split the batch"
        )
    return StreamBatch(tenant_id, [_encoded(i, e) for i, e in enumerate(elements)])


async def connect(
    platform: StreamBrokerConfig | None, max_pending: int = DEFAULT_MAX_PENDING
) -> Broker | None:
    """The gateway's broker (None without one). A broker down at start is logged, not
    fatal: the event path does not need it, and the client connects on first use."""
    if platform is None:
        return None
    broker = platform.open(max_pending)
    try:
        await broker.connect()
    except BrokerError as exc:
        log.warning("stream broker unreachable at start; stream deliveries wait for it: %s", exc)
    return broker


async def send(broker: Broker | None, batch: StreamBatch, timeout: float) -> list[str]:
    """``batch`` into its tenant's stream → the positions, once the broker has them.
    Raises ``StreamFull``, ``NoBroker``, ``BrokerError`` or ``TimeoutError``."""
    if broker is None:
        raise NoBroker(
            "stream delivery is not set up on this gateway: it needs the platform's broker "
            "(SETLIST_STREAM_BROKER_URL)"
        )
    async with asyncio.timeout(timeout):
        return await broker.send(batch.tenant_id, batch.events)
