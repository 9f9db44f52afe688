"""A gated server on loopback with its own database (SQLite under its home, or the
PostgreSQL URL it is given), for tests and benchmarks; or Prefect's multi-replica shape
(``start_local_ha``: replicas, services, Redis) on a PostgreSQL URL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_server(
    home: Path,
    operator_auth: str,
    timeout: float = 180.0,
    database_url: str | None = None,
    no_services: bool = False,
    log_name: str = "server.log",
    **env: str,
) -> tuple[subprocess.Popen, str]:
    """``python -m setlist.controlplane`` on a free port, log (``log_name``; and SQLite
    database, unless ``database_url`` names another) under ``home``; waits (bounded
    back-off) until it answers. → the process and its API URL. ``no_services``: an API
    replica, whose services run in another process (``setlist.controlplane.ha``)."""
    proc, url = spawn_local_server(home, operator_auth, database_url, no_services, log_name, **env)
    wait_answering(proc, url, home / log_name, timeout)
    return proc, url


def server_env(
    home: Path, operator_auth: str, database_url: str | None = None, **env: str
) -> dict[str, str]:
    """The environment of a local server process (a replica, the services, the
    migration step): the operator credential, the database, a Prefect home under
    ``home``, no UI; ``env`` on top."""
    return dict(
        os.environ,
        PREFECT_SERVER_API_AUTH_STRING=operator_auth,
        PREFECT_SERVER_DATABASE_CONNECTION_URL=(
            database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        ),
        PREFECT_HOME=str(home / "prefect-server"),
        PREFECT_UI_ENABLED="false",
        **env,
    )


def spawn_local_server(
    home: Path,
    operator_auth: str,
    database_url: str | None = None,
    no_services: bool = False,
    log_name: str = "server.log",
    **env: str,
) -> tuple[subprocess.Popen, str]:
    """Start the server as ``start_local_server`` does, without waiting for it (so that
    replicas start side by side). → the process and its API URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    child_env = server_env(home, operator_auth, database_url, **env)
    args = ["--port", str(port), *(["--no-services"] if no_services else [])]
    with open(home / log_name, "ab") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "setlist.controlplane", *args],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, url


def wait_answering(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    """Until the server at ``url`` answers its health check (bounded back-off); kills it
    and raises when it exits first or ``timeout`` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start; see {log}")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


@dataclass
class LocalHA:
    """Prefect's multi-replica shape on loopback: API replicas and services processes on
    one PostgreSQL and one Redis."""

    replicas: list[tuple[subprocess.Popen, str]]
    services: list[subprocess.Popen]  # Prefect's services, shared out through Redis
    log_dir: Path
    env: dict[str, str]  # of the server processes: database, Redis, credential

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.replicas]

    def stop(self, timeout: float = 20.0) -> None:
        procs = [*self.services, *(proc for proc, _ in self.replicas)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)


def start_local_ha(
    home: Path,
    operator_auth: str,
    database_url: str,
    redis_url: str,
    replicas: int = 2,
    timeout: float = 180.0,
    services: int = 2,
    **env: str,
) -> LocalHA:
    """The migrations once (``prefect server database upgrade -y``), then ``services``
    services processes and ``replicas`` gated API replicas (``--no-services``) side by
    side, each with every Redis setting (``setlist.controlplane.ha``); waits until every
    replica answers. Logs under ``home``: ``migrate.log``, ``services[-N].log``,
    ``replica-N.log``."""
    from setlist.controlplane import ha

    shared = {**ha.redis_env(redis_url), **ha.REPLICA_ENV, **env}
    child_env = server_env(home, operator_auth, database_url, **shared)
    ha.run_migrations(child_env, home / "migrate.log", timeout=timeout)
    started = LocalHA([], [], home, child_env)
    try:
        for n in range(1, services + 1):
            with open(home / ("services.log" if n == 1 else f"services-{n}.log"), "ab") as log:
                started.services.append(
                    subprocess.Popen(
                        [sys.executable, *ha.SERVICES],
                        env=child_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        for n in range(1, replicas + 1):
            started.replicas.append(
                spawn_local_server(
                    home, operator_auth, database_url, True, f"replica-{n}.log", **shared
                )
            )
        for n, (proc, url) in enumerate(started.replicas, 1):
            wait_answering(proc, url, home / f"replica-{n}.log", timeout)
        if any(proc.poll() is not None for proc in started.services):
            raise RuntimeError(f"a services process exited; see {home}/services*.log")
    except BaseException:
        started.stop()
        raise
    return started
