"""Stream benchmark: events produced at a steady rate into each tenant's broker stream,
consumed by one stream-ingest loop per tenant (``setlist.stream.job.consume``, what the
flow runs, in its own process with the tenant's table lock on a real Prefect server),
then compared with a batch load of the same events.

    .venv/bin/python bench/stream.py [--events 1000000] [--tenants 4] [--rate 10000]
        [--broker redis|nats] [--database embedded|sqlite|postgresql] [--no-kill]

Events look like live plays (``ts`` = the time they are produced; users and tracks
skewed as real listening is). The producer keeps a gzipped copy of every event it sent;
once all are committed, each tenant's table is compacted (data-etl's load) and compared
file for file with a batch load of that copy. Halfway, one consumer is killed
(SIGKILL) and started again a second later.

``freshness`` is per produced chunk: from just before its send to the end of the first
commit whose position covers it (the manifest write that makes it visible), weighted
by the chunk's events. ``events_per_s`` is events over the consumers' CPU seconds from
their start (so "per core"), ``max_rss_mb`` the largest consumer's peak resident memory;
each consumer logs both with every batch.

Last line, one JSON object: events, tenants, broker, lost, duplicates, freshness_p50_s,
freshness_p95_s, events_per_s, max_rss_mb, compacted_equals_batch, lost_after_kill,
duplicates_after_kill, killed_tenant, seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

URLS = {"redis": "redis://127.0.0.1:6379/0", "nats": "nats://127.0.0.1:4222"}
TICK_S = 0.1
COUNTRIES = ("US", "GB", "DE", "BR", "JP", "SE", "IN", "FR")


def log(msg: str) -> None:
    print(f"[stream {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- the consumer


def consumer_main(args: argparse.Namespace) -> None:
    """One tenant's stream-ingest loop, logging each committed batch as a JSON line."""
    from contextlib import asynccontextmanager

    from blocks.storage import LocalStorageConfig
    from setlist.brokers.base import open_broker
    from setlist.core.storage import tenant_storage
    from setlist.dispatch.locks import tenant_lock
    from setlist.stream.ingest import IngestSettings
    from setlist.stream.job import consume

    storage = tenant_storage(args.consume, LocalStorageConfig(root=args.store))
    out = open(args.log, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    @asynccontextmanager
    async def table_lock():
        async with tenant_lock(args.consume, "table", timeout_seconds=120):
            yield

    def usage() -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu": ru.ru_utime + ru.ru_stime, "rss_kb": ru.ru_maxrss}

    def on_batch(batch) -> None:
        line = {"last": batch.last, "at": time.time(), "rows": batch.rows, "n": batch.messages}
        out.write(orjson.dumps({**line, **usage()}).decode() + "\n")

    async def main() -> None:
        settings = IngestSettings(
            max_batch_events=args.batch_events, max_batch_seconds=args.batch_s
        )
        async with open_broker(args.broker, URLS[args.broker]) as broker:
            await broker.stream_length(args.consume)  # connected
            out.write(orjson.dumps({"ready": time.time(), **usage()}).decode() + "\n")
            await consume(
                storage, broker, args.broker, table_lock, settings, seconds=10**6, on_batch=on_batch
            )

    asyncio.run(main())


# ------------------------------------------------------------------- the producer


class Events:
    """Live plays of one tenant: ids in order, users and tracks Zipf-skewed."""

    def __init__(self, tenant: str, seed: int):
        self.tenant = tenant
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def take(self, count: int) -> list[bytes]:
        now_ms = int(time.time() * 1000)
        users = self.rng.zipf(1.3, count) % 50_000
        tracks = self.rng.zipf(1.2, count) % 200_000
        played = self.rng.integers(1_000, 300_000, count)
        lines = []
        for i in range(count):
            lines.append(
                orjson.dumps(
                    {
                        "event_id": f"{self.tenant}-{self.n + i:09d}",
                        "tenant_id": self.tenant,
                        "user_id": f"u{users[i]}",
                        "track_id": f"t{tracks[i]}",
                        "artist_id": f"a{tracks[i] % 20_000}",
                        "ts": now_ms,
                        "ms_played": int(played[i]),
                        "device": "ios" if i & 1 else "web",
                        "country": COUNTRIES[users[i] % len(COUNTRIES)],
                    }
                )
            )
        self.n += count
        return lines


def start_consumer(tenant: str, args: argparse.Namespace, work: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--consume",
        tenant,
        "--store",
        str(work / "store"),
        "--log",
        str(work / f"{tenant}.jsonl"),
        "--broker",
        args.broker,
        "--batch-events",
        str(args.batch_events),
        "--batch-s",
        str(args.batch_s),
    ]
    return subprocess.Popen(cmd, env={**os.environ, "PREFECT_API_URL": args.api})


def committed(work: Path, tenant: str) -> list[tuple[tuple[int, ...], float]]:
    from setlist.brokers.base import position_key

    path = work / f"{tenant}.jsonl"
    if not path.exists():
        return []
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return [(position_key(r["last"]), r["at"]) for r in rows if "last" in r]


def consumer_usage(work: Path, tenant: str) -> tuple[float, int]:
    """(CPU seconds from ready to last batch, peak RSS in bytes) over every consumer
    process the tenant had (a killed one counts up to its last logged batch)."""
    path = work / f"{tenant}.jsonl"
    cpu, rss, ready = 0.0, 0, None
    rows = [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]
    for n, row in enumerate(rows):
        if "ready" in row:
            ready = row["cpu"]
        rss = max(rss, row["rss_kb"] * 1024)
        ends = n + 1 == len(rows) or "ready" in rows[n + 1]
        if ends and ready is not None:
            cpu += row["cpu"] - ready
    return cpu, rss


def wait_ready(work: Path, tenants, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paths = [work / f"{t}.jsonl" for t in tenants]
        if all(p.exists() and b"ready" in p.read_bytes() for p in paths):
            return
        time.sleep(0.2)
    raise SystemExit("the consumers did not start")


async def produce_and_wait(args, tenants, work, procs) -> tuple[list, str | None]:
    """Send every event at the rate, killing one consumer halfway; wait until all are
    committed. Returns (chunks as (tenant, last position key, sent at, events), the
    killed tenant)."""
    from setlist.brokers.base import open_broker, position_key

    per_tick = max(1, int(args.rate * TICK_S / len(tenants)))
    gens = {t: Events(t, seed=n) for n, t in enumerate(tenants)}
    copies = {t: gzip.open(work / f"{t}.jsonl.gz", "wb", 1) for t in tenants}  # noqa: SIM115 - closed once all are sent
    chunks: list[tuple[str, tuple[int, ...], float, int]] = []
    sent = 0
    killed = None
    last: dict[str, tuple[int, ...]] = {}
    async with open_broker(args.broker, URLS[args.broker]) as broker:
        start = time.monotonic()
        tick = 0
        while sent < args.events:
            for t in tenants:
                count = min(per_tick, args.events - sent)
                if count <= 0:
                    break
                lines = gens[t].take(count)
                copies[t].write(b"".join(x + b"\n" for x in lines))
                at = time.time()
                positions = await broker.send(t, lines)
                last[t] = position_key(positions[-1])
                chunks.append((t, last[t], at, count))
                sent += count
            tick += 1
            if args.kill and killed is None and sent >= args.events // 2:
                killed = tenants[0]
                procs[killed].send_signal(signal.SIGKILL)
                procs[killed].wait()
                log(f"killed the consumer of {killed} at {sent} events")
                await asyncio.sleep(1.0)
                procs[killed] = start_consumer(killed, args, work)
            delay = start + tick * TICK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        for f in copies.values():
            f.close()
        log(f"sent {sent} events in {time.monotonic() - start:.1f} s; waiting for the commits")
        deadline = time.monotonic() + args.drain_s
        while time.monotonic() < deadline:
            done = [t for t in tenants if (c := committed(work, t)) and max(c)[0] >= last[t]]
            if len(done) == len(tenants):
                break
            await asyncio.sleep(0.5)
    return chunks, killed


def freshness(chunks, work: Path, tenants) -> list[tuple[float, int]]:
    """(seconds from send to visible, events) per chunk; inf when never committed."""
    import bisect

    out = []
    by_tenant = {}
    for t in tenants:
        commits = sorted(committed(work, t))
        # a position is visible at the earliest commit whose last position covers it
        keys = [k for k, _ in commits]
        earliest = list(np.minimum.accumulate([at for _, at in commits][::-1])[::-1])
        by_tenant[t] = (keys, earliest)
    for t, key, at, n in chunks:
        keys, earliest = by_tenant[t]
        i = bisect.bisect_left(keys, key)
        out.append((earliest[i] - at if i < len(keys) else float("inf"), n))
    return out


def check_tables(work: Path, tenants, produced: dict[str, int]) -> dict:
    """Lost and duplicate rows per tenant (as stored, before compaction), then compact
    and compare with a batch load of the producer's copy."""
    import pyarrow as pa

    from blocks.storage import LocalStorageConfig
    from setlist.core.storage import tenant_storage
    from setlist.etl.curated import read_manifest, read_partition
    from setlist.etl.load import load_new_files

    result = {}
    for t in tenants:
        storage = tenant_storage(t, LocalStorageConfig(root=str(work / "store")))
        manifest = read_manifest(storage)
        files = [p for d in manifest.dates for p in manifest.files(d)]
        ids = pa.concat_tables([read_partition(storage, p, ["event_id"]) for p in files])
        stored = ids["event_id"].to_pylist()
        distinct = len(set(stored))
        load_new_files(storage, t, workers=1)
        batch = tenant_storage(t, LocalStorageConfig(root=str(work / "batch")))
        batch.put_bytes("raw/all.jsonl.gz", (work / f"{t}.jsonl.gz").read_bytes())
        load_new_files(batch, t, workers=1)
        same = {d: p.sha256 for d, p in read_manifest(storage).partitions.items()} == {
            d: p.sha256 for d, p in read_manifest(batch).partitions.items()
        }
        result[t] = {
            "lost": produced[t] - distinct,
            "duplicates": len(stored) - distinct,
            "equal": same,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rate", type=int, default=10_000, help="events/s over all tenants")
    parser.add_argument("--broker", choices=sorted(URLS), default="redis")
    parser.add_argument("--database", default="embedded")
    parser.add_argument("--batch-events", type=int, default=20_000)
    parser.add_argument("--batch-s", type=float, default=1.0)
    parser.add_argument("--drain-s", type=float, default=300)
    parser.add_argument("--no-kill", dest="kill", action="store_false")
    # the consumer process's own arguments
    parser.add_argument("--consume", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        consumer_main(args)
        return

    from bench.servers import prefect_server
    from setlist.brokers.base import open_broker

    t0 = time.monotonic()
    run = os.urandom(3).hex()
    tenants = [f"bench-stream-{run}-{n}" for n in range(args.tenants)]
    with (
        tempfile.TemporaryDirectory(prefix="setlist-bench-stream-") as tmp,
        prefect_server(args.database) as api,
    ):
        args.api = api
        work = Path(tmp)
        procs = {t: start_consumer(t, args, work) for t in tenants}
        wait_ready(work, tenants)
        try:
            chunks, killed = asyncio.run(produce_and_wait(args, tenants, work, procs))
        finally:
            for p in procs.values():
                p.kill()
                p.wait()

            async def cleanup() -> None:
                async with open_broker(args.broker, URLS[args.broker]) as broker:
                    for t in tenants:
                        await broker.delete_stream(t)

            asyncio.run(cleanup())
        fresh = freshness(chunks, work, tenants)
        produced = {t: sum(n for tt, _, _, n in chunks if tt == t) for t in tenants}
        tables = check_tables(work, tenants, produced)
        spent = [consumer_usage(work, t) for t in tenants]
    weights = np.array([n for _, n in fresh], dtype=float)
    ages = np.array([s for s, _ in fresh])
    order = np.argsort(ages)
    cum = np.cumsum(weights[order]) / weights.sum()

    def pct(q: float) -> float:
        value = ages[order][np.searchsorted(cum, q)]
        return round(float(value), 3) if np.isfinite(value) else None

    cpu = sum(c for c, _ in spent)
    events = sum(produced.values())
    out = {
        "events": events,
        "tenants": len(tenants),
        "broker": args.broker,
        "rate": args.rate,
        "lost": sum(v["lost"] for v in tables.values()),
        "duplicates": sum(v["duplicates"] for v in tables.values()),
        "freshness_p50_s": pct(0.50),
        "freshness_p95_s": pct(0.95),
        "events_per_s": round(events / cpu, 1) if cpu else None,
        "max_rss_mb": round(max(r for _, r in spent) / 2**20, 1),
        "compacted_equals_batch": all(v["equal"] for v in tables.values()),
        "killed_tenant": killed is not None,
        "lost_after_kill": tables[killed]["lost"] if killed else None,
        "duplicates_after_kill": tables[killed]["duplicates"] if killed else None,
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
