"""A call made while the database can't be reached is answered 503, which Prefect's
clients retry with back-off, never 500, which they don't: a job's last state, a
worker's report, a webhook's run must outlive a PostgreSQL restart."""

from __future__ import annotations

import base64
import os
import socket
import uuid

import httpx
import pytest
from prefect.settings import (
    PREFECT_API_DATABASE_CONNECTION_URL,
    PREFECT_SERVER_API_AUTH_STRING,
    temporary_settings,
)

from setlist.controlplane.gate import Gate
from setlist.controlplane.server import create_app
from setlist.controlplane.unavailable import database_unreachable
from setlist.core import runtokens


def test_a_refused_connection_inside_a_group_is_the_database_unreachable():
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    assert database_unreachable(ExceptionGroup("middleware", [refused])) is refused
    wrapped = RuntimeError("query failed")
    wrapped.__cause__ = ConnectionResetError()
    assert isinstance(database_unreachable(wrapped), ConnectionResetError)


def test_an_error_of_the_call_itself_is_not():
    assert database_unreachable(ValueError("bad filter")) is None
    assert database_unreachable(ExceptionGroup("middleware", [KeyError("id")])) is None


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: a connection is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_database_app(monkeypatch):
    """The control plane's app on a PostgreSQL URL where nothing listens."""
    operator = f"operator:{uuid.uuid4().hex}"
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", operator)
    url = f"postgresql+asyncpg://prefect:x@127.0.0.1:{_closed_port()}/prefect"
    with temporary_settings(
        updates={PREFECT_API_DATABASE_CONNECTION_URL: url, PREFECT_SERVER_API_AUTH_STRING: operator}
    ):
        yield create_app(), operator


async def test_a_call_while_the_database_is_down_is_answered_503(dead_database_app):
    app, operator = dead_database_app
    auth = {"Authorization": "Basic " + base64.b64encode(operator.encode()).decode()}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp", headers=auth) as http:
        read = await http.get(f"/api/flow_runs/{uuid.uuid4()}")
        state = await http.post(
            f"/api/flow_runs/{uuid.uuid4()}/set_state",
            json={"state": {"type": "COMPLETED", "name": "Completed"}},
        )
    assert (read.status_code, state.status_code) == (503, 503)
    assert os.environ["PREFECT_SERVER_API_AUTH_STRING"] not in read.text + state.text


async def test_a_jobs_call_while_the_database_is_down_is_answered_503(dead_database_app):
    """A run token's call: the gate's own check of the token's run can't be read."""
    app, _ = dead_database_app
    run_id = uuid.uuid4()
    token = runtokens.issue(run_id, "acme")
    auth = {"Authorization": "Basic " + base64.b64encode(token.auth_string().encode()).decode()}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp", headers=auth) as http:
        answer = await http.get(f"/api/flow_runs/{run_id}")
    assert answer.status_code == 503
    assert "retry-after" not in answer.headers  # the client's own back-off: about a minute


async def test_an_answer_sent_whole_before_the_error_is_raised_again_is_passed_on():
    """Starlette's error middleware sends its handler's 503, then raises the error again
    for the server's log; the gate, holding the answer back to filter it, passes the
    503 on (it used to become a 500)."""

    async def prefect(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b'{"exception_message": "x"}'})
        raise ExceptionGroup("middleware", [ConnectionRefusedError(111, "refused")])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    gate = Gate(prefect, "operator:x")
    start, body = await gate._captured({"type": "http", "method": "GET", "path": "/"}, receive)
    assert (start["status"], body) == (503, b'{"exception_message": "x"}')

    async def broken(scope, receive, send):  # nothing sent: the error stands
        raise ConnectionRefusedError(111, "refused")

    with pytest.raises(ConnectionRefusedError):
        await Gate(broken, "operator:x")._captured({"type": "http"}, receive)
