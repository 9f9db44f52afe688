"""Sending a tenant's events to its stream from a file or the demo generator
(``setlist stream send``), through the platform's broker.

Lines go as they are, one message each: the stream-ingest job validates and quarantines
them exactly like data-etl, so nothing here reads their fields. The file is read line by
line and sent in chunks of ``CHUNK_EVENTS`` (one broker round trip each), so memory is
one chunk whatever the file's size. Blank lines are skipped; a line longer than
``MAX_LINE_BYTES`` stops the send, since the job would reject it anyway and NATS refuses
messages past 1 MiB.

Each chunk is acknowledged by the broker before the next is read. A send stopped midway
(``StreamFull``: the job is behind; a broker error) leaves the chunks before it in the
stream, and the message says how many: sending the file again is safe, since the table
keeps the first row of each event id.
"""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import IO

from blocks.stream import StreamBrokerConfig
from setlist.brokers.base import Broker, StreamFull
from setlist.core.settings import Settings, get_settings
from setlist.core.tenancy import SetlistError
from setlist.etl.demo import iter_raw_lines
from setlist.etl.raw_events import MAX_LINE_BYTES
from setlist.tenants.onboarding import read_profile
from setlist.tenants.stream_access import platform_broker

CHUNK_EVENTS = 5_000
_GZIP_MAGIC = b"\x1f\x8b"


class NoStreamBroker(SetlistError):
    """The platform has no stream broker (``SETLIST_STREAM_BROKER_URL``)."""


@dataclass(frozen=True)
class Sent:
    tenant_id: str
    events: int
    last_position: str | None


def producer_broker(settings: Settings) -> StreamBrokerConfig:
    """The platform's broker, or ``NoStreamBroker`` saying how to set one."""
    platform = platform_broker(settings)
    if platform is None:
        raise NoStreamBroker(
            "no stream broker is configured: set SETLIST_STREAM_BROKER_URL to the platform's "
            "broker, e.g. redis://127.0.0.1:6379/0 or nats://127.0.0.1:4222"
        )
    return platform


def read_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The non-blank lines of JSON-lines bytes, plain or gzip (told by the magic bytes,
    so a compressed stdin works too), each without surrounding whitespace."""
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream)
    if buffered.peek(2)[:2] == _GZIP_MAGIC:
        buffered = gzip.GzipFile(fileobj=buffered)  # type: ignore[assignment]
    number = 0
    while line := buffered.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise SetlistError(
                f"line {number} is over {MAX_LINE_BYTES} bytes; the stream-ingest job takes "
                "one event per line of at most that"
            )
        if event := line.strip():
            yield event


def file_lines(path: str) -> Iterator[bytes]:
    """``read_lines`` of the file at ``path``, or of standard input for ``-``."""
    if path == "-":
        yield from read_lines(sys.stdin.buffer)
        return
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the last line
    except OSError as exc:
        raise SetlistError(f"can't read {path}: {exc.strerror}") from None
    with handle:
        yield from read_lines(handle)


def demo_lines(tenant_id: str, events: int) -> Iterator[bytes]:
    """``events`` realistic events of the tenant, none defective, generated as sent."""
    return (line for line, _ in iter_raw_lines(tenant_id, events=events, defect_share=0.0))


def _chunks(lines: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    it = iter(lines)
    while chunk := list(islice(it, size)):
        yield chunk


async def send_lines(
    broker: Broker, tenant_id: str, lines: Iterable[bytes], chunk: int = CHUNK_EVENTS
) -> Sent:
    """Send ``lines`` to the tenant's stream, ``chunk`` at a time."""
    sent, last = 0, None
    for batch in _chunks(lines, chunk):
        try:
            positions = await broker.send(tenant_id, batch)
        except StreamFull as exc:
            where = f", up to position {last}" if last else ""
            raise StreamFull(f"stopped after {sent} events{where}: {exc}") from None
        sent, last = sent + len(positions), positions[-1]
    return Sent(tenant_id, sent, last)


async def send_events(tenant_id: str, lines: Iterable[bytes]) -> Sent:
    """``setlist stream send``: a known tenant's ``lines`` into its stream, through the
    platform's broker; the tenant and the broker are checked before a line is read."""
    await read_profile(tenant_id)
    async with producer_broker(get_settings()).open() as broker:
        return await send_lines(broker, tenant_id, lines)
