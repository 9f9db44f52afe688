"""Webhook sources and tenants as the gateway sees them: Prefect blocks, cached.

A source is a ``setlist-webhook-source`` block (signature scheme, typed event mapping,
allow-lists of events and tenants, rate limit) and the Secret block it names;
``save_source`` writes both, ``allow_tenants`` changes which tenants a source may speak
for. The gateway reads them, and checks that a delivery's tenant exists, through
``TtlCache``: a secret rotation, an allow-list change or an offboarded tenant takes effect
within about one TTL, and no request waits for Prefect except the first one for a source
or tenant. Both caches are bounded, the unknown sources too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from blocks.webhook import Delivery, SignatureScheme, WebhookSource, source_block_name
from setlist.core.tenancy import SetlistError, validate_tenant_id
from setlist.gateway.cache import TtlCache

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

log = logging.getLogger("setlist.gateway")


class UnknownSource(Exception):
    pass


@dataclass
class _Source:
    config: WebhookSource
    secret: str
    allowed_tenants: frozenset[str] = frozenset()

    @property
    def legacy_template(self) -> bool:
        return self.config.legacy_template


@dataclass
class Sources:
    """Source blocks and their secrets, cached; refreshed in the background every ``ttl``
    seconds (a secret rotation takes effect within about ``ttl``).

    Which sources exist at all is one list of the source blocks' names, read again at
    most every ``missing_ttl`` seconds and only when a request names a source not on it.
    A name not on a fresh list is still looked up (a source created a moment ago is
    served at once), but at most ``unlisted_lookups_per_s`` such lookups a second (burst
    of twice that): a flood naming ever new unknown sources costs Prefect a few calls a
    second, not one per name, and no memory per name.
    """

    ttl: float = 30.0
    client: PrefectClient | None = None  # the app's own; None: a client per load
    missing_ttl: float = 5.0
    max_entries: int = 1024
    max_missing: int = 1024
    _cache: TtlCache[_Source] = field(init=False, repr=False)
    _names: frozenset[str] | None = field(default=None, init=False, repr=False)
    _names_at: float = field(default=float("-inf"), init=False, repr=False)
    _names_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    unlisted_lookups_per_s: float = 5.0
    listings: int = field(default=0, init=False)
    _bucket: float = field(default=0.0, init=False, repr=False)
    _bucket_at: float = field(default=float("-inf"), init=False, repr=False)

    def __post_init__(self) -> None:
        self._cache = TtlCache(
            self._load,
            ttl=self.ttl,
            missing_ttl=min(self.ttl, self.missing_ttl),
            max_entries=self.max_entries,
            max_missing=self.max_missing,
        )

    @property
    def cache(self) -> TtlCache[_Source]:
        return self._cache

    async def get(self, source: str) -> _Source:
        entry = await self._cache.get(source) if await self._listed(source) else None
        if entry is None:
            raise UnknownSource(source)
        return entry

    async def _listed(self, source: str) -> bool:
        """Whether a block for ``source`` exists, by the list of names (read again when
        it is older than ``missing_ttl``); True when the list can't be read, so the
        source's own lookup decides."""
        name = source_block_name(source)
        if source in self._cache or (self._names is not None and name in self._names):
            return True
        async with self._names_lock:
            if time.monotonic() - self._names_at >= self.missing_ttl:
                try:
                    self._names = await self._list_names()
                except Exception as exc:  # noqa: BLE001 - Prefect down: look the source up
                    log.warning("webhook sources could not be listed: %s", exc)
                    return True
                finally:
                    self._names_at = time.monotonic()
        if self._names is None or name in self._names:
            return True
        return self._take_unlisted_lookup()

    def _take_unlisted_lookup(self) -> bool:
        now = time.monotonic()
        rate = self.unlisted_lookups_per_s
        self._bucket = min(2 * rate, self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket >= 1:
            self._bucket -= 1
            return True
        return False

    async def _list_names(self) -> frozenset[str]:
        from prefect.client.orchestration import get_client

        self.listings += 1
        names: set[str] = set()
        async with contextlib.AsyncExitStack() as stack:
            client = self.client or await stack.enter_async_context(get_client())
            offset, page = 0, 200
            while True:
                docs = await client.read_block_documents_by_type(
                    WebhookSource.get_block_type_slug(),
                    offset=offset,
                    limit=page,
                    include_secrets=False,
                )
                names.update(d.name for d in docs if d.name)
                if len(docs) < page:
                    return frozenset(names)
                offset += page

    async def _load(self, source: str) -> _Source | None:
        from prefect.blocks.system import Secret

        try:
            config = await WebhookSource.aload(source_block_name(source), client=self.client)
        except ValidationError as exc:  # an edited block that no longer validates: refused
            log.error("webhook source %s: block is invalid, deliveries refused: %s", source, exc)
            return None
        except ValueError:  # no such block
            return None
        try:
            secret = (await Secret.aload(config.secret_block, client=self.client)).get()
        except ValueError:
            log.error("webhook source %s: Secret block %s is missing", source, config.secret_block)
            return None
        if config.legacy_template:
            log.warning(
                "webhook source %s still has a whole-document event template, which is no "
                "longer rendered: its deliveries are refused until it is migrated to the typed "
                "mapping (setlist webhook set %s --tenant-path … --payload …)",
                source,
                source,
            )
        return _Source(
            config=config,
            secret=str(secret),
            allowed_tenants=frozenset(config.allowed_tenants),
        )


@dataclass
class Tenants:
    """Which tenants exist, cached: a known one is re-checked in the background every
    ``ttl`` s (an offboarded tenant is refused within about ``ttl``), an unknown one is
    asked again after 2 s."""

    ttl: float = 30.0
    client: PrefectClient | None = None  # the app's own; None: a client per check
    max_entries: int = 10_000
    _cache: TtlCache[bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # False is "no such tenant", which the cache spells None.
        self._cache = TtlCache(
            self._found,
            ttl=self.ttl,
            missing_ttl=2.0,
            max_entries=self.max_entries,
            max_missing=self.max_entries,
        )

    async def exists(self, tenant_id: str) -> bool:
        return await self._cache.get(tenant_id) is not None

    async def _found(self, tenant_id: str) -> bool | None:
        return await self._check(tenant_id) or None

    async def _check(self, tenant_id: str) -> bool:
        from setlist.tenants.onboarding import UnknownTenant, read_profile

        try:
            await read_profile(tenant_id, client=self.client)
        except UnknownTenant:
            return False
        return True


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}".removeprefix(": ")


def _validated(source: str, block_data: dict[str, Any]) -> WebhookSource:
    try:
        block = WebhookSource.model_validate(block_data)
    except ValidationError as exc:
        raise SetlistError(f"webhook source {source}: {_first_error(exc)}") from None
    if not block.event_path and block.event not in block.allowed_events:
        raise SetlistError(
            f"webhook source {source}: event {block.event!r} is not in its allowed events "
            f"({', '.join(block.allowed_events) or 'none'})"
        )
    return block


async def _save_block(source: str, block_data: dict[str, Any]) -> WebhookSource:
    block = _validated(source, block_data)
    await block.asave(source_block_name(source), overwrite=True)
    return block


async def _existing(source: str) -> dict[str, Any] | None:
    try:
        existing = await WebhookSource.aload(source_block_name(source))
    except ValidationError:
        return None  # rewritten from what is given
    except ValueError:
        return None
    return existing.model_dump(exclude={"block_type_slug"})


async def save_source(
    source: str,
    secret: str,
    *,
    scheme: SignatureScheme | None = None,
    deliver: Delivery | None = None,
    events_path: str | None = None,
    event: str | None = None,
    event_path: str | None = None,
    tenant_path: str | None = None,
    payload_fields: dict[str, str] | None = None,
    allowed_events: Iterable[str] | None = None,
    allowed_tenants: Iterable[str] | None = None,
    template: str | None = None,
    rate_limit_per_s: float | None = None,
    burst: int | None = None,
) -> WebhookSource:
    """Create or update a source and its Secret block; what is not given stays as it is
    (a new source: the block's defaults — the ``standard`` scheme, the data-arrived
    mapping, no tenants).

    Setting any part of the mapping (``event``, ``event_path``, ``tenant_path``,
    ``payload_fields``) or ``template=""`` drops a legacy template. A non-empty ``template``
    is refused: whole-document templates are no longer rendered.
    """
    from prefect.blocks.system import Secret

    from blocks.webhook import secret_block_name

    if len(secret) < 16:
        raise SetlistError("a signing secret needs at least 16 characters")
    if template:
        raise SetlistError(
            "whole-document event templates are no longer accepted; map the payload with "
            "event/event_path, tenant_path and payload_fields instead"
        )
    source_block_name(source)  # a valid name before anything is written
    fields: dict[str, Any] = {}
    given = {"scheme": scheme, "deliver": deliver, "events_path": events_path}
    fields.update({k: v for k, v in given.items() if v is not None})
    mapping = {
        "event": event,
        "event_path": event_path,
        "tenant_path": tenant_path,
        "payload_fields": payload_fields,
    }
    fields.update({k: v for k, v in mapping.items() if v is not None})
    if template is not None or any(v is not None for v in mapping.values()):
        fields["template"] = ""
    if allowed_events is not None:
        fields["allowed_events"] = list(allowed_events)
    if allowed_tenants is not None:
        fields["allowed_tenants"] = list(allowed_tenants)
    if rate_limit_per_s is not None:
        fields["rate_limit_per_s"] = rate_limit_per_s
    if burst is not None:
        fields["burst"] = burst
    secret_name = secret_block_name(source)
    fields["secret_block"] = secret_name
    fields["secret_length"] = len(secret)
    data = {**(await _existing(source) or {}), **fields}
    _validated(source, data)  # before the secret is written: a refused change changes nothing
    await Secret(value=secret).asave(secret_name, overwrite=True)
    return await _save_block(source, data)


async def allow_tenants(
    source: str, add: Iterable[str] = (), remove: Iterable[str] = ()
) -> WebhookSource:
    """Add tenants to, or remove them from, the tenants ``source`` may speak for."""
    add, remove = list(add), list(remove)
    for tenant_id in (*add, *remove):
        validate_tenant_id(tenant_id)
    data = await _existing(source)
    if data is None:
        raise SetlistError(f"unknown webhook source {source!r}; `setlist webhook set` first")
    allowed = (set(data.get("allowed_tenants") or ()) | set(add)) - set(remove)
    return await _save_block(source, {**data, "allowed_tenants": sorted(allowed)})
