"""Raw listening events: the schema, and turning raw files into valid rows or rejects.

Raw files are JSON lines or CSV, optionally gzipped. They are read as a stream of
lines in bounded memory, whatever the compression ratio (gzip is inflated a window at a
time): a truncated gzip, or one that inflates past ``ReadLimits``, ends the stream with a
reject; a line longer than ``MAX_LINE_BYTES`` is skipped without being held whole; bytes
that are not UTF-8 reject their line. Every row that can't become a valid event is
returned with a reason so the caller can quarantine and count it; nothing is dropped
silently. Blank lines are no input lines: they are counted apart (``Batch.blank_lines``),
skipped in bulk, and count toward no ``max_bad_share``; a mostly blank file is one reject.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import operator
import queue
import re
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

MAX_LINE_BYTES = 1 << 20  # 1 MiB: a real event is ~300 bytes
READ_CHUNK = 1 << 20  # raw (compressed) bytes read at a time
LINES_WINDOW = 1 << 22  # bytes inflated, and lines split out of the buffer, at a time
MAX_MS_PLAYED = 24 * 3600 * 1000
FUTURE_TOLERANCE = timedelta(minutes=5)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)

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
    d = zlib.decompressobj(wbits=31)
    fed = False  # has the current gzip member seen any input?
    read = inflated = 0
    while data := stream.read(READ_CHUNK):
        read += len(data)
        while data:
            fed = True
            try:
                out = d.decompress(data, LINES_WINDOW)
            except zlib.error as exc:
                raise StreamError(Reason.truncated_file, f"corrupt gzip: {exc}") from None
            data = d.unconsumed_tail  # the input left when the output reached its bound
            if d.eof:  # a member ended; concatenated gzip members may follow
                data = d.unused_data
                d = zlib.decompressobj(wbits=31)
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
    thread up to ``depth`` chunks ahead: zlib releases the GIL, so it overlaps parsing."""
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


def _parse_ts(value: Any) -> datetime:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value / 1000, tz=UTC)  # epoch milliseconds
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return ts.astimezone(UTC)


_TS = pa.timestamp("ms", tz="UTC")


def _not_id(values: pa.Array) -> np.ndarray:
    """Where a string is not null and not 1 to 128 characters, each printable ASCII but
    space (0x21 to 0x7E), as the regex ``^[\\x21-\\x7e]{1,128}$`` says; read from the
    array's offsets and bytes (a compare per byte), far faster than string kernels."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    n = len(values)
    if not n:
        return np.zeros(0, dtype=bool)
    wide = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    offset_type = np.dtype(np.int64 if wide else np.int32)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(
        offsets_buf, offset_type, n + 1, values.offset * offset_type.itemsize
    ).astype(np.int64)
    length = np.diff(offsets)
    bad = (length < 1) | (length > 128)
    start, end = int(offsets[0]), int(offsets[-1])
    if data_buf is not None and end > start:
        data = np.frombuffer(data_buf, np.uint8, end - start, start)
        # bytes outside 0x21..0x7E (below 0x21 the subtraction wraps round to above 0x5D)
        odd = np.flatnonzero((data - np.uint8(0x21)) > np.uint8(0x7E - 0x21))
        if len(odd):
            bad[np.searchsorted(offsets, odd + start, side="right") - 1] = True
    if values.null_count:
        bad &= values.is_valid().to_numpy(zero_copy_only=False)
    return bad


def _text(values: list[Any]) -> tuple[pa.Array, list[bool] | None]:
    """A string array; where a value is not text it becomes null and is flagged."""
    try:
        return pa.array(values, pa.string()), None
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        bad = [v is not None and not isinstance(v, str) for v in values]
        return pa.array(
            [None if b else v for v, b in zip(values, bad, strict=True)], pa.string()
        ), bad


_NONE = type(None)
_INT_OR_NONE = {int, _NONE}


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _ints(values: list[Any]) -> tuple[pa.Array, np.ndarray | None]:
    """An int64 array (digit strings accepted, as CSV gives them); others null and flagged."""
    types = list(map(type, values))
    kinds = set(types)
    if kinds <= _INT_OR_NONE:
        try:
            return pa.array(values, pa.int64()), None
        except (OverflowError, pa.ArrowInvalid):
            return _ints_each(values)  # an int beyond int64: flagged there
    # only the values that are neither an int nor None need a look of their own: found
    # by list.index (a C loop), type by type
    out = list(values)
    bad = np.zeros(len(values), dtype=bool)
    for kind in kinds - _INT_OR_NONE:
        i = -1
        with contextlib.suppress(ValueError):
            while True:
                i = types.index(kind, i + 1)
                out[i], bad[i] = _int_or_bad(values[i])
    try:
        return pa.array(out, pa.int64()), bad
    except (OverflowError, pa.ArrowInvalid):
        return _ints_each(values)  # an int beyond int64


def _int_or_bad(v: Any) -> tuple[int | None, bool]:
    """(the int64 of a value that is no int nor None, or None; whether it is flagged)"""
    n = None
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        try:
            n = int(v)  # "--5" or "²" pass isdigit() but are no integer
        except ValueError:
            n = None
    if n is not None and _INT64_MIN <= n <= _INT64_MAX:
        return n, False
    return None, v != ""


def _ints_each(values: list[Any]) -> tuple[pa.Array, np.ndarray]:
    """``_ints`` looking at every value (where some int is beyond int64)."""
    out = list(values)
    bad = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        t = type(v)
        if t is _NONE or (t is int and _INT64_MIN <= v <= _INT64_MAX):
            continue
        out[i], bad[i] = _int_or_bad(v)
    return pa.array(out, pa.int64()), bad


def _timestamps(values: list[Any] | pa.Array) -> pa.Array:
    """UTC timestamps; null where a value is no ISO-8601 time with zone nor epoch ms."""
    try:
        strings = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        return strings.cast(_TS)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    out = []
    for v in values.to_pylist() if isinstance(values, pa.Array) else values:
        try:
            out.append(_parse_ts(v))
        except (TypeError, ValueError, OverflowError, OSError):
            out.append(None)
    return pa.array(out, _TS)


def _blank(values: pa.Array) -> np.ndarray:
    """Where a string array is null or empty."""
    return pc.fill_null(pc.equal(values, ""), True).to_numpy(zero_copy_only=False)


_TEXT_FIELDS = (*REQUIRED_TEXT, "tenant_id", *OPTIONAL_TEXT, "country")
_FIELDS = (*REQUIRED_TEXT, "tenant_id", "ts", "ms_played", *OPTIONAL_TEXT, "country")
# The text fields and ``ts`` read in one pass over the records (C++ reads the dicts).
# Exact for records whose values there are all strings or null; any other value makes
# the conversion fail, and the batch takes the per-column path instead.
_AS_TEXT = pa.struct([(name, pa.string()) for name in (*_TEXT_FIELDS, "ts")])
_DICT_ONLY = {dict}


def _text_columns(records: list[Any]) -> dict[str, pa.Array] | None:
    """The text fields and ``ts`` of records that are all objects with only strings or
    nulls there; None for any other batch."""
    if set(map(type, records)) != _DICT_ONLY:
        return None
    try:
        struct = pa.array(records, _AS_TEXT)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return None
    return dict(zip(_AS_TEXT.names, struct.flatten(), strict=True))


class BatchValidator:
    """Validates decoded records a run at a time, column by column.

    Each row gets the reason of the first check it fails, in this order: not an object,
    missing field, wrong type, impossible value, foreign tenant, future timestamp.
    """

    def __init__(self, tenant_id: str, now: datetime, limits: ReadLimits = LIMITS):
        self.tenant_id = tenant_id
        self.latest = now + FUTURE_TOLERANCE
        self.limits = limits  # how much reading a raw file may cost

    def validate(
        self,
        batch: Batch,
        records: list[Any],
        where: Sequence[tuple[int, bytes | str]],
        source: str,
    ) -> None:
        """Adds the valid rows of ``records`` to ``batch.table``, the others to its
        rejects; ``where[i]`` is (line number, raw line) of ``records[i]``."""
        n = len(records)
        if not n:
            return
        reason = np.zeros(n, dtype=np.int8)  # 0 = valid, else index into _CODES + 1
        detail = np.full(n, "", dtype=object)

        def flag(mask, code: Reason, text: str) -> None:
            m = np.asarray(mask, dtype=bool) & (reason == 0)
            reason[m] = _CODES.index(code) + 1
            detail[m] = text

        arrays: dict[str, pa.Array]
        wrong: list[tuple[str, list[bool] | np.ndarray | None]]
        columns = _text_columns(records)
        if columns is None:  # some record or value is not what the one-pass read takes
            dicts = [r if type(r) is dict else {} for r in records]
            flag(
                [type(r) is not dict for r in records], Reason.wrong_type, "record is not an object"
            )
            col = {name: [d.get(name) for d in dicts] for name in _FIELDS}
            arrays, wrong = {}, []
            for name in _TEXT_FIELDS:
                arrays[name], bad = _text(col[name])
                wrong.append((name, bad))
            arrays["ms_played"], bad_ms = _ints(col["ms_played"])
            wrong.append(("ms_played", bad_ms))
            arrays["ts"] = ts = _timestamps(col["ts"])
            missing = {
                name: [v is None or v == "" for v in col[name]]
                for name in (*REQUIRED_TEXT, "ts", "ms_played")
            }
        else:
            arrays, wrong = columns, [(name, None) for name in _TEXT_FIELDS]
            ms_values = list(map(dict.get, records, itertools.repeat("ms_played", n)))
            arrays["ms_played"], bad_ms = _ints(ms_values)
            wrong.append(("ms_played", bad_ms))
            missing = {name: _blank(arrays[name]) for name in (*REQUIRED_TEXT, "ts")}
            # null where the value was None or "" (unflagged) or anything else (flagged)
            ms_null = arrays["ms_played"].is_null().to_numpy(zero_copy_only=False)
            missing["ms_played"] = ms_null if bad_ms is None else ms_null & ~bad_ms
            arrays["ts"] = ts = _timestamps(arrays["ts"])

        for name in (*REQUIRED_TEXT, "ts", "ms_played"):
            flag(missing[name], Reason.missing_field, name)
        for name, bad in wrong:
            if bad is not None:
                flag(bad, Reason.wrong_type, f"{name} has the wrong type")
        flag(
            ts.is_null().to_numpy(zero_copy_only=False),
            Reason.wrong_type,
            "ts is not an ISO-8601 time with zone or epoch ms",
        )
        for name in REQUIRED_TEXT:
            flag(_not_id(arrays[name]), Reason.impossible_value, f"{name} is not a printable id")
        ms = arrays["ms_played"]
        out_of_range = pc.or_(pc.less(ms, 0), pc.greater(ms, MAX_MS_PLAYED))
        flag(
            pc.fill_null(out_of_range, False).to_numpy(zero_copy_only=False),
            Reason.impossible_value,
            f"ms_played outside 0..{MAX_MS_PLAYED}",
        )
        flag(
            pc.fill_null(pc.less(ts, pa.scalar(EARLIEST, _TS)), False).to_numpy(
                zero_copy_only=False
            ),
            Reason.impossible_value,
            "ts before 2000",
        )
        country = pc.utf8_upper(pc.utf8_trim_whitespace(arrays["country"]))
        country = pc.if_else(pc.equal(country, ""), pa.scalar(None, pa.string()), country)
        bad_country = pc.invert(pc.match_substring_regex(country, "^[A-Z]{2}$"))
        flag(
            pc.fill_null(bad_country, False).to_numpy(zero_copy_only=False),
            Reason.impossible_value,
            "country is not an ISO 3166 alpha-2 code",
        )
        tenant = arrays["tenant_id"]
        foreign = pc.and_(pc.is_valid(tenant), pc.not_equal(tenant, self.tenant_id))
        flag(
            pc.fill_null(foreign, False).to_numpy(zero_copy_only=False),
            Reason.foreign_tenant,
            "tenant_id of another tenant",
        )
        flag(
            pc.fill_null(pc.greater(ts, pa.scalar(self.latest, _TS)), False).to_numpy(
                zero_copy_only=False
            ),
            Reason.future_timestamp,
            "ts in the future",
        )

        for i in np.flatnonzero(reason):
            line_no, raw = where[i]
            batch.rejects.append(
                Reject(source, line_no, _CODES[reason[i] - 1], detail[i], _sample(raw))
            )
        keep = pa.array(reason == 0)

        def lowered(name: str) -> pa.Array:
            v = pc.utf8_lower(pc.utf8_trim_whitespace(arrays[name]))
            return pc.if_else(pc.equal(v, ""), pa.scalar(None, pa.string()), v)

        table = pa.table(
            {
                "event_id": arrays["event_id"],
                "tenant_id": pa.repeat(pa.scalar(self.tenant_id, pa.string()), n),
                "user_id": arrays["user_id"],
                "track_id": arrays["track_id"],
                "artist_id": arrays["artist_id"],
                "ts": ts,
                "ms_played": ms,
                "context": lowered("context"),
                "device": lowered("device"),
                "country": country,
            }
        ).filter(keep)
        batch.table = pa.concat_tables([batch.table, table.cast(EVENT_SCHEMA)])
        batch.rejects.sort(key=lambda r: r.line)


_CODES = list(Reason)


def is_csv(source: str) -> bool:
    return source.removesuffix(".gz").endswith(".csv")


_SKIP = object()  # the CSV header: not a row
_BLANK = object()  # a blank line (one the bulk skip left: non-ASCII space, CSV): no row


def _json_record(source: str, n: int, line: bytes) -> Any:
    """The decoded record of a JSON line, a Reject, or _BLANK."""
    try:
        return orjson.loads(line)  # also refuses bytes that are not UTF-8
    except orjson.JSONDecodeError as exc:
        if not line.strip():
            return _BLANK
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return Reject(source, n, Reason.not_utf8, "bytes are not UTF-8", _sample(line))
        return Reject(source, n, Reason.unparseable, str(exc)[:200], _sample(line))


class _CsvRecords:
    """Decodes CSV lines against the file's header line."""

    def __init__(self, source: str):
        self.source = source
        self.header: list[str] | None = None

    def __call__(self, n: int, line: bytes) -> Any:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return Reject(self.source, n, Reason.not_utf8, "bytes are not UTF-8", _sample(line))
        if not text.strip():
            return _BLANK
        try:
            values = next(csv.reader([text]))
        except csv.Error as exc:
            return Reject(self.source, n, Reason.unparseable, str(exc), _sample(text))
        if self.header is None:
            self.header = values
            return _SKIP
        if len(values) != len(self.header):
            detail = f"{len(values)} fields, header has {len(self.header)}"
            return Reject(self.source, n, Reason.unparseable, detail, _sample(text))
        return dict(zip(self.header, values, strict=True))


class _Where(Sequence[tuple[int, bytes]]):
    """(line number, raw line) of each record of a batch."""

    def __init__(self, numbers: np.ndarray, raws: list[bytes]):
        self.numbers, self.raws = numbers, raws

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i):  # type: ignore[override]
        return int(self.numbers[i]), self.raws[i]


def _decode_json(
    source: str, numbers: np.ndarray, lines: list[bytes]
) -> tuple[list[Any], dict[int, Any]]:
    """The records of a run of JSON lines (numbered ``numbers``), aligned with the lines;
    the positions of lines that are no record map to their Reject or _BLANK (their record
    is None)."""
    records: list[Any] = []
    special: dict[int, Any] = {}
    lines_left = iter(lines)
    while True:
        try:  # one C loop over the lines until one fails; it resumes after that line
            records.extend(map(orjson.loads, lines_left))
            return records, special
        except orjson.JSONDecodeError:
            k = len(records)
            special[k] = _json_record(source, int(numbers[k]), lines[k])
            records.append(None)


class _DecodeCsv:
    """Like ``_decode_json`` for the lines of a CSV file, in order, header first."""

    def __init__(self, source: str):
        self.decode = _CsvRecords(source)

    def __call__(self, numbers: np.ndarray, lines: list[bytes]) -> tuple[list[Any], dict[int, Any]]:
        records: list[Any] = []
        special: dict[int, Any] = {}
        for k, (number, line) in enumerate(zip(numbers.tolist(), lines, strict=True)):
            item = self.decode(number, line)
            if item is _SKIP or item is _BLANK or isinstance(item, Reject):
                special[k], item = item, None
            records.append(item)
        return records, special


def _take(items: list[Any], idx: np.ndarray) -> list[Any]:
    if len(idx) == 1:
        return [items[idx[0]]]
    return list(operator.itemgetter(*idx.tolist())(items)) if len(idx) else []


def read_batches(
    stream: IO[bytes], source: str, validator: BatchValidator, batch_rows: int
) -> Iterator[Batch]:
    """Batches of at most ``batch_rows`` input lines from one raw file.

    Blank lines (and a CSV header) are no input lines: blank ones are counted apart
    (``blank_lines``, none of them a reject: they count toward no ``max_bad_share``);
    every other line counts, whether it becomes a row or a reject. Lines are decoded and
    validated a run at a time (the lines of one window of the input, never more than the
    batch has room for): decoded records, the bulk of the memory, are held for one run,
    only its Arrow rows longer. What reading may cost is ``validator.limits``'s."""
    decode = _DecodeCsv(source) if is_csv(source) else functools.partial(_decode_json, source)
    batch = Batch()
    for item in iter_line_blocks(stream, source, validator.limits):
        if isinstance(item, int):
            batch.blank_lines += item
            continue
        if isinstance(item, Reject):
            batch.lines += 1
            batch.rejects.append(item)
            if batch.lines >= batch_rows:
                yield batch
                batch = Batch()
            continue
        numbers, lines = item
        pos = 0
        while pos < len(lines):
            run = lines[pos : pos + batch_rows - batch.lines]
            where, pos = numbers[pos : pos + len(run)], pos + len(run)
            records, special = decode(where, run)
            if special:
                blank = sum(1 for v in special.values() if v is _BLANK)
                skipped = blank + sum(1 for v in special.values() if v is _SKIP)
                batch.blank_lines += blank
                batch.lines += len(run) - skipped
                batch.rejects.extend(v for v in special.values() if isinstance(v, Reject))
                keep = np.delete(np.arange(len(run)), list(special))
                records, run, where = _take(records, keep), _take(run, keep), where[keep]
            else:
                batch.lines += len(run)
            validator.validate(batch, records, _Where(where, run), source)
            if batch.lines >= batch_rows:
                yield batch
                batch = Batch()
    if batch.lines or batch.rejects or batch.blank_lines:
        yield batch
