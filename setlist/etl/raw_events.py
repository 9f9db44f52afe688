"""Raw listening events: turning raw files into valid rows or rejects.

Raw files are JSON lines or CSV, optionally gzipped. They are read as a stream of lines
(``raw_stream``, with the event schema) in bounded memory, whatever the compression
ratio (gzip is inflated a window at a time): a truncated gzip, or one that inflates past
``ReadLimits``, ends the stream with a reject; a line longer than ``MAX_LINE_BYTES`` is
skipped without being held whole; bytes that are not UTF-8 reject their line. Every row
that can't become a valid event is returned with a reason so the caller can quarantine
and count it; nothing is dropped silently. Blank lines are no input lines: they are
counted apart (``Batch.blank_lines``), skipped in bulk, and count toward no
``max_bad_share``; a mostly blank file is one reject.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools
import operator
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from setlist.etl.raw_stream import (  # noqa: F401 - LINES_WINDOW, MAX_LINE_BYTES: re-exported
    EARLIEST,
    EVENT_SCHEMA,
    FAST_JSON_ENV,
    FUTURE_TOLERANCE,
    LIMITS,
    LINES_WINDOW,
    MAX_LINE_BYTES,
    MAX_MS_PLAYED,
    OPTIONAL_TEXT,
    REQUIRED_TEXT,
    Batch,
    Lines,
    ReadLimits,
    Reason,
    Reject,
    _sample,
    iter_line_blocks,
)


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


def _offsets_and_bytes(values: pa.Array) -> tuple[np.ndarray, np.ndarray, int]:
    """(offsets, the values' bytes, where those bytes start) of a string array."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    n = len(values)
    wide = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    offset_type = np.dtype(np.int64 if wide else np.int32)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(
        offsets_buf, offset_type, n + 1, values.offset * offset_type.itemsize
    ).astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    if data_buf is None or end <= start:
        return offsets, np.zeros(0, np.uint8), start
    return offsets, np.frombuffer(data_buf, np.uint8, end - start, start), start


def _outside(values: pa.Array, shortest: int, longest: int, low: int, high: int) -> np.ndarray:
    """Where a string is not null and not ``shortest`` to ``longest`` bytes, each from
    ``low`` to ``high``: a regex like ``^[\\x21-\\x7e]{1,128}$`` read from the array's
    offsets and bytes (a compare per byte), far faster than string kernels."""
    if not len(values):
        return np.zeros(0, dtype=bool)
    offsets, data, start = _offsets_and_bytes(values)
    length = np.diff(offsets)
    bad = (length < shortest) | (length > longest)
    # bytes outside low..high (below low the subtraction wraps round to above high - low)
    odd = np.flatnonzero((data - np.uint8(low)) > np.uint8(high - low))
    if len(odd):
        bad[np.searchsorted(offsets, odd + start, side="right") - 1] = True
    if values.null_count:
        bad &= values.is_valid().to_numpy(zero_copy_only=False)
    return bad


def _not_id(values: pa.Array) -> np.ndarray:
    """Where a string is not null and not 1 to 128 characters, each printable ASCII but
    space (0x21 to 0x7E), as the regex ``^[\\x21-\\x7e]{1,128}$`` says."""
    return _outside(values, 1, 128, 0x21, 0x7E)


def _not_country(values: pa.Array) -> np.ndarray:
    """Where an (upper-cased) string is not null and no ISO 3166 alpha-2 code: the regex
    ``^[A-Z]{2}$``, two bytes from A to Z."""
    return _outside(values, 2, 2, ord("A"), ord("Z"))


def _normalized(values: pa.Array, upper: bool = False) -> pa.Array:
    """Trimmed of whitespace, lower- (or upper-) cased, empty as null. The ASCII kernels
    (several times quicker) where every byte is ASCII and none of 0x1C..0x1F, which the
    Unicode trim takes for whitespace and the ASCII one does not: the same result."""
    _, data, _ = _offsets_and_bytes(values)
    plain = not len(data) or (data.max() < 0x80 and not ((data >= 0x1C) & (data <= 0x1F)).any())
    if plain:
        trim, case = pc.ascii_trim_whitespace, pc.ascii_upper if upper else pc.ascii_lower
    else:
        trim, case = pc.utf8_trim_whitespace, pc.utf8_upper if upper else pc.utf8_lower
    v = case(trim(values))
    return pc.if_else(pc.equal(v, ""), pa.scalar(None, pa.string()), v)


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
    """Where a string array is null or empty (read from its offsets)."""
    if not len(values):
        return np.zeros(0, dtype=bool)
    blank = np.diff(_offsets_and_bytes(values)[0]) == 0
    if values.null_count:
        blank |= ~values.is_valid().to_numpy(zero_copy_only=False)
    return blank


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


@dataclass
class _Columns:
    """The values of a run of records, column by column, before the checks: what the
    checks need of each row, whichever way the records were read. ``ts`` is a string
    array, or the raw values (when some record has a ts that is no string nor null)."""

    text: dict[str, pa.Array]  # _TEXT_FIELDS
    ts: pa.Array | list[Any]
    ms: pa.Array
    not_object: np.ndarray | None
    missing: dict[str, np.ndarray]  # REQUIRED_TEXT, ts, ms_played
    wrong: dict[str, np.ndarray | None]  # _TEXT_FIELDS, ms_played

    def __len__(self) -> int:
        return len(self.ms)


def _record_columns(records: list[Any]) -> _Columns:
    """The columns of decoded records."""
    n = len(records)
    columns = _text_columns(records)
    wrong: dict[str, np.ndarray | None] = {}
    if columns is None:  # some record or value is not what the one-pass read takes
        dicts = [r if type(r) is dict else {} for r in records]
        not_object = np.array([type(r) is not dict for r in records], dtype=bool)
        col = {name: [d.get(name) for d in dicts] for name in _FIELDS}
        text = {}
        for name in _TEXT_FIELDS:
            text[name], bad = _text(col[name])
            wrong[name] = None if bad is None else np.asarray(bad, dtype=bool)
        ms, wrong["ms_played"] = _ints(col["ms_played"])
        missing = {
            name: np.array([v is None or v == "" for v in col[name]], dtype=bool)
            for name in (*REQUIRED_TEXT, "ts", "ms_played")
        }
        return _Columns(text, col["ts"], ms, not_object, missing, wrong)
    ts = columns.pop("ts")
    ms_values = list(map(dict.get, records, itertools.repeat("ms_played", n)))
    ms, bad_ms = _ints(ms_values)
    wrong["ms_played"] = bad_ms
    missing = {name: _blank(columns[name]) for name in REQUIRED_TEXT}
    missing["ts"] = _blank(ts)
    # null where the value was None or "" (unflagged) or anything else (flagged)
    ms_null = ms.is_null().to_numpy(zero_copy_only=False)
    missing["ms_played"] = ms_null if bad_ms is None else ms_null & ~bad_ms
    return _Columns(columns, ts, ms, None, missing, wrong)


def _table_columns(table: pa.Table) -> _Columns:
    """The columns of rows the Arrow JSON reader read (``_FAST_SCHEMA``: every text
    field and ts a string or null, ms_played an int64 or null)."""
    arrays = {name: table[name].combine_chunks() for name in table.column_names}
    text = {name: arrays[name] for name in _TEXT_FIELDS}
    ts, ms = arrays["ts"], arrays["ms_played"]
    missing = {name: _blank(text[name]) for name in REQUIRED_TEXT}
    missing["ts"] = _blank(ts)
    missing["ms_played"] = ms.is_null().to_numpy(zero_copy_only=False)
    return _Columns(text, ts, ms, None, missing, {})


def _concat_columns(a: _Columns, b: _Columns) -> _Columns:
    """The rows of ``a``, then those of ``b``."""
    na, nb = len(a), len(b)

    def flags(x: np.ndarray | None, y: np.ndarray | None) -> np.ndarray | None:
        if x is None and y is None:
            return None
        return np.concatenate(
            [np.zeros(na, bool) if x is None else x, np.zeros(nb, bool) if y is None else y]
        )

    if isinstance(a.ts, pa.Array) and isinstance(b.ts, pa.Array):
        ts: pa.Array | list[Any] = pa.concat_arrays([a.ts, b.ts])
    else:  # as the raw values (what ``_timestamps`` does with them depends on them all)
        ts = [
            *(a.ts.to_pylist() if isinstance(a.ts, pa.Array) else a.ts),
            *(b.ts.to_pylist() if isinstance(b.ts, pa.Array) else b.ts),
        ]
    return _Columns(
        text={name: pa.concat_arrays([a.text[name], b.text[name]]) for name in _TEXT_FIELDS},
        ts=ts,
        ms=pa.concat_arrays([a.ms, b.ms]),
        not_object=flags(a.not_object, b.not_object),
        missing={name: flags(a.missing[name], b.missing[name]) for name in a.missing},
        wrong={
            name: flags(a.wrong.get(name), b.wrong.get(name))
            for name in (*_TEXT_FIELDS, "ms_played")
        },
    )


class BatchValidator:
    """Validates decoded records a run at a time, column by column.

    Each row gets the reason of the first check it fails, in this order: not an object,
    missing field, wrong type, impossible value, foreign tenant, future timestamp.

    ``fast_json`` (default: on unless ``SETLIST_ETL_FAST_JSON=0``): read the JSON lines
    that pass a screen with Arrow's JSON reader, straight into columns, and decode only
    the others one by one (``read_json_run``); the rows, rejects and counts are the same
    either way.
    """

    def __init__(
        self,
        tenant_id: str,
        now: datetime,
        limits: ReadLimits = LIMITS,
        fast_json: bool | None = None,
    ):
        self.tenant_id = tenant_id
        self.latest = now + FUTURE_TOLERANCE
        self.limits = limits  # how much reading a raw file may cost
        if fast_json is None:
            fast_json = os.environ.get(FAST_JSON_ENV, "1") != "0"
        self.fast_json = fast_json

    def validate(
        self,
        batch: Batch,
        records: list[Any],
        where: Sequence[tuple[int, bytes | str]],
        source: str,
    ) -> None:
        """Adds the valid rows of ``records`` to ``batch.table``, the others to its
        rejects; ``where[i]`` is (line number, raw line) of ``records[i]``."""
        if records:
            self.check(batch, _record_columns(records), where, source)

    def check(
        self,
        batch: Batch,
        cols: _Columns,
        where: Sequence[tuple[int, bytes | str]],
        source: str,
        positions: np.ndarray | None = None,
    ) -> None:
        """``validate`` of rows already in columns; with ``positions`` (each row's place
        in the input), the valid rows are added in the order of their places."""
        n = len(cols)
        if not n:
            return
        reason = np.zeros(n, dtype=np.int8)  # 0 = valid, else index into _CODES + 1
        detail = np.full(n, "", dtype=object)

        def flag(mask, code: Reason, text: str) -> None:
            m = np.asarray(mask, dtype=bool) & (reason == 0)
            reason[m] = _CODES.index(code) + 1
            detail[m] = text

        arrays = cols.text
        if cols.not_object is not None:
            flag(cols.not_object, Reason.wrong_type, "record is not an object")
        for name in (*REQUIRED_TEXT, "ts", "ms_played"):
            flag(cols.missing[name], Reason.missing_field, name)
        for name in (*_TEXT_FIELDS, "ms_played"):
            bad = cols.wrong.get(name)
            if bad is not None:
                flag(bad, Reason.wrong_type, f"{name} has the wrong type")
        ts = _timestamps(cols.ts)
        flag(
            ts.is_null().to_numpy(zero_copy_only=False),
            Reason.wrong_type,
            "ts is not an ISO-8601 time with zone or epoch ms",
        )
        for name in REQUIRED_TEXT:
            flag(_not_id(arrays[name]), Reason.impossible_value, f"{name} is not a printable id")
        ms = cols.ms
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
        country = _normalized(arrays["country"], upper=True)
        flag(
            _not_country(country),
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

        table = pa.table(
            {
                "event_id": arrays["event_id"],
                "tenant_id": pa.repeat(pa.scalar(self.tenant_id, pa.string()), n),
                "user_id": arrays["user_id"],
                "track_id": arrays["track_id"],
                "artist_id": arrays["artist_id"],
                "ts": ts,
                "ms_played": ms,
                "context": _normalized(arrays["context"]),
                "device": _normalized(arrays["device"]),
                "country": country,
            }
        ).filter(keep)
        if positions is not None:  # back to input order
            placed = positions[reason == 0]
            if len(placed) > 1 and (np.diff(placed) < 0).any():
                table = table.take(np.argsort(placed, kind="stable"))
        batch.table = pa.concat_tables([batch.table, table.cast(EVENT_SCHEMA)])


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

    def __init__(self, numbers: np.ndarray, raws: Sequence[bytes]):
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


# The columns the Arrow JSON reader reads a run of JSON lines into. A line it reads is
# one object whose fields are all of these (no other, none twice), each a string, or for
# ms_played an integer in int64, or null; any other line makes it fail.
_FAST_SCHEMA = pa.schema(
    [*((name, pa.string()) for name in (*_TEXT_FIELDS, "ts")), ("ms_played", pa.int64())]
)
_FAST_PARSE = pa_json.ParseOptions(
    explicit_schema=_FAST_SCHEMA, unexpected_field_behavior="error", newlines_in_values=False
)
_FAST_BLOCK = 16_384  # lines read by one call of the Arrow JSON reader
_FAST_RETRIES = 3  # lines of a block set aside (from the reader's error) before giving up
_ERROR_ROW = re.compile(r" in row (\d+)")
# Lines that would fail the reader, found in C over the run's bytes: a (quoted) string
# where ms_played takes an integer, as CSV-minded producers write it.
_SUSPECT = b'"ms_played":"'


def _screen(data: bytearray, lens: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which lines (``data``: each line and a newline; ``ends``: where each newline is)
    go to ``orjson`` rather than Arrow's JSON reader: any that is not ``{...}``, holds a
    byte outside ASCII or a backslash (escapes: the two decoders differ on lone
    surrogates), or a quoted ms_played. (Arrow's reader would take a bare ``null`` line
    as a row, or crash on one: it never sees such a line.)"""
    buf = np.frombuffer(data, np.uint8)
    bad = (lens < 2) | (buf[ends - lens] != ord("{")) | (buf[np.maximum(ends - 1, 0)] != ord("}"))
    odd: list[np.ndarray] = []
    if not data.isascii():  # (a line's highest byte: one pass, no positions to look up)
        bad |= np.maximum.reduceat(buf, ends - lens) >= 0x80
    if b"\\" in data:
        odd.append(np.flatnonzero(buf == ord("\\")))
    found, at = [], data.find(_SUSPECT)
    while at >= 0:
        found.append(at)
        at = data.find(_SUSPECT, at + 1)
    if found:
        odd.append(np.array(found, np.int64))
    for positions in odd:
        bad[np.searchsorted(ends, positions)] = True
    return bad


def _read_block(block: pa.Buffer, rows: int) -> pa.Table | int | None:
    """The rows of the lines in ``block`` as Arrow's JSON reader reads them (``rows``
    of them, one a line, or None); or the index of a row it names in its error."""
    try:
        table = pa_json.read_json(
            pa.BufferReader(block),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=block.size + 1),
            parse_options=_FAST_PARSE,
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        row = _ERROR_ROW.search(str(exc))
        return int(row.group(1)) if row and int(row.group(1)) < rows else None
    return table if table.num_rows == rows else None


def _fast_rows(lines: Lines) -> tuple[np.ndarray, pa.Table | None]:
    """(the indices of the lines Arrow's JSON reader read, their rows in that order).

    The run's bytes are copied once; the lines it must not see are overwritten with
    spaces (a blank line is no row to it), and it reads ``_FAST_BLOCK`` lines at a time.
    A line it fails on, where its error names the row, is blanked too and the block
    read again (up to ``_FAST_RETRIES`` times); a block that still fails is left to
    orjson whole."""
    n = len(lines)
    data, starts = lines.joined()
    lens = lines.lens
    ends = starts + lens  # the newline after each line
    bad = _screen(data, lens, ends)
    buf = np.frombuffer(data, np.uint8)
    for i in np.flatnonzero(bad).tolist():
        buf[starts[i] : ends[i]] = ord(" ")
    whole = pa.py_buffer(data)
    read, tables = [], []
    for first in range(0, n, _FAST_BLOCK):
        last = min(first + _FAST_BLOCK, n)
        idx = first + np.flatnonzero(~bad[first:last])
        block = whole.slice(int(starts[first]), int(ends[last - 1] - starts[first]))
        got: pa.Table | int | None = None
        for _ in range(_FAST_RETRIES + 1):
            if not len(idx):
                break
            got = _read_block(block, len(idx))
            if not isinstance(got, int):
                break
            i = int(idx[got])
            buf[starts[i] : ends[i]] = ord(" ")
            idx = np.delete(idx, got)
        if isinstance(got, pa.Table):
            read.append(idx)
            tables.append(got)
    if not tables:
        return np.zeros(0, np.int64), None
    return np.concatenate(read), pa.concat_tables(tables)


class _Placed(Sequence[tuple[int, bytes]]):
    """``where`` of rows in another order: row i is ``where[positions[i]]``."""

    def __init__(self, where: Sequence[tuple[int, bytes]], positions: np.ndarray):
        self.where, self.positions = where, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):  # type: ignore[override]
        return self.where[int(self.positions[i])]


def _json_run(batch: Batch, validator: BatchValidator, source: str, run: Lines) -> None:
    """A run of JSON lines into ``batch``, as ``read_batches`` does with ``_decode_json``
    and ``validate``: the lines Arrow's JSON reader takes are read into columns there,
    only the others decoded one by one, then all of them checked together."""
    fast, table = _fast_rows(run)
    where = run.numbers
    if table is None:
        decode = functools.partial(_decode_json, source)
        _decoded_run(batch, validator, source, where, run.tolist(), decode)
        return
    slow = np.delete(np.arange(len(run)), fast)
    records, special = _decode_json(source, where[slow], run.take(slow))
    cols = _table_columns(table)
    batch.lines += len(run)
    if special:
        blank = sum(1 for v in special.values() if v is _BLANK)
        batch.blank_lines += blank
        batch.lines -= blank
        batch.rejects.extend(v for v in special.values() if isinstance(v, Reject))
        keep = np.delete(np.arange(len(slow)), list(special))
        records, slow = _take(records, keep), slow[keep]
    positions = fast
    if len(slow):
        cols = _concat_columns(cols, _record_columns(records))
        positions = np.concatenate([fast, slow])
    validator.check(batch, cols, _Placed(_Where(where, run), positions), source, positions)


def _decoded_run(
    batch: Batch,
    validator: BatchValidator,
    source: str,
    where: np.ndarray,
    run: list[bytes],
    decode: Any,
) -> None:
    """A run of lines into ``batch``: each decoded (``decode``), then validated."""
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


def _in_line_order(batch: Batch) -> Batch:
    """The batch with its rejects in line order (each run adds the lines it could not
    decode before those that failed a check)."""
    batch.rejects.sort(key=operator.attrgetter("line"))
    return batch


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
    fast = validator.fast_json and not is_csv(source)
    batch = Batch()
    for item in iter_line_blocks(stream, source, validator.limits):
        if isinstance(item, int):
            batch.blank_lines += item
            continue
        if isinstance(item, Reject):
            batch.lines += 1
            batch.rejects.append(item)
            if batch.lines >= batch_rows:
                yield _in_line_order(batch)
                batch = Batch()
            continue
        pos = 0
        while pos < len(item):
            run = item.select(slice(pos, pos + batch_rows - batch.lines))
            pos += len(run)
            if fast:
                _json_run(batch, validator, source, run)
            else:
                _decoded_run(batch, validator, source, run.numbers, run.tolist(), decode)
            if batch.lines >= batch_rows:
                yield _in_line_order(batch)
                batch = Batch()
    if batch.lines or batch.rejects or batch.blank_lines:
        yield _in_line_order(batch)
