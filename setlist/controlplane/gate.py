"""The ASGI gate around Prefect's app: the one door every API call comes through.

Prefect's own check (``PREFECT_SERVER_API_AUTH_STRING``) stays on inside: the gate
passes the operator credential through untouched, and hands a run-token call on only
after the policy allowed it, with the operator credential in place of the token. So a
call that slips past the gate still meets Prefect's 401, and Prefect never needs to
know run tokens exist.

The websocket a flow run streams its events on is covered too: the token arrives in the
first message (the browser can't set headers on a websocket), and every later message
is an event the policy must allow, or the socket is closed with 1008.

``POST /api/events`` is answered only once its events are in the database, and a
redelivered event is not handed to the triggers again (``intake``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx

from setlist.controlplane import intake, policy
from setlist.controlplane.unavailable import database_unreachable
from setlist.core import records
from setlist.core.runtokens import RUN_USER, InvalidRunToken, RunToken, verify
from setlist.core.tenancy import SetlistError

log = logging.getLogger("setlist.controlplane")

MAX_BODY = 32 * 1024 * 1024  # a run token's request bodies: logs and artifacts fit easily
OPEN_PATHS = {"/api/health", "/api/ready"}
EVENTS_IN, EVENTS_OUT = "/api/events/in", "/api/events/out"
RUN_SOCKETS = {EVENTS_IN, EVENTS_OUT}  # a flow run emits events, and watches its own run
# The gate's own endpoints (Prefect has no such routes): sealing platform records.
RECORD_SEAL, RECORD_KEY = "/api" + records.SEAL_PATH, "/api" + records.PUBLIC_KEY_PATH
CALLER_TTL_S = 30.0


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _with_headers(scope: dict[str, Any], replace: dict[bytes, bytes]) -> dict[str, Any]:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in replace]
    return {**scope, "headers": [*headers, *replace.items()]}


async def _json_answer(send, payload: Any, status: int = 200) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _json_response(send, status: int, detail: str) -> None:
    await _json_answer(send, {"detail": detail}, status)


async def _unavailable(
    send, detail: str = "events can't be kept right now; retry", retry_after: bool = True
) -> None:
    """503: Prefect's clients and the gateway retry it (after ``Retry-After``, else
    with their own back-off, about a minute in all for Prefect's)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": headers + ([(b"retry-after", b"2")] if retry_after else []),
        }
    )
    await send({"type": "http.response.body", "body": body})


def _database_away(exc: BaseException) -> bool:
    """A job's call that failed because the database is away: in Prefect's app, or in
    a read of it the gate made to check the call (answered 503 there)."""
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 503:
        return True
    return database_unreachable(exc) is not None


async def _read_body(receive) -> bytes | None:
    """The whole request body (None when the client went away); a little past
    ``MAX_BODY`` at most, for the caller to refuse."""
    raw = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        raw += message.get("body", b"")
        more = message.get("more_body", False)
        if len(raw) > MAX_BODY:
            break
    return raw


def _replay(raw: bytes, receive):
    """A ``receive`` that gives ``raw`` as the whole body, then the client's messages."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return replay


# Reads whose answer never changes for what the policy asks of it: the flow run a task
# run belongs to. Every log batch names its task runs; each is looked up once.
KEPT_READS = ("/task_runs/",)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
AFTER_END_S = 300  # a run's last logs and events arrive after its final state


def _ended_long_ago(run: dict[str, Any]) -> bool:
    """A token outlives its run by minutes at most, whatever its expiry says."""
    from datetime import UTC, datetime

    state = run.get("state") or {}
    if state.get("type") not in FINAL_STATES or not state.get("timestamp"):
        return False
    ended = datetime.fromisoformat(str(state["timestamp"]).replace("Z", "+00:00"))
    return (datetime.now(UTC) - ended).total_seconds() > AFTER_END_S


class _InnerReader:
    """Reads of Prefect's app in this process, with the operator credential."""

    def __init__(self, app, header: bytes) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://setlist-gate/api",
            headers={"Authorization": header.decode()},
            timeout=30,
        )
        self._kept: dict[str, Any] = {}

    # Each read runs as a task of its own: a websocket's messages are read from inside
    # Prefect's handler, which already holds the app's request limiter for this task.
    async def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        if path in self._kept:
            return self._kept[path]
        response = await asyncio.create_task(self._client.get(path, params=params))
        if response.status_code in (404, 422):
            return None
        response.raise_for_status()
        found = response.json()
        if path.startswith(KEPT_READS) and not params:
            if len(self._kept) > 50_000:
                self._kept.clear()
            self._kept[path] = found
        return found

    async def post(self, path: str, body: Any) -> Any:
        response = await asyncio.create_task(self._client.post(path, json=body))
        if response.status_code in (404, 422):
            return None
        response.raise_for_status()
        return response.json()


class Gate:
    def __init__(
        self,
        app,
        operator_auth: str,
        key: bytes | None = None,
        ledger: intake.Ledger | None = None,
    ) -> None:
        self.app = app
        self.ledger = ledger or intake.DatabaseLedger()
        self._operator = operator_auth
        self._operator_header = b"Basic " + base64.b64encode(operator_auth.encode())
        self._key = key
        self.reader = _InnerReader(app, self._operator_header)
        self._callers: dict[str, tuple[float, policy.Caller]] = {}
        self._flows: dict[str, str] = {}
        self._record_key = None

    # ------------------------------------------------------------------ who is calling

    def _identify(self, secret: str | None) -> str | RunToken | None:
        """``"operator"``, a verified run token, or None for anything else."""
        if not secret:
            return None
        if hmac.compare_digest(secret.encode(), self._operator.encode()):
            return "operator"
        user, _, token = secret.partition(":")
        if user != RUN_USER:
            return None
        try:
            return verify(token, self._key)
        except InvalidRunToken as exc:
            log.warning("refused a run token: %s", exc)
            return None

    @staticmethod
    def _basic(value: bytes | None) -> str | None:
        if not value:
            return None
        scheme, _, creds = value.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            return base64.b64decode(creds.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None

    async def _caller(self, token: RunToken) -> policy.Caller | None:
        """The token's run as the server has it; None if it is not its tenant's."""
        key = str(token.run_id)
        cached = self._callers.get(key)
        if cached and cached[1].token == token and time.monotonic() - cached[0] < CALLER_TTL_S:
            return cached[1]
        run = await self.reader.get(f"/flow_runs/{key}")
        if not run or f"tenant:{token.tenant_id}" not in (run.get("tags") or []):
            return None
        if _ended_long_ago(run):
            return None
        flow_id = str(run.get("flow_id"))
        if flow_id not in self._flows:
            flow = await self.reader.get(f"/flows/{flow_id}")
            self._flows[flow_id] = str((flow or {}).get("name", ""))
        caller = policy.Caller(token=token, run=run, flow_name=self._flows[flow_id])
        if len(self._callers) > 10_000:
            self._callers.clear()
        self._callers[key] = (time.monotonic(), caller)
        return caller

    # ------------------------------------------------------------------------- ASGI

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        path = scope.get("path", "")
        if kind not in ("http", "websocket") or not (path == "/api" or path.startswith("/api/")):
            return await self.app(scope, receive, send)
        if kind == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["method"] == "GET" and path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        who = self._identify(self._basic(_header(scope, b"authorization")))
        if who is None:
            return await _json_response(send, 401, "Unauthorized")
        if who == "operator":
            if path in (RECORD_SEAL, RECORD_KEY):
                return await self._records(None, scope, await _read_body(receive), send)
            if scope["method"] == "POST" and path in intake.PATHS:
                return await self._events(scope, await _read_body(receive), receive, send)
            return await self.app(scope, receive, send)
        assert isinstance(who, RunToken)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._run_call(who, scope, receive, sending)
        except Exception as exc:
            if started or not _database_away(exc):
                raise
            log.warning("%s %s for run %s: the database can't be reached; answered 503",
                        scope["method"], quote(path), who.run_id)  # fmt: skip
            await _unavailable(send, "the database can't be reached; retry", retry_after=False)

    async def _run_call(self, token: RunToken, scope, receive, send) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        if len(raw) > MAX_BODY:
            return await _json_response(send, 413, "request body too large for a job")
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            return await _json_response(send, 400, "request body is not JSON")
        caller = await self._caller(token)
        if caller is None:
            log.warning("refused run token of %s: run %s is not its", token.tenant_id, token.run_id)
            return await _json_response(send, 403, "the token's flow run is not its tenant's")
        if scope["path"] in (RECORD_SEAL, RECORD_KEY):
            return await self._records(caller, scope, raw, send)
        method = scope["method"]
        sub = scope["path"][len("/api") :] or "/"
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        request = policy.Request(method, sub, query, body)
        decision = await policy.decide(caller, request, self.reader)
        if not decision.allowed:
            log.warning(
                "refused %s %s for run %s of %s: %s",
                method,
                quote(sub),
                token.run_id,
                token.tenant_id,
                decision.reason,
            )
            return await _json_response(send, 403, decision.reason)
        if decision.rewrites:
            raw = policy.dumps(decision.body)
        inner = _with_headers(
            scope,
            {
                b"authorization": self._operator_header,
                b"content-length": str(len(raw)).encode(),
            },
        )
        if method == "POST" and scope["path"] in intake.PATHS:
            return await self._events(inner, raw, receive, send)
        replay = _replay(raw, receive)
        if decision.keep is None and decision.check is None:
            return await self.app(inner, replay, send)
        # The answer is read before it is passed on: ask for it uncompressed.
        inner = _with_headers(inner, {b"accept-encoding": b"identity"})
        await self._filtered(inner, replay, send, decision)

    async def _events(self, scope, raw: bytes | None, receive, send) -> None:
        """``POST /api/events``, answered once its new events are on Prefect's bus and in
        the database; events the database has already are acknowledged, not passed on."""
        if raw is None:
            return
        if len(raw) > MAX_BODY:
            return await _json_response(send, 413, "request body too large")
        try:
            events = intake.parse(raw)
        except ValueError:  # Prefect's answer to a body that is not events (422)
            return await self.app(scope, _replay(raw, receive), send)
        try:
            known = await self.ledger.known([e.id for e in events]) if events else set()
        except Exception as exc:  # noqa: BLE001 - the database is down: the sender retries
            log.warning("events refused, the database can't be read: %s", type(exc).__name__)
            return await _unavailable(send)
        fresh = [e for e in events if e.id not in known]
        if fresh:
            body = intake.dumps(fresh)
            inner = _with_headers(scope, {b"content-length": str(len(body)).encode()})
            start, answer = await self._captured(inner, _replay(body, receive))
            if start.get("status", 500) >= 300:
                await send(start)
                return await send({"type": "http.response.body", "body": answer})
            try:
                await self.ledger.write(fresh)
            except Exception as exc:  # noqa: BLE001 - not kept: the sender must retry
                log.warning("events not written, refused: %s", type(exc).__name__)
                return await _unavailable(send)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def _captured(self, scope, receive) -> tuple[dict[str, Any], bytes]:
        """Prefect's answer to the call, held back. → its start message and its body.

        Starlette's error middleware sends its handler's answer to a failed call (503
        while the database is away) and then raises the error again, for the server's
        log: an answer sent whole is the answer, and it is passed on. (Raised on, it
        became a 500 in place of the 503 the job's client would have retried.)"""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []
        whole = False

        async def capture(message):
            nonlocal whole
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                whole = not message.get("more_body", False)

        try:
            await self.app(scope, receive, capture)
        except Exception:
            if not (start and whole):
                raise
        return start, b"".join(chunks)

    async def _records(self, caller: policy.Caller | None, scope, raw: bytes | None, send) -> None:
        """Seal a platform record: for a job, only its own tenant's and only under the
        prefixes its job type writes; the operator names the tenant."""
        if raw is None:
            return
        if self._record_key is None:
            self._record_key = records.private_key()
        if scope["path"] == RECORD_KEY:
            if scope["method"] != "GET":
                return await _json_response(send, 405, "GET only")
            return await _json_answer(
                send, {"public_key": records.public_key_text(self._record_key)}
            )
        if scope["method"] != "POST":
            return await _json_response(send, 405, "POST only")
        try:
            body = json.loads(raw)
            key, digest = str(body["key"]), str(body["sha256"])
            tenant = caller.tenant if caller else str(body["tenant"])
        except (ValueError, KeyError, TypeError):
            return await _json_response(send, 422, "expected {key, sha256} (and tenant)")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            return await _json_response(send, 422, "sha256 is not a hex SHA-256")
        if caller is not None:
            reason = policy.record_denied(caller, key)
            if reason:
                log.warning("refused to seal %s for run %s: %s", quote(key), caller.run_id, reason)
                return await _json_response(send, 403, reason)
        try:
            records.check_record_key(key)
        except SetlistError as exc:
            return await _json_response(send, 422, str(exc))
        stamp = records.make_seal(self._record_key, tenant, key, digest)
        log.info(
            "sealed %s of %s for %s", quote(key), tenant, caller.run_id if caller else "operator"
        )
        await _json_answer(send, {"seal": stamp})

    async def _filtered(self, scope, receive, send, decision: policy.Decision) -> None:
        """Run the call, then keep only what the decision allows of its JSON answer."""
        start, body = await self._captured(scope, receive)
        if start.get("status") != 200:
            await send(start)
            return await send({"type": "http.response.body", "body": body})
        payload = json.loads(body)
        if decision.check is not None and not decision.check(payload):
            return await _json_response(send, 403, "the object is not the job's tenant's")
        if decision.keep is not None:
            if not isinstance(payload, list):
                return await _json_response(send, 403, "expected a list")
            payload = [item for item in payload if decision.keep(item)]
        out = policy.dumps(payload)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    async def _websocket(self, scope, receive, send) -> None:
        """Identify the caller from the first message; police a run token's events."""
        state: dict[str, Any] = {"who": None, "closed": False}
        header_secret = self._basic(_header(scope, b"authorization"))

        async def refuse(reason: str):
            log.warning("closed websocket %s: %s", scope["path"], reason)
            if not state["closed"]:
                state["closed"] = True
                await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
            return {"type": "websocket.disconnect", "code": 1008}

        async def guarded_receive():
            message = await receive()
            if message["type"] != "websocket.receive" or state["who"] == "operator":
                return message
            text = message.get("text")
            if text is None and message.get("bytes") is not None:
                text = message["bytes"].decode("utf-8", "replace")
            if state["who"] is None:
                try:
                    first = json.loads(text or "")
                except ValueError:
                    return await refuse("expected an auth message")
                secret = first.get("token") if isinstance(first, dict) else None
                who = self._identify(secret if isinstance(secret, str) else header_secret)
                if who is None:
                    return await refuse("Unauthorized")
                state["who"] = who
                if who == "operator":
                    return message
                if scope["path"] not in RUN_SOCKETS:
                    return await refuse("this stream is not open to a job's run token")
                caller = await self._caller(who)
                if caller is None:
                    return await refuse("the token's flow run is not its tenant's")
                state["caller"] = caller
                return {
                    "type": "websocket.receive",
                    "text": json.dumps({**first, "token": self._operator}),
                }
            try:
                event = json.loads(text or "")
            except ValueError:
                return await refuse("a message must be JSON")
            if scope["path"] == EVENTS_OUT:
                return await watch_own_run(event)
            reason = policy.event_denied(state["caller"], event)
            if reason:
                return await refuse(reason)
            return message

        async def watch_own_run(message: Any):
            """The stream's filter, narrowed to events that name the job's own run."""
            if state.get("filtered") or not isinstance(message, dict):
                return await refuse("a job's event stream takes one filter")
            if message.get("type") != "filter" or not isinstance(message.get("filter"), dict):
                return await refuse("expected a filter message")
            state["filtered"] = True
            own = f"prefect.flow-run.{state['caller'].run_id}"
            narrowed = {**message["filter"], "any_resource": {"id": [own]}}
            return {
                "type": "websocket.receive",
                "text": json.dumps({**message, "filter": narrowed}),
            }

        async def guarded_send(message):
            if state["closed"] and message["type"] != "websocket.close":
                return
            await send(message)

        inner = _with_headers(scope, {b"authorization": self._operator_header})
        await self.app(inner, guarded_receive, guarded_send)
