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

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from blocks.webhook import SignatureScheme, WebhookSource, source_block_name
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
    seconds (a secret rotation takes effect within about ``ttl``). An unknown source is
    remembered for ``missing_ttl`` seconds (at most ``ttl``), at most ``max_missing`` of
    them, so a flood naming unknown sources costs one lookup per name and bounded memory."""

    ttl: float = 30.0
    client: PrefectClient | None = None  # the app's own; None: a client per load
    missing_ttl: float = 5.0
    max_entries: int = 1024
    max_missing: int = 1024
    _cache: TtlCache[_Source] = field(init=False, repr=False)

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
        entry = await self._cache.get(source)
        if entry is None:
            raise UnknownSource(source)
        return entry

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
    if scheme is not None:
        fields["scheme"] = scheme
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
