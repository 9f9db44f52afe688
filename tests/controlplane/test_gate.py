"""The gate, attacked with a tenant job's own run token: every reach past its run is 403,
and nothing on the server changes; what the job needs still works."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import uuid

import httpx
import pytest
import websockets
from prefect.blocks.system import Secret
from prefect.client.schemas.actions import VariableCreate

from setlist.controlplane.probes import FORBIDDEN, attack, event
from setlist.core import runtokens
from setlist.core.run_names import run_name
from setlist.core.tenancy import backup_key_block_name, concurrency_limit_name
from setlist.dispatch.locks import lock_name
from setlist.gateway.sources import save_source
from setlist.tenants.onboarding import TenantSpec, create_tenant
from setlist.tenants.submit import submit

pytestmark = pytest.mark.server


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


@pytest.fixture
async def world(client, tenant_id, prefect_server):
    """Tenant A with a waiting canary run and its token; tenant B with a run, a
    variable, a backup key and a deployment; a platform webhook source."""
    a, b = f"{tenant_id[:20]}-a", f"{tenant_id[:20]}-b"
    for t in (a, b):
        await create_tenant(client, TenantSpec(tenant_id=t))
    run_a = (await submit(client, "canary", a)).flow_run_id
    run_b = (await submit(client, "canary", b)).flow_run_id
    await client.create_variable(VariableCreate(name=f"{b}_api_token", value="b-private"))
    await Secret(value="b-backup-key").asave(backup_key_block_name(b), overwrite=True)
    source = f"src-{uuid.uuid4().hex[:6]}"
    await save_source(source, "platform-webhook-secret")
    token = runtokens.issue(run_a, a)
    http = httpx.AsyncClient(
        base_url=prefect_server, headers=_auth(token.auth_string()), timeout=30
    )
    async with http:
        yield {
            "a": a,
            "b": b,
            "run_a": str(run_a),
            "run_b": str(run_b),
            "source": source,
            "http": http,
            "token": token,
            "url": prefect_server,
        }


async def _snapshot(client, w) -> dict:
    """What an attack would change, read with the operator credential."""
    run_b = await client.read_flow_run(w["run_b"])
    run_a = await client.read_flow_run(w["run_a"])
    pool = await client.read_work_pool("setlist-local")
    dep_a = await client.read_deployment_by_name(f"canary/{w['a']}")
    limit = await client.read_global_concurrency_limit_by_name(concurrency_limit_name(w["a"]))
    var = await client.read_variable_by_name(f"{w['b']}_api_token")
    response = await client._client.post(
        "/events/filter",
        json={"filter": {"event": {"prefix": ["setlist.tenant.deleted"]}}, "limit": 50},
    )
    logs = await client._client.post(
        "/logs/filter", json={"logs": {"flow_run_id": {"any_": [w["run_b"]]}}}
    )
    artifacts = await client._client.post(
        "/artifacts/filter", json={"artifacts": {"key": {"any_": [f"canary-{w['b']}"]}}}
    )
    queue_b = await client.read_work_queue_by_name(
        run_b.work_queue_name, work_pool_name="setlist-local"
    )
    return {
        "run_b": (run_b.state_type, run_b.state_id, sorted(run_b.tags)),
        "run_a": (run_a.name, sorted(run_a.tags), run_a.job_variables, run_a.parameters),
        "pool": pool.base_job_template,
        "dep_a": (dep_a.job_variables, dep_a.paused),
        "limit": (limit.limit, limit.active),
        "var": var.value,
        "deleted_events": len(response.json().get("events", [])),
        "logs_b": len(logs.json()),
        "artifacts_b": len(artifacts.json()),
        "queue_b": queue_b.is_paused,
        "flow_runs": len(await client.read_flow_runs(limit=200)),
    }


async def test_a_run_token_reaches_nothing_past_its_own_run(client, world):
    w = world
    dep_b = await client.read_deployment_by_name(f"canary/{w['b']}")
    dep_a = await client.read_deployment_by_name(f"canary/{w['a']}")
    run_b = await client.read_flow_run(w["run_b"])
    extra = {"dep_b": str(dep_b.id), "dep_a": str(dep_a.id), "queue_b": str(run_b.work_queue_id)}
    before = await _snapshot(client, w)
    assert await attack(w["http"], {**w, **extra}) == []
    assert len(FORBIDDEN) >= 20
    assert await _snapshot(client, w) == before


async def test_a_run_token_sees_only_its_tenants_runs_variables_and_blocks(client, world):
    w, http = world, world["http"]
    runs = (await http.post("/flow_runs/filter", json={})).json()
    assert {r["id"] for r in runs} and all(f"tenant:{w['a']}" in r["tags"] for r in runs)
    assert w["run_b"] not in {r["id"] for r in runs}
    # An `or_` filter can't widen the tenant tag away.
    wide = {"flow_runs": {"operator": "or_", "id": {"any_": [w["run_b"]]}}}
    assert w["run_b"] not in {
        r["id"] for r in (await http.post("/flow_runs/filter", json=wide)).json()
    }
    names = {v["name"] for v in (await http.post("/variables/filter", json={})).json()}
    assert f"{w['b']}_api_token" not in names
    # Its own run, profile and a platform block without secrets: readable.
    assert (await http.get(f"/flow_runs/{w['run_a']}")).json()["id"] == w["run_a"]
    own = await http.get(
        f"/block_types/slug/setlist-tenant-profile/block_documents/name/tenant-{w['a']}",
        params={"include_secrets": "true"},
    )
    assert own.status_code == 200 and own.json()["data"]["tenant_id"] == w["a"]
    # Without secrets, the platform's webhook source shows its settings, not its secret.
    src = await http.get(
        f"/block_types/slug/setlist-webhook-source/block_documents/name/setlist-webhook-{w['source']}"
    )
    assert src.status_code == 200 and "platform-webhook-secret" not in src.text


async def test_what_a_job_does_works_with_its_token(client, world):
    """Logs, labels and the result events of its own run, its own tenant's lock."""
    w, http = world, world["http"]
    log = [{"flow_run_id": w["run_a"], "name": "job", "level": 20, "message": "hello",
            "timestamp": "2026-01-01T00:00:00Z"}]  # fmt: skip
    assert (await http.post("/logs/", json=log)).status_code == 201
    labels = await http.patch(f"/flow_runs/{w['run_a']}/labels", json={"setlist.usage.cpu_s": 1})
    assert labels.status_code == 204
    # its seed-style name, which the flow sets when it starts (the UI's runs get it then)
    run = await client.read_flow_run(w["run_a"])
    own = run_name("canary", w["a"], run.expected_start_time)
    await client.update_flow_run(run.id, name="happy-otter")  # as the UI's run button names
    assert (await http.patch(f"/flow_runs/{w['run_a']}", json={"name": own})).status_code == 204
    assert (await client.read_flow_run(w["run_a"])).name == own
    name = lock_name(w["a"], "etl")
    created = await http.post("/v2/concurrency_limits/", json={"name": name, "limit": 1})
    assert created.status_code == 201
    assert (await http.get(f"/v2/concurrency_limits/{name}")).status_code == 200


@pytest.mark.parametrize(
    "secret",
    [
        None,
        "setlist:wrong",
        "run:not-a-token",
        "admin:pass",
    ],
)
async def test_calls_without_a_valid_credential_get_401(prefect_server, secret):
    headers = _auth(secret) if secret else {}
    async with httpx.AsyncClient(base_url=prefect_server, headers=headers) as http:
        for method, path in [("POST", "/block_documents/filter"), ("GET", "/flow_runs/x")]:
            assert (await http.request(method, path, json={})).status_code == 401
        assert (await http.get("/health")).status_code == 200


async def test_a_forged_expired_or_borrowed_token_is_refused(client, world):
    w = world
    forged = runtokens.issue(w["run_a"], w["a"]).auth_string(key=b"not the platform key")
    expired = runtokens.RunToken(uuid.UUID(w["run_a"]), w["a"], 1).auth_string()
    borrowed = runtokens.issue(w["run_b"], w["a"]).auth_string()  # B's run, A's name
    async with httpx.AsyncClient(base_url=w["url"]) as http:
        for secret in (forged, expired):
            r = await http.get(f"/flow_runs/{w['run_a']}", headers=_auth(secret))
            assert r.status_code == 401
        r = await http.get(f"/flow_runs/{w['run_b']}", headers=_auth(borrowed))
        assert r.status_code == 403


async def _socket(url: str, secret: str, path: str = "/events/in"):
    ws_url = url.replace("http://", "ws://") + path
    return await websockets.connect(ws_url, subprotocols=["prefect"])


async def test_the_event_stream_forwards_a_jobs_events_and_closes_on_a_forged_one(client, world):
    w = world
    before = (await _snapshot(client, w))["deleted_events"]
    ws = await _socket(w["url"], w["token"].auth_string())
    await ws.send(json.dumps({"type": "auth", "token": w["token"].auth_string()}))
    assert json.loads(await ws.recv())["type"] == "auth_success"
    await ws.send(json.dumps(event("setlist.tenant.deleted", w["a"])))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        for _ in range(50):
            await ws.recv()
    assert closed.value.rcvd.code == 1008
    # A run token reads the stream out only about its own run: B's events never arrive.
    about_a = {"filter": {"any_resource": {"id": [f"prefect.flow-run.{w['run_a']}"]}}}
    for _ in range(60):  # events are stored in batches: until A's are, the backfill is empty
        if (await client._client.post("/events/filter", json=about_a)).json()["events"]:
            break
        await asyncio.sleep(0.5)
    out = await _socket(w["url"], "", "/events/out")
    await out.send(json.dumps({"type": "auth", "token": w["token"].auth_string()}))
    assert json.loads(await out.recv())["type"] == "auth_success"
    await out.send(json.dumps({"type": "filter", "filter": {}, "backfill": True}))
    seen = []
    with contextlib.suppress(TimeoutError):
        while True:
            seen.append(json.loads(await asyncio.wait_for(out.recv(), 3)))
    named = [json.dumps(m) for m in seen]
    assert seen and all(w["run_a"] in m for m in named)
    assert not any(w["run_b"] in m or f"setlist.tenant.{w['b']}" in m for m in named)
    await out.close()
    assert (await _snapshot(client, w))["deleted_events"] == before
    operator = await _socket(w["url"], "")
    await operator.send(
        json.dumps({"type": "auth", "token": os.environ["PREFECT_API_AUTH_STRING"]})
    )
    assert json.loads(await operator.recv())["type"] == "auth_success"
    await operator.close()
