"""Sample listening events for the demo tenant, with real structure in them.

Listeners fall into taste clusters; each cluster prefers its own artists, so a model
trained on the data has something true to find. Deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from setlist.core.storage import TenantStorage
from setlist.etl.curated import (
    Manifest,
    canonical,
    event_dates,
    publish,
    read_manifest,
    write_partition,
)
from setlist.etl.raw_events import EVENT_SCHEMA

GENRES = ["indie", "techno", "jazz", "hiphop", "classical", "latin"]
DEVICES = ["ios", "android", "web", "desktop", "speaker"]
COUNTRIES = ["SE", "DE", "FR", "US", "BR", "JP", "GB"]
CONTEXTS = ["playlist", "album", "artist", "radio", "search"]


def iter_events(
    tenant_id: str,
    *,
    users: int = 200,
    events: int = 5000,
    seed: int = 7,
    start: datetime | None = None,
) -> Iterator[dict]:
    """Events one at a time, so any number can be written in bounded memory."""
    rng = random.Random(seed)
    start = start or datetime(2026, 11, 1, tzinfo=UTC)
    catalog = {
        g: [
            (f"{g}-artist-{a:02d}", [f"{g}-{a:02d}-track-{t:02d}" for t in range(10)])
            for a in range(8)
        ]
        for g in GENRES
    }
    taste = {f"user-{u:04d}": GENRES[u % len(GENRES)] for u in range(users)}
    for i in range(events):
        user = f"user-{rng.randrange(users):04d}"
        genre = taste[user] if rng.random() < 0.8 else rng.choice(GENRES)
        artist, tracks = rng.choice(catalog[genre])
        yield (
            {
                "event_id": f"{tenant_id}-{seed}-{i:08d}",
                "tenant_id": tenant_id,
                "user_id": user,
                "track_id": rng.choice(tracks),
                "artist_id": artist,
                "ts": (start + timedelta(seconds=rng.randrange(14 * 86400))).isoformat(),
                "ms_played": rng.randrange(5_000, 300_000),
                "context": rng.choice(CONTEXTS),
                "device": rng.choice(DEVICES),
                "country": rng.choice(COUNTRIES),
            }
        )


def write_sample_data(
    storage: TenantStorage,
    *,
    events: int = 5000,
    files: int = 4,
    defect_share: float = 0.01,
    seed: int = 7,
    prefix: str = "raw/demo",
) -> dict[str, int]:
    """Write raw event files (with a known share of defects) unless they are there.

    Returns the planted counts (see ``raw_files``); files already present are kept,
    so the call is idempotent.
    """
    written, expected = raw_files(
        storage.tenant_id,
        events=events,
        files=files,
        defect_share=defect_share,
        seed=seed,
        prefix=prefix,
    )
    for key, data in written.items():
        if not storage.exists(key):
            storage.put_bytes(key, data)
    return expected


DEFECTS = (
    "unparseable",
    "missing_field",
    "wrong_type",
    "impossible_value",
    "foreign_tenant",
    "future_timestamp",
    "not_utf8",
    "duplicate",
)


def _defective(kind: str, event: dict, earlier: bytes | None) -> bytes:
    e = dict(event)
    if kind == "unparseable":
        return json.dumps(e).encode()[:-7]
    if kind == "missing_field":
        e.pop("user_id")
    elif kind == "wrong_type":
        e["ms_played"] = "a while"
    elif kind == "impossible_value":
        e["ms_played"] = -1
    elif kind == "foreign_tenant":
        e["tenant_id"] = "someone-else"
    elif kind == "future_timestamp":
        e["ts"] = "2099-01-01T00:00:00+00:00"
    elif kind == "not_utf8":
        return json.dumps(e).encode().replace(b'"device"', b'"d\xff\xfeevice"')
    elif kind == "duplicate" and earlier is not None:
        return earlier
    return json.dumps(e, separators=(",", ":")).encode()


def iter_raw_lines(
    tenant_id: str, *, events: int, defect_share: float = 0.02, seed: int = 7
) -> Iterator[tuple[bytes, str | None]]:
    """(JSON line, planted defect or None) for each event, streaming."""
    rng = random.Random(seed + 1)
    last_good: bytes | None = None
    for event in iter_events(tenant_id, events=events, seed=seed):
        if rng.random() < defect_share:
            kind = DEFECTS[rng.randrange(len(DEFECTS))]
            if kind == "duplicate" and last_good is None:
                kind = "unparseable"
            yield _defective(kind, event, last_good), kind
        else:
            last_good = json.dumps(event, separators=(",", ":")).encode()
            yield last_good, None


def raw_files(
    tenant_id: str,
    *,
    events: int,
    files: int = 4,
    defect_share: float = 0.02,
    seed: int = 7,
    gzipped: bool = True,
    prefix: str = "raw/demo",
) -> tuple[dict[str, bytes], dict[str, int]]:
    """JSON-lines raw files with a known number of each defect.

    Returns ({key: bytes}, expected) where ``expected`` counts the planted defects by
    reason ('duplicate' included) and ``valid``: the distinct good events.
    """
    expected = {k: 0 for k in DEFECTS}
    lines = []
    for line, kind in iter_raw_lines(
        tenant_id, events=events, defect_share=defect_share, seed=seed
    ):
        lines.append(line)
        if kind:
            expected[kind] += 1
    expected["valid"] = len(lines) - sum(expected.values())
    per_file = -(-len(lines) // files)
    out = {}
    for n in range(files):
        body = b"".join(line + b"\n" for line in lines[n * per_file : (n + 1) * per_file])
        key = f"{prefix}/events-{n:03d}.jsonl" + (".gz" if gzipped else "")
        out[key] = gzip.compress(body, mtime=0) if gzipped else body
    return out, expected


def listening_table(
    tenant_id: str,
    *,
    users: int = 2000,
    tracks: int = 1000,
    events: int = 100_000,
    clusters: int = 8,
    in_cluster: float = 0.85,
    days: int = 28,
    seed: int = 7,
    start: datetime | None = None,
) -> pa.Table:
    """Curated-schema events with taste structure, generated vectorised (millions/s).

    Each listener belongs to one taste cluster and each track to one; a listener plays
    tracks of their own cluster ``in_cluster`` of the time, picked by the cluster's
    Zipf-shaped popularity, and plays them longer than tracks of other clusters. Taste is
    stable over time, so what a listener plays next is predictable from what came
    before; the global charts are not a good answer, which is what a model must beat.
    """
    rng = np.random.default_rng(seed)
    start = start or datetime(2026, 10, 1, tzinfo=UTC)
    user_cluster = rng.integers(0, clusters, users)
    track_cluster = rng.integers(0, clusters, tracks)
    members = [np.flatnonzero(track_cluster == c) for c in range(clusters)]
    members = [m if m.size else np.arange(tracks) for m in members]
    activity = rng.pareto(1.5, users) + 1.0  # some listeners play far more than others
    user = rng.choice(users, size=events, p=activity / activity.sum())
    own = rng.random(events) < in_cluster
    cluster = np.where(own, user_cluster[user], rng.integers(0, clusters, events))
    track = np.empty(events, dtype=np.int64)
    for c in range(clusters):
        picks = np.flatnonzero(cluster == c)
        pool = members[c]
        weights = 1.0 / np.arange(1, pool.size + 1) ** 0.8
        track[picks] = rng.choice(pool, size=picks.size, p=weights / weights.sum())
    full = rng.integers(60_000, 300_000, events)
    ms_played = np.where(own, full, rng.integers(2_000, 40_000, events))
    ts = int(start.timestamp() * 1000) + np.sort(rng.integers(0, days * 86_400_000, events))
    order = rng.permutation(events)  # ts increases with i; rows are shuffled like real input

    def labels(prefix: str, values: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")

    def pick(choices: list[str]) -> pa.Array:
        return pa.DictionaryArray.from_arrays(
            pa.array(rng.integers(0, len(choices), events), pa.int32()), pa.array(choices)
        ).cast(pa.string())

    return pa.table(
        {
            "event_id": labels(f"{tenant_id}-gen{seed}-", order),
            "tenant_id": pa.array([tenant_id] * events, pa.string())
            if events < 1024
            else pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(events, np.int32)), pa.array([tenant_id])
            ).cast(pa.string()),
            "user_id": labels("user-", user[order]),
            "track_id": labels("track-", track[order]),
            "artist_id": labels("artist-", track[order] // 10),
            "ts": pa.array(ts[order], pa.timestamp("ms", tz="UTC")),
            "ms_played": pa.array(ms_played[order], pa.int64()),
            "context": pick(CONTEXTS),
            "device": pick(DEVICES),
            "country": pick(COUNTRIES),
        },
        schema=EVENT_SCHEMA,
    )


def publish_curated(storage: TenantStorage, table: pa.Table) -> int:
    """Publish ``table`` as the tenant's curated events (one partition per date).

    For seeding a tenant that already has a history (benchmarks, tests of the jobs that
    read the table) without pushing millions of rows through raw files and the ETL;
    the files and manifest are the ETL's own. Returns the table version.
    """
    previous = read_manifest(storage)
    manifest = Manifest(loaded=dict(previous.loaded))
    dates = event_dates(table)
    for date in sorted(pc.unique(dates).to_pylist()):
        part, _ = canonical(table.filter(pc.equal(dates, date)))
        manifest.partitions[date] = write_partition(storage, date, part)
    return publish(storage, previous, manifest).version
