"""Stream delivery over real HTTP: a ``deliver=stream`` source's signed batch into the
tenant's stream on a real broker (Redis and NATS JetStream on loopback), and every way
a batch is refused with nothing sent."""

from __future__ import annotations

import uuid

import httpx
import orjson
import pytest
from pydantic import ValidationError

from blocks.stream import StreamBrokerConfig
from blocks.webhook import STREAM_EVENTS_MAX, Delivery, WebhookSource, source_block_name
from setlist.brokers.base import Broker, BrokerKind
from setlist.etl.demo import iter_events
from setlist.gateway.app import TENANT_REFUSED, GatewayConfig
from setlist.gateway.mapping import Unprocessable
from setlist.gateway.sources import save_source
from setlist.gateway.streaming import TooManyEvents, stream_batch
from setlist.tenants.onboarding import TenantSpec, create_tenant
from tests.gateway.test_gateway import SECRET, GatewayThread, _free_port, _std

URLS = {BrokerKind.redis: "redis://127.0.0.1:6379/0", BrokerKind.nats: "nats://127.0.0.1:4222"}


# --------------------------------------------------------------------------- pure


def test_a_stream_batch_is_the_tenant_and_its_objects_reencoded_compactly():
    config = WebhookSource(secret_block="s", deliver=Delivery.stream, events_path="/data/plays")
    events = [{"event_id": "e-1", "ms_played": 1.5, "nested": {"a": [1, None]}}, {}]
    body = {"tenant_id": "acme", "data": {"plays": events}}
    batch = stream_batch(config, body)
    assert batch.tenant_id == "acme"
    assert batch.events == [b'{"event_id":"e-1","ms_played":1.5,"nested":{"a":[1,null]}}', b"{}"]
    with pytest.raises(Unprocessable, match="event 1 is an array, not a JSON object"):
        stream_batch(config, {**body, "data": {"plays": [{}, [], {}]}})
    with pytest.raises(Unprocessable, match="event 0 is null"):
        stream_batch(config, {**body, "data": {"plays": [None]}})
    with pytest.raises(Unprocessable, match="event 0 can't be re-encoded"):  # past 64 bits
        stream_batch(config, {**body, "data": {"plays": [{"n": 2**70}]}})
    with pytest.raises(Unprocessable, match="no array of events at /data/plays"):
        stream_batch(config, {"tenant_id": "acme", "data": {"plays": {"a": 1}}})
    with pytest.raises(Unprocessable, match="no tenant id"):
        stream_batch(config, {"data": {"plays": []}})
    with pytest.raises(TooManyEvents, match="split the batch"):
        stream_batch(config, {**body, "data": {"plays": [{}] * (STREAM_EVENTS_MAX + 1)}})


def test_the_block_defaults_to_events_and_points_into_the_body():
    block = WebhookSource(secret_block="s")
    assert block.deliver == Delivery.event and block.events_path == "/events"
    with pytest.raises(ValidationError, match="events_path must point into the body"):
        WebhookSource(secret_block="s", deliver=Delivery.stream, events_path="")
    with pytest.raises(ValidationError, match="JSON pointer"):
        WebhookSource(secret_block="s", events_path="events")


# --------------------------------------------------------------------------- harness


@pytest.fixture(scope="module", params=[BrokerKind.redis, BrokerKind.nats])
def platform(request) -> StreamBrokerConfig:
    return StreamBrokerConfig(kind=request.param, url=URLS[request.param])


@pytest.fixture(scope="module")
def sgw(prefect_server, platform, tmp_path_factory):
    """A gateway with the platform's broker."""
    config = GatewayConfig(
        spool_path=tmp_path_factory.mktemp("sgw") / "spool.sqlite", stream_broker=platform
    )
    with GatewayThread(config) as thread:
        yield thread


@pytest.fixture
async def http(sgw):
    async with httpx.AsyncClient(base_url=sgw.url, timeout=30) as c:
        yield c


@pytest.fixture
async def broker(platform):
    async with platform.open() as b:
        yield b


@pytest.fixture
async def tenants(client, tenant_id, broker):
    """(a tenant, another tenant id), and their streams removed afterwards."""
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    other = f"other-{uuid.uuid4().hex[:8]}"
    yield tenant_id, other
    for t in (tenant_id, other):
        await broker.delete_stream(t)


async def _stream_source(*allowed: str, **kw) -> str:
    name = f"stream-{uuid.uuid4().hex[:12]}"
    await save_source(name, SECRET, deliver=Delivery.stream, allowed_tenants=list(allowed), **kw)
    return name


def _events(tenant_id: str, n: int) -> list[dict]:
    return list(iter_events(tenant_id, events=n))


def _batch(tenant_id: str, events: list) -> bytes:
    return orjson.dumps({"tenant_id": tenant_id, "events": events})


async def _post(http: httpx.AsyncClient, source: str, body: bytes, **kw) -> httpx.Response:
    """``body`` signed the Standard Webhooks way (a new source's scheme)."""
    return await http.post(f"/hooks/{source}", content=body, headers=_std(body, **kw))


async def _read_all(broker: Broker, tenant_id: str, n: int) -> list[bytes]:
    """The stream's ``n`` messages, oldest first."""
    got: list[bytes] = []
    async with broker.consumer(tenant_id) as consumer:
        for _ in range(20):
            got += [m.data for m in await consumer.fetch(1000, 0.5)]
            if len(got) >= n:
                break
    return got


# --------------------------------------------------------------------------- over HTTP


async def test_a_signed_batch_lands_in_the_tenants_stream_as_sent(http, broker, tenants):
    tenant, _ = tenants
    source = await _stream_source(tenant)
    events = _events(tenant, 250)
    r = await _post(http, source, _batch(tenant, events))
    assert r.status_code == 202, r.text
    assert r.json()["events"] == 250 and r.json()["last_position"]
    # Acknowledged means held by the broker: the stream has every event, in order.
    assert await broker.stream_length(tenant) == 250
    messages = await _read_all(broker, tenant, 250)
    assert [orjson.loads(m) for m in messages] == events
    assert messages == [orjson.dumps(e) for e in events]  # one compact object each


async def test_an_event_naming_another_tenant_stays_in_the_addressed_stream(http, broker, tenants):
    """Fields are the job's business (it quarantines a foreign tenant_id): the gateway
    sends the whole batch to the tenant the delivery is for, never to the one an event
    names."""
    tenant, other = tenants
    source = await _stream_source(tenant, other)
    foreign = _events(other, 3)
    r = await _post(http, source, _batch(tenant, [*_events(tenant, 2), *foreign]))
    assert r.status_code == 202, r.text
    assert await broker.stream_length(tenant) == 5
    assert await broker.stream_length(other) == 0
    assert [orjson.loads(m) for m in (await _read_all(broker, tenant, 5))[2:]] == foreign


async def test_a_forged_or_misaddressed_batch_sends_nothing(http, broker, tenants):
    tenant, other = tenants
    source = await _stream_source(tenant)
    body = _batch(tenant, _events(tenant, 5))
    forged = await _post(http, source, body, secret="not-the-partner-secret-0123")
    assert forged.status_code == 401
    tampered = _batch(tenant, _events(tenant, 6))
    r = await http.post(f"/hooks/{source}", content=tampered, headers=_std(body))
    assert r.status_code == 401
    # A tenant the source may not speak for: the answer of an unknown tenant.
    r = await _post(http, source, _batch(other, _events(other, 5)))
    assert r.status_code == 422 and r.json()["detail"] == TENANT_REFUSED
    assert await broker.stream_length(tenant) == 0
    assert await broker.stream_length(other) == 0


async def test_a_batch_with_a_bad_element_or_no_array_is_refused_whole(http, broker, tenants):
    tenant, _ = tenants
    source = await _stream_source(tenant)
    events: list = _events(tenant, 4)
    events[2] = "not an object"
    r = await _post(http, source, _batch(tenant, events))
    assert r.status_code == 422
    assert r.json()["detail"] == "event 2 is a string, not a JSON object"
    r = await _post(http, source, orjson.dumps({"tenant_id": tenant, "plays": []}))
    assert r.status_code == 422 and "no array of events at /events" in r.json()["detail"]
    r = await _post(http, source, _batch(tenant, [{}] * (STREAM_EVENTS_MAX + 1)))
    assert r.status_code == 413
    assert await broker.stream_length(tenant) == 0
    # The pointer is the source's: a source reading /data/plays takes its events there.
    nested = await _stream_source(tenant, events_path="/data/plays")
    body = orjson.dumps({"tenant_id": tenant, "data": {"plays": _events(tenant, 2)}})
    assert (await _post(http, nested, body)).status_code == 202
    assert await broker.stream_length(tenant) == 2


async def test_a_full_stream_is_answered_429_with_retry_after(
    prefect_server, platform, broker, tenants, tmp_path
):
    tenant, _ = tenants
    source = await _stream_source(tenant)
    config = GatewayConfig(
        spool_path=tmp_path / "spool.sqlite", stream_broker=platform, stream_max_pending=5
    )
    with GatewayThread(config) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            assert (await _post(c, source, _batch(tenant, _events(tenant, 4)))).status_code == 202
            r = await _post(c, source, _batch(tenant, _events(tenant, 2)))
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) > 0
            assert "stream is full" in r.json()["detail"]
            # What fits still goes in; nothing of a refused batch did.
            assert (await _post(c, source, _batch(tenant, _events(tenant, 1)))).status_code == 202
    assert await broker.stream_length(tenant) == 5


async def test_without_a_reachable_broker_a_batch_is_delayed_with_503(
    prefect_server, client, tenant_id, tmp_path
):
    """No broker configured, or one that does not answer: 503 with Retry-After, so the
    sender keeps the batch (the gateway itself starts either way)."""
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    source = await _stream_source(tenant_id)
    body = _batch(tenant_id, _events(tenant_id, 3))
    down = StreamBrokerConfig(kind=BrokerKind.redis, url=f"redis://127.0.0.1:{_free_port()}/0")
    for platform, reason in ((None, "SETLIST_STREAM_BROKER_URL"), (down, "unreachable")):
        config = GatewayConfig(
            spool_path=tmp_path / f"{reason}.sqlite",
            stream_broker=platform,
            stream_timeout=3.0,
        )
        with GatewayThread(config) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
                r = await _post(c, source, body)
        assert r.status_code == 503, r.text
        assert reason in r.json()["detail"] and int(r.headers["retry-after"]) > 0


def test_cli_makes_a_stream_source(prefect_server, monkeypatch):
    import anyio
    from typer.testing import CliRunner

    from setlist.cli import app

    source = f"stream-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("GW_TEST_SECRET", SECRET)
    runner = CliRunner()
    args = ["webhook", "set", source, "--secret-env", "GW_TEST_SECRET"]
    r = runner.invoke(app, [*args, "--deliver", "stream", "--events-path", "/plays"])
    assert r.exit_code == 0 and "events at /plays go to the tenant's stream" in r.output, r.output
    block = anyio.run(WebhookSource.aload, source_block_name(source))
    assert block.deliver == Delivery.stream and block.events_path == "/plays"
    r = runner.invoke(app, [*args, "--deliver", "queue"])
    assert r.exit_code == 2 and "unknown delivery 'queue'; accepted: event, stream" in r.output
    r = runner.invoke(app, [*args, "--events-path", ""])
    said = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "events_path must point into the body" in said, r.output
