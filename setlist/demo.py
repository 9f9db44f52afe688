"""Sample listening events for the demo tenant, with real structure in them.

Listeners fall into taste clusters; each cluster prefers its own artists, so a model
trained on the data has something true to find. Deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import json
import random
from datetime import UTC, datetime, timedelta

from setlist.storage import TenantStorage

GENRES = ["indie", "techno", "jazz", "hiphop", "classical", "latin"]
DEVICES = ["ios", "android", "web", "desktop", "speaker"]
COUNTRIES = ["SE", "DE", "FR", "US", "BR", "JP", "GB"]
CONTEXTS = ["playlist", "album", "artist", "radio", "search"]


def generate_events(
    tenant_id: str,
    *,
    users: int = 200,
    events: int = 5000,
    seed: int = 7,
    start: datetime | None = None,
) -> list[dict]:
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
    out = []
    for i in range(events):
        user = f"user-{rng.randrange(users):04d}"
        genre = taste[user] if rng.random() < 0.8 else rng.choice(GENRES)
        artist, tracks = rng.choice(catalog[genre])
        out.append(
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
    return out


def write_sample_data(storage: TenantStorage, *, files: int = 4, per_file: int = 1250) -> list[str]:
    """Write gzipped JSON-lines files under raw/ unless they are already there."""
    keys = []
    events = generate_events(storage.tenant_id, events=files * per_file)
    for n in range(files):
        key = f"raw/demo/events-{n:03d}.jsonl.gz"
        keys.append(key)
        if storage.exists(key):
            continue
        chunk = events[n * per_file : (n + 1) * per_file]
        body = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in chunk)
        storage.put_bytes(key, gzip.compress(body.encode(), mtime=0))
    return keys
