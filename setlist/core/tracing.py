"""OpenTelemetry export, on when an OTLP endpoint is configured, off (and free) otherwise.

Prefect already opens a span for every flow run and task run through OpenTelemetry's
global tracer provider, which is a no-op until something installs a real one. This
module installs one — batching spans to the OTLP/HTTP endpoint named by the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) — in each
process that runs Setlist code: every flow's process (``setlist.tenants.runtime`` calls it on
import) and the gateway. The service name is ``OTEL_SERVICE_NAME`` or ``setlist``.
"""

from __future__ import annotations

import atexit
import os
import threading

_lock = threading.Lock()
_configured = False


def endpoint() -> str | None:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )


def configure(service: str = "setlist") -> bool:
    """Install the OTLP exporter once per process if an endpoint is set; True if on."""
    global _configured
    if not endpoint():
        return False
    with _lock:
        if _configured:
            return True
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
        provider = TracerProvider(resource=resource)
        # The exporter reads the endpoint, headers and timeout from the OTEL_* variables.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        atexit.register(provider.shutdown)  # flush what a short flow process produced
        _configured = True
        return True
