"""The local stack's choice of database, and who may hold its URL (no processes here:
tests/e2e/test_stack.py runs `setlist up` / `down`)."""

from __future__ import annotations

import pytest

from setlist import stack
from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError

DSN = "postgresql+asyncpg://postgres:db-secret@127.0.0.1:5432/prefect"


@pytest.mark.parametrize(
    ("database", "url", "choice"),
    [
        (None, None, "postgres"),  # the default: the embedded PostgreSQL
        ("postgres", None, "postgres"),
        ("sqlite", None, "sqlite"),
        (None, DSN, "external"),
        ("postgres", DSN, "external"),
    ],
)
def test_the_database_is_the_embedded_postgres_unless_told(database, url, choice):
    assert stack._database(database, url) == choice


@pytest.mark.parametrize(("database", "url"), [("sqlite", DSN), ("mysql", None)])
def test_a_database_that_cannot_be_meant_is_refused(database, url):
    with pytest.raises(SetlistError, match="database"):
        stack._database(database, url)


def test_only_the_server_gets_the_database_url(monkeypatch):
    """Every other process's environment reaches the jobs it starts."""
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", DSN)
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", DSN)
    api = stack.api_url(4200)
    others = stack.stack_env(get_settings(), api, auth="setlist:x")
    assert "db-secret" not in str(others)
    server = stack.stack_env(get_settings(), api, DSN.replace("db-secret", "new"), "setlist:x")
    assert server["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith(":new@127.0.0.1:5432/prefect")
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in server  # would be read second


@pytest.mark.parametrize(
    ("choice", "redis_url", "match"),
    [
        ("sqlite", None, "needs PostgreSQL"),
        ("postgres", "redis://127.0.0.1:1/0", "does not answer.*--redis-url"),
    ],
)
def test_ha_refuses_what_replicas_cannot_share_before_starting_anything(choice, redis_url, match):
    state = stack.StackState(api_url=stack.api_url(4200))
    with pytest.raises(SetlistError, match=match):
        stack._start_ha(
            get_settings(),
            state,
            choice,
            None,
            None,
            "setlist:x",
            stack.api_url(4201),
            print,
            redis_url,
        )
    assert state.postgres_pid is None and state.server_pid is None and state.services_pid is None
