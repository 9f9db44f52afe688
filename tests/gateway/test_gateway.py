"""The webhook gateway over real HTTP (uvicorn on loopback) against the session server,
and the attacks it must refuse: forged events through the mapping, ambiguous or deep JSON,
tenant enumeration, replays, pre-claimed delivery ids, floods and unknown-source floods."""

from __future__ import annotations

import asyncio
import contextvars
import json
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
import uvicorn
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    DeploymentFilterName,
)
from pydantic import ValidationError

from blocks.webhook import (
    LEGACY_DATA_ARRIVED_TEMPLATE,
    SignatureScheme,
    WebhookSource,
    secret_block_name,
    source_block_name,
)
from setlist.core.tenancy import SetlistError
from setlist.gateway.app import TENANT_REFUSED, GatewayConfig, create_app
from setlist.gateway.cache import TtlCache
from setlist.gateway.dedupe import dedupe_keys
from setlist.gateway.forwarder import Forwarder
from setlist.gateway.mapping import NotJson, Unprocessable, parse_body, too_deep
from setlist.gateway.ratelimit import RateLimiter
from setlist.gateway.signatures import (
    SignatureError,
    sign_github,
    sign_setlist,
    sign_standard,
    verify_github,
    verify_setlist,
    verify_standard,
)
from setlist.gateway.sources import Sources, Tenants, allow_tenants, save_source
from setlist.gateway.spool import Spool, SpoolFull
from setlist.tenants.onboarding import TenantSpec, create_tenant, delete_tenant, update_tenant
from tests.helpers import wait_for_events

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_VECTOR = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
SECRET = "partner-signing-secret-0123456789"
# Standard Webhooks' published example (standard-webhooks spec, "Verifying" section).
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STANDARD_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STANDARD_TIME = 1614265330
STANDARD_BODY = b'{"test": 2432232314}'
STANDARD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


# --------------------------------------------------------------------------- pure


def test_github_published_test_vector_verifies():
    assert sign_github(GITHUB_SECRET, b"Hello, World!") == GITHUB_VECTOR
    verify_github(GITHUB_SECRET, b"Hello, World!", GITHUB_VECTOR)
    # Spellings of the same signature: the same digest, so they verify alike.
    verify_github(GITHUB_SECRET, b"Hello, World!", "sha256=" + GITHUB_VECTOR[7:].upper())
    verify_github(GITHUB_SECRET, b"Hello, World!", f"  {GITHUB_VECTOR}  ")
    with pytest.raises(SignatureError, match="does not match"):
        verify_github(GITHUB_SECRET, b"Hello, World?", GITHUB_VECTOR)
    with pytest.raises(SignatureError, match="does not match"):  # not 64 hex digits
        verify_github(GITHUB_SECRET, b"Hello, World!", GITHUB_VECTOR + "00")
    with pytest.raises(SignatureError, match="sha256=HEX"):
        verify_github(GITHUB_SECRET, b"Hello, World!", GITHUB_VECTOR.replace("sha256", "sha1"))


def test_timestamped_signature_tolerance_and_rotation():
    body = b'{"a": 1}'
    now = 1_700_000_000
    header = sign_setlist(SECRET, body, now)
    assert verify_setlist(SECRET, body, header, 300, now=now + 300).timestamp == now
    with pytest.raises(SignatureError, match="tolerance"):
        verify_setlist(SECRET, body, header, 300, now=now + 301)
    with pytest.raises(SignatureError, match="does not match"):
        verify_setlist(SECRET, body + b" ", header, 300, now=now)
    # Two v1 values: signed with the old and the new secret while rotating.
    old = sign_setlist("old-secret-0123456789", body, now)
    verify_setlist(SECRET, body, f"{old},{header.split(',')[1]}", 300, now=now)
    with pytest.raises(SignatureError, match="t=UNIX"):
        verify_setlist(SECRET, body, "v1=abc", 300, now=now)
    with pytest.raises(SignatureError, match="t=UNIX"):  # two timestamps: which one?
        verify_setlist(SECRET, body, f"t={now + 1},{header}", 300, now=now)


def test_standard_webhooks_published_example_verifies():
    headers = {
        "webhook-id": STANDARD_ID,
        "webhook-timestamp": str(STANDARD_TIME),
        "webhook-signature": STANDARD_SIGNATURE,
    }
    got = verify_standard(STANDARD_SECRET, STANDARD_BODY, headers, 300, now=STANDARD_TIME)
    assert got.delivery_id == STANDARD_ID and got.timestamp == STANDARD_TIME
    assert sign_standard(STANDARD_SECRET, STANDARD_BODY, STANDARD_ID, STANDARD_TIME) == headers
    # The id and the time are signed: changing either breaks the signature.
    for name, value in (("webhook-id", "msg_other"), ("webhook-timestamp", "1614265331")):
        with pytest.raises(SignatureError, match="does not match"):
            verify_standard(
                STANDARD_SECRET, STANDARD_BODY, {**headers, name: value}, 300, now=STANDARD_TIME
            )
    with pytest.raises(SignatureError, match="tolerance"):
        verify_standard(STANDARD_SECRET, STANDARD_BODY, headers, 300, now=STANDARD_TIME + 301)
    # Rotation: several space-separated signatures, one of them valid.
    rotating = {**headers, "webhook-signature": f"v1,{'A' * 43}= {STANDARD_SIGNATURE}"}
    verify_standard(STANDARD_SECRET, STANDARD_BODY, rotating, 300, now=STANDARD_TIME)
    with pytest.raises(SignatureError, match="webhook-id"):
        verify_standard(
            STANDARD_SECRET,
            STANDARD_BODY,
            {**headers, "webhook-id": "a.b"},
            300,
            now=STANDARD_TIME,
        )


def test_dedupe_keys_come_from_what_was_signed():
    body = b'{"tenant_id": "acme"}'
    t = int(time.time())
    std = verify_standard(SECRET, body, sign_standard(SECRET, body, "msg_1", t))
    assert dedupe_keys(std, "acme", body) == dedupe_keys(
        verify_standard(SECRET, body, sign_standard(SECRET, body, "msg_1", t + 1)), "acme", body
    )
    assert dedupe_keys(std, "acme", body) != dedupe_keys(std, "other", body)
    assert dedupe_keys(std, "acme", body) != dedupe_keys(std, "acme", body + b" ")
    header = sign_setlist(SECRET, body, t)
    respelled = header.replace("v1=", "v1= ").upper().replace("T=", "t=").replace("V1=", "v1=")
    v1, v1_respelled = (verify_setlist(SECRET, body, h) for h in (header, respelled))
    # A replay of the signed message is the same delivery under any unsigned id.
    assert dedupe_keys(v1, "acme", body, "d-1")[-1] == dedupe_keys(v1_respelled, "acme", body)[-1]
    assert dedupe_keys(v1, "acme", body, "d-1")[-1] in dedupe_keys(v1, "acme", body, "d-2")
    gh = verify_github(SECRET, body, sign_github(SECRET, body))
    assert dedupe_keys(gh, "acme", body, "a") == dedupe_keys(gh, "acme", body, "b")


def test_strict_json_refuses_duplicates_depth_and_constants():
    assert parse_body(b'{"a": [1, {"b": "[[[["}]}') == {"a": [1, {"b": "[[[["}]}
    with pytest.raises(Unprocessable, match="duplicate key"):
        parse_body(b'{"tenant_id": "a", "tenant_id": "b"}')
    with pytest.raises(Unprocessable, match="duplicate key"):  # the same key, escaped
        parse_body(b'{"tenant_id": "a", "tenant\\u005fid": "b"}')
    assert parse_body(b"[" * 32 + b"]" * 32) is not None
    with pytest.raises(Unprocessable, match="deeper than 32"):
        parse_body(b"[" * 33 + b"]" * 33)
    with pytest.raises(Unprocessable, match="deeper than 32"):
        parse_body(b"[" * 1_000_000)  # never a RecursionError
    # Brackets inside strings (escaped quotes too) are not structure.
    assert not too_deep(json.dumps({"s": '\\"' + "[" * 100}).encode())
    # Linear in the body, whatever it holds: a quote and escaped quotes to the end of a
    # 1 MiB body once made the string scan start (and fail) again at every quote.
    started = time.monotonic()
    assert not too_deep(b'"' + b'\\"' * 500_000)
    assert too_deep(b"[" * 70 + b'"' + b'\\"' * 500_000)
    assert time.monotonic() - started < 5
    with pytest.raises(NotJson):
        parse_body(b'{"a": NaN}')
    with pytest.raises(NotJson):
        parse_body(b'{"a": ')


def test_spool_dedupes_and_survives_reopen(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_pending=3)
    assert spool.accept("src", "d1", "e1", "{}")
    assert not spool.accept("src", "d1", "e1", "{}")
    assert spool.seen("src", "d1") == "e1"
    assert spool.accept("src", "d2", "e2", "{}")
    # Several keys: a delivery matching any of them is a duplicate, and a refused one
    # records none of its keys.
    assert not spool.accept("src", ["k-new", "d2"], "e3", "{}")
    assert spool.seen("src", ["k-new"]) is None and spool.seen("src", ["x", "d2"]) == "e2"
    assert spool.accept("src", ["k1", "k2"], "e4", "{}")
    assert spool.seen("src", ["k2"]) == "e4"
    with pytest.raises(SpoolFull):
        spool.accept("src", "d3", "e3", "{}")
    spool.close()
    again = Spool(tmp_path / "s.sqlite")
    assert again.pending == 3 and again.seen("src", "d2") == "e2"
    again.sent([seq for seq, _ in again.batch()])
    assert again.pending == 0


def test_rate_limit_buckets_are_per_key_and_bounded():
    limiter = RateLimiter(max_buckets=3)
    assert [limiter.take(("s", "a"), 0.01, 2) for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.take(("s", "a"), 0.01, 2) > 0
    assert limiter.take(("s", "b"), 0.01, 2) == 0.0  # another tenant of the source
    for i in range(100):
        limiter.take(("s", f"t{i}"), 1, 1)
    assert len(limiter) == 3


async def test_unknown_keys_are_remembered_in_a_bounded_cache():
    calls: list[str] = []

    async def load(key: str) -> None:
        calls.append(key)
        return None

    cache: TtlCache[str] = TtlCache(load, ttl=30, missing_ttl=60, max_missing=5)
    for _ in range(10):
        assert await cache.get("ghost") is None
    assert calls == ["ghost"]  # remembered: one lookup
    for i in range(50):
        await cache.get(f"ghost-{i}")
    assert cache.missing_count == 5 and len(calls) == 51


async def test_a_burst_for_an_uncached_tenant_makes_one_lookup():
    """Concurrent deliveries for a tenant not yet cached share one lookup; a failed lookup
    reaches every waiter and the next request asks again."""
    calls: list[str] = []
    release = asyncio.Event()

    class Counting(Tenants):
        async def _check(self, tenant_id: str) -> bool:
            calls.append(tenant_id)
            await release.wait()
            if tenant_id == "broken":
                raise RuntimeError("prefect unreachable")
            return True

    tenants = Counting()
    waiters = [asyncio.create_task(tenants.exists("acme")) for _ in range(20)]
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*waiters) == [True] * 20
    assert calls == ["acme"]
    assert await tenants.exists("acme") and calls == ["acme"]  # cached now

    failing = [asyncio.create_task(tenants.exists("broken")) for _ in range(5)]
    results = await asyncio.gather(*failing, return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError] * 5
    assert calls == ["acme", "broken"]
    with pytest.raises(RuntimeError):
        await tenants.exists("broken")
    assert calls == ["acme", "broken", "broken"]


def test_block_refuses_reserved_and_unlisted_events():
    for name in (
        "setlist.tenant.deleted",
        "setlist.tenant.created",
        "setlist.job.cancelled",
        "setlist.security.alert",
        "setlist.config.changed",
        "setlist.etl.completed",
        "setlist.stream.ended",  # would start a tenant's next stream-ingest run
        "setlist.stream.compaction-due",  # would start its data-etl
        "prefect.flow-run.Completed",
        'setlist.tenant.data.arrived"',
    ):
        with pytest.raises(ValidationError):
            WebhookSource(secret_block="s", allowed_events=[name])
        with pytest.raises(ValidationError):
            WebhookSource(secret_block="s", event=name)
    block = WebhookSource(secret_block="s")
    assert block.allowed_events == ["setlist.tenant.data.arrived"]
    assert block.allowed_tenants == [] and block.scheme == SignatureScheme.standard
    with pytest.raises(ValidationError):
        WebhookSource(secret_block="s", allowed_tenants=['acme"'])


# --------------------------------------------------------------------------- harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayThread:
    """The gateway app under uvicorn in a thread, with the test's Prefect settings."""

    def __init__(self, config: GatewayConfig):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(config)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
            )
        )
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self.server.run,), daemon=True)

    def __enter__(self) -> GatewayThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def gw(prefect_server, tmp_path_factory):
    config = GatewayConfig(spool_path=tmp_path_factory.mktemp("gw") / "spool.sqlite")
    with GatewayThread(config) as thread:
        yield thread


@pytest.fixture
async def http(gw):
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        yield c


@pytest.fixture
async def tenant(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    return tenant_id


@pytest.fixture(scope="module")
def neighbour(prefect_server):
    """A second tenant, shared by the module's tests: the other tenant of a source."""
    import anyio
    from prefect.client.orchestration import get_client

    tenant_id = f"gw-neighbour-{uuid.uuid4().hex[:6]}"

    async def setup():
        async with get_client() as c:
            await create_tenant(c, TenantSpec(tenant_id=tenant_id))

    anyio.run(setup)
    return tenant_id


async def _source(
    *tenants: str, scheme: SignatureScheme = SignatureScheme.setlist, secret=SECRET, **kw
) -> str:
    """A fresh source speaking for ``tenants`` (the gateway caches sources for 30 s)."""
    name = f"src-{uuid.uuid4().hex[:12]}"
    await save_source(name, secret, scheme=scheme, allowed_tenants=list(tenants), **kw)
    return name


def _signed(body: bytes, secret: str = SECRET, delivery: str | None = None, t=None) -> dict:
    return {
        "content-type": "application/json",
        "x-setlist-signature": sign_setlist(secret, body, t),
        "x-setlist-delivery": delivery or uuid.uuid4().hex,
    }


def _std(body: bytes, delivery: str | None = None, secret: str = SECRET) -> dict:
    return {"content-type": "application/json", **sign_standard(secret, body, delivery)}


def _gh(body: bytes, delivery: str | None = None) -> dict:
    return {
        "content-type": "application/json",
        "x-hub-signature-256": sign_github(GITHUB_SECRET, body),
        "x-github-delivery": delivery or uuid.uuid4().hex,
    }


def _body(tenant_id: str, **extra) -> bytes:
    return json.dumps({"tenant_id": tenant_id, "files": ["raw/a.jsonl"], **extra}).encode()


async def _accepted(http) -> int:
    """Events the gateway has accepted so far: still spooled plus sent."""
    health = (await http.get("/health")).json()
    return health["spooled"] + health["sent"]


async def _events_of(client, tenant_id: str, names: list[str] | None = None) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(resource=EventResourceFilter(id=[f"setlist.tenant.{tenant_id}"]))
    if names:
        flt.event = EventNameFilter(name=names)
    page = await client.read_events(filter=flt, limit=50)
    return list(page.events)


async def _wait_event(client, tenant_id: str, event_id: str, timeout: float = 30) -> list:
    """The tenant's events, once the one with ``event_id`` has reached Prefect."""
    deadline = time.monotonic() + timeout
    while True:
        events = await _events_of(client, tenant_id)
        if any(str(e.id) == event_id for e in events) or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.5)


async def _runs_of(client, deployment_name: str) -> list:
    deps = await client.read_deployments(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
    )
    if not deps:
        return []
    return await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id for d in deps])),
        limit=50,
    )


async def _wait_runs(client, flow: str, tenant_id: str, count: int, timeout: float = 20) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in await _runs_of(client, tenant_id) if r.parameters.get("tenant_id")]
        runs = [r for r in runs if flow in r.tags or f"job:{flow}" in r.tags]
        if len(runs) >= count or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- over HTTP


async def test_valid_webhook_creates_exactly_one_run_and_a_redelivery_none(client, http, tenant):
    source = await _source(tenant)
    body = _body(tenant)
    headers = _signed(body, delivery="delivery-1")
    r = await http.post(f"/hooks/{source}", content=body, headers=headers)
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]
    assert r.json()["event"] == "setlist.tenant.data.arrived"

    runs = await _wait_runs(client, "data-etl", tenant, 1)
    assert len(runs) == 1
    run = runs[0]
    assert run.parameters["tenant_id"] == tenant
    assert run.work_queue_name == f"{tenant}.normal"
    assert f"tenant:{tenant}" in run.tags
    deployment = await client.read_deployment(run.deployment_id)
    assert deployment.name == tenant

    # The same delivery again (a sender's retry), freshly signed: acknowledged, no event.
    again = await http.post(
        f"/hooks/{source}", content=body, headers=_signed(body, delivery="delivery-1")
    )
    assert again.status_code == 200 and again.json()["event_id"] == event_id
    # An exact replay of the first request: the same.
    replay = await http.post(f"/hooks/{source}", content=body, headers=headers)
    assert replay.status_code == 200
    (event,) = [e for e in await _wait_event(client, tenant, event_id) if str(e.id) == event_id]
    # The event is data from the mapping: the tenant resource (id and tenant label only),
    # the payload fields, and the webhook as the only related resource.
    assert dict(event.resource) == {
        "prefect.resource.id": f"setlist.tenant.{tenant}",
        "setlist.tenant": tenant,
    }
    assert event.payload == {"files": ["raw/a.jsonl"]}
    assert [r["prefect.resource.id"] for r in event.related] == [f"setlist.webhook.{source}"]
    await asyncio.sleep(2)
    runs = await _wait_runs(client, "data-etl", tenant, 2, timeout=1)
    assert len(runs) == 1, "a duplicate delivery created a second run"


async def test_standard_scheme_signs_the_delivery_id(http, tenant):
    source = await _source(tenant, scheme=SignatureScheme.standard)
    body = _body(tenant)
    headers = _std(body, delivery="msg_1")
    ok = await http.post(f"/hooks/{source}", content=body, headers=headers)
    assert ok.status_code == 202, ok.text
    # Its retry, signed afresh: a duplicate.
    again = await http.post(f"/hooks/{source}", content=body, headers=_std(body, "msg_1"))
    assert again.status_code == 200 and again.json()["event_id"] == ok.json()["event_id"]
    # The captured request under another delivery id: the signature no longer holds.
    moved = await http.post(
        f"/hooks/{source}", content=body, headers={**headers, "webhook-id": "msg_2"}
    )
    assert moved.status_code == 401
    stale = _std(body)
    stale.update(sign_standard(SECRET, body, "msg_3", int(time.time()) - 301))
    assert (await http.post(f"/hooks/{source}", content=body, headers=stale)).status_code == 401


async def test_github_scheme_over_http_and_its_replays(http, tenant):
    source = await _source(tenant, scheme=SignatureScheme.github, secret=GITHUB_SECRET)
    # The published vector verifies over HTTP too: the refusal is for the non-JSON body.
    r = await http.post(
        f"/hooks/{source}",
        content=b"Hello, World!",
        headers={"content-type": "application/json", "x-hub-signature-256": GITHUB_VECTOR},
    )
    assert r.status_code == 415 and "not valid JSON" in r.text
    body = _body(tenant)
    before = await _accepted(http)
    headers = _gh(body)
    ok = await http.post(f"/hooks/{source}", content=body, headers=headers)
    assert ok.status_code == 202, ok.text
    # GitHub signs neither a time nor the delivery id: the same body is the same delivery,
    # whatever the delivery id or however the signature is spelled.
    sig = headers["x-hub-signature-256"]
    for variant in (
        {**headers, "x-github-delivery": uuid.uuid4().hex},
        {**headers, "x-hub-signature-256": "sha256=" + sig[7:].upper()},
        {**headers, "x-hub-signature-256": f"sha256=  {sig[7:]}", "x-github-delivery": "x"},
        {k: v for k, v in headers.items() if k != "x-github-delivery"},
    ):
        r = await http.post(f"/hooks/{source}", content=body, headers=variant)
        assert r.status_code == 200, r.text
        assert r.json()["event_id"] == ok.json()["event_id"]
    assert await _accepted(http) == before + 1


async def test_replays_under_new_delivery_ids_or_respelled_signatures_are_duplicates(
    client, http, tenant
):
    """A captured Setlist-signed request replayed within the tolerance under another
    unsigned delivery id, none, or with its hex respelled, is the same delivery."""
    source = await _source(tenant)
    body = _body(tenant, note="once")
    headers = _signed(body, delivery="victim-delivery")
    before = await _accepted(http)
    first = await http.post(f"/hooks/{source}", content=body, headers=headers)
    assert first.status_code == 202, first.text
    t, hexsig = headers["x-setlist-signature"].split(",")
    for variant in (
        {**headers, "x-setlist-delivery": "replay-1"},
        {**headers, "x-setlist-signature": f"{t},v1={hexsig[3:].upper()}"},
        {**headers, "x-setlist-signature": f"{t} , v1= {hexsig[3:]}", "x-setlist-delivery": "2"},
        {k: v for k, v in headers.items() if k != "x-setlist-delivery"},
    ):
        r = await http.post(f"/hooks/{source}", content=body, headers=variant)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": 200,
            "detail": "duplicate delivery; already accepted",
            "event_id": first.json()["event_id"],
        }
    assert await _accepted(http) == before + 1
    events = await _wait_event(client, tenant, first.json()["event_id"])
    assert [e.payload.get("note") for e in events if e.event.endswith("data.arrived")] == ["once"]


async def test_a_co_sender_cannot_claim_a_victims_delivery_id(http, tenant, neighbour):
    """Two tenants share a source (and its secret). Claiming the victim's predictable
    delivery id first — for one's own tenant, or for the victim's with another body —
    doesn't make the victim's real delivery a duplicate."""
    for scheme in (SignatureScheme.setlist, SignatureScheme.standard):
        source = await _source(tenant, neighbour, scheme=scheme)
        sign = _signed if scheme == SignatureScheme.setlist else _std
        victim_body = _body(tenant, note="real")
        for n, claim in enumerate(
            (_body(neighbour, note="claim"), _body(tenant, note="bogus")), start=1
        ):
            delivery = f"msg_{scheme.value}_{n}"
            r = await http.post(
                f"/hooks/{source}", content=claim, headers=sign(claim, delivery=delivery)
            )
            assert r.status_code == 202, r.text
            real = await http.post(
                f"/hooks/{source}",
                content=victim_body,
                headers=sign(victim_body, delivery=delivery),
            )
            assert real.status_code == 202, (scheme, n, real.text)
            victim_body = _body(tenant, note=f"real-{n}")


async def test_injected_tenant_id_forges_no_event(client, http, tenant):
    """The attack on the old template: a tenant_id that closes its JSON string and adds
    keys (the last duplicate wins) made audit and security events, labelled at will."""
    source = await _source(tenant)
    v = tenant
    injections = [
        f'{v}"}}, "event": "setlist.tenant.deleted", "resource": '
        f'{{"prefect.resource.id": "setlist.tenant.{v}',
        f'{v}"}}, "event": "setlist.security.finding", "resource": {{"setlist.severity": '
        f'"critical", "prefect.resource.id": "setlist.tenant.{v}',
        f'{v}"}}, "event": "setlist.security.alert", "related": [{{"prefect.resource.id": '
        f'"setlist.tenant.other", "prefect.resource.role": "x"}}], "resource": '
        f'{{"prefect.resource.id": "setlist.tenant.{v}',
    ]
    before = await _accepted(http)
    for tenant_field in injections:
        body = json.dumps({"tenant_id": tenant_field, "files": []}).encode()
        r = await http.post(f"/hooks/{source}", content=body, headers=_signed(body))
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("tenant id")
    # Labels and related resources in the body go nowhere either.
    extra = json.dumps(
        {
            "tenant_id": tenant,
            "event": "setlist.security.alert",
            "resource": {"setlist.severity": "critical"},
            "related": [{"prefect.resource.id": "setlist.tenant.other"}],
        }
    ).encode()
    ok = await http.post(f"/hooks/{source}", content=extra, headers=_signed(extra))
    assert ok.status_code == 202 and ok.json()["event"] == "setlist.tenant.data.arrived"
    assert await _accepted(http) == before + 1
    # Once the one accepted event is in Prefect, nothing else arrived for the tenant.
    events = await _wait_event(client, tenant, ok.json()["event_id"])
    webhook_events = [
        e for e in events if any(r.id.startswith("setlist.webhook.") for r in e.related)
    ]
    assert [str(e.id) for e in webhook_events] == [ok.json()["event_id"]]
    assert "setlist.severity" not in dict(webhook_events[0].resource)
    forged = await _events_of(
        client,
        tenant,
        ["setlist.tenant.deleted", "setlist.security.finding", "setlist.security.alert"],
    )
    assert forged == []


async def test_ambiguous_or_deep_json_is_refused(http, tenant):
    source = await _source(tenant)
    before = await _accepted(http)
    dup = f'{{"tenant_id": "someone-else", "tenant_id": "{tenant}", "files": []}}'.encode()
    r = await http.post(f"/hooks/{source}", content=dup, headers=_signed(dup))
    assert r.status_code == 422 and "duplicate key" in r.text
    for depth in (33, 200_000):
        deep = f'{{"tenant_id": "{tenant}", "x": '.encode() + b"[" * depth + b"]" * depth + b"}"
        r = await http.post(f"/hooks/{source}", content=deep, headers=_signed(deep))
        assert r.status_code == 422, (depth, r.status_code, r.text[:200])
        assert "deeper than 32" in r.text
    assert await _accepted(http) == before
    # At the limit it is a payload like any other.
    ok = f'{{"tenant_id": "{tenant}", "x": '.encode() + b"[" * 31 + b"]" * 31 + b"}"
    assert (await http.post(f"/hooks/{source}", content=ok, headers=_signed(ok))).status_code == 202


async def test_a_tenant_not_allowed_is_answered_like_an_unknown_one(http, tenant, neighbour):
    source = await _source(tenant)  # the neighbour exists, but not for this source
    before = await _accepted(http)
    answers = []
    for who in (neighbour, "never-onboarded-tenant"):
        body = _body(who)
        r = await http.post(f"/hooks/{source}", content=body, headers=_signed(body))
        answers.append((r.status_code, r.json()))
    assert answers[0] == answers[1] == (422, {"status": 422, "detail": TENANT_REFUSED})
    assert await _accepted(http) == before
    # An allowed tenant that doesn't exist gets the same answer too.
    both = await _source(tenant, "allowed-but-gone")
    body = _body("allowed-but-gone")
    r = await http.post(f"/hooks/{both}", content=body, headers=_signed(body))
    assert (r.status_code, r.json()) == answers[0]
    # Allowing the neighbour (a fresh source: sources are cached) lets it through.
    await allow_tenants(both, add=[neighbour])
    assert neighbour in (await WebhookSource.aload(source_block_name(both))).allowed_tenants
    body = _body(neighbour)
    fresh = await _source(tenant, neighbour)
    r = await http.post(f"/hooks/{fresh}", content=body, headers=_signed(body))
    assert r.status_code == 202, r.text


async def test_one_tenants_flood_does_not_rate_limit_another(http, tenant, neighbour):
    source = await _source(tenant, neighbour, rate_limit_per_s=0.01, burst=2)
    codes = []
    for _ in range(4):
        body = _body(tenant, note=uuid.uuid4().hex)
        r = await http.post(f"/hooks/{source}", content=body, headers=_signed(body))
        codes.append(r.status_code)
    assert codes == [202, 202, 429, 429]
    assert int(r.headers["retry-after"]) >= 1
    body = _body(neighbour)
    r = await http.post(f"/hooks/{source}", content=body, headers=_signed(body))
    assert r.status_code == 202, r.text


async def test_unknown_sources_cost_one_listing_not_a_lookup_each(tmp_path, monkeypatch, tenant):
    """A flood naming ever new unknown sources is answered from the list of source
    names (read again at most once per ``unknown_source_ttl``): no per-name lookup, no
    memory per name; a known source is still served."""
    loads: list[str] = []
    original = Sources._load

    async def counting(self, name):
        loads.append(name)
        return await original(self, name)

    monkeypatch.setattr(Sources, "_load", counting)
    source = await _source(tenant)
    config = GatewayConfig(
        spool_path=tmp_path / "spool.sqlite",
        unknown_source_ttl=60,
        unlisted_source_lookups_per_s=0.01,  # a burst of 0.02: no lookup of unlisted names
    )
    body = b'{"tenant_id": "x"}'
    with GatewayThread(config) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            for i in range(60):
                r = await http.post(f"/hooks/ghost-{i}", content=body, headers=_signed(body))
                assert r.status_code == 404
            sources = gw.app.state.sources
            assert loads == [] and sources.listings == 1
            assert sources.cache.missing_count == 0 and len(sources.cache) == 0
            known = _body(tenant)
            r = await http.post(f"/hooks/{source}", content=known, headers=_signed(known))
            assert r.status_code == 202, r.text
            assert loads == [source] and sources.listings == 1


async def test_a_source_created_after_the_listing_is_served_at_once(http, tenant):
    """Names not on the list are still looked up (a few a second): a new source doesn't
    wait for the next listing."""
    first = await _source(tenant)
    body = _body(tenant)
    assert (
        await http.post(f"/hooks/{first}", content=body, headers=_signed(body))
    ).status_code == 202
    second = await _source(tenant)  # the list was read moments ago, without it
    body = _body(tenant)
    r = await http.post(f"/hooks/{second}", content=body, headers=_signed(body))
    assert r.status_code == 202, r.text


async def test_legacy_blocks_keep_loading(client, http, tenant):
    """A block as an older Setlist saved it (no mapping, no allow-lists): it loads; the old
    default template is read as the default mapping; a custom one is no longer rendered
    (503 until migrated)."""
    from prefect.client.schemas.actions import BlockDocumentUpdate

    old_default = f"src-{uuid.uuid4().hex[:12]}"
    custom = f"src-{uuid.uuid4().hex[:12]}"
    for name, template in ((old_default, LEGACY_DATA_ARRIVED_TEMPLATE), (custom, "{}")):
        await save_source(name, SECRET)
        doc = await client.read_block_document_by_name(
            source_block_name(name), "setlist-webhook-source"
        )
        old_data = {
            "scheme": "setlist",
            "secret_block": secret_block_name(name),
            "template": template,
            "event_prefixes": ["setlist."],
            "rate_limit_per_s": 50.0,
            "burst": 100,
            "tolerance_s": 300,
            "secret_length": len(SECRET),
            "delivery_header": "",
        }
        await client.update_block_document(
            doc.id, BlockDocumentUpdate(data=old_data, merge_existing_data=False)
        )
        loaded = await WebhookSource.aload(source_block_name(name))
        assert loaded.template == template and loaded.scheme == SignatureScheme.setlist
        assert loaded.allowed_tenants == [] and loaded.tenant_path == "/tenant_id"
        assert loaded.legacy_template is (name == custom)
        await allow_tenants(name, add=[tenant])
    body = _body(tenant)
    ok = await http.post(f"/hooks/{old_default}", content=body, headers=_signed(body))
    assert ok.status_code == 202, ok.text
    injected = json.dumps({"tenant_id": f'{tenant}", "x": "'}).encode()
    r = await http.post(f"/hooks/{old_default}", content=injected, headers=_signed(injected))
    assert r.status_code == 422
    r = await http.post(f"/hooks/{custom}", content=body, headers=_signed(body))
    assert r.status_code == 503 and "migrated" in r.text
    # Saving a whole-document template is refused; setting a mapping field migrates.
    with pytest.raises(SetlistError, match="no longer accepted"):
        await save_source(custom, SECRET, template='{"event": "x"}')
    migrated = await save_source(custom, SECRET, tenant_path="/tenant_id")
    assert migrated.template == "" and not migrated.legacy_template
    assert migrated.allowed_tenants == [tenant] and migrated.scheme == SignatureScheme.setlist


async def test_events_come_only_from_the_allow_list(http, tenant):
    with pytest.raises(SetlistError, match="reserved"):
        await _source(tenant, event="setlist.tenant.deleted")
    with pytest.raises(SetlistError, match="not in its allowed events"):
        await _source(tenant, event="setlist.partner.ping")
    source = await _source(
        tenant,
        event_path="/type",
        tenant_path="/meta/tenant",
        payload_fields={"size": "/data/size", "first": "/data/files/0", "all": ""},
        allowed_events=["setlist.tenant.data.arrived", "setlist.partner.ping"],
    )

    def body(event: str) -> bytes:
        return json.dumps(
            {"type": event, "meta": {"tenant": tenant}, "data": {"size": 3, "files": ["a"]}}
        ).encode()

    for name in ("setlist.partner.ping", "setlist.tenant.data.arrived"):
        r = await http.post(f"/hooks/{source}", content=body(name), headers=_signed(body(name)))
        assert r.status_code == 202 and r.json()["event"] == name, r.text
    for name in ("setlist.tenant.deleted", "setlist.security.alert", "setlist.partner.other"):
        r = await http.post(f"/hooks/{source}", content=body(name), headers=_signed(body(name)))
        assert r.status_code == 422 and "not allowed" in r.text


async def test_refusals_get_their_codes_and_create_no_run(client, http, tenant):
    source = await _source(tenant)
    body = _body(tenant)

    async def post(content=body, headers=None, to=source):
        return await http.post(f"/hooks/{to}", content=content, headers=headers or {})

    forged = _signed(body, secret="not-the-secret-0123456789")
    assert (await post(headers=forged)).status_code == 401
    missing = {"content-type": "application/json"}
    assert (await post(headers=missing)).status_code == 401
    stale = _signed(body, t=int(time.time()) - 301)
    r = await post(headers=stale)
    assert r.status_code == 401 and "tolerance" in r.text
    tampered = _signed(body)
    assert (
        await post(content=body.replace(b"raw/a", b"raw/b"), headers=tampered)
    ).status_code == 401

    big = json.dumps({"tenant_id": tenant, "pad": "x" * (1024 * 1024)}).encode()
    assert (await post(content=big, headers=_signed(big))).status_code == 413

    text = b"tenant_id=" + tenant.encode()
    r = await post(content=text, headers={**_signed(text), "content-type": "text/plain"})
    assert r.status_code == 415
    broken = b'{"tenant_id": '
    assert (await post(content=broken, headers=_signed(broken))).status_code == 415

    invalid = _body("Not_A_Tenant")
    r = await post(content=invalid, headers=_signed(invalid))
    assert r.status_code == 422 and "DNS-1123" in r.text
    no_tenant = json.dumps({"files": []}).encode()
    r = await post(content=no_tenant, headers=_signed(no_tenant))
    assert r.status_code == 422 and "no tenant id at /tenant_id" in r.text
    listed = json.dumps([{"tenant_id": tenant}]).encode()
    r = await post(content=listed, headers=_signed(listed))
    assert r.status_code == 422 and "JSON object" in r.text

    assert (await post(to="nobody", headers=_signed(body))).status_code == 404

    tiny = await _source(tenant, rate_limit_per_s=0.01, burst=2)
    codes = []
    for n in range(4):
        each = _body(tenant, note=str(n))  # the same body in the same second: a replay
        r = await post(to=tiny, content=each, headers=_signed(each))
        codes.append(r.status_code)
    assert codes[:2] == [202, 202] and codes[2:] == [429, 429]
    assert int(r.headers["retry-after"]) >= 1

    # Only the two rate-limited-source deliveries that were accepted made runs.
    await asyncio.sleep(2)
    runs = await _wait_runs(client, "data-etl", tenant, 3, timeout=1)
    assert len(runs) == 2


async def test_events_wait_in_the_spool_while_prefect_is_unreachable(client, tmp_path):
    from prefect.client.orchestration import PrefectClient
    from prefect.events.filters import EventFilter, EventIDFilter

    spool = Spool(tmp_path / "spool.sqlite")
    event_id = str(uuid.uuid4())
    event = {
        "id": event_id,
        "occurred": datetime.now(UTC).isoformat(),
        "event": "setlist.test.spooled",
        "resource": {"prefect.resource.id": "setlist.tenant.spool-test"},
    }
    spool.accept("partner", "d-1", event_id, json.dumps(event))
    forwarder = Forwarder(spool)
    async with PrefectClient(api=f"http://127.0.0.1:{_free_port()}/api") as down:
        with pytest.raises(httpx.HTTPError):
            await forwarder.flush_once(down)
    assert spool.pending == 1
    spool.close()
    # After a restart the spool still holds it, and it goes out once the API answers.
    spool = Spool(tmp_path / "spool.sqlite")
    forwarder = Forwarder(spool)
    assert await forwarder.flush_once(client) == 1 and spool.pending == 0
    deadline = time.monotonic() + 20
    while True:
        page = await client.read_events(
            filter=EventFilter(id=EventIDFilter(id=[event_id])), limit=10
        )
        if page.events or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert [str(e.id) for e in page.events] == [event_id]


@pytest.mark.parametrize("prefect", ["refusing", "silent"])
def test_a_delivery_is_delayed_with_503_while_prefect_cant_be_asked(tmp_path, prefect):
    """A source the gateway has not cached yet needs Prefect. While Prefect refuses
    connections, or takes them and does not answer (starting, overloaded), the delivery
    gets 503 with Retry-After within the lookup timeout: the sender keeps it, instead of
    a 500 or a wait past its own timeout."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    body = _body("acme-corp")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        if prefect == "silent":
            silent.listen(16)  # the kernel completes connections no one reads from
        down = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        with temporary_settings({PREFECT_API_URL: down}):
            config = GatewayConfig(spool_path=tmp_path / "spool.sqlite", lookup_timeout=1.0)
            with GatewayThread(config) as gw:
                t0 = time.monotonic()
                r = httpx.post(
                    f"{gw.url}/hooks/partner", content=body, headers=_signed(body), timeout=20
                )
                took = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5" and took < 10


# --------------------------------------------------------------------------- triggers


async def test_training_trigger_follows_the_policy_and_goes_with_the_tenant(client, tenant_id):
    from setlist.core import audit

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    dep = await client.read_deployment_by_name(f"ml-training/{tenant_id}")
    owner = f"prefect.deployment.{dep.id}"
    assert await client.read_resource_related_automations(owner) == []

    result = await update_tenant(client, tenant_id, {"training_policy": "after-etl"})
    assert result["triggers"] == {
        "data-etl": 2,
        "ml-training": 1,
        "security-scan": 1,
        "stream-ingest": 2,
        "tenant-backup": 1,
    }
    (automation,) = await client.read_resource_related_automations(owner)
    assert automation.trigger.expect == {"setlist.etl.completed"}
    assert automation.trigger.match.model_dump() == {
        "prefect.resource.id": f"setlist.tenant.{tenant_id}"
    }
    assert automation.actions[0].deployment_id == dep.id
    # Converging again leaves the automation as it is.
    await update_tenant(client, tenant_id, {"display_name": "again"})
    (same,) = await client.read_resource_related_automations(owner)
    assert same.id == automation.id

    # The trigger fires in the harness: an ETL completion starts one training run.
    await audit.emit(client, "setlist.etl.completed", tenant_id, payload={"loaded_rows": 10})
    runs = await _wait_runs(client, "ml-training", tenant_id, 1)
    assert len(runs) == 1 and runs[0].deployment_id == dep.id
    assert runs[0].parameters["tenant_id"] == tenant_id

    etl = await client.read_deployment_by_name(f"data-etl/{tenant_id}")
    await delete_tenant(client, tenant_id, force=True)
    assert await client.read_resource_related_automations(owner) == []
    assert await client.read_resource_related_automations(f"prefect.deployment.{etl.id}") == []


# --------------------------------------------------------------------------- alerts


async def test_alert_automations_are_applied_by_name(client):
    from prefect.events.schemas.automations import Posture

    from setlist.core.tenancy import SetlistError
    from setlist.observability import automations

    with pytest.raises(SetlistError, match="no notification block named"):
        await automations.apply(client, "no-such-alert-block")
    await automations.save_notification_block(
        "test-alerts", webhook_url="http://127.0.0.1:9/alerts"
    )
    first = await automations.apply(client, "test-alerts")
    assert len(first) == 8 and {what for _, what in first} <= {"created", "updated"}
    again = await automations.apply(client, "test-alerts")
    assert {what for _, what in again} == {"updated"}
    applied = await wait_for_events(client, None, "setlist.automations.applied", count=2)
    assert {"block": "test-alerts", "done": dict(again)} in [
        {k: e.payload.get(k) for k in ("block", "done")} for e in applied
    ]

    (failed,) = await client.read_automations_by_name("setlist: run failed")
    assert failed.trigger.expect == {"prefect.flow-run.Failed"}
    (crashed,) = await client.read_automations_by_name("setlist: run crashed")
    assert crashed.trigger.expect == {"prefect.flow-run.Crashed"}
    assert failed.actions[0].type == "send-notification"
    (pending,) = await client.read_automations_by_name("setlist: critical run pending over SLA")
    assert pending.trigger.posture == Posture.Proactive
    assert pending.trigger.after == {"prefect.flow-run.Pending"}
    assert pending.trigger.within.total_seconds() == 120
    (finding,) = await client.read_automations_by_name("setlist: critical security finding")
    assert finding.trigger.match.model_dump()["setlist.severity"] == "critical"


async def test_each_delivery_is_a_span_without_body_or_secrets(http, tenant, monkeypatch):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    body = _body(tenant)
    source = await _source(tenant)
    monkeypatch.setattr(trace, "get_tracer", lambda *a, **k: provider.get_tracer("test"))
    ok = await http.post(f"/hooks/{source}", content=body, headers=_signed(body))
    assert ok.status_code == 202
    forged = await http.post(f"/hooks/{source}", content=body, headers=_signed(body, "wrong"))
    assert forged.status_code == 401
    spans = exported.get_finished_spans()
    assert [s.attributes["http.response.status_code"] for s in spans] == [202, 401]
    assert {s.name for s in spans} == {"POST /hooks/{source}"}
    assert all(s.kind is trace.SpanKind.SERVER for s in spans)
    text = " ".join(str(dict(s.attributes)) for s in spans)
    assert tenant not in text and SECRET not in text  # no payload, no secret


def test_cli_sets_sources_and_allows_tenants(prefect_server, monkeypatch):
    import anyio
    from typer.testing import CliRunner

    from setlist.cli import app

    source = f"src-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("GW_TEST_SECRET", SECRET)
    runner = CliRunner()

    def block() -> WebhookSource:
        return anyio.run(WebhookSource.aload, source_block_name(source))

    r = runner.invoke(app, ["webhook", "set", source, "--secret-env", "GW_TEST_SECRET"])
    assert r.exit_code == 0, r.output
    assert "tenants: none yet" in r.output
    assert block().scheme == SignatureScheme.standard and block().allowed_tenants == []
    r = runner.invoke(app, ["webhook", "allow", source, "acme-music", "beta-co"])
    assert r.exit_code == 0 and "acme-music, beta-co" in r.output, r.output
    r = runner.invoke(app, ["webhook", "disallow", source, "beta-co"])
    assert r.exit_code == 0, r.output
    assert block().allowed_tenants == ["acme-music"]
    r = runner.invoke(app, ["webhook", "allow", source, "Not_A_Tenant"])
    assert r.exit_code == 2 and "DNS-1123" in r.output
    r = runner.invoke(
        app,
        [
            "webhook",
            "set",
            source,
            "--secret-env",
            "GW_TEST_SECRET",
            "--event",
            "setlist.partner.ping",
            "--tenant-path",
            "/meta/tenant",
            "--payload",
            "size=/data/size",
        ],
    )
    assert r.exit_code == 0, r.output
    got = block()
    assert got.event == "setlist.partner.ping" and got.tenant_path == "/meta/tenant"
    assert set(got.allowed_events) == {"setlist.tenant.data.arrived", "setlist.partner.ping"}
    assert got.payload_fields == {"size": "/data/size"} and got.allowed_tenants == ["acme-music"]
    r = runner.invoke(
        app,
        ["webhook", "set", source, "--secret-env", "GW_TEST_SECRET", "--event", "setlist.job.x"],
    )
    assert r.exit_code == 2 and "reserved" in r.output
