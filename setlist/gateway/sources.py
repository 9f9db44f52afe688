"""TODO."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from blocks.webhook import SignatureScheme, WebhookSource, source_block_name
from setlist.core.tenancy import SetlistError

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
from setlist.gateway.spool import log

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
        from setlist.tenants.onboarding import UnknownTenant, read_profile

        now = time.monotonic()
        try:
            await read_profile(tenant_id, client=self.client)
        except UnknownTenant:
            self._known.pop(tenant_id, None)
            self._unknown[tenant_id] = now
            return False
        self._known[tenant_id] = now
        return True


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
