"""A tenant lock across a control-plane outage: a holder that can't reach the server
keeps its lock while its lease is good, and stops with ``LockLost`` only once the
server no longer holds its lease. The outage is real: the holder talks to the session's
server through a TCP relay that stops listening (connections refused) and listens again."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import urlsplit, urlunsplit

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from setlist.dispatch import locks
from setlist.dispatch.locks import LockLost, lock_name, tenant_lock

pytestmark = pytest.mark.server


class Relay:
    """127.0.0.1:port → the server; ``cut()`` closes the listener and every open
    connection, ``mend()`` listens on the same port again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader, writer) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader, writer) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target)
        self.open |= {writer, up_w}
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))

    async def mend(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.open:
            w.close()
        self.open.clear()
        await self.server.wait_closed()


@pytest.fixture
async def relay(prefect_server):
    api = urlsplit(prefect_server)
    r = Relay((api.hostname, api.port))
    await r.mend()
    through = urlunsplit(api._replace(netloc=f"127.0.0.1:{r.port}"))
    with temporary_settings(updates={PREFECT_API_URL: through}):
        yield r
    if r.server is not None:
        r.server.close()


@pytest.fixture
def leases(monkeypatch):
    """Renewals every 3 s of the 60 s lease; the lease ids the locks took."""
    monkeypatch.setenv("SETLIST_HEARTBEAT_SECONDS", "30")
    monkeypatch.setenv("SETLIST_UNRESPONSIVE_SECONDS", "60")
    from setlist.core.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.setattr(locks, "RENEW_EVERY", 0.05)
    taken = []
    keep = locks._keep_lease

    def recorded(lease_id, *args):
        taken.append(lease_id)
        return keep(lease_id, *args)

    monkeypatch.setattr(locks, "_keep_lease", recorded)
    yield taken
    get_settings.cache_clear()


async def _held(tenant_id: str, name: str) -> int:
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(lock_name(tenant_id, name))
        return limit.active_slots


async def test_a_holder_keeps_its_lock_through_an_outage_shorter_than_its_lease(
    relay, leases, tenant_id
):
    async with tenant_lock(tenant_id, "etl"):
        await relay.cut()
        await asyncio.sleep(9)  # renewals refused for 9 s: Prefect's own gives up after ~3
        await relay.mend()
        await asyncio.sleep(5)  # and one gets through again
        assert await _held(tenant_id, "etl") == 1
    assert await _held(tenant_id, "etl") == 0  # released on the way out


async def test_a_holder_whose_lease_the_server_dropped_stops_with_lock_lost(
    relay, leases, tenant_id
):
    with pytest.raises(LockLost, match="no longer holds its lease"):
        async with tenant_lock(tenant_id, "etl"):
            await asyncio.sleep(0.5)  # the lease's keeper has started
            async with get_client() as client:  # as the server does with an expired one
                await client.release_concurrency_slots_with_lease(leases[0])
            await asyncio.sleep(30)  # the next renewal (3 s) finds it gone
    assert await _held(tenant_id, "etl") == 0
