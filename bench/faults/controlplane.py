"""Control-plane faults: the Prefect server, its PostgreSQL and the webhook gateway
killed in the middle of work, then started again as a supervisor would start them.

Each scenario brings up the whole local stack (``setlist.stack.start``: the gated
server, the dispatcher, the process worker, the gateway) in a home of its own on free
ports, and gives it work for the demo tenant: a burst of signed webhooks through the
gateway, each one a ``setlist.tenant.data.arrived`` event that triggers the tenant's
data-etl, and canary runs submitted directly while the burst goes on. A sender keeps
retrying a webhook until the gateway answers 2xx, as webhook senders do; a submission
that fails is retried under the same idempotency key.

- ``server-restart-sqlite`` / ``server-restart-postgres``: the server is SIGKILLed at a
  random point of the work and started again, on the same port and database, a few
  seconds later.
- ``postgres-restart``: the server's embedded PostgreSQL is stopped at a random point of
  the work, either as a crash (``immediate``: recovered from its WAL on start) or as an
  operator's restart (``fast``), and started again a few seconds later; the server stays.
- ``gateway-spool``: the server is killed, webhooks are accepted into the gateway's spool
  meanwhile, then the gateway is SIGKILLed with them on disk; both start again, in
  one order and then, in a second round, in the other.

A supervisor (the scenario's loop) starts again any stack process that exits on its own,
and says so. What must hold once the platform settles: every run ends Completed; no run
executed twice; every accepted webhook's event is on the server, and it started exactly
one data-etl run; the gateway's spool is empty.

Executions are counted by what they leave outside Prefect: a job flow persists its
result (``persist_result=True``) under the stack's result storage with a fresh key, once
per execution that completes. Each canary is submitted with its own payload size, which
its result carries, so a canary's results name its run; data-etl results are counted
per tenant. Prefect's own ``run_count`` (entries into Running) is reported beside them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.faults import Context
from bench.servers import free_port

HOOKS = 6  # webhooks of a burst
RUNS = 4  # canary runs submitted directly during the burst
WINDOW_S = 20.0  # the burst and the submissions spread over this long
SETTLE_S = 420.0  # how long the platform gets to finish after the fault
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
EXECUTED_EVENT = "prefect.automation.action.executed"
FAILED_EVENT = "prefect.automation.action.failed"


def _kill_group(pid: int | None) -> None:
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Stack:
    """One local stack for one scenario: its own home, ports and database; each of its
    processes can be killed and started again as ``setlist.stack.start`` starts it."""

    database: str  # postgres (embedded) or sqlite
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="setlist-chaos-cp-")))
    port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    log: list[str] = field(default_factory=list)
    restarted: dict[str, int] = field(default_factory=dict)  # by the supervisor, not the fault
    state: Any = None
    _previous_home: str | None = None

    # ---- the whole stack

    async def up(self) -> None:
        from setlist import stack
        from setlist.core.settings import get_settings

        self._previous_home = os.environ.get("SETLIST_HOME")
        os.environ["SETLIST_HOME"] = str(self.home)
        get_settings.cache_clear()
        self.state = await asyncio.to_thread(
            stack.start,
            port=self.port,
            gateway_port=self.gateway_port,
            metrics_port=free_port(),
            database=self.database,
            echo=self.log.append,
        )
        # Not part of the work: the exporter only reads the API, and the cores are few.
        stack._stop(self.state.metrics_pid, "metrics", self.log.append, marker=stack.METRICS_MARKER)
        deadline = time.monotonic() + 120
        while await self.gateway_health() is None:  # `start` does not wait for it
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{self.log_tail('gateway')}")
            await asyncio.sleep(0.5)

    async def down(self) -> None:
        from setlist import stack
        from setlist.core.settings import get_settings

        try:
            await asyncio.to_thread(stack.stop, self.log.append)
        finally:
            if self._previous_home is None:
                os.environ.pop("SETLIST_HOME", None)
            else:
                os.environ["SETLIST_HOME"] = self._previous_home
            get_settings.cache_clear()
            shutil.rmtree(self.home, ignore_errors=True)

    @property
    def settings(self):
        from setlist.core.settings import get_settings

        return get_settings()

    @property
    def auth(self) -> str:
        from setlist.core.credentials import ensure_operator_auth_string

        return ensure_operator_auth_string(self.home)[0]

    @property
    def url(self) -> str:
        return self.state.api_url

    @property
    def hooks_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def client_settings(self) -> dict:
        from setlist.core.credentials import client_settings

        return client_settings(self.url, self.auth)

    def _env(self, database_url: str | None = None) -> dict[str, str]:
        from setlist.stack import stack_env

        return stack_env(self.settings, self.url, database_url, self.auth)

    def _save(self) -> None:
        self.state.save(self.settings)

    # ---- the server

    def kill_server(self) -> None:
        _kill_group(self.state.server_pid)

    def server_alive(self) -> bool:
        from setlist.stack import SERVER_MARKER, _alive

        return _alive(self.state.server_pid, SERVER_MARKER)

    def database_url(self) -> str:
        from setlist.stack import embedded_postgres

        if self.database == "sqlite":
            return f"sqlite+aiosqlite:///{self.home / 'prefect' / 'prefect.db'}"
        return embedded_postgres(self.settings).start()  # running: its URL

    def start_server(self, timeout: float = 240.0) -> float:
        """As ``setlist up`` starts it: same port, same database. → seconds to healthy."""
        from setlist.stack import _spawn, wait_healthy

        t0 = time.monotonic()
        self.state.server_pid = _spawn(
            ["--host", "127.0.0.1", "--port", str(self.port)],
            self._env(self.database_url()),
            self.home / "logs" / "server.log",
            module="setlist.controlplane",
        )
        self._save()
        wait_healthy(self.url, timeout=timeout, pid=self.state.server_pid)
        return time.monotonic() - t0

    # ---- PostgreSQL

    def stop_postgres(self, mode: str) -> None:
        """``immediate``: no checkpoint, sessions cut (a crash, recovered from the WAL on
        start); ``fast``: sessions ended, a clean shutdown."""
        from setlist.stack import embedded_postgres

        pg = embedded_postgres(self.settings)
        if mode == "fast":
            pg.stop()
        else:
            pg._pg_ctl(["stop", "-m", "immediate", "-w", "-t", "60"])

    def start_postgres(self) -> float:
        from setlist.stack import embedded_postgres

        t0 = time.monotonic()
        embedded_postgres(self.settings).start()  # the port it had, when still free
        return time.monotonic() - t0

    # ---- the gateway, the worker, the dispatcher

    def kill_gateway(self) -> None:
        _kill_group(self.state.gateway_pid)

    def start_gateway(self) -> None:
        from setlist.stack import _spawn

        self.state.gateway_pid = _spawn(
            ["--port", str(self.gateway_port)],
            self._env(),
            self.home / "logs" / "gateway.log",
            module="setlist.gateway",
        )
        self._save()

    async def gateway_health(self) -> dict | None:
        try:
            async with httpx.AsyncClient(timeout=3) as http:
                return (await http.get(f"{self.hooks_url}/health")).json()
        except (httpx.HTTPError, ValueError):
            return None

    def supervise(self) -> None:
        """Start again what exited on its own; called only while no fault holds it down."""
        from setlist import stack

        s = self.state
        if not self.server_alive():
            self.restarted["server"] = self.restarted.get("server", 0) + 1
            self.start_server()
        if not stack._alive(s.gateway_pid, stack.GATEWAY_MARKER):
            self.restarted["gateway"] = self.restarted.get("gateway", 0) + 1
            self.start_gateway()
        if not stack._alive(s.dispatcher_pid, stack.DISPATCHER_MARKER):
            self.restarted["dispatcher"] = self.restarted.get("dispatcher", 0) + 1
            s.dispatcher_pid = stack._spawn(
                [], self._env(), self.home / "logs" / "dispatcher.log", module="setlist.dispatch"
            )
            self._save()
        if not stack._alive(s.worker_pid):
            self.restarted["worker"] = self.restarted.get("worker", 0) + 1
            s.worker_pid = stack._spawn(
                [
                    "worker",
                    "start",
                    "--pool",
                    self.settings.work_pool,
                    "--type",
                    "setlist-process",
                    "--limit",
                    str(self.settings.parallel_jobs),
                    "--name",
                    "setlist-local-worker",
                ],
                self._env(),
                self.home / "logs" / "worker.log",
            )
            self._save()

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.home / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------- the work


@dataclass
class Source:
    name: str
    secret: str


async def make_source(tenant_id: str) -> Source:
    """A webhook source speaking for ``tenant_id``, its rate limit out of the way: the
    burst is the work, not a test of the limiter."""
    from setlist.gateway.sources import save_source

    source = Source(f"chaos-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex + uuid.uuid4().hex)
    await save_source(
        source.name, source.secret, allowed_tenants=[tenant_id], rate_limit_per_s=1000, burst=1000
    )
    return source


def _hook_body(tenant_id: str, note: str) -> bytes:
    return json.dumps({"tenant_id": tenant_id, "files": [f"raw/{note}"], "note": note}).encode()


async def deliver(
    base: str,
    source: Source,
    tenant_id: str,
    note: str,
    deadline: float,
    seen: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One webhook, sent again (same delivery id and body, signed afresh) until the
    gateway answers 2xx or ``deadline`` passes; ``seen``: a delivery to carry on with.
    → what the sender saw."""
    from setlist.gateway.signatures import sign_standard

    body = _hook_body(tenant_id, note)
    if seen is None:
        seen = {"note": note, "delivery": f"msg_{uuid.uuid4().hex}", "attempts": 0, "refusals": {}}
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            seen["attempts"] += 1
            signed = sign_standard(source.secret, body, seen["delivery"])
            try:
                r = await http.post(
                    f"{base}/hooks/{source.name}",
                    content=body,
                    headers={"content-type": "application/json", **signed},
                )
            except httpx.HTTPError as exc:
                what = type(exc).__name__
            else:
                if r.status_code in (200, 202):
                    seen.update(status=r.status_code, event_id=r.json()["event_id"])
                    seen["at"] = time.monotonic()
                    return seen
                what = str(r.status_code)
            seen["refusals"][what] = seen["refusals"].get(what, 0) + 1
            await asyncio.sleep(min(0.5 * seen["attempts"], 3.0))
    return seen


async def submit_canary(tenant_id: str, payload_bytes: int, hold_s: float, deadline: float) -> dict:
    """A directly submitted canary, retried under one idempotency key while the API
    does not answer. → its run id (None if it never got in)."""
    from prefect.client.orchestration import get_client

    from setlist.tenants.submit import submit

    key = f"chaos-{uuid.uuid4().hex}"
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        try:
            async with get_client() as client:
                sub = await submit(
                    client,
                    "canary",
                    tenant_id,
                    params={"payload_bytes": payload_bytes, "hold_seconds": hold_s},
                    idempotency_key=key,
                )
            return {"run": str(sub.flow_run_id), "bytes": payload_bytes, "attempts": attempts}
        except Exception:  # noqa: BLE001 - the server is down: the caller tries again
            await asyncio.sleep(2.0)
    return {"run": None, "bytes": payload_bytes, "attempts": attempts}


@dataclass
class Work:
    tenant_id: str
    source: Source
    hooks: list[dict] = field(default_factory=list)  # what each sender saw
    canaries: list[dict] = field(default_factory=list)  # what each submitter saw

    @property
    def accepted(self) -> list[str]:
        return [h["event_id"] for h in self.hooks if "event_id" in h]


async def burst(stack: Stack, work: Work, rng: random.Random, hooks: int, runs: int) -> None:
    """The webhooks and the submissions, each at a random moment of the window."""
    deadline = time.monotonic() + SETTLE_S

    async def hook(at: float, n: int) -> None:
        await asyncio.sleep(at)
        work.hooks.append(
            await deliver(stack.hooks_url, work.source, work.tenant_id, f"chaos-{n}", deadline)
        )

    async def run(at: float, n: int, hold: float) -> None:
        await asyncio.sleep(at)
        work.canaries.append(await submit_canary(work.tenant_id, 1000 + n, hold, deadline))

    jobs = [hook(rng.uniform(0, WINDOW_S), n) for n in range(hooks)]
    jobs += [run(rng.uniform(0, WINDOW_S), n, round(rng.uniform(0, 6), 1)) for n in range(runs)]
    await asyncio.gather(*jobs)


# ------------------------------------------------------------------- what holds


async def _events_by_id(client, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), 50):
        body = {"filter": {"id": {"id": ids[i : i + 50]}, "occurred": _window()}, "limit": 50}
        r = await client._client.post("/events/filter", json=body)
        r.raise_for_status()
        found |= {e["id"] for e in r.json()["events"]}
    return found


def _window() -> dict[str, str]:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    since, until = now - timedelta(hours=2), now + timedelta(hours=1)
    return {"since": since.isoformat(), "until": until.isoformat()}


async def _events_named(client, name: str) -> list[dict]:
    body = {"filter": {"event": {"name": [name]}, "occurred": _window()}, "limit": 50}
    r = await client._client.post("/events/filter", json=body)
    r.raise_for_status()
    page = r.json()
    events = list(page["events"])
    while page.get("next_page"):
        page = (await client._client.get(page["next_page"])).json()
        events += page["events"]
    return events


async def _runs_by_event(client) -> dict[str, list[str]]:
    """Triggering event → the flow runs its automations started (where the server kept
    its own ``action.executed`` events: they can be lost with the server, the runs not)."""
    out: dict[str, list[str]] = {}
    for e in await _events_named(client, EXECUTED_EVENT):
        related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in e["related"]}
        trigger, run = related.get("triggering-event"), related.get("flow-run")
        if trigger and run:
            out.setdefault(trigger.removeprefix("prefect.event."), []).append(
                run.removeprefix("prefect.flow-run.")
            )
    return out


async def _etl_runs(client, tenant_id: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deployment = await client.read_deployment_by_name(f"data-etl/{tenant_id}")
    return await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    )


def executions(results_dir: Path) -> list[dict]:
    """Every flow result persisted under ``results_dir``: one per execution that
    completed (task results and other values are left out)."""
    import cloudpickle

    out = []
    for path in results_dir.glob("*") if results_dir.exists() else []:
        try:
            data = path.read_bytes()
            if data.startswith(b"{"):  # a result record: metadata beside the value
                data = json.loads(data)["result"].encode()
            value = cloudpickle.loads(base64.b64decode(data))
        except Exception:  # noqa: BLE001, S112 - not a flow result this check reads
            continue
        kind = type(value).__name__
        if kind == "CanaryReport":
            out.append({"kind": "canary", "tenant": value.tenant_id, "bytes": value.bytes})
        elif kind == "EtlReport":
            out.append({"kind": "etl", "tenant": value.tenant_id})
    return out


@dataclass
class Found:
    canary_states: dict[str, str]
    etl_states: dict[str, str]
    run_counts: dict[str, int]
    messages: dict[str, str]  # of the runs not Completed: their state and its message
    events_found: set[str]
    runs_by_event: dict[str, list[str]]
    spooled: int | None
    failed_actions: list[str]  # the reasons of automation actions that failed

    def quiet(self, work: Work) -> bool:
        """Every run ended, every submission is in, the spool is empty."""
        states = [*self.canary_states.values(), *self.etl_states.values()]
        return (
            all(s in TERMINAL for s in states)
            and len(self.canary_states) == len([c for c in work.canaries if c["run"]])
            and self.spooled == 0
        )

    def settled(self, work: Work) -> bool:
        """Quiet, and every accepted webhook's event and run are there."""
        return (
            self.quiet(work)
            and len(self.etl_states) >= len(work.accepted)
            and set(work.accepted) <= self.events_found
        )


async def observe(stack: Stack, work: Work) -> Found:
    from prefect.client.orchestration import get_client

    ids = [c["run"] for c in work.canaries if c["run"]]
    async with get_client() as client:
        canaries = [await client.read_flow_run(uuid.UUID(i)) for i in ids]
        etl = await _etl_runs(client, work.tenant_id)
        found = await _events_by_id(client, work.accepted) if work.accepted else set()
        by_event = await _runs_by_event(client)
        failed = [e["payload"].get("reason", "") for e in await _events_named(client, FAILED_EVENT)]
    health = await stack.gateway_health()
    return Found(
        canary_states={str(r.id): r.state.type.value for r in canaries},
        etl_states={str(r.id): r.state.type.value for r in etl},
        run_counts={str(r.id): r.run_count for r in [*canaries, *etl]},
        messages={
            str(r.id): f"{r.state.name}: {(r.state.message or '')[:160]}"
            for r in [*canaries, *etl]
            if r.state.type.value != "COMPLETED"
        },
        events_found=found,
        runs_by_event=by_event,
        spooled=None if health is None else health.get("spooled"),
        failed_actions=failed,
    )


async def settle(stack: Stack, work: Work, timeout: float = SETTLE_S, grace: float = 60.0) -> Found:
    """Supervise and wait until the work is done: everything accepted arrived and every
    run ended. When all runs ended and the spool is empty but an accepted webhook's
    event or run is still missing, it gets ``grace`` seconds more, then counts as lost.
    → the last look."""
    deadline = time.monotonic() + timeout
    last, error, quiet_since = None, None, None
    while True:
        await asyncio.to_thread(stack.supervise)
        try:
            last = await observe(stack, work)
        except Exception as exc:  # noqa: BLE001 - the API is back but not ready: look again
            error = f"{type(exc).__name__}: {exc}"[:500]
        if last is not None and last.settled(work):
            break
        if last is not None and last.quiet(work):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > grace:
                break
        else:
            quiet_since = None
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(3)
    if last is None:
        raise RuntimeError(f"the platform could not be read after the fault: {error}")
    return last


def verdict(stack: Stack, work: Work, found: Found) -> dict[str, Any]:
    """The invariants over what the work left."""
    results = executions(stack.home / "results")
    by_bytes: dict[int, int] = {}
    for r in results:
        if r["kind"] == "canary" and r["tenant"] == work.tenant_id:
            by_bytes[r["bytes"]] = by_bytes.get(r["bytes"], 0) + 1
    etl_execs = sum(1 for r in results if r["kind"] == "etl" and r["tenant"] == work.tenant_id)
    submitted = [c for c in work.canaries if c["run"]]
    accepted = work.accepted
    etl_runs = len(found.etl_states)
    states = {**found.canary_states, **found.etl_states}
    completed = {k for k, v in states.items() if v == "COMPLETED"}
    not_completed = {k: found.messages.get(k, v) for k, v in states.items() if v != "COMPLETED"}
    # A run executed twice: its body completed twice (its results), or it entered
    # Running twice (Prefect's run_count). A canary's results name its run; data-etl's
    # only its tenant, so past one per run they count for the runs together.
    again = {k: v - 1 for k, v in found.run_counts.items() if v > 1}
    twice = sum(
        max(by_bytes.get(c["bytes"], 0) - 1, again.get(c["run"], 0)) for c in submitted
    ) + max(etl_execs - len(found.etl_states), sum(again.get(k, 0) for k in found.etl_states))
    lost_events = [e for e in accepted if e not in found.events_found]
    per_event = {e: len(found.runs_by_event.get(e, [])) for e in accepted}
    lost_runs = (
        len(not_completed)
        + (len(work.canaries) - len(submitted))  # a submission that never got in
        + max(0, len(accepted) - etl_runs)  # an accepted webhook that started no run
    )
    duplicate_runs = twice + max(0, etl_runs - len(accepted))
    return {
        "webhooks_accepted": len(accepted),
        "webhooks_never_accepted": len(work.hooks) - len(accepted),
        "sender_refusals": _sum_refusals(work.hooks),
        "canaries_submitted": len(submitted),
        "etl_runs_triggered": etl_runs,
        "runs_completed": len(completed),
        "runs_not_completed": not_completed,
        "executions": {"canary": sum(by_bytes.values()), "etl": etl_execs},
        "run_count_over_1": {k: v + 1 for k, v in again.items()},
        "runs_per_event_seen": _histogram(per_event.values()),
        "events_found": len(accepted) - len(lost_events),
        "spooled_after": found.spooled,
        "failed_actions": [r[:200] for r in found.failed_actions[:5]],
        # Messages the server's in-memory bus gave up on (a trigger that kept failing,
        # e.g. on a locked SQLite database), kept by Prefect as files.
        "dead_letters": len(list((stack.home / "prefect" / "dlq").glob("*"))),
        "restarted_by_supervisor": stack.restarted,
        "lost_runs": lost_runs,
        "duplicate_runs": duplicate_runs,
        "lost_events": len(lost_events),
        "lost_or_duplicate_rows": 0,
    }


def _sum_refusals(hooks: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for h in hooks:
        for k, v in h["refusals"].items():
            out[k] = out.get(k, 0) + v
    return out


def _histogram(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


# ------------------------------------------------------------------- scenarios


async def _with_stack(name: str, database: str, body) -> dict:
    """Bring a stack up, run ``body(stack, client settings)``, always bring it down."""
    from prefect.settings import temporary_settings

    stack = Stack(database)
    t0 = time.monotonic()
    try:
        try:
            await stack.up()
            up_s = round(time.monotonic() - t0, 1)
            with temporary_settings(updates=stack.client_settings()):
                result = await body(stack)
            result["stack_up_s"] = up_s
        except Exception as exc:  # noqa: BLE001 - a scenario that breaks reports it
            result = {
                "error": f"{type(exc).__name__}: {exc}"[:800],
                "server_log": stack.log_tail("server"),
                "survived": False,
                "lost_runs": 0,
                "lost_or_duplicate_rows": 0,
            }
        if "error" not in result:
            counts = ("lost_runs", "duplicate_runs", "lost_events")
            lost = any(result[k] for k in counts) or result["spooled_after"] != 0
            result["survived"] = not lost
        if not result["survived"] and (stack.home / "logs").is_dir():
            # what the services wrote, the runs' own output among it, outlives the stack
            kept = Path(tempfile.mkdtemp(prefix=f"setlist-chaos-{name}-logs-"))
            shutil.copytree(stack.home / "logs", kept, dirs_exist_ok=True)
            result["logs_kept"] = str(kept)
    finally:
        await stack.down()
    return {"name": name, "database": database, **result}


async def _prepare(stack: Stack) -> Work:
    from setlist.stack import DEMO_TENANT

    return Work(tenant_id=DEMO_TENANT, source=await make_source(DEMO_TENANT))


async def _under_load(stack: Stack, rng: random.Random, injected: dict, take_down, bring_back):
    """The work, with ``take_down`` at a random point of it and ``bring_back`` a few
    seconds later (both blocking: run in a thread); then the platform settles."""
    work = await _prepare(stack)
    at, down_s = rng.uniform(1.0, WINDOW_S), rng.uniform(2.0, 8.0)
    injected.update(at_s=round(at, 1), down_s=round(down_s, 1))
    window: list[float] = []

    async def fault() -> None:
        await asyncio.sleep(at)
        injected["spooled_at_fault"] = (await stack.gateway_health() or {}).get("spooled")
        await asyncio.to_thread(take_down)
        window.append(time.monotonic())
        await asyncio.sleep(down_s)
        injected["back_after_s"] = round(await asyncio.to_thread(bring_back), 1)
        window.append(time.monotonic())

    await asyncio.gather(burst(stack, work, rng, HOOKS, RUNS), fault())
    # What the gateway took into its spool while the control plane was away.
    injected["accepted_while_down"] = sum(
        1 for h in work.hooks if "at" in h and window[0] <= h["at"] <= window[1]
    )
    t0 = time.monotonic()
    found = await settle(stack, work)
    injected["settled_after_s"] = round(time.monotonic() - t0, 1)
    return {"injected": injected, **verdict(stack, work, found)}


async def _server_restart(database: str, name: str, rng: random.Random) -> dict:
    async def body(stack: Stack) -> dict:
        injected: dict[str, Any] = {"fault": "SIGKILL of the Prefect server"}
        return await _under_load(stack, rng, injected, stack.kill_server, stack.start_server)

    return await _with_stack(name, database, body)


async def server_restart_sqlite(ctx: Context, args, rng: random.Random) -> dict:
    return await _server_restart("sqlite", "server-restart-sqlite", rng)


async def server_restart_postgres(ctx: Context, args, rng: random.Random) -> dict:
    return await _server_restart("postgres", "server-restart-postgres", rng)


async def postgres_restart(ctx: Context, args, rng: random.Random) -> dict:
    async def body(stack: Stack) -> dict:
        mode = rng.choice(["immediate", "fast"])
        injected: dict[str, Any] = {"fault": f"PostgreSQL stopped ({mode})"}

        def bring_back() -> float:
            took = stack.start_postgres()
            injected["server_outlived_it"] = stack.server_alive()
            return took

        return await _under_load(
            stack, rng, injected, lambda: stack.stop_postgres(mode), bring_back
        )

    return await _with_stack("postgres-restart", "postgres", body)


async def gateway_spool(ctx: Context, args, rng: random.Random) -> dict:
    """Two rounds, one per restart order; each: server down, webhooks spooled, gateway
    SIGKILLed, both started again."""

    async def body(stack: Stack) -> dict:
        work = await _prepare(stack)
        rounds = []
        orders = ["gateway-first", "server-first"]
        rng.shuffle(orders)
        for order in orders:
            # The gateway answers from its caches while Prefect is down: one delivery
            # fills them (source and tenant) in the gateway process of this round, as
            # production traffic keeps them filled.
            deadline = time.monotonic() + SETTLE_S
            warm = await deliver(
                stack.hooks_url, work.source, work.tenant_id, f"{order}-warm", deadline
            )
            work.hooks.append(warm)
            await settle(stack, work)  # everything so far done: the round starts clean
            rounds.append(await _spool_round(stack, work, rng, order))
        t0 = time.monotonic()
        found = await settle(stack, work)
        settled = round(time.monotonic() - t0, 1)
        return {
            "injected": {"rounds": rounds, "settled_after_s": settled},
            **verdict(stack, work, found),
        }

    return await _with_stack("gateway-spool", "postgres", body)


async def _spool_round(stack: Stack, work: Work, rng: random.Random, order: str) -> dict:
    """Server down, webhooks into the spool, the gateway SIGKILLed at a random point of
    the burst, both started again in ``order``; then what was refused is sent again."""
    stack.kill_server()
    hooks = rng.randint(3, HOOKS)
    kill_after = rng.randint(1, hooks)  # the gateway dies once this many were sent
    spooled_at_kill = None
    sent: list[dict] = []
    for n in range(hooks + 1):
        if n == kill_after:
            spooled_at_kill = (await stack.gateway_health() or {}).get("spooled")
            stack.kill_gateway()
        if n == hooks:
            break
        # A sender gives up on a refused delivery after a few tries for now, and
        # sends it again once the platform is back (below).
        sent.append(
            await deliver(
                stack.hooks_url, work.source, work.tenant_id, f"{order}-{n}", time.monotonic() + 3
            )
        )
    accepted_while_down = sum(1 for h in sent if "event_id" in h)
    await asyncio.sleep(rng.uniform(1, 4))
    if order == "gateway-first":
        stack.start_gateway()
        await asyncio.sleep(rng.uniform(1, 4))
        restart_s = await asyncio.to_thread(stack.start_server)
    else:
        restart_s = await asyncio.to_thread(stack.start_server)
        await asyncio.sleep(rng.uniform(1, 4))
        stack.start_gateway()
    deadline = time.monotonic() + SETTLE_S
    for h in sent:
        if "event_id" not in h:
            await deliver(stack.hooks_url, work.source, work.tenant_id, h["note"], deadline, h)
    work.hooks += sent
    return {
        "order": order,
        "webhooks": hooks,
        "accepted_while_down": accepted_while_down,
        "gateway_killed_after": kill_after,
        "spooled_at_kill": spooled_at_kill,
        "server_restart_s": round(restart_s, 1),
    }
