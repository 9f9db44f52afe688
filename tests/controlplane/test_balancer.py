"""The local replicas' balancer, over real sockets: turns, a replica gone, none left."""

from __future__ import annotations

import asyncio

import pytest

from setlist.controlplane.balancer import Balancer, backend_address


async def _replica(name: bytes) -> asyncio.Server:
    """Answers each line with its name and the line."""

    async def handle(reader, writer):
        while line := await reader.readline():
            writer.write(name + b":" + line)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _ask(port: int, line: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(line + b"\n")
    await writer.drain()
    answer = await reader.readline()
    writer.close()
    return answer


def _addr(server: asyncio.Server) -> tuple[str, int]:
    return server.sockets[0].getsockname()[:2]


async def test_connections_take_turns_and_skip_a_dead_replica():
    a, b = await _replica(b"a"), await _replica(b"b")
    addr_a = _addr(a)
    balancer = Balancer([addr_a, _addr(b)], down_s=60)
    front = await balancer.serve("127.0.0.1", 0)
    port = _addr(front)[1]
    try:
        answers = [await _ask(port, f"q{i}".encode()) for i in range(4)]
        assert sorted(answers) == [b"a:q0\n", b"a:q2\n", b"b:q1\n", b"b:q3\n"]

        a.close()
        await a.wait_closed()
        answers = [await _ask(port, f"r{i}".encode()) for i in range(4)]
        assert answers == [f"b:r{i}\n".encode() for i in range(4)]  # none lost to a
        assert balancer.down_until[addr_a] > 0

        b.close()
        await b.wait_closed()
        assert await _ask(port, b"s") == b""  # no replica: the connection is closed
    finally:
        front.close()


def test_backend_urls_are_parsed_or_refused():
    assert backend_address("http://127.0.0.1:4200/api") == ("127.0.0.1", 4200)
    for bad in ("https://h:1/api", "http://h/api", "127.0.0.1:4200"):
        with pytest.raises(ValueError, match="not an http"):
            backend_address(bad)
    with pytest.raises(ValueError, match="no backend"):
        Balancer([])
