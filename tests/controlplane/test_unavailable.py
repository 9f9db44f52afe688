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

from setlist.controlplane.server import create_app, database_unreachable


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
