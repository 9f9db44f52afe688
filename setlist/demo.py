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

from setlist.storage import TenantStorage

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
