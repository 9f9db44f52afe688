"""A gated server on loopback with its own database (SQLite under its home, or the
PostgreSQL URL it is given), for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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
    **env: str,
) -> tuple[subprocess.Popen, str]:
    """``python -m setlist.controlplane`` on a free port, log (and SQLite database,
    unless ``database_url`` names another) under ``home``; waits (bounded back-off)
    until it answers. → the process and its API URL."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    child_env = dict(
        os.environ,
        PREFECT_SERVER_API_AUTH_STRING=operator_auth,
        PREFECT_SERVER_DATABASE_CONNECTION_URL=(
            database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        ),
        PREFECT_HOME=str(home / "prefect-server"),
        PREFECT_UI_ENABLED="false",
        **env,
    )
    with open(home / "server.log", "ab") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "setlist.controlplane", "--port", str(port)],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start; see {home / 'server.log'}")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
