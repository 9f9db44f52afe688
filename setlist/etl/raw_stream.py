"""Raw listening events as a stream: the event schema, rejects, and the lines of a raw
file read in bounded memory (gzip inflated a window at a time, its ratio and size capped,
over-long lines skipped without being held whole, blank lines skipped in bulk).

``raw_events`` turns these lines into valid rows or rejects.
"""

from __future__ import annotations

import queue
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


# The bytes a blank line may hold (ASCII whitespace) besides its newline.
_SPACE = np.zeros(256, dtype=np.uint8)
_SPACE[[ord(c) for c in "\t\n\x0b\x0c\r "]] = 1


@dataclass(frozen=True)
class Lines:
    """A run of a raw file's lines, kept in the bytes they came in, with where each line
    starts and how long it is: not a bytes object a line, since splitting a window into
    thousands of them (and joining them again for Arrow's JSON reader) cost as much as
    checking the rows. Line ``i`` is ``data[starts[i] : starts[i] + lens[i]]``, numbered
    ``numbers[i]`` in its file; a newline follows each line in ``data``. Blank lines left
    out of the run may sit between two of its lines there, never inside one."""

    data: memoryview
    starts: np.ndarray
    lens: np.ndarray
    numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> bytes:
        start = int(self.starts[i])
        return bytes(self.data[start : start + int(self.lens[i])])

    def head(self, i: int, limit: int = 512) -> bytes:
        """The first ``limit`` bytes of line ``i`` (a reject's sample of a long line)."""
        start = int(self.starts[i])
        return bytes(self.data[start : start + min(int(self.lens[i]), limit)])

    def select(self, which: slice | np.ndarray) -> Lines:
        """The lines ``which`` picks (a slice of them, or a mask), sharing the bytes."""
        return Lines(self.data, self.starts[which], self.lens[which], self.numbers[which])

    def contiguous(self) -> bool:
        """Whether nothing but a newline lies between one line and the next."""
        return bool((self.starts[1:] == self.starts[:-1] + self.lens[:-1] + 1).all())

    def tolist(self) -> list[bytes]:
        if not len(self):
            return []
        if self.contiguous():
            first, last = int(self.starts[0]), int(self.starts[-1] + self.lens[-1])
            return bytes(self.data[first:last]).split(b"\n")
        return self.take(np.arange(len(self)))

    def take(self, idx: np.ndarray) -> list[bytes]:
        data = self.data
        return [
            bytes(data[s : s + n])
            for s, n in zip(self.starts[idx].tolist(), self.lens[idx].tolist(), strict=True)
        ]

    def joined(self) -> tuple[bytearray, np.ndarray]:
        """A copy of the lines, each followed by a newline and nothing else between them
        (what Arrow's JSON reader reads, and may be overwritten), and where each starts."""
        if not len(self):
            return bytearray(), self.starts
        if self.contiguous():
            first = int(self.starts[0])
            last = int(self.starts[-1] + self.lens[-1])
            return bytearray(self.data[first : last + 1]), self.starts - first
        data = bytearray(b"\n").join(self.tolist())
        data += b"\n"
        return data, np.cumsum(self.lens + 1) - self.lens - 1


def iter_line_blocks(
    stream: IO[bytes], source: str, limits: ReadLimits = LIMITS
) -> Iterator[Lines | Reject | int]:
    """Runs of lines (``Lines``, with their line numbers), Rejects, and counts of blank
    lines left out of the runs, in input order and in bounded memory: the lines of one
    chunk at a time, a chunk of at most ``LINES_WINDOW`` inflated bytes however well it
    compressed. Lines and blank lines are found and counted a window at a time (in C),
    never one at a time."""
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
) -> Iterator[Lines | Reject | int]:
    """The lines between the newlines at ``start`` and ``last`` of ``buf``, numbered
    from n + 1, as ``iter_line_blocks`` gives them. Returns (lines so far, blank ones)."""
    view = memoryview(buf)[start + 1 : last + 1]  # the lines, each with its newline
    arr = np.frombuffer(view, np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    numbers = np.arange(n + 1, n + 1 + len(ends))
    lines = Lines(view, starts, ends - starts, numbers)
    # A blank line holds nothing but whitespace, so starts with a byte up to a space (an
    # empty one with its newline): where no line does, none is blank.
    if arr[starts].min() > ord(" "):
        yield from _long_apart(source, lines, max_line)
        return n + len(ends), 0
    blank = np.minimum.reduceat(_SPACE[arr], starts).astype(bool)  # all whitespace
    blanks = int(np.count_nonzero(blank))
    if blanks < len(ends):
        yield from _long_apart(source, lines.select(~blank), max_line)
    if blanks:
        yield blanks
    return n + len(ends), blanks


def _long_apart(source: str, lines: Lines, max_line: int) -> Iterator[Lines | Reject]:
    """The runs of a window's lines around those longer than ``max_line``, and theirs."""
    long = np.flatnonzero(lines.lens > max_line)
    if not len(long):
        yield lines
        return
    start = 0
    for i in long.tolist():
        if i > start:
            yield lines.select(slice(start, i))
        detail = f"{int(lines.lens[i])} bytes > {max_line}"
        line = int(lines.numbers[i])
        yield Reject(source, line, Reason.line_too_long, detail, _sample(lines.head(i)))
        start = i + 1
    if start < len(lines):
        yield lines.select(slice(start, None))


def iter_lines(stream: IO[bytes], source: str) -> Iterator[tuple[int, bytes | Reject]]:
    """(line number, bytes without newline) or (line number, Reject), in bounded memory;
    blank lines left out."""
    for item in iter_line_blocks(stream, source):
        if isinstance(item, Reject):
            yield item.line, item
        elif not isinstance(item, int):
            yield from zip(item.numbers.tolist(), item.tolist(), strict=True)
