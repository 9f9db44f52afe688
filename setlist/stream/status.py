"""Where a tenant's stream stands (``setlist stream status``): what waits in the broker,
what the table has committed, and the live figures of the last snapshot.

- ``lag``: the messages the broker holds for the tenant, i.e. not consumed yet;
- ``committed_position``: the position the table holds everything up to (its manifest's
  ``streams``, under the broker's kind, as the stream-ingest job commits it);
- ``appended_files``/``appended_rows``: micro-batches not compacted yet, what data-etl's
  next load merges;
- ``live``: from the job's snapshot, when there is one: plays and listeners of its newest
  minute (still filling when the snapshot was written), the skip rate and the top 5
  tracks of the last 5 minutes. A snapshot that fails validation is left out, with why
  (``live_error``): the rest of the status still stands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from setlist.brokers.base import Broker
from setlist.core.settings import get_settings
from setlist.core.storage import TenantStorage, load_storage_config, tenant_storage
from setlist.etl.appends import appended_backlog
from setlist.etl.curated import read_manifest
from setlist.stream.analytics import SnapshotInvalid, read_snapshot
from setlist.stream.produce import producer_broker
from setlist.tenants.onboarding import read_profile

TOP_TRACKS = 5


@dataclass(frozen=True)
class LiveFigures:
    updated: str  # when the job wrote the snapshot (ISO 8601, UTC)
    minute: str | None  # the newest minute's start
    plays: int
    listeners: int
    skip_rate_5m: float | None
    top_tracks_5m: list[dict[str, Any]]


@dataclass(frozen=True)
class StreamStatus:
    tenant_id: str
    broker: str
    lag: int
    committed_position: str | None
    appended_files: int
    appended_rows: int
    live: LiveFigures | None
    live_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_figures(snapshot: dict[str, Any]) -> LiveFigures:
    """The status's figures of a validated snapshot (``read_snapshot``)."""
    minutes = snapshot["plays_per_minute"]
    newest = minutes[-1] if minutes else {"minute": None, "plays": 0, "listeners": 0}
    return LiveFigures(
        updated=datetime.fromtimestamp(snapshot["updated_ms"] / 1000, UTC).isoformat(),
        minute=newest["minute"],
        plays=newest["plays"],
        listeners=newest["listeners"],
        skip_rate_5m=snapshot["skip_rate_5m"],
        top_tracks_5m=snapshot["top_tracks_5m"][:TOP_TRACKS],
    )


async def gather_status(broker: Broker, storage: TenantStorage) -> StreamStatus:
    """The status of ``storage``'s tenant's stream on ``broker``."""
    tenant_id = storage.tenant_id
    lag = await broker.stream_length(tenant_id)
    manifest = read_manifest(storage)
    files, rows = appended_backlog(manifest)
    live, live_error = None, None
    try:
        snapshot = read_snapshot(storage)
    except SnapshotInvalid as exc:
        live_error = str(exc)
    else:
        live = live_figures(snapshot) if snapshot else None
    return StreamStatus(
        tenant_id=tenant_id,
        broker=broker.kind.value,
        lag=lag,
        committed_position=manifest.streams.get(broker.kind.value),
        appended_files=files,
        appended_rows=rows,
        live=live,
        live_error=live_error,
    )


async def stream_status(tenant_id: str) -> StreamStatus:
    """``setlist stream status``: a known tenant's stream on the platform's broker."""
    profile = await read_profile(tenant_id)
    storage = tenant_storage(tenant_id, await load_storage_config(profile.storage_block))
    async with producer_broker(get_settings()).open() as broker:
        return await gather_status(broker, storage)
