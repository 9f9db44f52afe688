"""Live analytics of a tenant's stream: per-minute figures over the last hour, folded in
batch by batch by the ``stream-ingest`` job and saved with each commit as a snapshot.

Windows. Each valid row falls in the minute of its event time ``ts``. The window is the
60 minutes that end at the job's clock (``now``, never behind the newest ``now`` seen),
not at the newest event: when the stream goes quiet the figures fall to zero instead
of freezing, and a backlog replayed after an outage counts where it belongs. A row more
than 60 minutes old when it arrives counts in ``events_total`` (and ``late_total``)
only; a row up to ``FUTURE_TOLERANCE_MS`` ahead of the clock (a producer's clock a
little fast) counts in the current minute; one further ahead counts in the totals only.
"5 minutes" and "60 minutes" are the 5 and 60 newest minute buckets, the current
(partial) one included.

Bounds. Whatever the input, a minute holds at most ``TRACKS_PER_MINUTE`` track counters
and ``EXACT_LISTENERS`` listener hashes (or a ``2**HLL_P``-byte sketch), so the whole
hour stays under about 2 MiB plus 60,000 track ids.
- Listeners: exact (64-bit hashes of user ids, collisions negligible) while a minute
  has at most ``EXACT_LISTENERS``; then a HyperLogLog of 4096 registers, whose standard
  error is 1.04/sqrt(4096) = 1.6%.
- Tracks: each minute keeps a Misra-Gries summary of ``TRACKS_PER_MINUTE`` counters,
  merged batch by batch (Agarwal et al., "Mergeable summaries", 2012). A count is exact
  while the minute has at most that many distinct tracks; beyond, each count is a lower
  bound, short of the truth by at most plays/(K+1) of that minute, so a top list over a
  window is short by at most 0.1% of the window's plays (``top_error``).

Snapshot and resume. ``snapshot()`` is JSON: the 60 minutes (plays, listeners, skips and
the minute's top 10), the top lists, the skip rate, lag and the last batch. A restarted
job resumes from it (``LiveAnalytics.from_snapshot``) with exact plays and skips; the
restored minutes keep only their top 10 tracks and their listener counts, so until they
leave the window a track outside a minute's top 10 misses that minute's plays, and a
user heard in the same minute before and after the restart is counted twice.

Trust. The snapshot lives in the tenant's own storage, which the tenant's code can
write: ``read_snapshot`` caps the bytes it reads, validates every field against
``LiveSnapshot`` (sizes, bounds, types) and raises ``SnapshotInvalid``, never anything
a reader has to guess at.

One job's loop owns an instance: it is not thread-safe.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from setlist.core.storage import ObjectNotFound
from setlist.core.tenancy import SetlistError, validate_tenant_id

if TYPE_CHECKING:
    from setlist.core.storage import TenantStorage

# The industry's common rule (and the royalty threshold of the big services): a play
# shorter than 30 seconds is a skip, not a listen.
SKIP_MS = 30_000
MINUTE_MS = 60_000
WINDOW_MINUTES = 60
SHORT_MINUTES = 5
FUTURE_TOLERANCE_MS = 60_000
TOP_N = 10
TRACKS_PER_MINUTE = 1_000  # K of the Misra-Gries summary of each minute
EXACT_LISTENERS = 4_096  # hashes kept per minute (32 KiB) before the sketch takes over
HLL_P = 12  # 4096 one-byte registers
LIVE_KEY = "live/analytics.json"
# 62 top lists of 10 ids (128 bytes at most, 256 escaped) come to about 180 KB
MAX_SNAPSHOT_BYTES = 512 * 1024
SNAPSHOT_VERSION = 1
MAX_COUNT = 2**53  # integers a JSON reader (and Prometheus's float) holds exactly
MAX_COMMIT_SECONDS = 86_400.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# ------------------------------------------------------------------ hashing

_WORDS = 32  # ids are 1 to 128 bytes (raw_events): at most 32 words of 4 bytes
_WEIGHTS = np.random.default_rng(0x5E7_115).integers(
    0, 2**64, size=_WORDS + 2, dtype=np.uint64
) | np.uint64(1)
_PAD = pa.scalar(bytes(4 * _WORDS), pa.binary())


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash64(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string, the same in every process, in bulk: the strings
    zero-padded to one width in Arrow, then a multilinear hash of their 32-bit words
    under fixed odd random 64-bit weights (mod 2**64, the family of Lemire and Kaser)
    plus the length, mixed. Nulls hash as the empty string; a string
    over 128 bytes (no valid id is) is hashed on its first 128 bytes and its length."""
    n = len(values)
    if n == 0:
        return np.empty(0, np.uint64)
    values = pc.fill_null(values, "").cast(pa.binary())
    lengths = pc.binary_length(values)
    width = 4 * min(_WORDS, max(1, -(-pc.max(lengths).as_py() // 4)))
    padded = pc.binary_slice(pc.binary_join_element_wise(values, _PAD, b""), 0, width)
    padded = padded.cast(pa.binary(width))
    if isinstance(padded, pa.ChunkedArray):
        padded = padded.combine_chunks()
    raw = np.frombuffer(padded.buffers()[1], np.uint8)
    words = raw[padded.offset * width : (padded.offset + n) * width].view("<u4")
    h = words.reshape(n, width // 4).astype(np.uint64) @ _WEIGHTS[: width // 4]
    h += np.asarray(lengths, np.uint64) * _WEIGHTS[_WORDS] + _WEIGHTS[_WORDS + 1]
    return _mix(h)


# ------------------------------------------------------------------ listeners

_HLL_REST = 64 - HLL_P  # bits under the register index: 52, exact in a float64


def _hll_add(registers: np.ndarray, hashes: np.ndarray) -> None:
    index = (hashes >> np.uint64(_HLL_REST)).astype(np.intp)
    rest = hashes & np.uint64((1 << _HLL_REST) - 1)
    _mantissa, bits = np.frexp(rest.astype(np.float64))  # bit length, exactly
    np.maximum.at(registers, index, (_HLL_REST + 1 - bits).astype(np.uint8))


def _hll_estimate(registers: np.ndarray) -> float:
    m = registers.size
    estimate = 0.7213 / (1 + 1.079 / m) * m * m / np.ldexp(1.0, -registers.astype(int)).sum()
    zeros = int(np.count_nonzero(registers == 0))
    if estimate <= 2.5 * m and zeros:  # small range: linear counting is the better guess
        return m * math.log(m / zeros)
    return float(estimate)


@dataclass
class Listeners:
    """Distinct listeners of one minute: exact hashes while few, then HyperLogLog.
    ``carried`` is a count restored from a snapshot, added as is."""

    exact: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    registers: np.ndarray | None = None
    carried: int = 0

    def add(self, hashes: np.ndarray) -> None:
        if self.registers is not None:
            _hll_add(self.registers, hashes)
            return
        merged = np.union1d(self.exact, hashes)
        if len(merged) <= EXACT_LISTENERS:
            self.exact = merged
            return
        self.registers = np.zeros(1 << HLL_P, np.uint8)
        _hll_add(self.registers, merged)
        self.exact = np.empty(0, np.uint64)

    def count(self) -> int:
        seen = len(self.exact) if self.registers is None else round(_hll_estimate(self.registers))
        return self.carried + seen

    def held(self) -> int:
        """Bytes held (the size that stays bounded)."""
        return self.exact.nbytes + (0 if self.registers is None else self.registers.nbytes)


# ------------------------------------------------------------------ tracks


def _sum_by_id(ids: pa.Array, counts: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    summed = pa.table({"id": ids, "n": counts}).group_by("id").aggregate([("n", "sum")])
    return summed["id"].combine_chunks(), summed["n_sum"].to_numpy()


@dataclass
class TrackCounts:
    """A minute's Misra-Gries summary: at most ``capacity`` (track id, plays) counters;
    ``undercount`` bounds how far any count (a kept one or a dropped one) is below the
    truth."""

    ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    undercount: int = 0
    capacity: int = TRACKS_PER_MINUTE

    def add(self, ids: pa.Array, counts: np.ndarray) -> None:
        ids, counts = _sum_by_id(
            pa.concat_arrays([self.ids, ids]), np.concatenate([self.counts, counts])
        )
        if len(counts) > self.capacity:
            # less the (K+1)-th largest from every counter: at most K stay positive
            cut = int(np.partition(counts, len(counts) - self.capacity - 1)[-self.capacity - 1])
            counts = counts - cut
            keep = counts > 0
            ids, counts = ids.filter(pa.array(keep)), counts[keep]
            self.undercount += cut
        self.ids, self.counts = ids, counts


def _top(ids: pa.Array, counts: np.ndarray, n: int) -> list[tuple[str, int]]:
    """The ``n`` largest counts, ties by track id, for a stable answer."""
    if len(counts) > n:
        bar = np.partition(counts, len(counts) - n)[len(counts) - n]
        keep = np.flatnonzero(counts >= bar)
        ids, counts = ids.take(pa.array(keep)), counts[keep]
    pairs = sorted(zip(ids.to_pylist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    return pairs[:n]


# ------------------------------------------------------------------ windows


@dataclass
class Minute:
    """One minute bucket of the window."""

    plays: int = 0
    skips: int = 0
    listeners: Listeners = field(default_factory=Listeners)
    tracks: TrackCounts = field(default_factory=TrackCounts)


@dataclass(frozen=True)
class MinuteFigures:
    minute: datetime
    plays: int
    listeners: int
    skips: int


def _iso(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, UTC).isoformat()


def _int_column(table: pa.Table, name: str, null: int, cast: pa.DataType) -> np.ndarray:
    column = table.column(name)
    if column.type != cast:
        column = pc.cast(column, cast, safe=False)
    return pc.fill_null(column.cast(pa.int64()), null).to_numpy()


class LiveAnalytics:
    """The live figures of one tenant's stream (see the module's docstring); ``now``
    gives the clock in epoch milliseconds."""

    def __init__(self, tenant_id: str, now: Callable[[], int] = wall_ms):
        self.tenant_id = validate_tenant_id(tenant_id)
        self._now = now
        self._clock = 0  # the newest ``now`` seen, in ms: the window never goes back
        self._minutes: dict[int, Minute] = {}
        self.events_total = 0
        self.late_total = 0  # older than the window on arrival
        self.future_total = 0  # further ahead than FUTURE_TOLERANCE_MS
        self.lag: int | None = None
        self.last_batch: dict[str, Any] | None = None

    # ------------------------------------------------------------------ folding in

    def _advance(self, now_ms: int | None) -> int:
        self._clock = max(self._clock, self._now() if now_ms is None else int(now_ms))
        oldest = self._clock // MINUTE_MS - WINDOW_MINUTES + 1
        for minute in [m for m in self._minutes if m < oldest]:
            del self._minutes[minute]
        return self._clock

    def update(self, table: pa.Table, now_ms: int | None = None) -> None:
        """Fold in one committed batch of valid rows (``EVENT_SCHEMA``'s columns ``ts``,
        ``user_id``, ``track_id`` and ``ms_played`` are read)."""
        now = self._advance(now_ms)
        self.events_total += table.num_rows
        if table.num_rows == 0:
            return
        ts = _int_column(table, "ts", np.iinfo(np.int64).min, pa.timestamp("ms", tz="UTC"))
        current = now // MINUTE_MS
        future = ts > now + FUTURE_TOLERANCE_MS
        minute = np.minimum(ts // MINUTE_MS, current)  # a little ahead: now
        late = minute <= current - WINDOW_MINUTES
        self.future_total += int(future.sum())
        self.late_total += int(late.sum())
        rows = np.flatnonzero(~(future | late))
        if not len(rows):
            return
        order = rows[np.argsort(minute[rows], kind="stable")]
        skips = _int_column(table, "ms_played", SKIP_MS, pa.int64())[order] < SKIP_MS
        users = hash64(table.column("user_id"))[order]
        tracks = table.column("track_id").combine_chunks().cast(pa.string()).take(order)
        minutes, starts = np.unique(minute[order], return_index=True)
        ends = [*starts[1:].tolist(), len(order)]
        for m, start, end in zip(minutes.tolist(), starts.tolist(), ends, strict=True):
            bucket = self._minutes.setdefault(m, Minute())
            bucket.plays += end - start
            bucket.skips += int(skips[start:end].sum())
            bucket.listeners.add(users[start:end])
            bucket.tracks.add(tracks.slice(start, end - start), np.ones(end - start, np.int64))

    def set_lag(self, n: int | None) -> None:
        """Messages in the broker not yet committed (None: unknown)."""
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"consumer lag must be a non-negative integer, not {n!r}")
        self.lag = n

    def set_batch(
        self, rows: int, rejected: int, commit_seconds: float, at_ms: int | None = None
    ) -> None:
        """The last committed batch: rows committed, rows rejected, seconds its commit took."""
        if min(rows, rejected) < 0 or not 0 <= commit_seconds <= MAX_COMMIT_SECONDS:
            raise ValueError(
                f"batch figures must be non-negative, the commit at most {MAX_COMMIT_SECONDS} s"
            )
        self.last_batch = {
            "rows": int(rows),
            "rejected": int(rejected),
            "commit_seconds": float(commit_seconds),
            "at_ms": wall_ms() if at_ms is None else int(at_ms),
        }

    # ------------------------------------------------------------------ figures

    def _window(self, minutes: int) -> list[Minute]:
        newest = self._clock // MINUTE_MS
        return [b for m, b in self._minutes.items() if m > newest - minutes]

    def figures(self, ago: int = 0) -> MinuteFigures:
        """The minute ``ago`` minutes before the current one (0: current, partial; 1: the
        last complete one)."""
        minute = self._clock // MINUTE_MS - ago
        bucket = self._minutes.get(minute, Minute())
        listeners = min(bucket.listeners.count(), bucket.plays)  # an estimate can overshoot
        return MinuteFigures(
            datetime.fromtimestamp(minute * 60, UTC), bucket.plays, listeners, bucket.skips
        )

    def top_tracks(self, minutes: int = WINDOW_MINUTES, n: int = TOP_N) -> list[tuple[str, int]]:
        """(track id, plays) of the ``n`` most played over the newest ``minutes`` buckets."""
        window = [b.tracks for b in self._window(minutes) if len(b.tracks.counts)]
        if not window:
            return []
        ids, counts = _sum_by_id(
            pa.concat_arrays([t.ids for t in window]), np.concatenate([t.counts for t in window])
        )
        return _top(ids, counts, n)

    def top_error(self, minutes: int = WINDOW_MINUTES) -> int:
        """Plays a count of ``top_tracks(minutes)`` may be short of the truth, at most."""
        return sum(b.tracks.undercount for b in self._window(minutes))

    def skip_rate(self, minutes: int = SHORT_MINUTES) -> float | None:
        """Skips / plays over the newest ``minutes`` buckets; None without plays."""
        window = self._window(minutes)
        plays = sum(b.plays for b in window)
        return sum(b.skips for b in window) / plays if plays else None

    def footprint(self) -> dict[str, int]:
        """What the windows hold: minute buckets, track counters, listener bytes."""
        return {
            "minutes": len(self._minutes),
            "track_counters": sum(len(b.tracks.counts) for b in self._minutes.values()),
            "max_track_counters": max(
                (len(b.tracks.counts) for b in self._minutes.values()), default=0
            ),
            "listener_bytes": sum(b.listeners.held() for b in self._minutes.values()),
        }

    # ------------------------------------------------------------------ snapshot

    def snapshot(self, now_ms: int | None = None) -> dict[str, Any]:
        """The figures as JSON-ready data (``LiveSnapshot``'s shape), the window first
        moved on to ``now_ms`` (default: the clock)."""
        updated = self._advance(now_ms)
        newest = updated // MINUTE_MS
        minutes = []
        for ago in range(WINDOW_MINUTES - 1, -1, -1):
            figures = self.figures(ago)
            bucket = self._minutes.get(newest - ago)
            top = _top(bucket.tracks.ids, bucket.tracks.counts, TOP_N) if bucket else []
            minutes.append(
                {
                    "minute": _iso(newest - ago),
                    "plays": figures.plays,
                    "listeners": figures.listeners,
                    "skips": figures.skips,
                    "top": _tracks_json(top),
                }
            )
        return {
            "version": SNAPSHOT_VERSION,
            "tenant_id": self.tenant_id,
            "updated_ms": updated,
            "events_total": self.events_total,
            "late_total": self.late_total,
            "future_total": self.future_total,
            "plays_per_minute": minutes,
            "top_tracks_5m": _tracks_json(self.top_tracks(SHORT_MINUTES)),
            "top_tracks_60m": _tracks_json(self.top_tracks(WINDOW_MINUTES)),
            "skip_rate_5m": self.skip_rate(SHORT_MINUTES),
            "lag": self.lag,
            "last_batch": self.last_batch,
        }

    @classmethod
    def from_snapshot(
        cls, snapshot: dict[str, Any], now: Callable[[], int] = wall_ms
    ) -> LiveAnalytics:
        """The analytics a snapshot describes, to go on from (see the module's docstring
        for what is approximate); raises ``SnapshotInvalid`` on a snapshot that isn't."""
        snap = _parse(snapshot)
        live = cls(snap.tenant_id, now=now)
        live._clock = snap.updated_ms
        live.events_total, live.late_total = snap.events_total, snap.late_total
        live.future_total, live.lag = snap.future_total, snap.lag
        live.last_batch = snap.last_batch.model_dump() if snap.last_batch else None
        for entry in snap.plays_per_minute:
            if not entry.plays:
                continue
            bucket = live._minutes.setdefault(entry.index, Minute())
            bucket.plays, bucket.skips = entry.plays, entry.skips
            bucket.listeners.carried = entry.listeners
            if entry.top:
                ids = pa.array([t.track_id for t in entry.top], pa.string())
                bucket.tracks.add(ids, np.array([t.plays for t in entry.top], np.int64))
            if len(entry.top) == TOP_N:  # a track left out had at most the 10th's plays
                bucket.tracks.undercount = min(t.plays for t in entry.top)
        live._advance(snap.updated_ms)
        return live


def _tracks_json(pairs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [
        {"track_id": track, "plays": plays} for track, plays in pairs if _TRACK.fullmatch(track)
    ]


# ------------------------------------------------------------------ validation


class SnapshotInvalid(SetlistError):
    """A live analytics snapshot that is not one (too large, not JSON, out of bounds)."""


_TRACK_PATTERN = r"^[\x21-\x7e]{1,128}$"  # raw_events' rule for ids
_TRACK = re.compile(_TRACK_PATTERN)
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


def _minute_iso(value: str) -> str:
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("not an ISO 8601 time") from None
    if at.utcoffset() is None or at.second or at.microsecond:
        raise ValueError("not the start of a minute, with a time zone")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class TrackPlays(_Strict):
    track_id: Annotated[str, Field(max_length=128, pattern=_TRACK_PATTERN)]
    plays: Count


class MinutePlays(_Strict):
    minute: Annotated[str, Field(max_length=40), AfterValidator(_minute_iso)]
    plays: Count
    listeners: Count
    skips: Count = 0
    top: list[TrackPlays] = Field(default_factory=list, max_length=TOP_N)

    @property
    def index(self) -> int:
        """Minutes since the epoch."""
        return int(datetime.fromisoformat(self.minute).timestamp()) // 60

    @model_validator(mode="after")
    def _within_plays(self) -> MinutePlays:
        if max(self.listeners, self.skips, sum(t.plays for t in self.top)) > self.plays:
            raise ValueError("listeners, skips and top plays can't exceed the minute's plays")
        return self


class LastBatch(_Strict):
    rows: Count
    rejected: Count
    commit_seconds: Annotated[float, Field(ge=0, le=MAX_COMMIT_SECONDS, allow_inf_nan=False)]
    at_ms: Count


class LiveSnapshot(_Strict):
    """What a snapshot may hold, each field bounded."""

    version: Literal[1]
    tenant_id: Annotated[str, Field(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    updated_ms: Count
    events_total: Count
    late_total: Count = 0
    future_total: Count = 0
    plays_per_minute: list[MinutePlays] = Field(max_length=WINDOW_MINUTES)
    top_tracks_5m: list[TrackPlays] = Field(max_length=TOP_N)
    top_tracks_60m: list[TrackPlays] = Field(max_length=TOP_N)
    skip_rate_5m: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None
    lag: Count | None
    last_batch: LastBatch | None

    @model_validator(mode="after")
    def _minutes_in_window(self) -> LiveSnapshot:
        newest = self.updated_ms // MINUTE_MS
        indexes = [m.index for m in self.plays_per_minute]
        if any(b <= a for a, b in zip(indexes, indexes[1:], strict=False)):
            raise ValueError("plays_per_minute must be in time order, each minute once")
        if indexes and (indexes[0] <= newest - WINDOW_MINUTES or indexes[-1] > newest):
            raise ValueError("plays_per_minute must lie in the hour before updated_ms")
        return self


def _parse(data: Any) -> LiveSnapshot:
    if not isinstance(data, dict):
        raise SnapshotInvalid("a live analytics snapshot is a JSON object")
    try:
        return LiveSnapshot.model_validate(data)
    except ValidationError as exc:
        faults = exc.errors(include_input=False, include_url=False, include_context=False)
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'snapshot'}: {e['msg']}" for e in faults[:3]
        )
        more = f" (and {len(faults) - 3} more)" if len(faults) > 3 else ""
        raise SnapshotInvalid(f"live analytics snapshot refused: {where}{more}") from None


def validate_snapshot(data: Any) -> dict[str, Any]:
    """``data`` checked against ``LiveSnapshot``; raises ``SnapshotInvalid`` naming the
    first faults (never echoing the values: they are the tenant's)."""
    return _parse(data).model_dump(mode="json")


# ------------------------------------------------------------------ storage


def save_snapshot(storage: TenantStorage, snapshot: dict[str, Any]) -> int:
    """Write ``snapshot`` (checked first, as a reader will) to ``LIVE_KEY``; → bytes."""
    data = orjson.dumps(validate_snapshot(snapshot))
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotInvalid(f"live analytics snapshot is {len(data)} bytes, over the cap")
    return storage.put_bytes(LIVE_KEY, data)


def read_snapshot(storage: TenantStorage) -> dict[str, Any] | None:
    """The tenant's snapshot, validated; None when there is none. Reads at most
    ``MAX_SNAPSHOT_BYTES`` + 1 bytes; raises ``SnapshotInvalid`` on anything else."""
    try:
        data = storage.read_range(LIVE_KEY, 0, MAX_SNAPSHOT_BYTES + 1)
    except ObjectNotFound:
        return None
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotInvalid(f"live analytics snapshot over {MAX_SNAPSHOT_BYTES} bytes")
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise SnapshotInvalid("live analytics snapshot is not JSON") from None
    snapshot = validate_snapshot(parsed)
    if snapshot["tenant_id"] != storage.tenant_id:
        raise SnapshotInvalid("live analytics snapshot names another tenant")
    return snapshot
