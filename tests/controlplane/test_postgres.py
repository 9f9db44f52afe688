"""The embedded PostgreSQL: a real cluster under a fresh home, a real Prefect server on it,
a restart that keeps the data, a stop that leaves no process, a crash's pid file."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from setlist.controlplane.postgres import (
    DATABASE,
    EmbeddedPostgres,
    redact,
)


def _query(pg: EmbeddedPostgres, sql: str, port: int):
    """The first value of the last statement's first row."""

    async def run():
        import asyncpg

        conn = await asyncpg.connect(pg.url(port, driver="postgresql"))
        try:
            *before, last = [s for s in sql.split(";") if s.strip()]
            for statement in before:
                await conn.execute(statement)
            return await conn.fetchval(last)
        finally:
            await conn.close()

    return asyncio.run(run())


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (the server's checkpointer, walwriter…)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cluster(setlist_home):
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pg-", dir=setlist_home)))
    yield pg
    pg.stop()
    shutil.rmtree(pg.root, ignore_errors=True)  # 40 MB a cluster


@pytest.mark.server  # its own server: about 25 s
def test_a_prefect_flow_run_completes_on_the_embedded_postgres(cluster, setlist_home):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import temporary_settings

    from setlist.controlplane.local import start_local_server
    from setlist.core.credentials import client_settings

    operator = os.environ["PREFECT_API_AUTH_STRING"]  # the session's, set by conftest
    url = cluster.start()
    assert url.startswith("postgresql+asyncpg://postgres:") and url.endswith(f"/{DATABASE}")
    assert cluster.start() == url  # running: the same URL, no second server
    home = Path(tempfile.mkdtemp(prefix="server-", dir=setlist_home))
    proc, api = start_local_server(home, operator, database_url=url)
    try:

        @flow(persist_result=False)
        def add(a: int, b: int) -> int:
            return a + b

        with temporary_settings(updates=client_settings(api, operator)):
            state = add(2, 3, return_state=True)

            async def read():
                async with get_client() as client:
                    return await client.read_flow_run(state.state_details.flow_run_id)

            run = asyncio.run(read())
            # What the run still sends (logs, events) reaches the server before it stops.
            APILogWorker.drain_all()
            EventsWorker.drain_all()
        assert state.is_completed() and state.result() == 5
        assert run.state.is_completed()
        # The run is in PostgreSQL, not in a SQLite file beside the server.
        port = cluster.running().port
        assert _query(cluster, f"SELECT count(*) FROM flow_run WHERE id = '{run.id}'", port) == 1
        assert not (home / "prefect.db").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    password = (cluster.root / "password").read_text().strip()
    assert password not in (home / "server.log").read_text()
    assert password not in cluster.log.read_text()


def test_a_restart_keeps_the_data_and_the_url(cluster):
    url = cluster.start()
    port = cluster.running().port
    _query(cluster, "CREATE TABLE IF NOT EXISTS kept (v int); INSERT INTO kept VALUES (7)", port)
    pid = cluster.stop()
    assert pid and cluster.running() is None
    assert cluster.stop() is None  # nothing left to stop
    assert cluster.start() == url
    assert _query(cluster, "SELECT sum(v) FROM kept", cluster.running().port) >= 7


def test_stop_leaves_no_process(cluster):
    cluster.start()
    postmaster = cluster.running().pid
    children = _children(postmaster)
    assert children, "a running server has its auxiliary processes"
    assert cluster.stop() == postmaster
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in {postmaster, *children}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in {postmaster, *children} if _alive(p)]
    assert not (cluster.data / "postmaster.pid").exists()


def test_a_crash_leaves_a_pid_file_that_start_gets_past(cluster):
    url = cluster.start()
    port = cluster.running().port
    _query(
        cluster,
        "CREATE TABLE IF NOT EXISTS survived (v int); INSERT INTO survived VALUES (1)",
        port,
    )
    os.kill(cluster.running().pid, signal.SIGKILL)
    pidfile = cluster.data / "postmaster.pid"
    lines = pidfile.read_text().splitlines()
    # After a reboot its pid may belong to any live process: here, this one.
    pidfile.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")
    assert cluster.running() is None
    assert cluster.start() == url
    assert _query(cluster, "SELECT count(*) FROM survived", cluster.running().port) >= 1


def test_secrets_stay_private_and_root_never_runs_the_server(cluster):
    url = cluster.start()
    password = (cluster.root / "password").read_text().strip()
    assert (cluster.root / "password").stat().st_mode & 0o077 == 0
    assert password not in redact(url) and redact(url).startswith(
        "postgresql+asyncpg://postgres:***@"
    )
    owner = Path(f"/proc/{cluster.running().pid}/status").read_text()
    uid = int(next(line for line in owner.splitlines() if line.startswith("Uid:")).split()[1])
    if os.geteuid() == 0:
        assert uid == pwd.getpwnam("nobody").pw_uid == cluster.data.stat().st_uid
    else:
        assert uid == os.geteuid()
