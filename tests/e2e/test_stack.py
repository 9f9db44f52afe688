"""`setlist up` / `down` as an operator runs them: real processes, real ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_is_idempotent_and_down_stops_only_what_up_started(setlist_home):
    # Under the session's home, not pytest's tmp_path: as root, the embedded PostgreSQL
    # runs as nobody, and would have to be let into pytest-of-root (0700) to reach it.
    home = Path(tempfile.mkdtemp(prefix="stack-", dir=setlist_home))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(SETLIST_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    setlist = str(Path(sys.executable).with_name("setlist"))
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    def run(*args):
        return subprocess.run(
            [setlist, *args], env=env, capture_output=True, text=True, timeout=300
        )

    gateway_port = _free_port()
    metrics_port = _free_port()
    try:
        ports = ("--gateway-port", str(gateway_port), "--metrics-port", str(metrics_port))
        first = run("up", "--detach", "--port", str(port), *ports)
        assert first.returncode == 0, first.stdout + first.stderr
        state = json.loads((home / "stack.json").read_text())
        assert _alive(state["server_pid"]) and _alive(state["worker_pid"])
        # The default database: the embedded PostgreSQL, whose URL only the server holds.
        assert state["database"] == "postgres" and _alive(state["postgres_pid"])
        db_password = (home / "postgres" / "password").read_text().strip()
        assert db_password not in first.stdout + first.stderr
        assert db_password.encode() in Path(f"/proc/{state['server_pid']}/environ").read_bytes()
        for other in ("worker_pid", "gateway_pid", "dispatcher_pid", "metrics_pid"):
            assert db_password.encode() not in Path(f"/proc/{state[other]}/environ").read_bytes()
        api = f"http://127.0.0.1:{port}/api"
        assert httpx.get(f"{api}/health").json() is True
        # The API wants the operator credential, made on first start, kept 0600; the
        # output says where it is, never what it is.
        secret_file = home / "credentials" / "api-auth"
        assert secret_file.stat().st_mode & 0o077 == 0
        auth = tuple(secret_file.read_text().strip().split(":", 1))
        assert str(secret_file) in first.stdout
        assert auth[1] not in first.stdout + first.stderr
        assert httpx.post(f"{api}/work_pools/filter", json={}).status_code == 401
        # The UI is told to ask for the credential (Prefect's login form for basic auth).
        ui = httpx.get(f"http://127.0.0.1:{port}/ui-settings").json()
        assert ui["auth"] == "BASIC" and ui["api_url"] == api
        wrong = httpx.post(f"{api}/work_pools/filter", json={}, auth=(auth[0], "guess"))
        assert wrong.status_code == 401
        pools = httpx.post(f"{api}/work_pools/filter", json={}, auth=auth).json()
        assert "setlist-local" in {p["name"] for p in pools}
        deps = httpx.post(f"{api}/deployments/filter", json={}, auth=auth).json()
        assert "enterprise-client-001" in {d["name"] for d in deps}
        raw = home / "storage" / "tenants" / "enterprise-client-001" / "raw"
        assert len(list(raw.rglob("*.jsonl.gz"))) == 4
        assert _alive(state["gateway_pid"])
        gateway = f"http://127.0.0.1:{gateway_port}"
        for _ in range(100):  # the gateway process imports Prefect first
            try:
                assert httpx.get(f"{gateway}/health", timeout=2).json()["ok"] is True
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        unsigned = httpx.post(f"{gateway}/hooks/partner", json={"tenant_id": "x"})
        assert unsigned.status_code == 401
        assert _alive(state["metrics_pid"])
        for _ in range(100):  # the exporter reads the run history before it serves
            try:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert "setlist_up 1.0" in text
        assert 'setlist_tenant_quota{tenant="enterprise-client-001"} 4.0' in text

        # The CLI finds the credential itself; the job runs with its run token only.
        canary = run("submit", "canary", "--tenant", "enterprise-client-001", "--wait")
        assert canary.returncode == 0, canary.stdout + canary.stderr
        assert "Completed" in canary.stdout

        second = run("up", "--detach", "--port", str(port), *ports)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "already up" in second.stdout and "already running" in second.stdout
        assert "PostgreSQL already running" in second.stdout
        assert auth[1] not in second.stdout  # shown once, on the start that made it
        again = json.loads((home / "stack.json").read_text())
        assert again == state

        down = run("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not _alive(state["server_pid"]) and not _alive(state["worker_pid"])
        assert not _alive(state["gateway_pid"]) and not _alive(state["metrics_pid"])
        assert not _alive(state["postgres_pid"]) and "stopped PostgreSQL" in down.stdout
        assert bystander.poll() is None, "down stopped a process it did not start"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{api}/health", timeout=2)
    finally:
        run("down")
        bystander.kill()
        shutil.rmtree(home / "postgres", ignore_errors=True)  # 40 MB and more
