"""The Prefect server a benchmark runs against: on a fresh embedded PostgreSQL (the
stack's default, ``embedded``), Prefect's test harness on a fresh SQLite database
(``sqlite``), or a fresh database on the PostgreSQL server at ``SETLIST_BENCH_PG_URL``
(``postgresql``).

SQLite takes one writer at a time; a transaction that read first and then needs to
write fails at once when another holds the write lock, and Prefect's server answers
503, which its clients retry after about 2 s. PostgreSQL, the production database
(``k8s/`` ships it as an optional component), has no such path. Benchmarks whose
figures depend on it take ``--database postgresql``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator

# trust auth on loopback, as on the development machine; override for another server
PG_ADMIN_URL = os.environ.get(
    "SETLIST_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


DATABASES = ("embedded", "sqlite", "postgresql")


@contextlib.contextmanager
def _on(url: str) -> Iterator[str]:
    import prefect.settings as ps
    from prefect.server.api.server import SubprocessASGIServer

    with ps.temporary_settings({ps.PREFECT_SERVER_DATABASE_CONNECTION_URL: url}):
        server = SubprocessASGIServer(port=free_port())
        server.start(timeout=120)
        try:
            with ps.temporary_settings({ps.PREFECT_API_URL: server.api_url}):
                yield server.api_url
        finally:
            server.stop()


@contextlib.contextmanager
def prefect_server(database: str = "embedded") -> Iterator[str]:
    """Start the server; yields its API URL (also set as ``PREFECT_API_URL``)."""
    import tempfile

    import anyio
    import prefect.settings as ps

    if database == "sqlite":
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield ps.PREFECT_API_URL.value()
        return
    if database == "embedded":
        from setlist.controlplane.postgres import EmbeddedPostgres

        with tempfile.TemporaryDirectory(prefix="setlist-bench-pg-") as root:
            postgres = EmbeddedPostgres(root)
            try:
                with _on(postgres.start()) as url:
                    yield url
            finally:
                postgres.stop()
        return
    if database != "postgresql":
        raise ValueError(f"unknown database {database!r}: {', '.join(DATABASES)}")
    name = f"setlist_bench_{uuid.uuid4().hex[:8]}"
    anyio.run(_admin, f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        with _on(f"{base}/{name}") as url:
            yield url
    finally:
        anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
