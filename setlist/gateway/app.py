"""The webhook gateway: signed webhooks in, Prefect events out (an ASGI app).

Open-source Prefect accepts events on its events API and runs automations on them, but
has no inbound webhooks. ``POST /hooks/{source}`` closes that gap:

1. the body is read up to 1 MiB (413 beyond), must be JSON (415);
2. the source's signature is checked in constant time (401): Standard Webhooks'
   ``webhook-signature: v1,BASE64`` over ``id.timestamp.body``, Setlist's timestamped
   ``X-Setlist-Signature: t=UNIX,v1=HEX`` over ``t.body`` (both at most ``tolerance_s``
   old), or GitHub's ``X-Hub-Signature-256: sha256=HEX`` over the body;
3. the body is parsed strictly: a duplicate key or nesting deeper than 32 is 422;
4. the source's typed mapping takes the tenant id, event name and payload from the body
   as values (422 when it can't, or the event is not on the source's allow-list);
5. a tenant not on the source's allow-list is refused (422) before anything else is
   asked of it; one that does not exist gets the very same answer (after 6 and 7), so a
   sender can't learn which tenant ids exist;
6. a delivery seen before (same dedupe keys, ``dedupe.py``: from what was signed, never
   from how a header was spelled) is acknowledged again (200), with no event;
7. the rate limit of the (source, tenant) applies (429 with Retry-After);
8. the event is written to an on-disk spool and acknowledged (202); a background task
   sends the spool to Prefect's events API in batches, retrying while the server is
   unreachable. The spool is bounded: when full, requests get 503 and the sender's own
   retry keeps the delivery — nothing accepted is dropped.

A source with ``deliver=stream`` takes steps 1–5 and 7 alike (its mapping is the tenant
id and the array of events); then its events go to the tenant's broker stream and the
delivery is acknowledged (202) once the broker has them (``streaming.py``). The broker is
the platform's (``SETLIST_STREAM_BROKER_URL``), one connection for the app's life.

Logs carry source, delivery id, tenant, event name and status — never a secret, a
signature or a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blocks.stream import StreamBrokerConfig
from blocks.webhook import Delivery, SignatureScheme, WebhookSource, validate_source_name
from setlist.brokers.base import DEFAULT_MAX_PENDING, BrokerError, StreamFull
from setlist.gateway import streaming
from setlist.gateway.dedupe import dedupe_keys
from setlist.gateway.forwarder import Forwarder
from setlist.gateway.mapping import (
    MAX_DEPTH,
    NotJson,
    Unprocessable,
    build_event,
    event_id,
    extract,
    parse_body,
)
from setlist.gateway.ratelimit import RateLimiter
from setlist.gateway.signatures import SignatureError, verify
from setlist.gateway.sources import Sources, Tenants, UnknownSource
from setlist.gateway.spool import Spool, SpoolFull

log = logging.getLogger("setlist.gateway")

MAX_BODY = 1024 * 1024
# One answer for "no such tenant" and "not this source's tenant": nothing to enumerate.
TENANT_REFUSED = "tenant not accepted from this source"
UNREACHABLE_RETRY_S = 5
# A full stream drains at the stream-ingest job's pace: a micro-batch a second or so.
STREAM_FULL_RETRY_S = 10


@dataclass
class GatewayConfig:
    spool_path: Path
    max_body: int = MAX_BODY
    max_pending: int = 10_000
    cache_ttl: float = 30.0
    max_depth: int = MAX_DEPTH
    unknown_source_ttl: float = 5.0  # an unknown source is asked again after this
    # A lookup still waiting for Prefect after this long is answered 503: while Prefect
    # restarts, its client retries for about a minute, past any sender's own timeout.
    lookup_timeout: float = 5.0
    max_sources: int = 1024  # sources kept in the cache
    max_unknown_sources: int = 1024  # "no such source" answers kept
    unlisted_source_lookups_per_s: float = 5.0  # lookups of names not on the source list
    max_tenants: int = 10_000  # tenant existence answers kept
    max_buckets: int = 10_000  # rate-limit buckets, one per (source, tenant)
    # The platform's broker for ``deliver=stream`` sources; None: they get 503.
    stream_broker: StreamBrokerConfig | None = None
    stream_max_pending: int = DEFAULT_MAX_PENDING  # a tenant's stream's bound (429 past it)
    stream_timeout: float = 10.0  # a send still waiting after this long is answered 503


def default_config() -> GatewayConfig:
    from setlist.core.settings import get_settings
    from setlist.tenants.stream_access import platform_broker

    settings = get_settings()
    return GatewayConfig(
        spool_path=settings.home / "gateway" / "spool.sqlite",
        stream_broker=platform_broker(settings),
    )


def _reply(status: int, detail: str, **extra: Any) -> JSONResponse:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    return JSONResponse({"status": status, "detail": detail, **extra}, status, headers=headers)


def _unreachable(source_name: str, exc: Exception) -> JSONResponse:
    """A delivery that needs the Prefect API (a source or tenant not cached yet) while it
    does not answer, or not in time: 503 with Retry-After, so the sender keeps it and
    sends it again."""
    log.warning("webhook %s delayed: Prefect API unreachable (%s)", source_name, type(exc).__name__)
    return _reply(503, "the platform is unreachable; retry later", retry_after=UNREACHABLE_RETRY_S)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it exceeds ``limit`` (stops reading there)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json_type(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and "+json" in media)


def _unsigned_delivery_id(value: str | None) -> str | None:
    value = (value or "").strip()
    return value if 0 < len(value) <= 200 else None


def create_app(config: GatewayConfig | None = None) -> Starlette:
    config = config or default_config()
    state: dict[str, Any] = {}
    limiter = RateLimiter(max_buckets=config.max_buckets)
    sources = Sources(
        ttl=config.cache_ttl,
        missing_ttl=config.unknown_source_ttl,
        max_entries=config.max_sources,
        max_missing=config.max_unknown_sources,
        unlisted_lookups_per_s=config.unlisted_source_lookups_per_s,
    )
    tenants = Tenants(ttl=config.cache_ttl, max_entries=config.max_tenants)

    async def _admit(
        source_name: str, source: WebhookSource, tenant_id: str, delivery: str
    ) -> JSONResponse | None:
        """The refusal of a delivery for an allowed tenant (rate limit, 429; no such
        tenant, 422 as for a tenant not allowed), or None to go on."""
        wait = limiter.take((source_name, tenant_id), source.rate_limit_per_s, source.burst)
        if wait:
            return _reply(429, "rate limit exceeded", retry_after=max(1, round(wait + 0.5)))
        try:
            async with asyncio.timeout(config.lookup_timeout):
                exists = await tenants.exists(tenant_id)
        except Exception as exc:  # noqa: BLE001 - Prefect can't be asked: delayed, not refused
            return _unreachable(source_name, exc)
        if not exists:
            log.info("webhook %s delivery %s refused: 422 unknown tenant", source_name, delivery)
            return _reply(422, TENANT_REFUSED)
        return None

    async def _to_stream(
        source_name: str, delivery: str, batch: streaming.StreamBatch
    ) -> JSONResponse:
        """Send a stream delivery's events; 202 once the broker has them."""
        try:
            positions = await streaming.send(state["broker"], batch, config.stream_timeout)
        except StreamFull as exc:
            log.warning("webhook %s delivery %s refused: 429 %s", source_name, delivery, exc)
            return _reply(
                429, "the tenant's stream is full; retry later", retry_after=STREAM_FULL_RETRY_S
            )
        except streaming.NoBroker as exc:
            log.error("webhook %s delivery %s refused: 503 %s", source_name, delivery, exc)
            return _reply(503, str(exc), retry_after=300)
        except (BrokerError, TimeoutError) as exc:
            log.warning(
                "webhook %s delivery %s delayed: 503 stream broker: %s",
                source_name,
                delivery,
                str(exc) or type(exc).__name__,
            )
            return _reply(
                503,
                "the stream broker is unreachable; retry later",
                retry_after=UNREACHABLE_RETRY_S,
            )
        log.info(
            "webhook %s delivery %s accepted: %d events for tenant %s's stream",
            source_name,
            delivery,
            len(positions),
            batch.tenant_id,
        )
        last = positions[-1] if positions else None
        return _reply(202, "accepted", events=len(positions), last_position=last)

    async def hook(request: Request) -> JSONResponse:
        source_name = request.path_params["source"]
        try:
            validate_source_name(source_name)
        except ValueError:
            return _reply(404, "no such webhook source")
        body = await _read_body(request, config.max_body)
        if body is None:
            return _reply(413, f"body over {config.max_body} bytes")
        if not _is_json_type(request.headers.get("content-type", "")):
            return _reply(415, "send the payload as application/json")
        try:
            async with asyncio.timeout(config.lookup_timeout):
                source = await sources.get(source_name)
        except UnknownSource:
            return _reply(404, "no such webhook source")
        except Exception as exc:  # noqa: BLE001 - Prefect can't be asked: delayed, not refused
            return _unreachable(source_name, exc)
        try:
            verified = verify(source.config, source.secret, body, request.headers)
        except SignatureError as exc:
            log.info("webhook %s refused: 401 %s", source_name, exc)
            return _reply(401, str(exc))
        if source.legacy_template:
            return _reply(
                503,
                "this source's event template must be migrated to the typed mapping",
                retry_after=300,
            )
        unsigned_id = None
        if source.config.scheme != SignatureScheme.standard:
            unsigned_id = _unsigned_delivery_id(
                request.headers.get(source.config.delivery_header_name)
            )
        delivery = verified.delivery_id or unsigned_id or "-"
        streamed = source.config.deliver == Delivery.stream
        try:
            payload = parse_body(body, config.max_depth)
            if streamed:
                batch = streaming.stream_batch(source.config, payload)
            else:
                mapped = extract(source.config, payload)
        except NotJson as exc:
            return _reply(415, str(exc))
        except streaming.TooManyEvents as exc:
            log.info("webhook %s delivery %s refused: 413 %s", source_name, delivery, exc)
            return _reply(413, str(exc))
        except Unprocessable as exc:
            log.info("webhook %s delivery %s refused: 422 %s", source_name, delivery, exc)
            return _reply(422, str(exc))
        except RecursionError:  # belt and braces: a payload is never a 500
            return _reply(422, f"JSON nested deeper than {config.max_depth} levels")
        tenant_id = batch.tenant_id if streamed else mapped.tenant_id
        if tenant_id not in source.allowed_tenants:
            log.info(
                "webhook %s delivery %s refused: 422 tenant not allowed", source_name, delivery
            )
            return _reply(422, TENANT_REFUSED)
        if streamed:
            refused = await _admit(source_name, source.config, tenant_id, delivery)
            return refused or await _to_stream(source_name, delivery, batch)
        spool: Spool = state["spool"]
        keys = dedupe_keys(verified, tenant_id, body, unsigned_id)
        seen = spool.seen(source_name, keys)
        if seen:
            log.info("webhook %s delivery %s: duplicate, acknowledged", source_name, delivery)
            return _reply(200, "duplicate delivery; already accepted", event_id=seen)
        refused = await _admit(source_name, source.config, tenant_id, delivery)
        if refused:
            return refused
        try:
            event = build_event(
                source_name,
                mapped,
                event_id(source_name, keys[0]),
                verified.delivery_id or unsigned_id,
            )
        except Unprocessable as exc:
            log.info("webhook %s delivery %s refused: 422 %s", source_name, delivery, exc)
            return _reply(422, str(exc))
        try:
            fresh = spool.accept(source_name, keys, event["id"], json.dumps(event))
        except SpoolFull as exc:
            log.error("webhook %s refused: spool full (%s)", source_name, exc)
            return _reply(503, "the gateway is backlogged; retry later", retry_after=30)
        if not fresh:  # a concurrent duplicate won the race
            return _reply(200, "duplicate delivery; already accepted", event_id=event["id"])
        state["forwarder"].wake.set()
        log.info(
            "webhook %s delivery %s accepted: %s for tenant %s",
            source_name,
            delivery,
            event["event"],
            tenant_id,
        )
        return _reply(202, "accepted", event_id=event["id"], event=event["event"])

    async def health(request: Request) -> JSONResponse:
        fwd: Forwarder = state["forwarder"]
        return JSONResponse({"ok": True, "spooled": state["spool"].pending, "sent": fwd.sent_total})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from prefect.client.orchestration import get_client

        spool = Spool(config.spool_path, max_pending=config.max_pending)
        spool.prune()
        # One Prefect client for the app's lookups and forwarding: a client per lookup
        # costs a TLS context and a connection each.
        async with get_client() as client:
            sources.client = tenants.client = client
            forwarder = Forwarder(spool, client=client)
            broker = await streaming.connect(config.stream_broker, config.stream_max_pending)
            state.update(spool=spool, forwarder=forwarder, broker=broker)
            task = asyncio.create_task(forwarder.run())
            if spool.pending:
                log.info("%d spooled event(s) from before the restart will be sent", spool.pending)
            try:
                yield
            finally:
                # A last chance to send what waits; what can't be sent stays on disk.
                forwarder.wake.set()
                deadline = time.monotonic() + 5
                while spool.pending and time.monotonic() < deadline and not task.done():
                    await asyncio.sleep(0.05)
                forwarder.stop()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                spool.close()
                if broker is not None:
                    await broker.aclose()
                sources.client = tenants.client = None

    async def traced_hook(request: Request) -> JSONResponse:
        """One server span per delivery (route and status only: never body or headers)."""
        from opentelemetry import trace

        tracer = trace.get_tracer("setlist.gateway")
        with tracer.start_as_current_span(
            "POST /hooks/{source}",
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.route": "/hooks/{source}",
                "setlist.webhook.source": request.path_params["source"][:64],
            },
        ) as span:
            response = await hook(request)
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    app = Starlette(
        routes=[
            Route("/hooks/{source}", traced_hook, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    # For tests and diagnostics: the caches and buckets (never a secret on its own).
    app.state.sources = sources
    app.state.tenants = tenants
    app.state.limiter = limiter
    return app


def serve(host: str = "127.0.0.1", port: int = 8787, config: GatewayConfig | None = None) -> None:
    """Run the gateway under uvicorn until interrupted."""
    import uvicorn

    from setlist.core import tracing

    tracing.configure("setlist-gateway")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
