"""Each tenant's own broker user, good for its own stream only.

A tenant's stream-ingest job runs the tenant's code next to the broker client, so it
must not hold a credential that reaches other tenants' streams.

**Redis** has per-user ACLs. ``ensure_tenant_user`` makes (or resets) the user
``setlist-stream-<tenant>``, allowed only keys matching ``setlist:stream:{<tenant>}:*``,
no Pub/Sub channel, and only the commands the producer and the consumer send
(``TENANT_COMMANDS``; no ``DEL``: a tenant cannot drop its own queue). The admin URL
needs a user allowed ``ACL SETUSER/GETUSER/DELUSER``.

The password is derived, never stored: HMAC-SHA256 of ``<tenant>/<generation>`` keyed by
``derived_key("stream-broker")``, so every platform process that holds the platform key
computes the same one. The generation starts at 0; ``rotate=True`` moves to the next.
Which generation is live is read back from Redis itself: ``ACL GETUSER`` lists the
SHA-256 of the user's password, which is matched against generations 0 to
``GENERATIONS - 1``. Re-running without ``rotate`` keeps the password (a converging
``setlist up`` must not cut off running jobs). A rotation replaces the password at once;
connections already authenticated stay open until they reconnect. Rotation lasts as long
as the user does: a Redis that loses its ACLs (no ``aclfile``) starts again at
generation 0, and a new platform key changes every password.

**NATS** permissions are server configuration (``authorization { users = [...] }`` or an
account JWT), which the platform does not write. ``nats_user_permissions`` gives the
``permissions`` block of a tenant's user: publish to its own subject, the JetStream API
of its own stream's ``ingest`` consumer and that consumer's acks; subscribe only to its
own inbox subtree (``_INBOX.<username>.>``, the prefix the adapter uses for a connection
with a username). It may read its stream's info but neither create, change, purge nor
delete streams: the platform's credential creates the stream first (``send`` with it, or
``NatsBroker.ensure_stream``). The loopback server of the local stack has no
authorization at all: there, and wherever the operator has not configured these users,
a tenant's job holds the platform's NATS credential and can reach every tenant's stream.
That is an open gap on NATS, not isolation.
"""

from __future__ import annotations

import hashlib
import hmac

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from setlist.brokers.base import CONSUMER, BrokerError, StreamNames, nats_inbox_prefix
from setlist.core.credentials import derived_key

KEY_PURPOSE = "stream-broker"
GENERATIONS = 1000
# The producer's and the consumer's commands, plus what redis-py sends on connecting
# (AUTH or HELLO, CLIENT SETNAME) and SELECT for a numbered database. Not CLIENT SETINFO:
# Redis 7.0 does not know it (an unknown name fails the whole SETUSER), and redis-py
# ignores its refusal.
TENANT_COMMANDS = (
    "xadd",
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xpending",
    "xinfo|stream",
    "xinfo|groups",
    "xinfo|consumers",
    "xlen",
    "xtrim",
    "xgroup|create",
    "xgroup|createconsumer",
    "ping",
    "hello",
    "auth",
    "client|setname",
    "select",
)


def _password(key: bytes, tenant_id: str, generation: int) -> str:
    return hmac.new(key, f"{tenant_id}/{generation}".encode(), hashlib.sha256).hexdigest()


def tenant_password(tenant_id: str, generation: int = 0) -> str:
    """The tenant's broker password of ``generation``, from the platform key."""
    return _password(derived_key(KEY_PURPOSE), StreamNames.of(tenant_id).tenant_id, generation)


def _live_generation(tenant_id: str, password_hashes: list[str | bytes]) -> int | None:
    hashes = {h.decode() if isinstance(h, bytes) else h for h in password_hashes}
    key = derived_key(KEY_PURPOSE)
    for generation in range(GENERATIONS):
        password = _password(key, tenant_id, generation)
        if hashlib.sha256(password.encode()).hexdigest() in hashes:
            return generation
    return None


def acl_rules(names: StreamNames, password: str) -> list[str]:
    """``ACL SETUSER`` rules: ``reset`` first, so nothing granted before survives."""
    return [
        "reset",
        "on",
        f">{password}",
        f"~{names.redis_key_pattern}",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in TENANT_COMMANDS),
    ]


async def ensure_tenant_user(
    admin_url: str, tenant_id: str, rotate: bool = False
) -> tuple[str, str]:
    """Create or reset the tenant's Redis user → (username, password). The password is
    kept unless ``rotate``."""
    names = StreamNames.of(tenant_id)
    client = aioredis.Redis.from_url(admin_url)
    try:
        current = await client.acl_getuser(names.username)
        live = _live_generation(names.tenant_id, current["passwords"]) if current else None
        # No live generation (a new user, or one set by hand): 0 replaces whatever it had.
        generation = 0 if live is None else live + int(rotate)
        if generation >= GENERATIONS:
            raise BrokerError(
                f"the broker user of tenant {names.tenant_id!r} has been rotated "
                f"{GENERATIONS - 1} times; rotate the platform key instead"
            )
        password = tenant_password(names.tenant_id, generation)
        await client.execute_command("ACL", "SETUSER", names.username, *acl_rules(names, password))
    except RedisError as exc:
        raise BrokerError(
            f"Redis could not set up the broker user of tenant {names.tenant_id!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        await client.aclose()
    return names.username, password


async def revoke_tenant_user(admin_url: str, tenant_id: str) -> bool:
    """Delete the tenant's Redis user and close its connections → whether it existed."""
    names = StreamNames.of(tenant_id)
    client = aioredis.Redis.from_url(admin_url)
    try:
        return bool(await client.acl_deluser(names.username))
    except RedisError as exc:
        raise BrokerError(
            f"Redis could not delete the broker user of tenant {names.tenant_id!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        await client.aclose()


def nats_user_permissions(tenant_id: str) -> dict:
    """The ``permissions`` block of the tenant's NATS user (for a server config)."""
    names = StreamNames.of(tenant_id)
    stream, api = names.nats_stream, "$JS.API"
    return {
        "publish": {
            "allow": [
                names.nats_subject,
                f"{api}.STREAM.INFO.{stream}",
                # nats-py names the consumer on servers ≥ 2.9; the durable form before.
                f"{api}.CONSUMER.CREATE.{stream}.{CONSUMER}",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{CONSUMER}",
                f"{api}.CONSUMER.DELETE.{stream}.{CONSUMER}",
                f"{api}.CONSUMER.INFO.{stream}.{CONSUMER}",
                f"{api}.CONSUMER.MSG.NEXT.{stream}.{CONSUMER}",
                f"$JS.ACK.{stream}.{CONSUMER}.>",
            ]
        },
        "subscribe": {"allow": [f"{nats_inbox_prefix(names.username)}.>"]},
    }
