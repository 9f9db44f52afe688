"""One address in front of the local API replicas, as a Kubernetes Service is in a cluster.

Each new TCP connection goes to the next replica in turn that accepts it; a replica that
refuses a connection is passed over for ``down_s`` and tried again after. A connection
already open to a replica that dies breaks, as it would behind a Service: Prefect's
clients retry a request that failed that way (a read error, a protocol error), and the
retry's new connection reaches a live replica. So a client of the balancer loses nothing
when one replica is killed, which is what ``bench/ha.py`` measures.

For the local multi-replica shape only (``bench/ha.py``, tests); a cluster balances with
its Service (``k8s/components/prefect-ha``).

    python -m setlist.controlplane.balancer --port 4300 \\
        --backend http://127.0.0.1:4200/api --backend http://127.0.0.1:4201/api
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import time
from urllib.parse import urlsplit

log = logging.getLogger("setlist.balancer")


def backend_address(url: str) -> tuple[str, int]:
    """(host, port) of an API URL such as ``http://127.0.0.1:4200/api``."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"not an http://host:port URL: {url!r}")
    return parts.hostname, parts.port


class Balancer:
    """Round-robin TCP proxy over ``backends``, skipping the ones that refuse."""

    def __init__(
        self,
        backends: list[tuple[str, int]],
        down_s: float = 2.0,
        connect_timeout: float = 2.0,
    ):
        if not backends:
            raise ValueError("no backend to balance")
        self.backends = backends
        self.down_s = down_s
        self.connect_timeout = connect_timeout
        self.down_until = dict.fromkeys(backends, 0.0)
        self._turn = itertools.cycle(range(len(backends)))
        self.connections = dict.fromkeys(backends, 0)  # how many each one was given

    def _order(self) -> list[tuple[str, int]]:
        """The backends from the next in turn; those marked down after the others."""
        start = next(self._turn)
        turn = self.backends[start:] + self.backends[:start]
        now = time.monotonic()
        return sorted(turn, key=lambda b: self.down_until[b] > now)

    async def _connect(self):
        errors = []
        for backend in self._order():
            try:
                streams = await asyncio.wait_for(
                    asyncio.open_connection(*backend), self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                self.down_until[backend] = time.monotonic() + self.down_s
                errors.append(f"{backend[0]}:{backend[1]}: {exc}")
                continue
            self.connections[backend] += 1
            return streams
        raise ConnectionError("no replica accepts connections: " + "; ".join(errors))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._connect()
        except ConnectionError as exc:
            log.warning("%s", exc)
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m setlist.controlplane.balancer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", action="append", required=True, help="an API URL; repeat")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    balancer = Balancer([backend_address(u) for u in args.backend])

    async def run() -> None:
        server = await balancer.serve(args.host, args.port)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
