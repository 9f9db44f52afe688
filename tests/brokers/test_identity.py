"""Tenants' own broker users: a Redis ACL user on the loopback server, and NATS users
built from ``nats_user_permissions`` on a private ``nats-server`` started for the module.
Each may use its own stream and is refused everything else."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError

from setlist.brokers.base import BrokerError, BrokerKind, StreamNames, open_broker
from setlist.brokers.identity import (
    ensure_tenant_user,
    nats_user_permissions,
    revoke_tenant_user,
    tenant_password,
)
from setlist.brokers.nats_jetstream import NatsBroker
from setlist.core.tenancy import InvalidTenantId
from tests.brokers.conftest import URLS, new_tenant_id, unreachable

REDIS = URLS[BrokerKind.redis]
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def _as(user: str, password: str, url: str = REDIS) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, username=user, password=password)


@pytest.fixture
async def redis_tenants():
    """→ a maker of tenant ids with a Redis user; users and streams go afterwards."""
    reason = unreachable(REDIS)
    if reason:
        pytest.skip(f"the Redis ACL tests need the server ({reason})")
    made: list[str] = []

    def make() -> str:
        made.append(new_tenant_id())
        return made[-1]

    yield make
    async with open_broker(BrokerKind.redis, REDIS) as admin:
        for tenant_id in made:
            await revoke_tenant_user(REDIS, tenant_id)
            await admin.delete_stream(tenant_id)


async def test_a_redis_tenant_user_reaches_its_own_stream_only(redis_tenants):
    mine, other = redis_tenants(), redis_tenants()
    user, password = await ensure_tenant_user(REDIS, mine)
    assert user == f"setlist-stream-{mine}"
    async with open_broker(BrokerKind.redis, REDIS) as admin:
        await admin.send(other, [b'{"secret": 1}'])

    async with open_broker(BrokerKind.redis, REDIS, user, password) as broker:
        sent = await broker.send(mine, [b"{}", b"{}"])
        async with broker.consumer(mine) as consumer:
            got = await consumer.fetch(10, 1)
            assert [m.position for m in got] == sent
            assert await consumer.lag() == 2
            await consumer.ack(got)
        assert await broker.stream_length(mine) == 0

        with pytest.raises(BrokerError, match="NoPermissionError"):
            await broker.send(other, [b"{}"])
        with pytest.raises(BrokerError, match="NoPermissionError"):
            await broker.consumer(other).fetch(10, 0)
        with pytest.raises(BrokerError, match="NoPermissionError"):
            await broker.delete_stream(mine)  # no DEL: a job cannot drop its own queue

    client = _as(user, password)
    try:
        for command in (("KEYS", "*"), ("CONFIG", "GET", "maxmemory"), ("GET", "x")):
            with pytest.raises(NoPermissionError):
                await client.execute_command(*command)
        with pytest.raises(NoPermissionError):
            await client.xrange(StreamNames.of(other).redis_key)
    finally:
        await client.aclose()
    # What would be destructive to try for real, asked of the ACL without running it.
    admin_client = aioredis.Redis.from_url(REDIS)
    try:
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "save", "")):
            verdict = await admin_client.execute_command("ACL", "DRYRUN", user, *command)
            assert b"no permissions" in verdict, verdict
    finally:
        await admin_client.aclose()


async def test_the_redis_password_is_stable_until_rotated_and_revoke_removes_the_user(
    redis_tenants,
):
    tenant = redis_tenants()
    user, first = await ensure_tenant_user(REDIS, tenant)
    assert (user, first) == await ensure_tenant_user(REDIS, tenant)
    assert first == tenant_password(tenant)

    _, second = await ensure_tenant_user(REDIS, tenant, rotate=True)
    assert second != first and second == tenant_password(tenant, 1)
    assert (user, second) == await ensure_tenant_user(REDIS, tenant)  # kept after rotation
    client = _as(user, first)
    with pytest.raises(AuthenticationError):
        await client.ping()
    await client.aclose()
    client = _as(user, second)
    assert await client.ping()
    await client.aclose()

    assert await revoke_tenant_user(REDIS, tenant) is True
    assert await revoke_tenant_user(REDIS, tenant) is False
    client = _as(user, second)
    with pytest.raises(AuthenticationError):
        await client.ping()
    await client.aclose()


async def test_a_bad_tenant_id_gets_no_redis_user():
    with pytest.raises(InvalidTenantId):  # before Redis is asked
        await ensure_tenant_user("redis://127.0.0.1:1", "Bad.Tenant")


# ---- NATS: a private server with users from nats_user_permissions


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def nats_users(tmp_path_factory):
    """A private nats-server with an admin and two tenant users → (url, tenants, users)."""
    if not Path(NATS_SERVER).exists():
        pytest.skip("the NATS permission tests need nats-server")
    home = tmp_path_factory.mktemp("nats")
    port, tenants = _free_port(), [new_tenant_id(), new_tenant_id()]
    users = {"admin": "admin-pw"} | {StreamNames.of(t).username: f"pw-{t}" for t in tenants}
    entries = [{"user": "admin", "password": "admin-pw"}] + [
        {
            "user": StreamNames.of(t).username,
            "password": f"pw-{t}",
            "permissions": nats_user_permissions(t),
        }
        for t in tenants
    ]
    config = {
        "listen": f"127.0.0.1:{port}",
        "jetstream": {"store_dir": str(home / "js")},
        "authorization": {"users": entries},
    }
    (home / "nats.conf").write_text(json.dumps(config, indent=1))  # JSON is valid NATS config
    log = open(home / "nats.log", "wb")
    proc = subprocess.Popen([NATS_SERVER, "-c", str(home / "nats.conf")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while unreachable(f"nats://127.0.0.1:{port}") and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield f"nats://127.0.0.1:{port}", tenants, users
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


async def test_a_nats_tenant_user_reaches_its_own_stream_only(nats_users):
    url, (mine, other), users = nats_users
    async with NatsBroker(url, "admin", users["admin"]) as admin:
        await admin.send(other, [b'{"secret": 1}'])
        # The platform creates the stream; the tenant's user may not.
        await admin.ensure_stream(StreamNames.of(mine))
    user = StreamNames.of(mine).username
    tenant = NatsBroker(url, user, users[user], api_timeout_s=1.0)
    async with tenant:
        sent = await tenant.send(mine, [b"{}", b"{}"])
        async with tenant.consumer(mine) as consumer:
            got = await consumer.fetch(10, 1)
            assert [m.position for m in got] == sent
            assert await consumer.lag() == 2
            await consumer.ack(got)
            assert await consumer.lag() == 0
        assert await tenant.stream_length(mine) == 0

        with pytest.raises(BrokerError, match="(?i)permissions violation"):
            await tenant.send(other, [b"{}"])
        with pytest.raises(BrokerError, match="(?i)permissions violation"):
            await tenant.consumer(other).fetch(10, 0.5)
        with pytest.raises(BrokerError, match="(?i)permissions violation"):
            await tenant.delete_stream(mine)
        with pytest.raises(BrokerError, match="(?i)permissions violation"):
            await tenant.send(new_tenant_id(), [b"{}"])  # may not create a stream

    # Nor read the other's subject, or other users' replies, with a plain client.
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    nc = await nats.connect(url, user=user, password=users[user], error_cb=on_error)
    try:
        for subject in (StreamNames.of(other).nats_subject, "_INBOX.>", ">"):
            await nc.subscribe(subject)
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert sum("permissions violation for subscription" in v.lower() for v in violations) == 3, (
        violations
    )
