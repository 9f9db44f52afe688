"""Raw listening events as a stream: the event schema, rejects, and the lines of a raw
file read in bounded memory (gzip inflated a window at a time, its ratio and size capped,
over-long lines skipped without being held whole, blank lines skipped in bulk).

``raw_events`` turns these lines into valid rows or rejects.
"""

from __future__ import annotations

import queue
import re
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import IO

import numpy as np
import orjson
import pyarrow as pa

try:  # zlib's inflate, rebuilt faster: the same output, chunk for chunk, and errors
    from zlib_ng import zlib_ng as _inflate
except ImportError:  # pragma: no cover
    _inflate = zlib


MAX_LINE_BYTES = 1 << 20  # 1 MiB: a real event is ~300 bytes
READ_CHUNK = 1 << 20  # raw (compressed) bytes read at a time
LINES_WINDOW = 1 << 22  # bytes inflated, and lines split out of the buffer, at a time
MAX_MS_PLAYED = 24 * 3600 * 1000
FUTURE_TOLERANCE = timedelta(minutes=5)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
FAST_JSON_ENV = "SETLIST_ETL_FAST_JSON"  # "0": decode every JSON line one by one

# The curated event schema (documented in the README). ``date`` is the partition key.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("artist_id", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("ms_played", pa.int64(), nullable=False),
        pa.field("context", pa.string(), nullable=True),
        pa.field("device", pa.string(), nullable=True),
        pa.field("country", pa.string(), nullable=True),
    ]
)
# (Schema.empty_table would import pandas, a second's work on the first call)
_EMPTY = pa.Table.from_batches([], schema=EVENT_SCHEMA)
REQUIRED_TEXT = ("event_id", "user_id", "track_id", "artist_id")
OPTIONAL_TEXT = ("context", "device")


class Reason(StrEnum):
    unparseable = "unparseable"
    not_utf8 = "not_utf8"
    line_too_long = "line_too_long"
    truncated_file = "truncated_file"
    missing_field = "missing_field"
    wrong_type = "wrong_type"
    impossible_value = "impossible_value"
    foreign_tenant = "foreign_tenant"
    future_timestamp = "future_timestamp"
    inflated_too_large = "inflated_too_large"
    ratio_too_high = "ratio_too_high"
    mostly_blank = "mostly_blank"


@dataclass
class Reject:
    source: str
    line: int
    reason: Reason
    detail: str
    raw: str = ""

    def as_json(self) -> bytes:
        return orjson.dumps(
            {
                "source": self.source,
                "line": self.line,
                "reason": self.reason.value,
                "detail": self.detail,
                "raw": self.raw,
            }
        )


@dataclass
class Batch:
    """Valid rows of a stretch of input, plus its rejects; blank lines are no lines."""

    table: pa.Table = field(default_factory=lambda: _EMPTY)
    rejects: list[Reject] = field(default_factory=list)
    lines: int = 0
    blank_lines: int = 0

    @property
    def rows(self) -> int:
        return self.table.num_rows


def _sample(raw: bytes | str, limit: int = 512) -> str:
    text = raw if isinstance(raw, str) else raw[:limit].decode("utf-8", "replace")
    return text[:limit]


@dataclass(frozen=True)
class ReadLimits:
    """What reading one raw file may cost, whatever its compression ratio. A gzip file
    that inflates past ``max_inflated`` bytes, or (past ``ratio_after`` inflated bytes) to
    more than ``max_ratio`` times the compressed bytes read, ends there with one reject
    (``inflated_too_large``, ``ratio_too_high``), the rows before it kept as a truncated
    file's are; a line longer than ``max_line`` is a ``line_too_long`` reject; a file
    with more than ``max_blank_lines`` blank lines, more than its other lines, gets one
    ``mostly_blank`` reject."""

    max_inflated: int = 4 << 30
    max_ratio: int = 200
    ratio_after: int = 16 << 20
    max_line: int = MAX_LINE_BYTES
    max_blank_lines: int = 10_000

    def check(self, inflated: int, compressed: int) -> None:
        if inflated > self.max_inflated:
            raise StreamError(Reason.inflated_too_large, f"inflates past {self.max_inflated} bytes")
        if inflated > self.ratio_after and inflated > self.max_ratio * compressed:
            detail = f"{inflated} bytes inflated from {compressed}: over {self.max_ratio}:1"
            raise StreamError(Reason.ratio_too_high, detail)


LIMITS = ReadLimits()


class StreamError(Exception):
    """The rest of a raw file can't be read: it ends with one reject, for this reason."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason


def _chunks(stream: IO[bytes], gz: bool, limits: ReadLimits) -> Iterator[bytes]:
    """Raw or gunzipped bytes in chunks, gunzipped ones of at most ``LINES_WINDOW``
    bytes (concatenated gzip members are one stream); a cut-off gzip, or one past
    ``limits``, yields all it has, then raises."""
    if not gz:
        while chunk := stream.read(READ_CHUNK):
            yield chunk
        return
    d = _inflate.decompressobj(wbits=31)
    fed = False  # has the current gzip member seen any input?
    read = inflated = 0
    while data := stream.read(READ_CHUNK):
        read += len(data)
        while data:
            fed = True
            try:
                out = d.decompress(data, LINES_WINDOW)
            except (zlib.error, _inflate.error) as exc:
                raise StreamError(Reason.truncated_file, f"corrupt gzip: {exc}") from None
            data = d.unconsumed_tail  # the input left when the output reached its bound
            if d.eof:  # a member ended; concatenated gzip members may follow
                data = d.unused_data
                d = _inflate.decompressobj(wbits=31)
                fed = False
            if out:
                inflated += len(out)
                limits.check(inflated, read - len(data))
                yield out
    if fed and not d.eof:
        if tail := d.flush():  # at most a match's length: the input is all consumed
            yield tail
        raise StreamError(Reason.truncated_file, "gzip stream ends before its end marker")


def _read_ahead(chunks: Iterator[bytes], depth: int = 2) -> Iterator[bytes]:
    """The same chunks (and the same exception at the end), read and decompressed by a
    thread up to ``depth`` chunks ahead: zlib(-ng) releases the GIL, so it overlaps parsing."""
    ahead: queue.Queue[tuple[bytes | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def pump() -> None:
        item: tuple[bytes | None, BaseException | None] = (None, None)
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        ahead.put((chunk, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the reader, raised there
            item = (None, exc)
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    thread = threading.Thread(target=pump, name="raw-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            chunk, exc = ahead.get()
            if exc is not None:
                raise exc
            if chunk is None:
                return
            yield chunk
    finally:
        stop.set()
        thread.join()


# The newline before a run of blank lines (nothing but ASCII whitespace), and the run:
# one repeat of a character set (a C loop, no backtracking state per line).
_BLANK_RUN = re.compile(rb"\n[\n \t\r\x0b\x0c]*\n")
Block = tuple[np.ndarray, list[bytes]]  # line numbers, and lines without newlines


def iter_line_blocks(
    stream: IO[bytes], source: str, limits: ReadLimits = LIMITS
) -> Iterator[Block | Reject | int]:
    """Runs of lines (with their line numbers), Rejects, and counts of blank lines left
    out of the runs, in input order and in bounded memory: the lines of one chunk at a
    time, a chunk of at most ``LINES_WINDOW`` inflated bytes however well it compressed.
    Blank lines are found and counted a chunk at a time (in C), never one at a time."""
    buf = b"\n"  # from the newline before the first line not yet taken
    n = blanks = 0  # lines so far; the blank ones among them
    skipping = False  # inside an over-long line: discard until its newline
    chunks = _read_ahead(_chunks(stream, source.endswith(".gz"), limits))
    while True:
        try:
            chunk = next(chunks, b"")
        except StreamError as exc:
            if exc.reason is Reason.truncated_file and len(buf) > 1 and not skipping:
                n += 1
                sample = _sample(buf[1:])
                yield Reject(source, n, Reason.truncated_file, "last line cut off", sample)
            yield Reject(source, n + 1, exc.reason, str(exc))
            return
        if not chunk and (skipping or len(buf) == 1):
            break
        buf += chunk or b"\n"  # (the last line has no newline)
        if skipping:  # the first piece is the end of the over-long line
            if (start := buf.find(b"\n", 1)) < 0:
                buf = b"\n"
                continue
            buf, skipping = buf[start:], False
        start = 0
        while True:  # the complete lines in buf, a window of at most LINES_WINDOW at a time
            last = buf.rfind(b"\n", start + 1, start + 1 + LINES_WINDOW)
            if last < 0 and (last := buf.find(b"\n", start + 1 + LINES_WINDOW)) < 0:
                break
            n, k = yield from _window(source, buf, start, last, n, limits.max_line)
            blanks, start = blanks + k, last
        buf = buf[start:]
        if len(buf) > limits.max_line + 1:
            n += 1
            detail = f"> {limits.max_line} bytes"
            yield Reject(source, n, Reason.line_too_long, detail, _sample(buf[1:]))
            skipping, buf = True, b"\n"
        if not chunk:
            break
    if blanks > limits.max_blank_lines and blanks > n - blanks:
        yield Reject(source, n + 1, Reason.mostly_blank, f"{blanks} of {n} lines are blank")


def _window(
    source: str, buf: bytes, start: int, last: int, n: int, max_line: int
) -> Iterator[Block | Reject | int]:
    """The lines between the newlines at ``start`` and ``last`` of ``buf``, numbered
    from n + 1, as ``iter_line_blocks`` gives them. Returns (lines so far, blank ones)."""
    # No line empty or starting with a space: none is blank (if there are too many lines
    # to split at once, as in runs of newlines, the regex below finds out).
    lines = buf[start + 1 : last].split(b"\n", 1 << 16)
    if len(lines) <= 1 << 16 and min(lines)[:1] > b" ":
        yield from _long_apart(source, np.arange(n + 1, n + 1 + len(lines)), lines, max_line)
        return n + len(lines), 0
    pos, lines, firsts, counts, blanks = start + 1, [], [], [], 0
    for run in _BLANK_RUN.finditer(buf, start, last + 1):
        if run.start() > pos:  # the lines before the run (the first may be blank)
            some = buf[pos : run.start()].split(b"\n")
            firsts.append(n + 1)
            counts.append(len(some))
            lines += some
            n += len(some)
        k = buf.count(b"\n", run.start() + 1, run.end())
        n, blanks, pos = n + k, blanks + k, run.end()
    if last > pos:
        some = buf[pos:last].split(b"\n")
        firsts.append(n + 1)
        counts.append(len(some))
        lines += some
        n += len(some)
    if lines:
        offsets = np.cumsum(counts) - counts  # where each stretch starts in lines
        numbers = np.repeat(np.array(firsts) - offsets, counts) + np.arange(len(lines))
        yield from _long_apart(source, numbers, lines, max_line)
    if blanks:
        yield blanks
    return n, blanks


def _long_apart(
    source: str, numbers: np.ndarray, lines: list[bytes], max_line: int
) -> Iterator[Block | Reject]:
    """The runs of a chunk's lines around those longer than ``max_line``, and theirs."""
    if max(map(len, lines)) <= max_line:
        yield numbers, lines
        return
    start = 0
    for i, line in enumerate(lines):
        if len(line) > max_line:
            if i > start:
                yield numbers[start:i], lines[start:i]
            detail = f"{len(line)} bytes > {max_line}"
            yield Reject(source, int(numbers[i]), Reason.line_too_long, detail, _sample(line))
            start = i + 1
    if start < len(lines):
        yield numbers[start:], lines[start:]


def iter_lines(stream: IO[bytes], source: str) -> Iterator[tuple[int, bytes | Reject]]:
    """(line number, bytes without newline) or (line number, Reject), in bounded memory;
    blank lines left out."""
    for item in iter_line_blocks(stream, source):
        if isinstance(item, Reject):
            yield item.line, item
        elif not isinstance(item, int):
            yield from zip(item[0].tolist(), item[1], strict=True)
