"""Webhook sources and tenants as the gateway sees them: Prefect blocks, cached.

A source is a ``setlist-webhook-source`` block (signature scheme, template, rate limit)
and the Secret block it names; ``save_source`` writes both. The gateway reads them, and
checks that a delivery's tenant exists, through ``TtlCache``: a secret rotation or an
offboarded tenant takes effect within about one TTL, and no request waits for Prefect
except the first one for a source or tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from blocks.webhook import SignatureScheme, WebhookSource, source_block_name
from setlist.core.tenancy import SetlistError
from setlist.gateway.cache import TtlCache

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient


class UnknownSource(Exception):
    pass


@dataclass
class _Source:
    config: WebhookSource
    secret: str
    template: Any


_jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


@dataclass
class Sources:
    """Source blocks and their secrets, cached; refreshed in the background every ``ttl``
    seconds (a secret rotation takes effect within about ``ttl``). An unknown source is
    asked again after ``ttl``, at most 5 s."""

    ttl: float = 30.0
    client: PrefectClient | None = None  # the app's own; None: a client per load
    _cache: TtlCache[_Source] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cache = TtlCache(self._load, ttl=self.ttl, missing_ttl=min(self.ttl, 5.0))

    async def get(self, source: str) -> _Source:
        entry = await self._cache.get(source)
        if entry is None:
            raise UnknownSource(source)
        return entry

    async def _load(self, source: str) -> _Source | None:
        from prefect.blocks.system import Secret

        try:
            config = await WebhookSource.aload(source_block_name(source), client=self.client)
            secret = (await Secret.aload(config.secret_block, client=self.client)).get()
        except ValueError:  # no such block
            return None
        return _Source(
            config=config, secret=str(secret), template=_jinja.from_string(config.template)
        )


@dataclass
class Tenants:
    """Which tenants exist, cached: a known one is re-checked in the background every
    ``ttl`` s (an offboarded tenant is refused within about ``ttl``), an unknown one is
    asked again after 2 s."""

    ttl: float = 30.0
    client: PrefectClient | None = None  # the app's own; None: a client per check
    _cache: TtlCache[bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # False is "no such tenant", which the cache spells None.
        self._cache = TtlCache(self._found, ttl=self.ttl, missing_ttl=2.0)

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
    fields: dict[str, Any] = {
        "scheme": scheme,
        "secret_block": secret_name,
        "secret_length": len(secret),
    }
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
