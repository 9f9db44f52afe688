"""Live analytics of a stream: exact figures on a hand-built batch, windows that slide
with the clock, memory that stays bounded whatever the input, the snapshot's round trip
through the tenant's storage, and hostile snapshots refused."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from setlist.core.storage import LocalTenantStorage, tenant_storage
from setlist.etl.raw_stream import EVENT_SCHEMA
from setlist.stream.analytics import (
    EXACT_LISTENERS,
    HLL_P,
    LIVE_KEY,
    MAX_SNAPSHOT_BYTES,
    TRACKS_PER_MINUTE,
    LiveAnalytics,
    SnapshotInvalid,
    hash64,
    read_snapshot,
    save_snapshot,
    validate_snapshot,
)

TENANT = "acme-music"
NOW = datetime(2025, 1, 1, 12, 0, 30, tzinfo=UTC)  # half a minute into 12:00


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def events(rows: list[tuple[str, str, datetime, int]]) -> pa.Table:
    """A batch of valid rows from (user, track, ts, ms_played)."""
    n = len(rows)
    return pa.table(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "tenant_id": [TENANT] * n,
            "user_id": [r[0] for r in rows],
            "track_id": [r[1] for r in rows],
            "artist_id": ["a1"] * n,
            "ts": pa.array([ms(r[2]) for r in rows], pa.timestamp("ms", tz="UTC")),
            "ms_played": [r[3] for r in rows],
            "context": [None] * n,
            "device": [None] * n,
            "country": [None] * n,
        },
        schema=EVENT_SCHEMA,
    )


def minute(hh: int, mm: int, ss: int = 10) -> datetime:
    return datetime(2025, 1, 1, hh, mm, ss, tzinfo=UTC)


# 12:00 (current): 4 plays (one 45 s ahead of the clock, within the tolerance), 3
# listeners, 1 skip. 11:59 (last complete): 2 plays, 2 listeners, 1 skip. 11:40: t9
# five times, the hour's hit but not the last 5 minutes'. One row 70 minutes old, one
# 5 minutes ahead: in the totals only.
ROWS = [
    ("u1", "t1", minute(12, 0), 40_000),
    ("u2", "t1", minute(12, 0, 20), 10_000),
    ("u1", "t2", minute(12, 0, 25), 60_000),
    ("u5", "t1", NOW + timedelta(seconds=45), 50_000),
    ("u1", "t3", minute(11, 59), 5_000),
    ("u3", "t3", minute(11, 59, 50), 100_000),
    *[("u4", "t9", minute(11, 40, s), 200_000) for s in range(5)],
    ("u6", "t1", NOW - timedelta(minutes=70), 200_000),
    ("u7", "t1", NOW + timedelta(minutes=5), 200_000),
]


@pytest.fixture
def live() -> LiveAnalytics:
    live = LiveAnalytics(TENANT, now=lambda: ms(NOW))
    live.update(events(ROWS))
    return live


def test_exact_figures_on_a_small_batch(live):
    current, last = live.figures(0), live.figures(1)
    assert (current.minute, current.plays, current.listeners, current.skips) == (
        minute(12, 0, 0),
        4,
        3,
        1,
    )
    assert (last.minute, last.plays, last.listeners, last.skips) == (minute(11, 59, 0), 2, 2, 1)
    assert live.top_tracks(5) == [("t1", 3), ("t3", 2), ("t2", 1)]
    assert live.top_tracks(60) == [("t9", 5), ("t1", 3), ("t3", 2), ("t2", 1)]
    assert live.top_error(60) == 0  # few tracks: exact
    assert live.skip_rate(5) == pytest.approx(2 / 6)
    assert (live.events_total, live.late_total, live.future_total) == (13, 1, 1)

    snap = live.snapshot()
    json.dumps(snap)  # JSON as is
    assert snap["updated_ms"] == ms(NOW)
    per_minute = snap["plays_per_minute"]
    assert len(per_minute) == 60
    assert per_minute[-1] == {
        "minute": "2025-01-01T12:00:00+00:00",
        "plays": 4,
        "listeners": 3,
        "skips": 1,
        "top": [{"track_id": "t1", "plays": 3}, {"track_id": "t2", "plays": 1}],
    }
    assert per_minute[-2]["plays"] == 2 and per_minute[-21]["plays"] == 5
    assert sum(m["plays"] for m in per_minute) == 11
    assert snap["top_tracks_5m"][0] == {"track_id": "t1", "plays": 3}
    assert snap["top_tracks_60m"][0] == {"track_id": "t9", "plays": 5}
    assert snap["skip_rate_5m"] == pytest.approx(2 / 6)
    assert snap["lag"] is None and snap["last_batch"] is None


def test_top_lists_hold_ten_by_plays_then_id():
    live = LiveAnalytics(TENANT, now=lambda: ms(NOW))
    rows = [(f"u{i}", f"t{i:02d}", minute(12, 0), 60_000) for i in range(15) for _ in range(i % 4)]
    live.update(events(rows))
    top = live.top_tracks(5)
    assert len(top) == 10
    assert top[:4] == [("t03", 3), ("t07", 3), ("t11", 3), ("t02", 2)]


def test_windows_slide_as_the_clock_moves(live):
    live.update(events([]), now_ms=ms(NOW + timedelta(minutes=3)))
    assert live.figures(0).plays == 0 and live.figures(1).plays == 0
    assert live.figures(3).plays == 4
    assert live.skip_rate(5) == pytest.approx(2 / 6)  # 11:59 and 12:00 are in 5 newest

    live.snapshot(now_ms=ms(NOW + timedelta(minutes=5)))
    assert live.skip_rate(5) is None and live.top_tracks(5) == []
    assert live.top_tracks(60)[0] == ("t9", 5)

    live.snapshot(now_ms=ms(minute(12, 39, 59)))  # 11:40 is the oldest minute kept
    assert live.top_tracks(60)[0] == ("t9", 5)
    live.snapshot(now_ms=ms(minute(12, 40, 0)))
    assert live.top_tracks(60) == [("t1", 3), ("t3", 2), ("t2", 1)]

    # the clock never goes back: an older ``now`` doesn't bring minutes back
    live.update(events([("u9", "t9", minute(11, 40), 60_000)]), now_ms=ms(NOW))
    assert live.late_total == 2 and live.top_tracks(60)[0] == ("t1", 3)

    snap = live.snapshot(now_ms=ms(minute(13, 1)))
    assert live.footprint()["minutes"] == 0
    assert sum(m["plays"] for m in snap["plays_per_minute"]) == 0
    assert snap["top_tracks_60m"] == [] and snap["skip_rate_5m"] is None


def _distinct(prefix: str, start: int, n: int) -> pa.Array:
    numbers = pc.cast(pa.array(np.arange(start, start + n)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), numbers, "")


def test_memory_stays_bounded_with_a_million_distinct_tracks_and_users():
    """A million distinct tracks and listeners over three minutes, plus a hit (1 play in
    10): every minute keeps at most K track counters and a fixed-size sketch."""
    live = LiveAnalytics(TENANT, now=lambda: ms(NOW))
    batch, total = 50_000, 1_000_000
    rng = np.random.default_rng(7)
    hit = 0
    for start in range(0, total, batch):
        tracks = _distinct("track-", start, batch).to_numpy(zero_copy_only=False)
        is_hit = rng.random(batch) < 0.1
        hit += int(is_hit.sum())
        tracks[is_hit] = "the-hit"
        ts = ms(minute(11, 58, 0)) + rng.integers(0, 150_000, batch)  # 11:58 to 12:00
        table = pa.table(
            {
                "user_id": _distinct("user-", start, batch),
                "track_id": pa.array(tracks, pa.string()),
                "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
                "ms_played": pa.array(rng.integers(0, 60_000, batch)),
            }
        )
        live.update(table)

    held = live.footprint()
    assert held["minutes"] == 3
    assert held["max_track_counters"] <= TRACKS_PER_MINUTE
    assert held["listener_bytes"] == 3 * (1 << HLL_P)  # sketches only, no exact sets
    assert all(b.listeners.exact.size == 0 for b in live._minutes.values())

    # the estimates: listeners within 5% (HLL: 1.6% standard error), the hit's plays
    # short of the truth by no more than the stated bound, itself at most plays/(K+1)
    plays = sum(b.plays for b in live._minutes.values())
    assert plays == total
    for ago in range(3):
        f = live.figures(ago)
        assert abs(f.listeners - f.plays) <= 0.05 * f.plays, f  # every play a new listener
    (top_id, top_plays), *_ = live.top_tracks(60)
    assert top_id == "the-hit"
    error = live.top_error(60)
    assert hit - error <= top_plays <= hit
    assert error <= total / (TRACKS_PER_MINUTE + 1)
    assert len(orjson.dumps(live.snapshot())) < MAX_SNAPSHOT_BYTES


def test_listeners_are_exact_up_to_the_bound():
    live = LiveAnalytics(TENANT, now=lambda: ms(NOW))
    users = _distinct("u", 0, EXACT_LISTENERS)
    for _ in range(3):  # the same listeners again: still counted once
        live.update(
            pa.table(
                {
                    "user_id": users,
                    "track_id": pa.array(["t"] * EXACT_LISTENERS),
                    "ts": pa.array([ms(NOW)] * EXACT_LISTENERS, pa.timestamp("ms", tz="UTC")),
                    "ms_played": pa.array([60_000] * EXACT_LISTENERS),
                }
            )
        )
    assert live.figures(0).listeners == EXACT_LISTENERS
    assert live.figures(0).plays == 3 * EXACT_LISTENERS


def test_hashes_ignore_how_arrow_holds_the_strings():
    values = pa.array(["a", "bb", None, "x" * 300, "é", "", "ccc"])
    whole = hash64(values)
    assert (hash64(values.slice(2)) == whole[2:]).all()
    assert (hash64(pa.chunked_array([values[:3], values[3:]])) == whole).all()
    assert (hash64(values.cast(pa.large_string())) == whole).all()
    assert whole[2] == whole[5]  # null hashes as ""
    assert len(set(whole.tolist())) == 6


def test_lag_and_batch_figures_go_into_the_snapshot(live):
    live.set_lag(42)
    live.set_batch(rows=11, rejected=2, commit_seconds=0.25, at_ms=ms(NOW))
    snap = live.snapshot()
    assert snap["lag"] == 42
    assert snap["last_batch"] == {
        "rows": 11,
        "rejected": 2,
        "commit_seconds": 0.25,
        "at_ms": ms(NOW),
    }
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            live.set_lag(bad)
    with pytest.raises(ValueError):
        live.set_batch(rows=-1, rejected=0, commit_seconds=0.1)


# ------------------------------------------------------------------ snapshots


def test_snapshot_round_trip_through_storage_and_resume(live, storage_config):
    live.set_lag(5)
    storage = tenant_storage(TENANT, storage_config)
    assert read_snapshot(storage) is None
    snap = live.snapshot()
    save_snapshot(storage, snap)
    read = read_snapshot(storage)
    assert read == snap

    later = ms(NOW + timedelta(seconds=20))
    resumed = LiveAnalytics.from_snapshot(read, now=lambda: later)
    assert resumed.snapshot(ms(NOW)) == snap  # the same figures, at the same clock

    # both go on alike: new listeners in the current minute, and the clock moving on
    more = events([("u8", "t2", minute(12, 0, 40), 1_000), ("u9", "t2", minute(12, 0, 45), 1)])
    for each in (live, resumed):
        each.update(more, now_ms=later)
    a, b = live.snapshot(later), resumed.snapshot(later)
    assert a == b
    assert b["plays_per_minute"][-1]["plays"] == 6 and b["events_total"] == 15
    assert b["top_tracks_5m"][:2] == [
        {"track_id": "t1", "plays": 3},
        {"track_id": "t2", "plays": 3},
    ]
    assert b["skip_rate_5m"] == pytest.approx(4 / 8)
    slid = resumed.snapshot(ms(minute(12, 40)))
    assert slid["top_tracks_60m"][0] == {"track_id": "t1", "plays": 3}


def test_a_resumed_minute_keeps_only_its_top_ten_and_says_so():
    live = LiveAnalytics(TENANT, now=lambda: ms(NOW))
    rows = [(f"u{i}", f"t{i:02d}", minute(12, 0), 60_000) for i in range(12) for _ in range(i + 1)]
    live.update(events(rows))
    resumed = LiveAnalytics.from_snapshot(live.snapshot(), now=lambda: ms(NOW))
    assert resumed.figures(0).plays == live.figures(0).plays == 78
    assert resumed.top_tracks(60) == live.top_tracks(60)  # the top ten are kept
    assert live.top_error(60) == 0 and resumed.top_error(60) == 3  # t00, t01 dropped


def _valid() -> dict:
    live = LiveAnalytics(TENANT, now=lambda: ms(NOW))
    live.update(events(ROWS))
    live.set_lag(3)
    live.set_batch(rows=13, rejected=0, commit_seconds=0.1, at_ms=ms(NOW))
    return live.snapshot()


def _set(path: str, value):
    def change(snap: dict) -> None:
        *parents, last = path.split(".")
        node = snap
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


HOSTILE = {
    "too many top tracks": _set(
        "top_tracks_60m", [{"track_id": f"t{i}", "plays": 1} for i in range(11)]
    ),
    "too many minutes": lambda s: s["plays_per_minute"].append(s["plays_per_minute"][-1]),
    "negative total": _set("events_total", -1),
    "negative plays": _set("plays_per_minute.59.plays", -4),
    "negative lag": _set("lag", -10),
    "huge track id": _set("top_tracks_5m.0.track_id", "t" * 100_000),
    "129-character track id": _set("top_tracks_5m.0.track_id", "t" * 129),
    "control characters": _set("top_tracks_5m.0.track_id", "t1\x1b[2J"),
    "plays as a string": _set("top_tracks_5m.0.plays", "3"),
    "total as a float": _set("events_total", 13.0),
    "lag as a bool": _set("lag", True),
    "minutes as an object": _set("plays_per_minute", {"minute": "x"}),
    "a minute that isn't one": _set("plays_per_minute.59.minute", "2025-01-01T12:00:07+00:00"),
    "a minute without a zone": _set("plays_per_minute.59.minute", "2025-01-01T12:00:00"),
    "a minute in the future": _set("plays_per_minute.59.minute", "2025-01-01T13:00:00+00:00"),
    "minutes out of order": lambda s: s["plays_per_minute"].reverse(),
    "more listeners than plays": _set("plays_per_minute.59.listeners", 10**6),
    "a skip rate over 1": _set("skip_rate_5m", 1.5),
    "a commit of a year": _set("last_batch.commit_seconds", 3.2e7),
    "an enormous number": _set("events_total", 10**30),
    "an unknown field": _set("extra", "x"),
    "another version": _set("version", 2),
    "a bad tenant id": _set("tenant_id", "../other"),
    "a missing field": lambda s: s.pop("plays_per_minute"),
}


@pytest.mark.parametrize("change", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_snapshots_are_refused_with_a_clear_error(change):
    snap = _valid()
    validate_snapshot(copy.deepcopy(snap))  # the untouched one passes
    change(snap)
    with pytest.raises(SnapshotInvalid, match="live analytics snapshot refused: ") as caught:
        validate_snapshot(snap)
    assert "t" * 129 not in str(caught.value) and "\x1b" not in str(caught.value)
    with pytest.raises(SnapshotInvalid):
        LiveAnalytics.from_snapshot(snap)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[1, 2, 3]",
        b"{}",
        b"9" * (MAX_SNAPSHOT_BYTES + 1),
        orjson.dumps({**_valid(), "tenant_id": "someone-else"}),
    ],
    ids=["not JSON", "a list", "empty", "over the size cap", "another tenant's"],
)
def test_read_snapshot_refuses_junk_in_storage(tmp_path, data):
    storage = LocalTenantStorage(TENANT, tmp_path)
    storage.put_bytes(LIVE_KEY, data)
    with pytest.raises(SnapshotInvalid):
        read_snapshot(storage)


def test_save_snapshot_refuses_what_a_reader_would(tmp_path):
    storage = LocalTenantStorage(TENANT, tmp_path)
    with pytest.raises(SnapshotInvalid):
        save_snapshot(storage, {**_valid(), "events_total": -1})
    assert read_snapshot(storage) is None
