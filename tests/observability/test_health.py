"""`setlist health`: each broken dependency is reported with its reason."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from blocks import LocalStorageConfig
from setlist.cli import app
from setlist.core.settings import get_settings
from setlist.observability.health import run_checks
from setlist.tenants.onboarding import TenantSpec, create_tenant

pytestmark = pytest.mark.server


@pytest.fixture
def env(monkeypatch):
    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()


def by_name(checks):
    return {c.name: c for c in checks}


async def test_healthy_parts_pass_and_a_pool_without_worker_fails(prefect_server):
    checks = by_name(await run_checks(prefect_server))
    for name in ("server", "database", "block-types", "storage-block", "storage"):
        assert checks[name].ok, checks[name]
    assert checks["kubernetes"].ok and checks["kubernetes"].skipped
    pool = checks["pool:setlist-local"]
    assert not pool.ok and "no worker online for pool 'setlist-local'" in pool.reason


async def test_paused_tenant_queue_is_named(prefect_server, client, tenant_id):
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    queue = await client.read_work_queue_by_name(f"{tenant_id}.low", work_pool_name="setlist-local")
    await client.update_work_queue(queue.id, is_paused=True)
    try:
        check = by_name(await run_checks(prefect_server))["queues:setlist-local"]
        assert not check.ok and f"{tenant_id}.low" in check.reason
    finally:
        await client.update_work_queue(queue.id, is_paused=False)
    # Other tests' tenants on the shared server may hold paused queues of their own.
    after = by_name(await run_checks(prefect_server))["queues:setlist-local"]
    assert after.ok or f"{tenant_id}.low" not in after.reason


async def test_missing_storage_block(prefect_server, env):
    env(SETLIST_STORAGE_BLOCK="no-such-store")
    checks = by_name(await run_checks(prefect_server))
    assert not checks["storage-block"].ok
    assert "no storage block named 'no-such-store'" in checks["storage-block"].reason
    assert checks["storage"].skipped and not checks["storage"].ok


async def test_unreachable_storage(prefect_server, env, tmp_path):
    await LocalStorageConfig(root=str(tmp_path / "gone")).asave("broken-store", overwrite=True)
    env(SETLIST_STORAGE_BLOCK="broken-store")
    check = by_name(await run_checks(prefect_server))["storage"]
    assert not check.ok and "does not exist" in check.reason


async def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    checks = by_name(await run_checks(f"http://127.0.0.1:{port}/api"))
    assert not checks["server"].ok and "unreachable" in checks["server"].reason
    assert checks["database"].skipped


def test_cli_exits_1_with_json(prefect_server):
    result = CliRunner().invoke(app, ["health", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["healthy"] is False
    assert any(c["name"] == "pool:setlist-local" and not c["ok"] for c in report["checks"])


def _stub_api(ready_status: int):
    """A server whose /health is fine but whose /ready fails, like one that lost its DB."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = (200, b"true") if self.path.endswith("/health") else (ready_status, b"")
            if self.path.endswith("/ready"):
                body = b'{"message": "database unavailable"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def test_database_down_is_named():
    server = _stub_api(503)
    try:
        checks = by_name(await run_checks(f"http://127.0.0.1:{server.server_port}/api"))
    finally:
        server.shutdown()
    assert checks["server"].ok
    assert not checks["database"].ok and "/ready answered 503" in checks["database"].reason
    assert "database unavailable" in checks["database"].reason


async def test_unreachable_kubernetes_api_when_configured(prefect_server, env, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    env(SETLIST_KUBERNETES_POOLS="true", KUBECONFIG=str(kubeconfig))
    check = by_name(await run_checks(prefect_server))["kubernetes"]
    assert not check.ok and not check.skipped
    assert "Kubernetes API unreachable" in check.reason


async def test_unregistered_block_types_are_named(prefect_server, monkeypatch):
    import blocks
    import setlist.observability.health as health
    from blocks.tenant import TenantProfile

    class Unregistered(TenantProfile):
        _block_type_slug = "setlist-never-registered"

    monkeypatch.setattr(health, "ALL_BLOCK_TYPES", (*blocks.ALL_BLOCK_TYPES, Unregistered))
    check = by_name(await run_checks(prefect_server))["block-types"]
    assert not check.ok and "not registered: setlist-never-registered" in check.reason
