"""Each tenant's access to its own event stream: the block its stream-ingest job loads.

With ``SETLIST_STREAM_BROKER_URL`` set, onboarding gives every tenant a block
``setlist-stream-<tenant>`` (``StreamBrokerConfig``) holding what its job may use:

- on Redis, a Redis user of the tenant's own (``setlist.brokers.identity``), allowed the
  stream commands on the tenant's keys only, so a job's credential reaches no other
  tenant's stream, and the URL without the platform's admin credential;
- on NATS, the platform's URL as given: per-user permissions live in the NATS server's
  own configuration (``nats_user_permissions`` gives each tenant's block of it), which
  onboarding cannot change, so there the stream is kept apart by its subject only.

The producers (the gateway, ``setlist stream send``) use the platform's URL. Without a
broker URL, nothing is made, and a stream-ingest run says how to set one up.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import SecretStr

from blocks.stream import StreamBrokerConfig
from setlist.brokers.base import BrokerKind, check_url
from setlist.brokers.identity import ensure_tenant_user, revoke_tenant_user
from setlist.core.settings import Settings
from setlist.core.tenancy import SetlistError, stream_block_name

SCHEME_KINDS = {"redis": BrokerKind.redis, "rediss": BrokerKind.redis, "nats": BrokerKind.nats}
SCHEME_KINDS |= {"tls": BrokerKind.nats}


def platform_broker(settings: Settings) -> StreamBrokerConfig | None:
    """The platform's broker (producers' side), or None when streaming is off."""
    url = settings.stream_broker_url.strip()
    if not url:
        return None
    kind = SCHEME_KINDS.get(urlsplit(url).scheme)
    if kind is None:
        raise SetlistError(
            "SETLIST_STREAM_BROKER_URL must be a redis://, rediss://, nats:// or tls:// URL"
        )
    return StreamBrokerConfig(kind=kind, url=check_url(kind, url))


class NoBroker(SetlistError):
    """The tenant has no stream broker block: streaming is not set up for it."""


async def tenant_broker(tenant_id: str) -> StreamBrokerConfig:
    """The tenant's own stream block (what its stream-ingest job connects with)."""
    try:
        return await StreamBrokerConfig.aload(stream_block_name(tenant_id))
    except ValueError:
        raise NoBroker(
            f"tenant {tenant_id!r} has no stream broker block {stream_block_name(tenant_id)!r}; "
            "set SETLIST_STREAM_BROKER_URL and run `setlist up` (or `setlist tenant create`) "
            "to give every tenant one"
        ) from None


def _without_credential(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def ensure_stream_access(tenant_id: str, settings: Settings) -> str | None:
    """Make the tenant's stream block (and Redis user); its name, or None without a
    broker. Re-running keeps the same credential."""
    platform = platform_broker(settings)
    if platform is None:
        return None
    name = stream_block_name(tenant_id)
    if platform.kind == BrokerKind.redis:
        user, password = await ensure_tenant_user(platform.url, tenant_id)
    else:  # the platform's own user, as a field the UI and the API mask
        parts = urlsplit(platform.url)
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
    block = StreamBrokerConfig(
        kind=platform.kind,
        url=_without_credential(platform.url),
        username=user or None,
        password=SecretStr(password) if password else None,
    )
    await block.asave(name, overwrite=True)
    return name


async def revoke_stream_access(tenant_id: str, settings: Settings) -> bool:
    """Take the tenant's stream credential away: its Redis user and its block."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    platform = platform_broker(settings)
    if platform is not None and platform.kind == BrokerKind.redis:
        await revoke_tenant_user(platform.url, tenant_id)
    async with get_client() as client:
        try:
            doc = await client.read_block_document_by_name(
                stream_block_name(tenant_id), StreamBrokerConfig.get_block_type_slug()
            )
        except ObjectNotFound:
            return False
        await client.delete_block_document(doc.id)
    return True
