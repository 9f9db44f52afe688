"""NATS JetStream adapter: one work-queue stream per tenant, one durable pull consumer.

A tenant's events are published on ``setlist.events.<tenant>`` into the stream
``SETLIST_EVENTS_<tenant>`` (file storage, work-queue retention: a message is removed
once acked, so the stream holds exactly the tenant's lag). Its position is the stream
sequence; ``produced_ms`` is the message's stored timestamp from the ack metadata.

Redelivery: the consumer ``ingest`` is durable, explicit-ack, with ``ack_wait`` 10 s and
at most ``2 × MAX_BATCH`` messages unacked. Left alone, a dead consumer's unacked
messages would come back only when their ack_wait ran out, and by then a restarted job
may have been given newer ones, committed them, and would skip the late ones as already
committed. So a new ``Consumer`` deletes and re-creates the durable consumer before its
first fetch: delivery starts again at the stream's first message, which in a work-queue
stream is the oldest unacked one, so the dead consumer's messages come back at once and
before anything new. ack_wait stays as the backstop for a live consumer that stalls:
the job commits and acks every ≤ 2 s, so 10 s is five commit intervals of slack, and a
message it still holds after that goes to whoever pulls next.

Streams are created on first use (``send``, or a consumer's first fetch) if missing;
an existing stream is taken as it is unless its retention is not work-queue, which
cannot be changed in place and is refused. Creating a stream needs the platform's
credential: a tenant's own user (``identity.nats_user_permissions``) may not, so that
it cannot claim another subject. A connection with a username uses ``_INBOX.<username>``
as its inbox prefix, the one reply subtree that user may subscribe to.

``send`` publishes the whole batch asynchronously and then awaits every publish ack.
No ``Nats-Msg-Id`` is set: producers have no stable event id to put there, and a random
one would not deduplicate a retried batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from setlist.brokers._interface import (
    CONSUMER,
    DEFAULT_MAX_PENDING,
    MAX_BATCH,
    Broker,
    BrokerError,
    BrokerKind,
    Consumer,
    Message,
    StreamNames,
    nats_inbox_prefix,
)

ACK_WAIT_S = 10.0
MAX_ACK_PENDING = 2 * MAX_BATCH
API_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

log = logging.getLogger("setlist.brokers.nats")


def stream_config(names: StreamNames) -> StreamConfig:
    return StreamConfig(
        name=names.nats_stream,
        subjects=[names.nats_subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
    )


def consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        name=CONSUMER,
        durable_name=CONSUMER,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_ack_pending=MAX_ACK_PENDING,
    )


def _message(msg: Msg) -> Message:
    meta = msg.metadata
    return Message(
        position=str(meta.sequence.stream),
        data=msg.data,
        produced_ms=(meta.timestamp - _EPOCH) // _MS,
        handle=msg,
    )


class NatsConsumer(Consumer):
    """The durable pull consumer ``ingest`` of one tenant's stream."""

    def __init__(self, broker: NatsBroker, names: StreamNames) -> None:
        super().__init__(names)
        self._broker = broker
        self._sub: JetStreamContext.PullSubscription | None = None
        self._nc: Client | None = None  # the connection the subscription lives on

    async def _start(self) -> JetStreamContext.PullSubscription:
        self._nc = await self._broker.client()
        js = await self._broker.jetstream()
        stream = self.names.nats_stream
        await self._broker.ensure_stream(self.names)
        async with self._broker.errors("restart the consumer", self.names):
            try:
                await js.delete_consumer(stream, CONSUMER)
            except NotFoundError:
                pass
            await js.add_consumer(stream, consumer_config())
            return await js.pull_subscribe_bind(CONSUMER, stream=stream)

    async def _fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        if self._sub is None:
            self._sub = await self._start()
        async with self._broker.errors("fetch from the stream", self.names):
            try:
                # nats-py needs a positive timeout; 10 ms is its no-wait.
                msgs = await self._sub.fetch(max_messages, timeout=max(timeout_s, 0.01))
            except TimeoutError:  # nats-py raises its own subclass or asyncio's
                if self._nc is not None and self._nc.is_closed:
                    raise BrokerError(
                        f"the NATS connection of tenant {self.tenant_id!r}'s consumer is closed"
                    ) from None
                return []
        return [_message(msg) for msg in msgs]

    async def ack(self, messages: Sequence[Message]) -> None:
        handles = [m.handle for m in messages]
        if not handles:
            return
        if not all(isinstance(h, Msg) for h in handles):
            raise BrokerError("only messages fetched from a NATS consumer can be acked here")
        async with self._broker.errors("ack on the stream", self.names):
            for msg in handles[:-1]:
                with contextlib.suppress(MsgAlreadyAckdError):
                    await msg.ack()
            # One round trip for the batch: the server handles a connection's acks in
            # order, so when the last is confirmed, the others are done too.
            try:
                await handles[-1].ack_sync(timeout=self._broker.api_timeout_s)
            except MsgAlreadyAckdError:
                await (await self._broker.client()).flush(timeout=self._broker.api_timeout_s)

    async def lag(self) -> int:
        js = await self._broker.jetstream()
        async with self._broker.errors("measure the lag", self.names):
            try:
                info = await js.consumer_info(self.names.nats_stream, CONSUMER)
            except NotFoundError:
                return await self._broker._length(self.names)
            return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def aclose(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()


class NatsBroker(Broker):
    """One NATS connection (connected on first use) for every tenant's stream."""

    kind = BrokerKind.nats

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        api_timeout_s: float = API_TIMEOUT_S,
    ) -> None:
        super().__init__(url, username, password, max_pending=max_pending)
        self.api_timeout_s = api_timeout_s
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._ready: set[str] = set()
        # The server's last asynchronous complaint (a permissions violation arrives
        # this way, not as the failing call's error), for the next error message.
        self._last_error: str | None = None

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.warning("nats: %s", self._last_error)

    async def connect(self) -> None:
        await self.client()

    async def client(self) -> Client:
        async with self._lock:
            if self._nc is None:
                options = {"user": self.username, "password": self.password}
                try:
                    self._nc = await asyncio.wait_for(
                        nats.connect(
                            self.url,
                            error_cb=self._on_error,
                            inbox_prefix=nats_inbox_prefix(self.username),
                            connect_timeout=2,
                            reconnect_time_wait=1,
                            **{k: v for k, v in options.items() if v is not None},
                        ),
                        CONNECT_TIMEOUT_S,
                    )
                except (NatsError, OSError, TimeoutError) as exc:
                    cause = self._last_error or f"{type(exc).__name__}: {exc}"
                    raise BrokerError(
                        f"NATS did not accept a connection within {CONNECT_TIMEOUT_S:.0f} s: "
                        f"{cause}"
                    ) from exc
                self._js = self._nc.jetstream(timeout=self.api_timeout_s)
            return self._nc

    async def jetstream(self) -> JetStreamContext:
        await self.client()
        assert self._js is not None
        return self._js

    @contextlib.asynccontextmanager
    async def errors(self, action: str, names: StreamNames) -> AsyncIterator[None]:
        """NATS failures as ``BrokerError``, with the server's last complaint."""
        self._last_error = None
        try:
            yield
        except (NatsError, TimeoutError) as exc:
            detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if self._last_error:
                detail += f" (server: {self._last_error})"
            raise BrokerError(
                f"NATS could not {action} of tenant {names.tenant_id!r}: {detail}"
            ) from exc

    async def ensure_stream(self, names: StreamNames) -> None:
        """Create the tenant's stream if missing; refuse one that is not a work queue."""
        if names.nats_stream in self._ready:
            return
        js = await self.jetstream()
        async with self.errors("set up the stream", names):
            try:
                info = await js.stream_info(names.nats_stream)
            except NotFoundError:
                try:
                    await js.add_stream(stream_config(names))
                except BadRequestError as exc:
                    if "already in use" not in str(exc):
                        raise
                info = await js.stream_info(names.nats_stream)
        if info.config.retention != RetentionPolicy.WORK_QUEUE:
            raise BrokerError(
                f"NATS stream {names.nats_stream} has {info.config.retention} retention; "
                "the stream-ingest job needs workqueue (acked messages are dropped)"
            )
        self._ready.add(names.nats_stream)

    async def aclose(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def _append(self, names: StreamNames, batch: list[bytes]) -> list[str]:
        await self.ensure_stream(names)
        js = await self.jetstream()
        futures: list[asyncio.Future] = []
        async with self.errors("publish to the stream", names):
            try:
                for data in batch:
                    futures.append(
                        await js.publish_async(names.nats_subject, data, stream=names.nats_stream)
                    )
                acks = await asyncio.wait_for(asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
            except BaseException:
                for future in futures:
                    future.cancel()  # frees its slot in nats-py's in-flight limit
                self._ready.discard(names.nats_stream)
                raise
        return [str(ack.seq) for ack in acks]

    def _consumer(self, names: StreamNames) -> NatsConsumer:
        return NatsConsumer(self, names)

    async def _length(self, names: StreamNames) -> int:
        js = await self.jetstream()
        async with self.errors("measure the stream", names):
            try:
                info = await js.stream_info(names.nats_stream)
            except NotFoundError:
                return 0
            return int(info.state.messages)

    async def _delete(self, names: StreamNames) -> None:
        js = await self.jetstream()
        self._ready.discard(names.nats_stream)
        async with self.errors("delete the stream", names):
            try:
                await js.delete_stream(names.nats_stream)
            except NotFoundError:
                pass
