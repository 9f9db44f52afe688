"""The webhook gateway over real HTTP (uvicorn on loopback) against the session server."""

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

from blocks.webhook import SignatureScheme
from setlist.gateway.app import GatewayConfig, create_app
from setlist.gateway.forwarder import Forwarder
from setlist.gateway.signatures import (
    SignatureError,
    sign_github,
    sign_setlist,
    verify_github,
    verify_setlist,
)
from setlist.gateway.sources import Tenants, save_source
from setlist.gateway.spool import Spool, SpoolFull
from setlist.tenants.onboarding import TenantSpec, create_tenant, delete_tenant, update_tenant

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_VECTOR = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
SECRET = "partner-signing-secret-0123456789"


# --------------------------------------------------------------------------- pure


def test_github_published_test_vector_verifies():
    assert sign_github(GITHUB_SECRET, b"Hello, World!") == GITHUB_VECTOR
    verify_github(GITHUB_SECRET, b"Hello, World!", GITHUB_VECTOR)
    with pytest.raises(SignatureError, match="does not match"):
        verify_github(GITHUB_SECRET, b"Hello, World?", GITHUB_VECTOR)
    with pytest.raises(SignatureError, match="sha256=HEX"):
        verify_github(GITHUB_SECRET, b"Hello, World!", GITHUB_VECTOR.replace("sha256", "sha1"))


def test_timestamped_signature_tolerance_and_rotation():
    body = b'{"a": 1}'
    now = 1_700_000_000
    header = sign_setlist(SECRET, body, now)
    verify_setlist(SECRET, body, header, 300, now=now + 300)
    with pytest.raises(SignatureError, match="tolerance"):
        verify_setlist(SECRET, body, header, 300, now=now + 301)
    with pytest.raises(SignatureError, match="does not match"):
        verify_setlist(SECRET, body + b" ", header, 300, now=now)
    # Two v1 values: signed with the old and the new secret while rotating.
    old = sign_setlist("old-secret-0123456789", body, now)
    verify_setlist(SECRET, body, f"{old},{header.split(',')[1]}", 300, now=now)
    with pytest.raises(SignatureError, match="t=UNIX"):
        verify_setlist(SECRET, body, "v1=abc", 300, now=now)


def test_spool_dedupes_and_survives_reopen(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_pending=2)
    assert spool.accept("src", "d1", "e1", "{}")
    assert not spool.accept("src", "d1", "e1", "{}")
    assert spool.seen("src", "d1") == "e1"
    assert spool.accept("src", "d2", "e2", "{}")
    with pytest.raises(SpoolFull):
        spool.accept("src", "d3", "e3", "{}")
    spool.close()
    again = Spool(tmp_path / "s.sqlite")
    assert again.pending == 2 and again.seen("src", "d2") == "e2"
    again.sent([seq for seq, _ in again.batch()])
    assert again.pending == 0


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
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(config),
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
def sources(prefect_server):
    import anyio

    async def setup():
        await save_source("partner", SECRET)
        await save_source("gh", GITHUB_SECRET, scheme=SignatureScheme.github)
        await save_source("tiny", SECRET, rate_limit_per_s=0.01, burst=2)

    anyio.run(setup)


@pytest.fixture(scope="module")
def gw(sources, tmp_path_factory):
    config = GatewayConfig(spool_path=tmp_path_factory.mktemp("gw") / "spool.sqlite")
    with GatewayThread(config) as thread:
        yield thread


@pytest.fixture
async def http(gw):
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        yield c


@pytest.fixture
async def tenant(client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    return tenant_id


def _signed(body: bytes, secret: str = SECRET, delivery: str | None = None, t=None) -> dict:
    return {
        "content-type": "application/json",
        "x-setlist-signature": sign_setlist(secret, body, t),
        "x-setlist-delivery": delivery or uuid.uuid4().hex,
    }


def _body(tenant_id: str, **extra) -> bytes:
    return json.dumps({"tenant_id": tenant_id, "files": ["raw/a.jsonl"], **extra}).encode()


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
    body = _body(tenant)
    headers = _signed(body, delivery="delivery-1")
    r = await http.post("/hooks/partner", content=body, headers=headers)
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
        "/hooks/partner", content=body, headers=_signed(body, delivery="delivery-1")
    )
    assert again.status_code == 200 and again.json()["event_id"] == event_id
    # An exact replay of the first request: the same.
    replay = await http.post("/hooks/partner", content=body, headers=headers)
    assert replay.status_code == 200
    await asyncio.sleep(2)
    runs = await _wait_runs(client, "data-etl", tenant, 2, timeout=1)
    assert len(runs) == 1, "a duplicate delivery created a second run"


async def test_github_scheme_over_http(http, tenant):
    # The published vector verifies over HTTP too: the refusal is for the non-JSON body.
    r = await http.post(
        "/hooks/gh",
        content=b"Hello, World!",
        headers={"content-type": "application/json", "x-hub-signature-256": GITHUB_VECTOR},
    )
    assert r.status_code == 415 and "not valid JSON" in r.text
    body = _body(tenant)
    ok = await http.post(
        "/hooks/gh",
        content=body,
        headers={
            "content-type": "application/json",
            "x-hub-signature-256": sign_github(GITHUB_SECRET, body),
            "x-github-delivery": uuid.uuid4().hex,
        },
    )
    assert ok.status_code == 202, ok.text


async def test_refusals_get_their_codes_and_create_no_run(client, http, tenant):
    body = _body(tenant)

    async def post(content=body, headers=None, source="partner"):
        return await http.post(f"/hooks/{source}", content=content, headers=headers or {})

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

    other = _body("never-onboarded-tenant")
    r = await post(content=other, headers=_signed(other))
    assert r.status_code == 422 and "unknown tenant" in r.text
    invalid = _body("Not_A_Tenant")
    r = await post(content=invalid, headers=_signed(invalid))
    assert r.status_code == 422 and "DNS-1123" in r.text
    no_tenant = json.dumps({"files": []}).encode()
    r = await post(content=no_tenant, headers=_signed(no_tenant))
    assert r.status_code == 422 and "template failed" in r.text

    assert (await post(source="nobody", headers=_signed(body))).status_code == 404

    codes = []
    for _ in range(4):
        r = await post(source="tiny", headers=_signed(body))
        codes.append(r.status_code)
    assert codes[:2] == [202, 202] and codes[2:] == [429, 429]
    assert int(r.headers["retry-after"]) >= 1

    # Only the two rate-limited-source deliveries that were accepted made runs.
    await asyncio.sleep(2)
    runs = await _wait_runs(client, "data-etl", tenant, 3, timeout=1)
    assert len(runs) == 2


async def test_template_may_not_name_another_tenant_or_foreign_events(client, http, tenant):
    await save_source(
        "sneaky",
        SECRET,
        template='{"event": "prefect.flow-run.Completed", '
        '"resource": {"prefect.resource.id": "setlist.tenant.{{ body.tenant_id }}"}}',
    )
    body = _body(tenant)
    r = await http.post("/hooks/sneaky", content=body, headers=_signed(body))
    assert r.status_code == 422 and "not allowed" in r.text
    await save_source(
        "sneaky2",
        SECRET,
        template='{"event": "setlist.tenant.data.arrived", '
        '"resource": {"prefect.resource.id": "setlist.tenant.{{ body.tenant_id }}"}, '
        '"related": [{"prefect.resource.id": "setlist.tenant.other", '
        '"prefect.resource.role": "x"}]}',
    )
    r = await http.post("/hooks/sneaky2", content=body, headers=_signed(body))
    assert r.status_code == 422 and "only its own tenant" in r.text


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


# --------------------------------------------------------------------------- triggers


async def test_training_trigger_follows_the_policy_and_goes_with_the_tenant(client, tenant_id):
    from setlist.core import audit

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    dep = await client.read_deployment_by_name(f"ml-training/{tenant_id}")
    owner = f"prefect.deployment.{dep.id}"
    assert await client.read_resource_related_automations(owner) == []

    result = await update_tenant(client, tenant_id, {"training_policy": "after-etl"})
    assert result["triggers"] == {
        "data-etl": 1,
        "ml-training": 1,
        "security-scan": 1,
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
    assert len(first) == 7 and {what for _, what in first} <= {"created", "updated"}
    again = await automations.apply(client, "test-alerts")
    assert {what for _, what in again} == {"updated"}

    (failed,) = await client.read_automations_by_name("setlist: run failed or crashed")
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
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
    monkeypatch.setattr(trace, "get_tracer", lambda *a, **k: provider.get_tracer("test"))
    body = _body(tenant)
    ok = await http.post("/hooks/partner", content=body, headers=_signed(body))
    assert ok.status_code == 202
    forged = await http.post("/hooks/partner", content=body, headers=_signed(body, "wrong"))
    assert forged.status_code == 401
    spans = exported.get_finished_spans()
    assert [s.attributes["http.response.status_code"] for s in spans] == [202, 401]
    assert {s.name for s in spans} == {"POST /hooks/{source}"}
    assert all(s.kind is trace.SpanKind.SERVER for s in spans)
    text = " ".join(str(dict(s.attributes)) for s in spans)
    assert tenant not in text and SECRET not in text  # no payload, no secret
