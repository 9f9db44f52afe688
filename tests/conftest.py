"""One Prefect server per test session; everything else is per test.

The server is the platform's own: Prefect's app behind Setlist's gate
(``python -m setlist.controlplane``) on a fresh embedded PostgreSQL, the stack's own
default (``setlist.controlplane.postgres``, under the session's home), with an operator
credential made for the session, so every test talks to an authenticated API as the
platform does. Unit tests don't request it and run without one.

``SETLIST_TEST_DATABASE=sqlite`` puts that server on a fresh SQLite database instead.
``SETLIST_TEST_CONTROL_PLANE=ha`` runs the session on Prefect's multi-replica shape (two
API replicas without services, two services processes, the embedded PostgreSQL and a Redis
database of its own at ``SETLIST_TEST_REDIS_URL``): the tests, the dispatcher and the
gateway talk to the second replica, the e2e worker to the first, so every run's state
changes cross replicas (``make test-ha``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="setlist-test-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["SETLIST_HOME"] = str(_HOME)
os.environ["SETLIST_ACTOR"] = "pytest"
# Runs over a tenant quota retry for a slot after this long (Prefect default: 30 s).
os.environ["PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS"] = "3"
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_HOME / "results")
# The operator credential of the session: set before Prefect reads its settings, so
# every client of the suite (and every process it starts) sends it.
OPERATOR_AUTH = f"setlist:{secrets.token_urlsafe(24)}"
os.environ["PREFECT_API_AUTH_STRING"] = OPERATOR_AUTH
os.environ.pop("PREFECT_API_KEY", None)
for var in ("TENANT_ID", "PRIORITY", "RESOURCE_TIER", "DRY_RUN", "PARALLEL_JOBS"):
    os.environ.pop(var, None)
TEST_DATABASE = os.environ.get("SETLIST_TEST_DATABASE", "postgres")
if TEST_DATABASE not in ("sqlite", "postgres"):
    raise RuntimeError(f"SETLIST_TEST_DATABASE={TEST_DATABASE!r}: sqlite or postgres")
CONTROL_PLANE = os.environ.get("SETLIST_TEST_CONTROL_PLANE", "one")
if CONTROL_PLANE not in ("one", "ha"):
    raise RuntimeError(f"SETLIST_TEST_CONTROL_PLANE={CONTROL_PLANE!r}: one or ha")
if CONTROL_PLANE == "ha" and TEST_DATABASE != "postgres":
    raise RuntimeError("SETLIST_TEST_CONTROL_PLANE=ha runs on PostgreSQL only")


@pytest.fixture(scope="session")
def setlist_home() -> Path:
    return _HOME


@contextlib.contextmanager
def _one_server(home: Path, database_url: str | None):
    """→ [its API URL]."""
    from setlist.controlplane.local import start_local_server

    proc, url = start_local_server(
        home,
        OPERATOR_AUTH,
        database_url=database_url,
        PREFECT__SERVER_EPHEMERAL="1",  # as Prefect's test harness runs its server
    )
    try:
        yield [url]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def _two_replicas(home: Path, database_url: str):
    """→ the two replicas' API URLs."""
    from setlist.controlplane import ha
    from setlist.controlplane.local import start_local_ha

    redis_url = os.environ.get("SETLIST_TEST_REDIS_URL", ha.DEFAULT_REDIS_URL)
    with ha.claimed_database(redis_url) as claimed:
        started = start_local_ha(home, OPERATOR_AUTH, database_url, claimed)
        try:
            yield started.urls
        finally:
            started.stop()


@pytest.fixture(scope="session")
def api_urls(setlist_home) -> list[str]:
    """The session's API processes: one server, or two replicas (the last serves the
    tests, the first the e2e worker)."""
    database = None
    if TEST_DATABASE == "postgres":
        from setlist.controlplane.postgres import EmbeddedPostgres

        database = EmbeddedPostgres(setlist_home / "postgres")
    try:
        url = database.start() if database else None
        start = _two_replicas if CONTROL_PLANE == "ha" else _one_server
        with start(setlist_home, url) as urls:
            yield urls
    finally:
        if database:
            database.stop()
            shutil.rmtree(database.root, ignore_errors=True)  # 40 MB and more


@pytest.fixture(scope="session")
def prefect_server(api_urls):
    """A real, gated Prefect server for the whole session, with Setlist's blocks, pool
    and store."""
    import anyio
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from setlist import stack
    from setlist.core.credentials import client_settings

    url = api_urls[-1]
    os.environ["PREFECT_API_URL"] = url
    with (
        temporary_settings(updates=client_settings(url, OPERATOR_AUTH)),
        prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()),
    ):
        anyio.run(stack.bootstrap_platform, _HOME / "storage")
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def worker_api_url(prefect_server, api_urls) -> str:
    """Where the e2e worker talks to: the first replica (the session's own server when
    there is one)."""
    return api_urls[0]


@pytest.fixture
async def client(prefect_server):
    from prefect.client.orchestration import get_client

    async with get_client() as c:
        yield c


# The loopback Redis this machine runs: tenants' event streams in the stream tests.
STREAM_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def streaming(monkeypatch) -> str:
    """Tenants onboarded in the test get stream blocks on the loopback Redis (the
    platform broker is ``SETLIST_STREAM_BROKER_URL``); its URL."""
    from setlist.core.settings import get_settings

    monkeypatch.setenv("SETLIST_STREAM_BROKER_URL", STREAM_REDIS_URL)
    get_settings.cache_clear()
    yield STREAM_REDIS_URL
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's real S3 server on loopback, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def storage_config(request, tmp_path):
    """A storage config of each backend: a local directory, and a fresh bucket in moto."""
    from blocks.storage import LocalStorageConfig

    if request.param == "local":
        return LocalStorageConfig(root=str(tmp_path / "store"))
    from tests.helpers import fresh_s3_store

    return fresh_s3_store(request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def tenant_id(request) -> str:
    """A fresh tenant id per test, so tests never share queues, limits or data."""
    import re
    import uuid

    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    return f"{base}-{uuid.uuid4().hex[:6]}"


def pytest_collection_modifyitems(config, items):
    """End-to-end tests last: their worker must not race the other modules' runs."""
    items.sort(key=lambda item: "/e2e/" in str(item.fspath))
