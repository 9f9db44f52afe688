"""What the control-plane gate costs a job, and what it refuses.

    .venv/bin/python bench/job_api.py [--runs 3] [--calls 100]

Starts the platform's own server (Prefect's app behind Setlist's gate,
``python -m setlist.controlplane``) on a fresh SQLite database with an operator
credential, onboards two tenants, then measures, in one run:

- ``forbidden_tried`` / ``forbidden_allowed``: every probe of
  ``setlist.controlplane.probes`` sent with tenant A's run token (B's secrets, runs,
  logs, variables and locks, the platform's configuration, forged audit events);
  allowed means anything but 403.
- ``overhead_ratio``: wall time of the same canary flow run executed as the worker runs
  it (``python -m prefect.engine`` in a subprocess), with its run token (through the
  policy) against the operator credential (straight through the gate: one constant-time
  compare, nothing else), ``--runs`` of each, alternating; median against median.
- ``p95_added_ms``: the calls a job makes most (read its run, send logs, list its
  runs, load its profile block, read its lock), ``--calls`` of each with each
  credential, interleaved: p95 with the token minus p95 with the operator credential.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOME = Path(tempfile.mkdtemp(prefix="setlist-bench-job-api-"))
OPERATOR = f"setlist:{secrets.token_urlsafe(24)}"
os.environ.update(
    SETLIST_HOME=str(HOME),
    PREFECT_API_AUTH_STRING=OPERATOR,
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOCAL_STORAGE_PATH=str(HOME / "results"),
)
os.environ.pop("PREFECT_API_KEY", None)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_server() -> tuple[subprocess.Popen, str]:
    from setlist.controlplane.local import start_local_server

    return start_local_server(HOME, OPERATOR)


async def setup(url: str) -> dict:
    """Two tenants, a waiting run each, B's private variable and key, a webhook source."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    from setlist import stack
    from setlist.core.tenancy import backup_key_block_name
    from setlist.gateway.sources import save_source
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from setlist.tenants.submit import submit

    await stack.bootstrap_platform(HOME / "storage")
    a, b = "bench-a", "bench-b"
    async with get_client() as client:
        for t in (a, b):
            await create_tenant(client, TenantSpec(tenant_id=t), exist_ok=True)
        run_a = (await submit(client, "canary", a)).flow_run_id
        run_b = (await submit(client, "canary", b)).flow_run_id
        await client.create_variable(VariableCreate(name=f"{b}_api_token", value="b-private"))
        await Secret(value="b-backup-key").asave(backup_key_block_name(b), overwrite=True)
        await save_source("bench-source", "platform-webhook-secret")
        dep_a = await client.read_deployment_by_name(f"canary/{a}")
        dep_b = await client.read_deployment_by_name(f"canary/{b}")
        queue_b = (await client.read_flow_run(run_b)).work_queue_id
    return {
        "a": a,
        "b": b,
        "run_a": str(run_a),
        "run_b": str(run_b),
        "source": "bench-source",
        "dep_a": str(dep_a.id),
        "dep_b": str(dep_b.id),
        "queue_b": str(queue_b),
        "url": url,
    }


async def probe(world: dict) -> tuple[int, list]:
    import httpx

    from setlist.controlplane.probes import FORBIDDEN, attack
    from setlist.core import runtokens

    token = runtokens.issue(world["run_a"], world["a"]).auth_string()
    user, _, password = token.partition(":")
    async with httpx.AsyncClient(base_url=world["url"], auth=(user, password)) as http:
        allowed = await attack(http, world)
    return len(FORBIDDEN), allowed


async def call_latency(world: dict, calls: int) -> dict:
    """Per-call latency of a job's usual calls, token against operator, interleaved."""
    import httpx

    from setlist.core import runtokens
    from setlist.dispatch.locks import lock_name

    a, run = world["a"], world["run_a"]
    token = runtokens.issue(run, a).auth_string()
    lock = lock_name(a, "etl")
    log = [{"flow_run_id": run, "name": "bench", "level": 20, "message": "x",
            "timestamp": "2026-01-01T00:00:00Z"}]  # fmt: skip
    requests = [
        ("GET", f"/flow_runs/{run}", None),
        ("POST", "/logs/", log),
        ("POST", "/flow_runs/filter", {"limit": 10}),
        ("GET", f"/block_types/slug/setlist-tenant-profile/block_documents/name/tenant-{a}", None),
        ("GET", f"/v2/concurrency_limits/{lock}", None),
    ]
    clients = {
        mode: httpx.AsyncClient(base_url=world["url"], auth=tuple(secret.split(":", 1)))
        for mode, secret in (("token", token), ("operator", OPERATOR))
    }
    await clients["operator"].post("/v2/concurrency_limits/", json={"name": lock, "limit": 1})
    times: dict[str, list[float]] = {"token": [], "operator": []}
    for _ in range(calls):
        for method, path, body in requests:
            for mode in ("token", "operator") if _ % 2 else ("operator", "token"):
                started = time.perf_counter()
                response = await clients[mode].request(method, path, json=body)
                times[mode].append((time.perf_counter() - started) * 1000)
                if response.status_code >= 400:
                    raise SystemExit(f"{mode} {method} {path}: {response.status_code}")
    for c in clients.values():
        await c.aclose()
    return {
        "token_p50_ms": round(_pct(times["token"], 0.5), 2),
        "token_p95_ms": round(_pct(times["token"], 0.95), 2),
        "operator_p50_ms": round(_pct(times["operator"], 0.5), 2),
        "operator_p95_ms": round(_pct(times["operator"], 0.95), 2),
        "p95_added_ms": round(_pct(times["token"], 0.95) - _pct(times["operator"], 0.95), 2),
        "calls": len(times["token"]),
    }


async def new_run(tenant: str) -> str:
    from prefect.client.orchestration import get_client

    from setlist.tenants.submit import submit

    async with get_client() as client:
        return str((await submit(client, "canary", tenant)).flow_run_id)


async def final_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_flow_run(uuid.UUID(run_id))).state.name


def execute(url: str, run_id: str, secret: str) -> float:
    """The flow run as the process worker runs it; → its wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "SETLIST_PLATFORM_KEY"}
    env.update(PREFECT_API_URL=url, PREFECT__FLOW_RUN_ID=run_id, PREFECT_API_AUTH_STRING=secret)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "prefect.engine"],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> None:
    import anyio
    from prefect.settings import temporary_settings

    from setlist.core import runtokens
    from setlist.core.credentials import client_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="flow runs of each kind")
    parser.add_argument("--calls", type=int, default=100, help="rounds of the usual calls")
    args = parser.parse_args()
    proc, url = start_server()
    try:
        with temporary_settings(updates=client_settings(url, OPERATOR)):
            world = anyio.run(setup, url)
            tried, allowed = anyio.run(probe, world)
            latency = anyio.run(call_latency, world, args.calls)
            walls: dict[str, list[float]] = {"token": [], "operator": []}
            for i in range(args.runs * 2):
                mode = ("token", "operator")[i % 2]
                run_id = anyio.run(new_run, world["a"])
                secret = (
                    runtokens.issue(run_id, world["a"]).auth_string()
                    if mode == "token"
                    else OPERATOR
                )
                walls[mode].append(execute(url, run_id, secret))
                state = anyio.run(final_state, run_id)
                if state != "Completed":
                    raise SystemExit(f"{mode} run {run_id} ended {state}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "forbidden_tried": tried,
        "forbidden_allowed": len(allowed),
        "allowed": allowed,
        "overhead_ratio": round(
            statistics.median(walls["token"]) / statistics.median(walls["operator"]), 3
        ),
        "run_token_s": [round(w, 2) for w in walls["token"]],
        "run_operator_s": [round(w, 2) for w in walls["operator"]],
        **latency,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
