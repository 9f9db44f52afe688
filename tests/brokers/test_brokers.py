"""The broker layer against the real Redis and NATS servers, each test on both: what
the stream-ingest job's exactly-once scheme relies on (ordered positions, unacked
messages back first after a crash, acked ones never), bounded memory, isolation between
tenants, and the refusals."""

from __future__ import annotations

import json
import time

import pytest

from blocks.stream import StreamBrokerConfig
from setlist.brokers.base import (
    MAX_BATCH,
    BrokerError,
    BrokerKind,
    Consumer,
    Message,
    StreamFull,
    open_broker,
    position_key,
)
from setlist.brokers.nats_jetstream import ACK_WAIT_S, NatsBroker
from setlist.brokers.redis_streams import RedisBroker
from setlist.core.tenancy import InvalidTenantId
from tests.brokers.conftest import URLS

DEAD = {BrokerKind.redis: "redis://127.0.0.1:1", BrokerKind.nats: "nats://127.0.0.1:1"}


async def drain(consumer: Consumer, count: int, timeout: float = 5.0) -> list[Message]:
    """Fetch until ``count`` messages came or ``timeout`` passed (polls with back-off)."""
    got: list[Message] = []
    deadline, wait = time.monotonic() + timeout, 0.05
    while len(got) < count and time.monotonic() < deadline:
        got += await consumer.fetch(count - len(got), wait)
        wait = min(wait * 2, 1.0)
    return got


def events(n: int, tag: str = "") -> list[bytes]:
    return [json.dumps({"tenant": tag, "i": i}).encode() for i in range(n)]


def positions(messages: list[Message]) -> list[str]:
    return [m.position for m in messages]


# ---- ordering and the round trip


async def test_round_trip_keeps_order_and_data(broker, tenants):
    tenant = tenants()
    sent = events(25, tenant)
    before = time.time_ns() // 1_000_000
    first = await broker.send(tenant, sent[:20])
    second = await broker.send(tenant, sent[20:])
    after = time.time_ns() // 1_000_000
    keys = [position_key(p) for p in first + second]
    assert keys == sorted(keys) and len(set(keys)) == 25  # strictly increasing, across batches
    assert await broker.stream_length(tenant) == 25

    async with broker.consumer(tenant) as consumer:
        got = await drain(consumer, 25)
        assert positions(got) == first + second
        assert [m.data for m in got] == sent
        assert all(before - 1000 <= m.produced_ms <= after + 1000 for m in got)
        await consumer.ack(got)
        assert await consumer.fetch(10, 0.2) == []
        assert await consumer.lag() == 0
    assert await broker.stream_length(tenant) == 0


async def test_an_idle_fetch_returns_empty_after_its_timeout(broker, tenants):
    async with broker.consumer(tenants()) as consumer:
        start = time.monotonic()
        assert await consumer.fetch(5, 0.3) == []
        assert 0.2 <= time.monotonic() - start < 2.0
        assert await consumer.fetch(5, 0) == []


# ---- at-least-once: a crash gives the unacked messages back, oldest first


@pytest.mark.parametrize("crash", ["consumer closed", "connection dropped"])
async def test_unacked_messages_come_back_first_after_a_crash(kind, broker, tenants, crash):
    tenant = tenants()
    old = await broker.send(tenant, events(3, "old"))
    if crash == "consumer closed":
        dead = broker.consumer(tenant)
        assert positions(await drain(dead, 3)) == old
        await dead.aclose()
    else:
        async with open_broker(kind, URLS[kind]) as doomed:  # its connection dies with it
            assert positions(await drain(doomed.consumer(tenant), 3)) == old
    new = await broker.send(tenant, events(2, "new"))

    start = time.monotonic()
    async with broker.consumer(tenant) as restarted:
        got = await drain(restarted, 5, timeout=ACK_WAIT_S + 5)
        elapsed = time.monotonic() - start
        assert positions(got) == old + new  # the dead one's first, before anything new
        assert elapsed < 5, f"redelivery took {elapsed:.1f} s"
        await restarted.ack(got)


async def test_acked_messages_never_come_back_and_the_stream_shrinks(broker, tenants):
    tenant = tenants()
    sent = await broker.send(tenant, events(10))
    async with broker.consumer(tenant) as consumer:
        got = await drain(consumer, 10)
        done = got[:3] + got[4:6]  # out of order: the 4th stays unacked
        await consumer.ack(done)
        # Redis keeps acked entries above the oldest unacked one; NATS drops each.
        assert 5 <= await broker.stream_length(tenant) <= 7
        assert await consumer.lag() == 5

    async with broker.consumer(tenant) as restarted:
        again = await drain(restarted, 5)
        assert positions(again) == [sent[3], *sent[6:]]
        assert await restarted.fetch(10, 0.3) == []
        await restarted.ack(again)
    assert await broker.stream_length(tenant) == 0

    async with broker.consumer(tenant) as later:
        assert await later.fetch(10, 0.3) == []


async def test_lag_counts_undelivered_and_unacked(broker, tenants):
    tenant = tenants()
    async with broker.consumer(tenant) as consumer:
        assert await consumer.lag() == 0
        await broker.send(tenant, events(10))
        assert await consumer.lag() == 10
        first = await drain(consumer, 4)
        assert len(first) == 4 and await consumer.lag() == 10  # 4 unacked + 6 undelivered
        await consumer.ack(first)
        assert await consumer.lag() == 6
        rest = await drain(consumer, 6)
        await consumer.ack(rest[:2])
        assert await consumer.lag() == 4


# ---- isolation


async def test_a_tenant_consumer_never_sees_another_tenants_events(broker, tenants):
    a = tenants()
    b = tenants(f"{a}-b")  # a prefix of the other: no key pattern or subject may match both
    await broker.send(a, events(4, a))
    await broker.send(b, events(6, b))
    async with broker.consumer(a) as ca, broker.consumer(b) as cb:
        got_a, got_b = await drain(ca, 10, timeout=1.5), await drain(cb, 10, timeout=1.5)
        assert [json.loads(m.data)["tenant"] for m in got_a] == [a] * 4
        assert [json.loads(m.data)["tenant"] for m in got_b] == [b] * 6
        await ca.ack(got_a)
        assert await cb.lag() == 6
        assert await broker.stream_length(b) == 6


# ---- refusals


@pytest.mark.parametrize("kind", list(BrokerKind), ids=str)
@pytest.mark.parametrize(
    "bad", ["", "Acme", "a.b", "a*", "a>", "a b", "a/b", "-a", "a_b", "ü", "a" * 51]
)
async def test_a_bad_tenant_id_is_refused_before_any_broker_call(kind, bad):
    broker = open_broker(kind, DEAD[kind])  # nothing listens: a call would fail otherwise
    start = time.monotonic()
    with pytest.raises(InvalidTenantId):
        await broker.send(bad, [b"{}"])
    with pytest.raises(InvalidTenantId):
        broker.consumer(bad)
    with pytest.raises(InvalidTenantId):
        await broker.stream_length(bad)
    with pytest.raises(InvalidTenantId):
        await broker.delete_stream(bad)
    assert time.monotonic() - start < 0.5
    await broker.aclose()


async def test_send_refuses_with_stream_full_over_max_pending(kind, tenants):
    tenant = tenants()
    async with open_broker(kind, URLS[kind], max_pending=5) as broker:
        await broker.send(tenant, events(3))
        with pytest.raises(StreamFull, match="max_pending=5"):
            await broker.send(tenant, events(3))
        assert await broker.stream_length(tenant) == 3  # nothing of the refused batch
        await broker.send(tenant, events(2))
        with pytest.raises(StreamFull):
            await broker.send(tenant, events(1))
        async with broker.consumer(tenant) as consumer:
            await consumer.ack(await drain(consumer, 2))
        assert len(await broker.send(tenant, events(2))) == 2  # room again once acked


async def test_events_must_be_bytes(broker, tenants):
    tenant = tenants()
    with pytest.raises(BrokerError, match="event 1 is str"):
        await broker.send(tenant, [b"{}", "{}"])  # type: ignore[list-item]
    with pytest.raises(BrokerError, match="not one event"):
        await broker.send(tenant, b"{}")  # type: ignore[arg-type]
    assert await broker.send(tenant, []) == []
    assert await broker.stream_length(tenant) == 0


@pytest.mark.parametrize(
    ("max_messages", "timeout_s"), [(0, 1.0), (MAX_BATCH + 1, 1.0), (1, -1.0), (1, float("nan"))]
)
async def test_fetch_refuses_bad_arguments(max_messages, timeout_s):
    consumer = open_broker(BrokerKind.redis, DEAD[BrokerKind.redis]).consumer("acme")
    with pytest.raises(BrokerError):
        await consumer.fetch(max_messages, timeout_s)


def test_open_broker_refuses_unknown_kinds_and_urls():
    assert isinstance(open_broker(BrokerKind.redis, "redis://h:6379"), RedisBroker)
    assert isinstance(open_broker("nats", "nats://h:4222"), NatsBroker)  # type: ignore[arg-type]
    with pytest.raises(BrokerError, match="unknown broker kind 'kafka'"):
        open_broker("kafka", "kafka://h")  # type: ignore[arg-type]
    with pytest.raises(BrokerError, match="not a nats URL"):
        open_broker(BrokerKind.nats, "redis://h:6379")
    with pytest.raises(BrokerError, match="max_pending"):
        open_broker(BrokerKind.redis, "redis://h", max_pending=0)


# ---- positions


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("9", "10"),
        ("1733350000000-9", "1733350000000-10"),
        ("1733350000000-5", "1733350000001-0"),
        ("0", "1"),
        ("42", "18446744073709551616"),
    ],
)
def test_positions_order_as_numbers(low, high):
    assert position_key(low) < position_key(high)


@pytest.mark.parametrize(
    "junk",
    ["", "-", "-1", "1-", "1--2", "a", "1.5", " 1", "1 ", "+1", "0x1", "١", "²", "1" * 65, None, 7],
)
def test_position_key_refuses_junk(junk):
    with pytest.raises(BrokerError, match="not a broker position"):
        position_key(junk)  # type: ignore[arg-type]


# ---- the block


def test_the_block_opens_its_broker_and_masks_the_password():
    block = StreamBrokerConfig(kind="nats", url="nats://nats:4222", username="u", password="pw")
    assert "pw" not in repr(block)
    broker = block.open(max_pending=7)
    assert isinstance(broker, NatsBroker) and broker.password == "pw" and broker.max_pending == 7
    with pytest.raises(ValueError, match="not a redis URL"):
        StreamBrokerConfig(kind="redis", url="nats://nats:4222")
