"""OpenTelemetry: a flow run's process exports its flow and task spans over OTLP/HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from setlist.core import tracing

ROOT = Path(__file__).resolve().parents[2]


class _Collector(BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP trace receiver: keeps each export request's spans."""

    spans: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get(
                "service.name"
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attrs = {a.key: a.value.string_value for a in span.attributes}
                    type(self).spans.append((self.path, service, span, attrs))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_tracing_is_off_without_an_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.configure() is False


@pytest.mark.server
async def test_a_flow_run_exports_its_flow_and_task_spans(client, tenant_id, prefect_server):
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    _Collector.spans = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "OTEL_SERVICE_NAME": "setlist-test",
    }
    code = (
        "import asyncio; from flows.canary import canary; "
        f"asyncio.run(canary({tenant_id!r}, payload_bytes=64))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    spans = _Collector.spans
    assert spans and all(path == "/v1/traces" for path, *_ in spans)
    assert {service for _, service, *_ in spans} == {"setlist-test"}
    flows = [s for _, _, s, a in spans if a.get("prefect.run.type") == "flow"]
    tasks = [s for _, _, s, a in spans if a.get("prefect.run.type") == "task"]
    assert len(flows) == 1 and len(tasks) >= 2
    # one trace: every task span hangs under the flow run's span
    assert all(t.trace_id == flows[0].trace_id for t in tasks)
    assert all(t.parent_span_id == flows[0].span_id for t in tasks)
