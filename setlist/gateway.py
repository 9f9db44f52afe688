"""The webhook gateway: signed webhooks in, Prefect events out (an ASGI app).

Open-source Prefect accepts events on its events API and runs automations on them, but
has no inbound webhooks. ``POST /hooks/{source}`` closes that gap:

1. the body is read up to 1 MiB (413 beyond), must be JSON (415);
2. the source's signature is checked in constant time (401): GitHub's
   ``X-Hub-Signature-256: sha256=HEX`` over the body, or Setlist's timestamped
   ``X-Setlist-Signature: t=UNIX,v1=HEX`` over ``t.body``, at most ``tolerance_s`` old;
3. a delivery seen before (same delivery id) is acknowledged again (200), with no event;
4. the source's rate limit applies (429 with Retry-After);
5. the source's Jinja template maps the payload to an event whose resource is an
   existing tenant, ``setlist.tenant.<id>`` (422 otherwise);
6. the event is written to an on-disk spool and acknowledged (202); a background task
   sends the spool to Prefect's events API in batches, retrying while the server is
   unreachable. The spool is bounded: when full, requests get 503 and the sender's own
   retry keeps the delivery — nothing accepted is dropped.

Event ids derive from (source, delivery id), so a redelivered event is the same event to
Prefect. Logs carry source, delivery id, tenant, event name and status — never a secret,
a signature or a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from blocks.webhook import SignatureScheme, WebhookSource, source_block_name, validate_source_name
from setlist.tenancy import SetlistError, validate_tenant_id

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

log = logging.getLogger("setlist.gateway")

MAX_BODY = 1024 * 1024
GITHUB_HEADER = "x-hub-signature-256"
SETLIST_HEADER = "x-setlist-signature"
TENANT_RESOURCE_PREFIX = "setlist.tenant."
_HIDDEN_HEADERS = {GITHUB_HEADER, SETLIST_HEADER, "x-hub-signature", "authorization", "cookie"}
_EVENT_NAMESPACE = uuid.UUID("6f1c1f7e-4f5e-4d51-9a55-6c9b1b0a8e21")


# --------------------------------------------------------------------------- signatures


def _hex_hmac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_github(secret: str | bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return "sha256=" + _hex_hmac(_bytes(secret), body)


def sign_setlist(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Setlist-Signature`` value for ``body`` signed at ``timestamp`` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1=" + _hex_hmac(_bytes(secret), f"{t}.".encode() + body)


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class SignatureError(Exception):
    """Why a signature was refused (the reason is safe to return; it holds no secret)."""


def verify_github(secret: str | bytes, body: bytes, header: str | None) -> None:
    if not header:
        raise SignatureError(f"missing {GITHUB_HEADER} header")
    scheme, _, digest = header.strip().partition("=")
    if scheme != "sha256" or not digest:
        raise SignatureError(f"{GITHUB_HEADER} is not sha256=HEX")
    expected = _hex_hmac(_bytes(secret), body)
    if not hmac.compare_digest(expected.encode(), digest.strip().lower().encode()):
        raise SignatureError("signature does not match")


def verify_setlist(
    secret: str | bytes,
    body: bytes,
    header: str | None,
    tolerance_s: int = 300,
    now: float | None = None,
) -> None:
    if not header:
        raise SignatureError(f"missing {SETLIST_HEADER} header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        raise SignatureError(f"{SETLIST_HEADER} is not t=UNIX,v1=HEX") from None
    candidates = parts.get("v1") or []
    if not candidates:
        raise SignatureError(f"{SETLIST_HEADER} has no v1 signature")
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        raise SignatureError(f"signature timestamp outside the {tolerance_s} s tolerance")
    expected = _hex_hmac(_bytes(secret), f"{t}.".encode() + body).encode()
    # Several v1 values let a sender sign with the old and the new secret during rotation.
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(expected, candidate.strip().lower().encode())
    if not ok:
        raise SignatureError("signature does not match")


def verify(source: WebhookSource, secret: str | bytes, body: bytes, headers: Any) -> None:
    if source.scheme == SignatureScheme.github:
        verify_github(secret, body, headers.get(GITHUB_HEADER))
    else:
        verify_setlist(secret, body, headers.get(SETLIST_HEADER), source.tolerance_s)


# --------------------------------------------------------------------------- spool


class SpoolFull(Exception):
    pass


class Spool:
    """Deliveries seen and events not yet sent, in one SQLite file (WAL).

    Accepting a delivery is one transaction: the delivery id (the dedupe record) and its
    event go in together, so an acknowledged webhook always has its event on disk.
    """

    def __init__(self, path: Path, max_pending: int = 10_000, dedupe_days: float = 7.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_pending = max_pending
        self.dedupe_s = dedupe_days * 86400
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL: a commit survives the process crashing (not the OS crashing).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS deliveries (
                source TEXT NOT NULL, delivery_id TEXT NOT NULL, event_id TEXT NOT NULL,
                accepted_at REAL NOT NULL, PRIMARY KEY (source, delivery_id));
            CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (accepted_at);
            CREATE TABLE IF NOT EXISTS outbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL,
                accepted_at REAL NOT NULL);
            """
        )
        self._pending = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    @property
    def pending(self) -> int:
        return self._pending

    def seen(self, source: str, delivery_id: str) -> str | None:
        row = self._db.execute(
            "SELECT event_id FROM deliveries WHERE source = ? AND delivery_id = ?",
            (source, delivery_id),
        ).fetchone()
        return row[0] if row else None

    def accept(self, source: str, delivery_id: str, event_id: str, event_json: str) -> bool:
        """Record the delivery and spool its event; False if the delivery was seen already."""
        if self._pending >= self.max_pending:
            raise SpoolFull(f"{self._pending} events wait for the Prefect API")
        now = time.time()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO deliveries VALUES (?, ?, ?, ?)",
                    (source, delivery_id, event_id, now),
                )
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return False
            self._db.execute(
                "INSERT INTO outbox (event, accepted_at) VALUES (?, ?)", (event_json, now)
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._pending += 1
        return True

    def batch(self, limit: int = 100) -> list[tuple[int, str]]:
        return self._db.execute(
            "SELECT seq, event FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()

    def sent(self, seqs: list[int]) -> None:
        if not seqs:
            return
        self._db.execute(
            f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(seqs))})",  # noqa: S608
            seqs,
        )
        self._pending = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def prune(self) -> int:
        """Forget delivery ids older than the dedupe window."""
        cur = self._db.execute(
            "DELETE FROM deliveries WHERE accepted_at < ?", (time.time() - self.dedupe_s,)
        )
        return cur.rowcount

    def close(self) -> None:
        self._db.close()


# --------------------------------------------------------------------------- rate limit


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per source: ``rate`` per second sustained, ``burst`` at once."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, rate: float, burst: int) -> float:
        """0 if allowed, else the seconds until a token is free."""
        now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(tokens=float(burst), at=now)
        b.tokens = min(float(burst), b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / rate


# --------------------------------------------------------------------------- configuration


class UnknownSource(Exception):
    pass


@dataclass
class _Source:
    config: WebhookSource
    secret: str
    template: Any
    loaded: float


_jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def _refresh_later(refreshing: set[str], key: str, coro_fn) -> None:
    """Refresh a cache entry in the background (one at a time per key); requests keep
    being served from the entry meanwhile, so an expiry never stalls a request."""
    if key in refreshing:
        return
    refreshing.add(key)

    async def run() -> None:
        try:
            await coro_fn()
        except Exception as exc:  # keep the old entry; the next expiry tries again
            log.warning("refreshing %s failed: %s", key, type(exc).__name__)
        finally:
            refreshing.discard(key)

    task = asyncio.get_running_loop().create_task(run())
    _background.add(task)  # the loop keeps only a weak reference
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task] = set()


async def _single_flight(inflight: dict[str, asyncio.Future], key: str, coro_fn):
    """``coro_fn()``, awaited once for all concurrent callers with the same key: a burst
    of deliveries for a tenant not yet cached makes one lookup, not one each."""
    pending = inflight.get(key)
    if pending is not None:
        return await asyncio.shield(pending)
    future = asyncio.get_running_loop().create_task(coro_fn())
    inflight[key] = future
    try:
        return await asyncio.shield(future)
    finally:
        if future.done():
            inflight.pop(key, None)
        else:  # this caller was cancelled: the others still wait on it
            future.add_done_callback(lambda _: inflight.pop(key, None))


@dataclass
class Sources:
    """Source blocks and their secrets, cached; refreshed in the background every ``ttl``
    seconds (a secret rotation takes effect within about ``ttl``)."""

    ttl: float = 30.0
    client: PrefectClient | None = None  # the app's own; None: a client per load
    _cache: dict[str, _Source] = field(default_factory=dict)
    _missing: dict[str, float] = field(default_factory=dict)
    _refreshing: set[str] = field(default_factory=set)
    _inflight: dict[str, asyncio.Future] = field(default_factory=dict)

    async def get(self, source: str) -> _Source:
        now = time.monotonic()
        hit = self._cache.get(source)
        if hit:
            if now - hit.loaded >= self.ttl:
                _refresh_later(self._refreshing, source, lambda: self._load(source))
            return hit
        if now - self._missing.get(source, -1e9) < min(self.ttl, 5.0):
            raise UnknownSource(source)
        return await _single_flight(self._inflight, source, lambda: self._load(source))

    async def _load(self, source: str) -> _Source:
        now = time.monotonic()
        from prefect.blocks.system import Secret

        try:
            config = await WebhookSource.aload(source_block_name(source), client=self.client)
            secret = (await Secret.aload(config.secret_block, client=self.client)).get()
        except ValueError:
            self._cache.pop(source, None)
            self._missing[source] = now
            raise UnknownSource(source) from None
        entry = _Source(
            config=config,
            secret=str(secret),
            template=_jinja.from_string(config.template),
            loaded=now,
        )
        self._cache[source] = entry
        return entry


@dataclass
class Tenants:
    """Which tenants exist, cached: a known one is re-checked in the background every
    ``ttl`` s (an offboarded tenant is refused within about ``ttl``), an unknown one is
    asked again after 2 s."""

    ttl: float = 30.0
    client: PrefectClient | None = None  # the app's own; None: a client per check
    _known: dict[str, float] = field(default_factory=dict)
    _unknown: dict[str, float] = field(default_factory=dict)
    _refreshing: set[str] = field(default_factory=set)
    _inflight: dict[str, asyncio.Future] = field(default_factory=dict)

    async def exists(self, tenant_id: str) -> bool:
        now = time.monotonic()
        known = self._known.get(tenant_id)
        if known is not None:
            if now - known >= self.ttl:
                _refresh_later(self._refreshing, tenant_id, lambda: self._check(tenant_id))
            return True
        if now - self._unknown.get(tenant_id, -1e9) < 2.0:
            return False
        return await _single_flight(self._inflight, tenant_id, lambda: self._check(tenant_id))

    async def _check(self, tenant_id: str) -> bool:
        from setlist.onboarding import UnknownTenant, read_profile

        now = time.monotonic()
        try:
            await read_profile(tenant_id, client=self.client)
        except UnknownTenant:
            self._known.pop(tenant_id, None)
            self._unknown[tenant_id] = now
            return False
        self._known[tenant_id] = now
        return True


# --------------------------------------------------------------------------- event mapping


class Unprocessable(Exception):
    """The template could not make a valid event of this payload (422)."""


def render_event(
    source_name: str,
    source: _Source,
    body: Any,
    headers: dict[str, str],
    delivery_id: str,
) -> tuple[str, dict[str, Any]]:
    """Template → validated event JSON (as a dict) and its tenant id."""
    from prefect.events import Event

    try:
        text = source.template.render(body=body, headers=headers, source=source_name)
    except TemplateError as exc:
        raise Unprocessable(f"event template failed: {exc}") from None
    try:
        spec = json.loads(text)
    except ValueError:
        raise Unprocessable("event template did not render JSON") from None
    if not isinstance(spec, dict):
        raise Unprocessable("event template must render a JSON object")
    name = spec.get("event")
    if not isinstance(name, str) or not name:
        raise Unprocessable("event template gave no event name")
    if not any(name.startswith(p) for p in source.config.event_prefixes):
        raise Unprocessable(
            f"event {name!r} is not allowed for this source; allowed prefixes: "
            f"{', '.join(source.config.event_prefixes)}"
        )
    resource = spec.get("resource")
    if not isinstance(resource, dict):
        raise Unprocessable("event template gave no resource")
    resource_id = str(resource.get("prefect.resource.id", ""))
    if not resource_id.startswith(TENANT_RESOURCE_PREFIX):
        raise Unprocessable(f"resource must be {TENANT_RESOURCE_PREFIX}<tenant id>")
    tenant_id = resource_id.removeprefix(TENANT_RESOURCE_PREFIX)
    try:
        validate_tenant_id(tenant_id)
    except SetlistError as exc:
        raise Unprocessable(str(exc)) from None
    related = spec.get("related") or []
    if not isinstance(related, list) or not all(isinstance(r, dict) for r in related):
        raise Unprocessable("related must be a list of resources")
    for r in related:
        rid = str(r.get("prefect.resource.id", ""))
        if rid.startswith(TENANT_RESOURCE_PREFIX) and rid != resource_id:
            raise Unprocessable("an event may name only its own tenant")
    payload = spec.get("payload") or {}
    if not isinstance(payload, dict):
        raise Unprocessable("payload must be a JSON object")
    resource = {
        **{k: str(v) for k, v in resource.items()},
        "prefect.resource.name": tenant_id,
        "setlist.tenant": tenant_id,
    }
    related = [
        *related,
        {
            "prefect.resource.id": f"setlist.webhook.{source_name}",
            "prefect.resource.role": "webhook",
            "prefect.resource.name": source_name,
            "setlist.delivery": delivery_id,
        },
    ]
    try:
        event = Event(
            id=uuid.uuid5(_EVENT_NAMESPACE, f"{source_name}\x00{delivery_id}"),
            occurred=datetime.now(UTC),
            event=name,
            resource=resource,
            related=related,
            payload=payload,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Unprocessable(
            f"not a valid event: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        ) from None
    return tenant_id, event.model_dump(mode="json")


# --------------------------------------------------------------------------- forwarding


class Forwarder:
    """Sends the spool to Prefect's events API in batches; retries with backoff."""

    def __init__(
        self,
        spool: Spool,
        batch: int = 100,
        max_backoff: float = 10.0,
        client: PrefectClient | None = None,
    ):
        self.spool = spool
        self.client = client  # the app's own; None: one for the forwarder's lifetime
        self.batch_size = batch
        self.max_backoff = max_backoff
        self.wake = asyncio.Event()
        self.failures = 0
        self.sent_total = 0
        self._stop = False
        self._pruned = time.monotonic()

    async def _post(self, client, events: list[dict[str, Any]]) -> None:
        response = await client.request("POST", "/events", json=events)
        response.raise_for_status()

    async def flush_once(self, client) -> int:
        rows = self.spool.batch(self.batch_size)
        if not rows:
            return 0
        await self._post(client, [json.loads(e) for _, e in rows])
        self.spool.sent([seq for seq, _ in rows])
        self.sent_total += len(rows)
        return len(rows)

    async def run(self) -> None:
        from prefect.client.orchestration import get_client

        backoff = 0.25
        async with contextlib.nullcontext(self.client) if self.client else get_client() as client:
            while not self._stop:
                # Cleared before reading the spool: an event accepted while a batch is in
                # flight sets it again, so it is sent at once, not after the idle timeout.
                self.wake.clear()
                try:
                    sent = await self.flush_once(client)
                except Exception as exc:  # the server is down or refusing: keep the spool
                    self.failures += 1
                    log.warning(
                        "Prefect events API unavailable (%s); %d event(s) kept in the spool, "
                        "retry in %.1f s",
                        type(exc).__name__,
                        self.spool.pending,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                backoff = 0.25
                if sent:
                    continue
                if time.monotonic() - self._pruned > 3600:  # forget old delivery ids hourly
                    self.spool.prune()
                    self._pruned = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)

    def stop(self) -> None:
        self._stop = True
        self.wake.set()


# --------------------------------------------------------------------------- the app


@dataclass
class GatewayConfig:
    spool_path: Path
    max_body: int = MAX_BODY
    max_pending: int = 10_000
    cache_ttl: float = 30.0


def default_config() -> GatewayConfig:
    from setlist.settings import get_settings

    return GatewayConfig(spool_path=get_settings().home / "gateway" / "spool.sqlite")


def _reply(status: int, detail: str, **extra: Any) -> JSONResponse:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra.pop("retry_after"))
    return JSONResponse({"status": status, "detail": detail, **extra}, status, headers=headers)


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


def create_app(config: GatewayConfig | None = None) -> Starlette:
    config = config or default_config()
    state: dict[str, Any] = {}
    limiter = RateLimiter()
    sources = Sources(ttl=config.cache_ttl)
    tenants = Tenants(ttl=config.cache_ttl)

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
            source = await sources.get(source_name)
        except UnknownSource:
            return _reply(404, "no such webhook source")
        try:
            verify(source.config, source.secret, body, request.headers)
        except SignatureError as exc:
            log.info("webhook %s refused: 401 %s", source_name, exc)
            return _reply(401, str(exc))
        try:
            payload = json.loads(body)
        except ValueError:
            return _reply(415, "body is not valid JSON")
        spool: Spool = state["spool"]
        delivery_id = request.headers.get(source.config.delivery_header_name, "").strip()
        if not delivery_id or len(delivery_id) > 200:
            # No delivery id: the signature identifies the delivery, so an exact replay of
            # a request is the same delivery.
            sig = request.headers.get(GITHUB_HEADER) or request.headers.get(SETLIST_HEADER, "")
            delivery_id = "sig:" + hashlib.sha256(sig.encode()).hexdigest()[:32]
        seen = spool.seen(source_name, delivery_id)
        if seen:
            log.info("webhook %s delivery %s: duplicate, acknowledged", source_name, delivery_id)
            return _reply(200, "duplicate delivery; already accepted", event_id=seen)
        wait = limiter.take(source_name, source.config.rate_limit_per_s, source.config.burst)
        if wait:
            return _reply(429, "rate limit exceeded", retry_after=max(1, round(wait + 0.5)))
        headers = {k: v for k, v in request.headers.items() if k not in _HIDDEN_HEADERS}
        try:
            tenant_id, event = render_event(source_name, source, payload, headers, delivery_id)
            if not await tenants.exists(tenant_id):
                raise Unprocessable(f"unknown tenant {tenant_id!r}")
        except Unprocessable as exc:
            log.info("webhook %s delivery %s refused: 422 %s", source_name, delivery_id, exc)
            return _reply(422, str(exc))
        try:
            fresh = spool.accept(source_name, delivery_id, event["id"], json.dumps(event))
        except SpoolFull as exc:
            log.error("webhook %s refused: spool full (%s)", source_name, exc)
            return _reply(503, "the gateway is backlogged; retry later", retry_after=30)
        if not fresh:  # a concurrent duplicate won the race
            return _reply(200, "duplicate delivery; already accepted", event_id=event["id"])
        state["forwarder"].wake.set()
        log.info(
            "webhook %s delivery %s accepted: %s for tenant %s",
            source_name,
            delivery_id,
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
            state.update(spool=spool, forwarder=forwarder)
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

    return Starlette(
        routes=[
            Route("/hooks/{source}", traced_hook, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


# --------------------------------------------------------------------------- sources


async def save_source(
    source: str,
    secret: str,
    *,
    scheme: SignatureScheme = SignatureScheme.setlist,
    template: str | None = None,
    rate_limit_per_s: float | None = None,
    burst: int | None = None,
) -> WebhookSource:
    """Create or update a source and its Secret block."""
    from prefect.blocks.system import Secret

    from blocks.webhook import secret_block_name

    if len(secret) < 16:
        raise SetlistError("a signing secret needs at least 16 characters")
    secret_name = secret_block_name(source)
    await Secret(value=secret).asave(secret_name, overwrite=True)
    fields: dict[str, Any] = {"scheme": scheme, "secret_block": secret_name}
    if template is not None:
        _jinja.from_string(template)  # refuse a template that does not compile
        fields["template"] = template
    if rate_limit_per_s is not None:
        fields["rate_limit_per_s"] = rate_limit_per_s
    if burst is not None:
        fields["burst"] = burst
    try:
        existing = await WebhookSource.aload(source_block_name(source))
        data = {**existing.model_dump(exclude={"block_type_slug"}), **fields}
    except ValueError:
        data = fields
    block = WebhookSource.model_validate(data)
    await block.asave(source_block_name(source), overwrite=True)
    return block


def serve(host: str = "127.0.0.1", port: int = 8787, config: GatewayConfig | None = None) -> None:
    """Run the gateway under uvicorn until interrupted."""
    import uvicorn

    from setlist import tracing

    tracing.configure("setlist-gateway")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")


if __name__ == "__main__":  # python -m setlist.gateway --port 8787 (how `setlist up` runs it)
    import argparse

    parser = argparse.ArgumentParser(description="Setlist webhook gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    cli_args = parser.parse_args()
    serve(cli_args.host, cli_args.port)
