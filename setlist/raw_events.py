"""Raw listening events: the schema, and turning raw files into valid rows or rejects.

Raw files are JSON lines or CSV, optionally gzipped. They are read as a stream of
lines in bounded memory: a truncated gzip ends the stream with a reject, a line longer
than ``MAX_LINE_BYTES`` is skipped without being held whole, bytes that are not UTF-8
reject their line. Every row that can't become a valid event is returned with a reason
so the caller can quarantine and count it; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import IO, Any

import orjson
import pyarrow as pa

MAX_LINE_BYTES = 1 << 20  # 1 MiB: a real event is ~300 bytes
READ_CHUNK = 1 << 20
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
REQUIRED_TEXT = ("event_id", "user_id", "track_id", "artist_id")
OPTIONAL_TEXT = ("context", "device")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


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
    """Valid rows as columns, plus the rejects of the same stretch of input."""

    columns: dict[str, list[Any]] = field(
        default_factory=lambda: {f.name: [] for f in EVENT_SCHEMA}
    )
    rejects: list[Reject] = field(default_factory=list)
    lines: int = 0

    @property
    def rows(self) -> int:
        return len(self.columns["event_id"])

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.columns, schema=EVENT_SCHEMA)


def _sample(raw: bytes | str, limit: int = 512) -> str:
    text = raw if isinstance(raw, str) else raw[:limit].decode("utf-8", "replace")
    return text[:limit]


class TruncatedStream(Exception):
    pass


def _chunks(stream: IO[bytes], gz: bool) -> Iterator[bytes]:
    """Raw or gunzipped bytes in chunks; a cut-off gzip yields all it has, then raises."""
    if not gz:
        while chunk := stream.read(READ_CHUNK):
            yield chunk
        return
    d = zlib.decompressobj(wbits=31)
    fed = False  # has the current gzip member seen any input?
    while data := stream.read(READ_CHUNK):
        while data:
            fed = True
            try:
                out = d.decompress(data)
            except zlib.error as exc:
                raise TruncatedStream(f"corrupt gzip: {exc}") from None
            if out:
                yield out
            if d.eof:  # a member ended; concatenated gzip members may follow
                data = d.unused_data
                d = zlib.decompressobj(wbits=31)
                fed = False
            else:
                data = b""
    if fed and not d.eof:
        if tail := d.flush():
            yield tail
        raise TruncatedStream("gzip stream ends before its end marker")


def iter_lines(stream: IO[bytes], source: str) -> Iterator[tuple[int, bytes | Reject]]:
    """(line number, bytes without newline) or (line number, Reject), in bounded memory."""
    buf = b""
    n = 0
    skipping = False  # inside an over-long line: discard until its newline
    chunks = _chunks(stream, source.endswith(".gz"))
    while True:
        try:
            chunk = next(chunks, b"")
        except TruncatedStream as exc:
            if buf and not skipping:
                n += 1
                yield n, Reject(source, n, Reason.truncated_file, "last line cut off", _sample(buf))
            n += 1
            yield n, Reject(source, n, Reason.truncated_file, str(exc))
            return
        if not chunk:
            break
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if skipping:
                skipping = False
            else:
                n += 1
                line = buf[start:nl]
                if len(line) > MAX_LINE_BYTES:
                    yield (
                        n,
                        Reject(
                            source,
                            n,
                            Reason.line_too_long,
                            f"{len(line)} bytes > {MAX_LINE_BYTES}",
                            _sample(line),
                        ),
                    )
                else:
                    yield n, line
            start = nl + 1
        buf = buf[start:]
        if len(buf) > MAX_LINE_BYTES and not skipping:
            n += 1
            yield (
                n,
                Reject(source, n, Reason.line_too_long, f"> {MAX_LINE_BYTES} bytes", _sample(buf)),
            )
            skipping = True
            buf = b""
        elif skipping:
            buf = b""
    if buf and not skipping:
        n += 1
        yield n, buf


def _parse_ts(value: Any) -> datetime:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value / 1000, tz=UTC)  # epoch milliseconds
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return ts.astimezone(UTC)


class RowValidator:
    """Checks one decoded record and appends it to a batch, or records why not."""

    def __init__(self, tenant_id: str, now: datetime):
        self.tenant_id = tenant_id
        self.latest = now + FUTURE_TOLERANCE

    def add(self, batch: Batch, rec: Any, source: str, line: int, raw: bytes | str) -> None:
        def reject(reason: Reason, detail: str) -> None:
            batch.rejects.append(Reject(source, line, reason, detail, _sample(raw)))

        if not isinstance(rec, dict):
            return reject(Reason.wrong_type, "record is not an object")
        for name in REQUIRED_TEXT:
            v = rec.get(name)
            if v is None or v == "":
                return reject(Reason.missing_field, name)
            if not isinstance(v, str):
                return reject(Reason.wrong_type, f"{name} is {type(v).__name__}, not text")
            if not _ID.match(v):
                return reject(Reason.impossible_value, f"{name} is not a printable id")
        tenant = rec.get("tenant_id")
        if tenant is not None and tenant != self.tenant_id:
            return reject(Reason.foreign_tenant, f"tenant_id {str(tenant)[:64]!r}")
        if rec.get("ts") in (None, ""):
            return reject(Reason.missing_field, "ts")
        try:
            ts = _parse_ts(rec["ts"])
        except (TypeError, ValueError, OverflowError, OSError):
            return reject(Reason.wrong_type, "ts is not an ISO-8601 time with zone or epoch ms")
        if ts > self.latest:
            return reject(Reason.future_timestamp, ts.isoformat())
        if ts < EARLIEST:
            return reject(Reason.impossible_value, f"ts {ts.isoformat()} before 2000")
        ms = rec.get("ms_played")
        if ms is None or ms == "":
            return reject(Reason.missing_field, "ms_played")
        if isinstance(ms, str) and ms.strip().lstrip("-").isdigit():
            ms = int(ms)
        if isinstance(ms, bool) or not isinstance(ms, int):
            return reject(Reason.wrong_type, "ms_played is not an integer")
        if not 0 <= ms <= MAX_MS_PLAYED:
            return reject(Reason.impossible_value, f"ms_played {ms} outside 0..{MAX_MS_PLAYED}")
        opt = {}
        for name in OPTIONAL_TEXT:
            v = rec.get(name)
            if v is not None and not isinstance(v, str):
                return reject(Reason.wrong_type, f"{name} is not text")
            opt[name] = v.strip().lower() or None if v else None
        country = rec.get("country")
        if country not in (None, ""):
            if not isinstance(country, str) or not _COUNTRY.match(country.strip().upper()):
                return reject(Reason.impossible_value, "country is not an ISO 3166 alpha-2 code")
            country = country.strip().upper()
        else:
            country = None
        cols = batch.columns
        cols["event_id"].append(rec["event_id"])
        cols["tenant_id"].append(self.tenant_id)
        cols["user_id"].append(rec["user_id"])
        cols["track_id"].append(rec["track_id"])
        cols["artist_id"].append(rec["artist_id"])
        cols["ts"].append(ts)
        cols["ms_played"].append(ms)
        cols["context"].append(opt["context"])
        cols["device"].append(opt["device"])
        cols["country"].append(country)
        return None


def is_csv(source: str) -> bool:
    return source.removesuffix(".gz").endswith(".csv")


def read_batches(
    stream: IO[bytes], source: str, validator: RowValidator, batch_rows: int
) -> Iterator[Batch]:
    """Batches of at most ``batch_rows`` input lines from one raw file."""
    lines = iter_lines(stream, source)
    header: list[str] | None = None
    batch = Batch()
    for n, item in lines:
        if isinstance(item, Reject):
            batch.rejects.append(item)
            batch.lines += 1
        else:
            batch.lines += 1
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError:
                batch.rejects.append(
                    Reject(source, n, Reason.not_utf8, "bytes are not UTF-8", _sample(item))
                )
                text = None
            if text is not None and text.strip():
                if is_csv(source):
                    if header is None:
                        header = next(csv.reader([text]))
                        batch.lines -= 1  # the header is not a row
                    else:
                        try:
                            values = next(csv.reader(io.StringIO(text)))
                        except csv.Error as exc:
                            batch.rejects.append(
                                Reject(source, n, Reason.unparseable, str(exc), _sample(text))
                            )
                        else:
                            if len(values) != len(header):
                                batch.rejects.append(
                                    Reject(
                                        source,
                                        n,
                                        Reason.unparseable,
                                        f"{len(values)} fields, header has {len(header)}",
                                        _sample(text),
                                    )
                                )
                            else:
                                validator.add(
                                    batch, dict(zip(header, values, strict=True)), source, n, text
                                )
                else:
                    try:
                        rec = orjson.loads(item)
                    except orjson.JSONDecodeError as exc:
                        batch.rejects.append(
                            Reject(source, n, Reason.unparseable, str(exc)[:200], _sample(item))
                        )
                    else:
                        validator.add(batch, rec, source, n, item)
            elif text is not None:
                batch.lines -= 1  # blank lines are not rows
        if batch.lines >= batch_rows:
            yield batch
            batch = Batch()
    if batch.lines or batch.rejects:
        yield batch
