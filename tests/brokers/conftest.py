"""Fixtures of the broker tests: the real Redis and NATS servers on loopback, a broker
per test, and tenant ids nobody else uses, whose streams are deleted afterwards.

``SETLIST_TEST_BROKER_REDIS_URL`` and ``SETLIST_TEST_NATS_URL`` point elsewhere; a test
whose server does not answer is skipped with the reason. No Prefect server is needed.
"""

from __future__ import annotations

import os
import secrets
import socket
from urllib.parse import urlsplit

import pytest

from setlist.brokers.base import BrokerKind, open_broker

URLS = {
    BrokerKind.redis: os.environ.get("SETLIST_TEST_BROKER_REDIS_URL", "redis://127.0.0.1:6379"),
    BrokerKind.nats: os.environ.get("SETLIST_TEST_NATS_URL", "nats://127.0.0.1:4222"),
}


def unreachable(url: str) -> str | None:
    """None when something listens at ``url``'s host and port; else why not."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError as exc:
        return f"{parts.hostname}:{parts.port} does not answer: {exc}"
    return None


def new_tenant_id() -> str:
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture(params=list(BrokerKind), ids=str)
def kind(request) -> BrokerKind:
    reason = unreachable(URLS[request.param])
    if reason:
        pytest.skip(f"the {request.param} broker tests need the server ({reason})")
    return request.param


@pytest.fixture
async def broker(kind):
    async with open_broker(kind, URLS[kind]) as broker:
        yield broker


@pytest.fixture
async def tenants(kind):
    """→ a maker of fresh tenant ids; their streams are deleted after the test."""
    made: list[str] = []

    def make(tenant_id: str | None = None) -> str:
        made.append(tenant_id or new_tenant_id())
        return made[-1]

    yield make
    async with open_broker(kind, URLS[kind]) as admin:
        for tenant_id in made:
            await admin.delete_stream(tenant_id)
