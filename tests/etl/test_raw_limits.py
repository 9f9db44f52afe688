"""Reading a raw file costs memory bounded by a fixed window and time bounded by its
bytes, whatever it holds: gzip that inflates a thousandfold, a gigabyte line, runs of
blank lines. Unit tests of the reader: no Prefect server (pytest-timeout bounds them; no
test asserts a time)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from setlist.etl.demo import iter_raw_lines
from setlist.etl.raw_events import LINES_WINDOW, BatchValidator, ReadLimits, read_batches
from tests.etl.gzip_bombs import gz_repeat

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 20, tzinfo=UTC)
GOOD = (
    b'{"event_id":"e%d","user_id":"u","track_id":"t","artist_id":"a",'
    b'"ts":"2026-11-02T10:00:00+00:00","ms_played":1000}'
)
NO_RATIO_CAP = {"max_ratio": 10**9}


def _read(data: bytes, source: str, limits: ReadLimits | None = None, batch_rows: int = 100_000):
    validator = BatchValidator("acme", NOW, limits or ReadLimits())
    batches = list(read_batches(io.BytesIO(data), source, validator, batch_rows))
    return {
        "ids": [i for b in batches for i in b.table["event_id"].to_pylist()],
        "rejects": [(r.line, r.reason.value, r.detail, r.raw) for b in batches for r in b.rejects],
        "lines": sum(b.lines for b in batches),
        "blank_lines": sum(b.blank_lines for b in batches),
    }


def _reasons(out) -> list[tuple[int, str]]:
    return [(line, reason) for line, reason, *_ in out["rejects"]]


# Reads a file in a fresh interpreter: the growth of its peak RSS over the read is what
# the read cost, with nothing of the test process's own in it.
_FRESH = """
import io, json, resource, sys
from datetime import UTC, datetime
from setlist.etl.raw_events import BatchValidator, ReadLimits, read_batches
path, source, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = open(path, "rb").read()
validator = BatchValidator("acme", datetime(2026, 11, 20, tzinfo=UTC), ReadLimits(**limits))
list(read_batches(io.BytesIO(b"{}"), source, validator, 10))  # the first read's one-offs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batches = list(read_batches(io.BytesIO(data), source, validator, 100_000))
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({
    "grew_mib": grew / 1024,
    "rejects": [[r.line, r.reason.value] for b in batches for r in b.rejects],
    "rows": sum(b.rows for b in batches),
    "lines": sum(b.lines for b in batches),
    "blank_lines": sum(b.blank_lines for b in batches),
}))
"""


def _read_in_a_fresh_process(path: Path, source: str, limits: dict) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _FRESH, str(path), source, json.dumps(limits)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("limits", [{}, NO_RATIO_CAP], ids=["default", "no-ratio-cap"])
def test_a_gigabyte_line_in_a_megabyte_gzip_is_a_reject_in_bounded_memory(tmp_path, limits):
    """1 GiB of one line, then a good line, in ~1 MB of gzip: the line is a reject, read
    a window at a time and never held; the ratio cap ends the file early, and without it
    the whole gigabyte streams past and the good line after it still loads."""
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gz_repeat(b"x" * (1 << 20), 1024, tail=b"\n" + GOOD % 1 + b"\n"))
    assert bomb.stat().st_size < 2 << 20
    out = _read_in_a_fresh_process(bomb, "raw/bomb.jsonl.gz", limits)
    assert out["grew_mib"] < 200, out
    if limits:
        assert out["rejects"] == [[1, "line_too_long"]] and out["rows"] == 1
    else:
        assert out["rejects"] == [[1, "line_too_long"], [2, "ratio_too_high"]]
        assert out["rows"] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("limits", [{}, NO_RATIO_CAP], ids=["default", "no-ratio-cap"])
def test_half_a_gigabyte_of_newlines_is_counted_in_bulk(tmp_path, limits):
    """512 MiB of newlines (~0.5 MB of gzip) are blank lines counted a window at a time,
    not a line at a time: no lines, no per-line rejects. The ratio cap ends the file after
    a few windows; without it, all of them are counted and the file is one mostly_blank
    reject."""
    bomb = tmp_path / "newlines.jsonl.gz"
    bomb.write_bytes(gz_repeat(b"\n" * (1 << 20), 512))
    out = _read_in_a_fresh_process(bomb, "raw/newlines.jsonl.gz", limits)
    assert out["grew_mib"] < 200, out
    assert out["lines"] == 1
    if limits:
        assert out["blank_lines"] == 512 << 20
        assert out["rejects"] == [[(512 << 20) + 1, "mostly_blank"]]
    else:
        assert 8 << 20 <= out["blank_lines"] < 32 << 20  # the cap trips past 16 MiB
        assert out["rejects"] == [[out["blank_lines"] + 1, "ratio_too_high"]]


def test_a_ratio_bomb_of_valid_lines_ends_with_one_reject():
    """The same valid line over and over (~1000:1): the lines before a cap trips load,
    the rest of the file is one reject; a real file's ratio trips nothing."""
    line = GOOD % 7 + b"\n"
    bomb = gz_repeat(line * 1000, (256 << 20) // (1000 * len(line)))
    out = _read(bomb, "raw/same.jsonl.gz")
    assert _reasons(out)[-1:] == [(out["lines"], "ratio_too_high")]
    assert len(out["rejects"]) == 1 and out["ids"] == ["e7"] * (out["lines"] - 1)
    assert 8 << 20 <= out["lines"] * len(line) < 32 << 20  # the cap trips past 16 MiB

    capped = ReadLimits(max_inflated=24 << 20, **NO_RATIO_CAP)
    out = _read(bomb, "raw/same.jsonl.gz", capped)
    assert _reasons(out)[-1:] == [(out["lines"], "inflated_too_large")]
    assert 0 < (out["lines"] - 1) * len(line) <= 24 << 20  # rows before the reject

    lines = [ln for ln, *_ in iter_raw_lines("acme", events=20_000, defect_share=0, seed=2)]
    real = gzip.compress(b"\n".join(lines), 9)  # ~10:1
    strict = ReadLimits(ratio_after=0, max_ratio=30)
    assert _read(real, "raw/real.jsonl.gz", strict)["lines"] == 20_000
    stricter = ReadLimits(ratio_after=0, max_ratio=3)
    assert _reasons(_read(real, "raw/real.jsonl.gz", stricter)) == [(1, "ratio_too_high")]


def test_concatenated_gzip_members_read_as_one_file():
    """Members cut anywhere (mid-line too, one of them empty) read as the one stream they
    make: the same rows, rejects and counts as the plain file and as one member."""
    lines = [ln for ln, *_ in iter_raw_lines("acme", events=40_000, defect_share=0.05, seed=4)]
    data = b"\n".join(lines) + b"\n"
    assert len(data) > 2 * LINES_WINDOW
    plain = _read(data, "raw/m.jsonl")
    assert plain["lines"] == 40_000 and plain["rejects"] and plain["ids"]
    cuts = [0, 1_000, len(data) // 2 + 17, len(data) // 2 + 17, len(data) - 1, len(data)]
    members = b"".join(gzip.compress(data[a:b], 1) for a, b in itertools.pairwise(cuts))
    for gz in (gzip.compress(data, 1), members):
        assert _read(gz, "raw/m.jsonl.gz") == plain
        assert _read(gz, "raw/m.jsonl.gz", batch_rows=777) == plain


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    ("size", "limits"),
    [(2 << 20, ReadLimits()), (9 << 20, ReadLimits()), (300, ReadLimits(max_line=200))],
    ids=["in-a-window", "across-windows", "small-cap"],
)
def test_a_line_over_the_cap_between_good_lines(gz, size, limits):
    """The good lines around a line over ``max_line`` load; the long one is a reject of
    its own, whether it lies in one window or spans many."""
    long = b'{"event_id":"' + b"y" * (size - 16) + b'"}'
    lines = [GOOD % 1, GOOD % 2, long, GOOD % 3, b"", GOOD % 4]
    data = b"\n".join(lines)
    out = _read(gzip.compress(data, 1) if gz else data, "raw/l.jsonl" + ".gz" * gz, limits)
    assert out["ids"] == ["e1", "e2", "e3", "e4"]
    assert _reasons(out) == [(3, "line_too_long")]
    assert out["lines"] == 5 and out["blank_lines"] == 1


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_blank_lines_are_counted_apart_and_a_mostly_blank_file_is_one_reject(gz):
    """Blank lines (any ASCII whitespace) are no lines and no rejects, whatever the batch
    size, and the lines after them keep their numbers; past ``max_blank_lines`` blank
    lines, more than the others, the file is one mostly_blank reject."""

    def read(data: bytes, batch_rows: int = 100_000):
        source = "raw/b.jsonl" + ".gz" * gz
        return _read(gzip.compress(data) if gz else data, source, None, batch_rows)

    lines = [GOOD % 1, b"", b"  ", b"\r", b"\t\x0b\x0c", GOOD % 2, b"x", b"", b"", GOOD % 3, b" "]
    out = read(b"\n".join(lines))
    assert out["ids"] == ["e1", "e2", "e3"] and _reasons(out) == [(7, "unparseable")]
    assert out["lines"] == 4 and out["blank_lines"] == 7
    for batch_rows in (1, 2, 3):
        assert read(b"\n".join(lines), batch_rows) == out

    limit = ReadLimits().max_blank_lines
    at_limit = read(GOOD % 1 + b"\n" * (limit + 1))
    assert at_limit["rejects"] == [] and at_limit["blank_lines"] == limit
    over = read(GOOD % 1 + b"\n" * (limit + 2))
    assert _reasons(over) == [(limit + 3, "mostly_blank")] and over["ids"] == ["e1"]
    assert over["blank_lines"] == limit + 1 and over["lines"] == 2


def test_read_limits_come_from_the_environment(monkeypatch):
    from setlist.etl.load import read_limits

    assert read_limits() == ReadLimits()
    monkeypatch.setenv("SETLIST_ETL_MAX_RATIO", "500")
    monkeypatch.setenv("SETLIST_ETL_MAX_INFLATED", str(1 << 30))
    assert read_limits() == ReadLimits(max_ratio=500, max_inflated=1 << 30)
