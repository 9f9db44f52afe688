"""The columnar fast path (Arrow's JSON reader for the lines that pass a screen, orjson
for the others) against the per-line path it replaces: the same raw files give the same
rows, rejects, counts and curated and quarantine bytes, whatever bad lines they hold.

The reader-level tests need no Prefect server; the load-level one does."""

from __future__ import annotations

import gzip
import io
import json
import random
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocks.storage import LocalStorageConfig
from setlist.core.storage import tenant_storage
from setlist.etl import raw_events
from setlist.etl.demo import DEFECTS, iter_raw_lines
from setlist.etl.raw_events import BatchValidator, ReadLimits, read_batches
from setlist.etl.raw_stream import iter_line_blocks

NOW = datetime(2026, 11, 20, tzinfo=UTC)
TENANT = "acme"


def _event(i: int, **changes) -> dict:
    e = {
        "event_id": f"e-{i:06d}",
        "tenant_id": TENANT,
        "user_id": f"user-{i % 97}",
        "track_id": f"track-{i % 31}",
        "artist_id": f"artist-{i % 7}",
        "ts": f"2026-11-{1 + i % 14:02d}T{i % 24:02d}:{i % 60:02d}:00+00:00",
        "ms_played": 1000 + i,
        "context": "playlist",
        "device": "web",
        "country": "SE",
    }
    e.update(changes)
    return {k: v for k, v in e.items() if v is not _DROP}


_DROP = object()


def _line(i: int, **changes) -> bytes:
    return json.dumps(_event(i, **changes), separators=(",", ":")).encode()


def odd_lines(i: int) -> list[bytes]:
    """One line of every kind the validator tells apart (and some it accepts oddly)."""
    e = _event
    j = json.dumps
    lines = [
        # not an object / not JSON / not UTF-8
        b"null",
        b"5",
        b'"text"',
        b"[1, 2]",
        b"true",
        _line(i)[:-7],
        _line(i) + b" " + _line(i + 1),  # two objects on one line
        _line(i) + b" null",
        _line(i)[:-1] + b",}",
        _line(i).replace(b'"device"', b'"d\xff\xfeevice"'),
        _line(i).replace(b"web", b"w\xc3\xa9b"),  # UTF-8, not ASCII
        _line(i).replace(b"web", b"w\xed\xa0\x80b"),  # an encoded surrogate
        _line(i).replace(b'"web"', b'"w\\u00e9b"'),
        _line(i).replace(b'"web"', b'"w\\ud800b"'),
        _line(i).replace(b'"web"', b'"w\\"b"'),
        _line(i).replace(b'"event_id"', b'"event\\u005fid"'),
        _line(i).replace(b'"web"', b"NaN"),
        _line(i).replace(b'"ms_played":', b'"ms_played":NaN,"x":'),
        b"  " + _line(i) + b"  ",
        _line(i) + b"\r",
        _line(i).replace(b",", b" , "),
        # missing fields, and blank ones
        *(j(e(i, **{f: _DROP})).encode() for f in ("event_id", "user_id", "ts", "ms_played")),
        *(j(e(i, **{f: ""})).encode() for f in ("track_id", "ts", "ms_played", "country")),
        *(j(e(i, **{f: None})).encode() for f in ("artist_id", "ms_played", "tenant_id")),
        j(e(i, context=_DROP, device=_DROP, country=_DROP, tenant_id=_DROP)).encode(),
        b"{}",
        # wrong types
        j(e(i, ms_played="a while")).encode(),
        j(e(i, ms_played="1234")).encode(),  # digits: accepted (CSV's way)
        j(e(i, ms_played=" 77 ")).encode(),
        j(e(i, ms_played="")).encode(),
        j(e(i, ms_played=12.0)).encode(),
        j(e(i, ms_played=True)).encode(),
        j(e(i, ms_played=2**63)).encode(),
        j(e(i, ms_played=10**30)).encode(),
        j(e(i, ms_played=-(2**63))).encode(),
        j(e(i, ms_played=[1])).encode(),
        j(e(i, event_id=17)).encode(),
        j(e(i, user_id=True)).encode(),
        j(e(i, country={"code": "SE"})).encode(),
        j(e(i, device=["web"])).encode(),
        j(e(i, ts=1_730_000_000_000)).encode(),  # epoch ms: accepted
        j(e(i, ts=1.73e12)).encode(),
        j(e(i, ts="yesterday")).encode(),
        j(e(i, ts="2026-11-02T10:00:00")).encode(),  # no zone
        j(e(i, ts="2026-11-02T10:00:00Z")).encode(),
        j(e(i, ts="2026-11-02 10:00:00.123456+02:00")).encode(),
        # impossible values
        j(e(i, event_id="has space")).encode(),
        j(e(i, track_id="x" * 129)).encode(),
        j(e(i, artist_id="\u00e9")).encode(),
        j(e(i, ms_played=-1)).encode(),
        j(e(i, ms_played=24 * 3600 * 1000 + 1)).encode(),
        j(e(i, ts="1999-12-31T23:59:59+00:00")).encode(),
        j(e(i, country="Sweden")).encode(),
        j(e(i, country=" se ", context=" Radio ", device="  ")).encode(),  # normalised
        j(e(i, tenant_id="someone-else")).encode(),
        j(e(i, ts="2099-01-01T00:00:00+00:00")).encode(),
        # duplicate ids (the first wins at the merge), extra and repeated fields
        _line(i - 1, ms_played=5),
        j({**e(i), "extra": {"nested": [1, {"a": None}]}}).encode(),
        _line(i)[:-1] + b',"event_id":"other-id"}',
        _line(i)[:-1] + b',"ms_played":"x"}',
        b'{"a":' * 600 + b"1" + b"}" * 600,
        b"\x0b" + _line(i),
        b"x" * 300,  # over the test's max_line
    ]
    return lines


def raw_file(seed: int, events: int = 3000, defect_share: float = 0.05) -> bytes:
    """Clean stretches with the demo's defects, every odd line, and blank lines."""
    rng = random.Random(seed)
    out = []
    demo = iter_raw_lines(TENANT, events=events, defect_share=defect_share, seed=seed)
    for n, (line, _) in enumerate(demo):
        out.append(line)
        if rng.random() < 0.02:
            out.extend(odd_lines(n))
        if rng.random() < 0.005:
            out.extend([b"", b"   ", b"\t"])
    out.extend(odd_lines(10**6))
    return b"\n".join(out) + b"\n"


LIMITS = ReadLimits(max_line=256)


def _read(data: bytes, source: str, fast: bool, batch_rows: int) -> dict:
    validator = BatchValidator(TENANT, NOW, LIMITS, fast_json=fast)
    batches = list(read_batches(io.BytesIO(data), source, validator, batch_rows))
    return {
        "tables": [b.table for b in batches],
        "rejects": [r.as_json() for b in batches for r in b.rejects],
        "lines": [b.lines for b in batches],
        "blank_lines": [b.blank_lines for b in batches],
    }


def _assert_same(fast: dict, slow: dict) -> None:
    assert fast["lines"] == slow["lines"]
    assert fast["blank_lines"] == slow["blank_lines"]
    assert fast["rejects"] == slow["rejects"]
    assert len(fast["tables"]) == len(slow["tables"])
    for a, b in zip(fast["tables"], slow["tables"], strict=True):
        assert a.schema == b.schema
        assert a.equals(b)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few lines, so that a file has many, and set-aside retries happen."""
    monkeypatch.setattr(raw_events, "_FAST_BLOCK", 64)


@pytest.mark.parametrize("batch_rows", [100_000, 700])
def test_fast_path_reads_what_the_per_line_path_reads(small_blocks, batch_rows):
    data = raw_file(3)
    fast = _read(gzip.compress(data, mtime=0), "f.jsonl.gz", True, batch_rows)
    slow = _read(gzip.compress(data, mtime=0), "f.jsonl.gz", False, batch_rows)
    _assert_same(fast, slow)
    reasons = {json.loads(r)["reason"] for r in slow["rejects"]}
    assert reasons >= {*(d for d in DEFECTS if d != "duplicate"), "line_too_long"}
    assert sum(t.num_rows for t in fast["tables"]) > 2000


def test_fast_path_takes_clean_blocks():
    """Clean lines are read by Arrow's JSON reader (none decoded one by one); odd
    lines among them are set aside by the screen."""
    lines = [_line(i) for i in range(500)]
    lines[17] = _line(17, ms_played="a while")
    lines[300] = lines[300].replace(b"web", b"w\xc3\xa9b")
    (run,) = iter_line_blocks(io.BytesIO(b"\n".join(lines) + b"\n"), "e.jsonl")
    read, table = raw_events._fast_rows(run)
    assert sorted(set(range(500)) - set(read.tolist())) == [17, 300]
    assert table is not None and table.num_rows == 498


def test_lines_are_kept_in_the_bytes_they_came_in():
    """A window's lines are cut out of its bytes where they are: with blank lines and an
    over-long line among them, each line still has its own bytes and number, and the
    copy Arrow's reader gets holds the lines alone, a newline after each."""
    data = b"a1\n  \n\nb22\n" + b"x" * 40 + b"\nc333\n\t\nd\n"
    items = list(iter_line_blocks(io.BytesIO(data), "e.jsonl", ReadLimits(max_line=30)))
    first, reject, second, blanks = items
    assert (first.tolist(), first.numbers.tolist()) == ([b"a1", b"b22"], [1, 4])
    assert not first.contiguous()
    assert (reject.line, reject.reason) == (5, "line_too_long")
    assert (second.tolist(), second.numbers.tolist()) == ([b"c333", b"d"], [6, 8])
    assert blanks == 3
    joined, starts = first.joined()
    assert (bytes(joined), starts.tolist()) == (b"a1\nb22\n", [0, 3])
    assert [first[i] for i in range(2)] == first.take(np.arange(2)) == [b"a1", b"b22"]
    clean = next(iter_line_blocks(io.BytesIO(b"p\nqq\nr\n"), "e.jsonl"))
    assert clean.contiguous() and bytes(clean.joined()[0]) == b"p\nqq\nr\n"
    # only whitespace is blank: a line led by a control byte or a space is a line
    odd = b"\r\n\x00x\n \x0b\x0c\t\n {}\n" + b"y\n\n" * 1000
    first, blanks = iter_line_blocks(io.BytesIO(odd), "e.jsonl")
    assert first.tolist()[:3] == [b"\x00x", b" {}", b"y"] and len(first) == 1002
    assert first.numbers[:4].tolist() == [2, 4, 5, 7] and blanks == 1002


def test_switch_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(raw_events.FAST_JSON_ENV, "0")
    assert not BatchValidator(TENANT, NOW).fast_json
    monkeypatch.delenv(raw_events.FAST_JSON_ENV)
    assert BatchValidator(TENANT, NOW).fast_json


_PIECES = [line for line in odd_lines(5) if len(line) < 256] + [_line(i) for i in range(40)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(_PIECES), min_size=1, max_size=150),
    st.integers(min_value=1, max_value=200),
    st.integers(min_value=1, max_value=40),
)
def test_random_mixes_read_the_same(lines, batch_rows, block):
    data = b"\n".join(lines) + b"\n"
    old = raw_events._FAST_BLOCK
    raw_events._FAST_BLOCK = block
    try:
        fast = _read(data, "r.jsonl", True, batch_rows)
    finally:
        raw_events._FAST_BLOCK = old
    _assert_same(fast, _read(data, "r.jsonl", False, batch_rows))


@pytest.mark.server
def test_fast_and_per_line_loads_write_the_same_bytes(prefect_server, tmp_path, monkeypatch):
    """The whole load, fast path on and forced off: byte-identical curated and
    quarantine files, and the same report."""
    from setlist.etl.load import load_new_files

    monkeypatch.setattr(raw_events, "_FAST_BLOCK", 256)
    monkeypatch.setenv("SETLIST_ETL_MAX_LINE", "256")
    files = {f"raw/events-{n}.jsonl.gz": gzip.compress(raw_file(n), mtime=0) for n in range(3)}
    files["raw/plain.jsonl"] = raw_file(7, events=800)
    out = {}
    for fast in (True, False):
        monkeypatch.setenv(raw_events.FAST_JSON_ENV, "1" if fast else "0")
        storage = tenant_storage(TENANT, LocalStorageConfig(root=str(tmp_path / f"s{fast}")))
        for key, data in files.items():
            storage.put_bytes(key, data)
        report = load_new_files(
            storage, TENANT, max_bad_share=0.9, batch_rows=1500, now=NOW, workers=1
        )
        stored = {
            key: storage.get_bytes(key)
            for prefix in ("curated", "quarantine")
            for key in storage.list_keys(prefix)
        }
        out[fast] = report.model_dump(exclude={"seconds", "events_per_s"}), stored
    assert out[True][0] == out[False][0]
    assert sorted(out[True][1]) == sorted(out[False][1])
    for key, data in out[False][1].items():
        assert out[True][1][key] == data, key
    assert out[True][0]["loaded_rows"] > 5000 and out[True][0]["duplicates"] > 0
    assert any(k.startswith("quarantine/") for k in out[True][1])
