"""Prometheus exporter: the platform's state, read from the Prefect API on each scrape.

Cost. A scrape reads (1) the runs that are due or under way, (2) the runs that finished
since the previous scrape (a watermark on end time; finished runs don't change), (3)
the workers of each Setlist pool, and every ``profile_ttl`` seconds (4) the tenant
profiles (quotas). Each read is paged 200 at a time, so a scrape costs a few calls
plus one per 200 busy or newly finished runs — never a call per tenant or per queue.
The first scrape reads the whole ``window`` of finished runs once.

Storage. Every ``storage_ttl`` seconds a scrape also measures each tenant's bytes in the
object store (``setlist.tenants.usage``: its prefix of the data store and of the backup
store, listed with the platform's credentials from the stores' blocks: one API call for
the blocks, then one store call per 1000 objects). Between measurements the last ones
are served. A tenant whose store can't be read has no storage sample that scrape.

Streams. With the same handles, a scrape reads the tenants' live analytics snapshots
(``stream_metrics``): every ``stream_ttl`` seconds for a tenant that streams, every
``storage_ttl`` for the others; a tenant's junk snapshot costs only its own samples.

Cardinality. Labels are tenant, job type, band, state and pool: bounded by the number
of tenants, never by runs (no run ids, no run names).

Finished runs are counted once each (``setlist_jobs_finished_total`` and the duration
histogram are counters from the exporter's start, as Prometheus expects); the success
ratio and finished counts over the window are gauges recomputed every scrape.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from setlist.core.credentials import http_auth
from setlist.core.tenancy import JOB_DEADLINE_SECONDS, parse_queue_name
from setlist.observability.stream_metrics import STREAM_JOB, LiveSnapshots
from setlist.tenants.usage import GIB, PlatformStores, StorageUsage, UsageCache

PAGE = 200
logger = logging.getLogger("setlist.metrics")
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
ACTIVE = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED")
BUSY = ("PENDING", "RUNNING", "CANCELLING")
# Seconds; spans the job types' run times (minutes for canaries, hours for training).
BUCKETS = (30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0)
SLA_SUCCESS_RATIO = 0.995
PROFILE_SLUG = "setlist-tenant-profile"
STORE_SLUGS = ("setlist-local-storage", "setlist-s3-storage")


@dataclass(frozen=True)
class RunFacts:
    """What the metrics need of a run; nothing that identifies it goes into a label."""

    id: str
    tenant: str
    job_type: str
    band: str
    state: str  # state type, lower case
    late: bool
    expected_start: datetime | None
    end: datetime | None
    seconds: float


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def run_facts(run: dict[str, Any]) -> RunFacts | None:
    """A Setlist run's labels from its queue (tenant, band) and tags (job type)."""
    tags = run.get("tags") or []
    parsed = parse_queue_name(run.get("work_queue_name") or "")
    tenant = parsed[0] if parsed else next((t[7:] for t in tags if t.startswith("tenant:")), "")
    if not tenant:
        return None
    band = parsed[1].value if parsed else next((t[5:] for t in tags if t.startswith("band:")), "")
    state = run.get("state") or {}
    return RunFacts(
        id=run["id"],
        tenant=tenant,
        job_type=next((t[4:] for t in tags if t.startswith("job:")), "unknown"),
        band=band or "unknown",
        state=(state.get("type") or run.get("state_type") or "unknown").lower(),
        late=(state.get("name") or run.get("state_name")) == "Late",
        expected_start=_ts(run.get("expected_start_time")),
        end=_ts(run.get("end_time")),
        seconds=float(run.get("total_run_time") or 0.0),
    )


def queue_waits(active: list[RunFacts], now: datetime) -> dict[tuple[str, str], list[float]]:
    """(tenant, band) → how long each due run still waiting has waited, in seconds."""
    waits: dict[tuple[str, str], list[float]] = defaultdict(list)
    for f in active:
        if f.state == "scheduled" and f.expected_start:
            waits[(f.tenant, f.band)].append((now - f.expected_start).total_seconds())
    return waits


class PrefectReader:
    """The few API reads a scrape makes, counted."""

    def __init__(self, api_url: str, timeout: float = 10.0):
        self._http = httpx.Client(
            base_url=api_url.rstrip("/") + "/", timeout=timeout, auth=http_auth()
        )
        self.calls = 0

    def post(self, path: str, body: dict[str, Any]) -> Any:
        self.calls += 1
        response = self._http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def paged(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self.post(path, {**body, "limit": PAGE, "offset": offset})
            yield from page
            if len(page) < PAGE:
                return
            offset += PAGE

    def close(self) -> None:
        self._http.close()


@dataclass
class TenantQuota:
    concurrent_jobs: int
    weight: float
    storage_gb: int = 0
    storage_block: str = "setlist-storage"


@dataclass
class Snapshot:
    """One read of the API, as a scrape makes it, for views other than Prometheus's
    (``setlist monitor``)."""

    at: datetime
    active: list[RunFacts]  # due or under way
    finished: list[RunFacts]  # finished within the window
    workers: dict[str, int]  # pool → workers online
    quotas: dict[str, TenantQuota]


class Exporter(Collector):
    """A prometheus_client collector; each ``collect`` is one scrape of the API."""

    def __init__(
        self,
        api_url: str,
        pools: list[str],
        *,
        window: timedelta = timedelta(hours=24),
        profile_ttl: float = 60.0,
        buckets: tuple[float, ...] = BUCKETS,
        storage_ttl: float = 300.0,
        backup_block: str | None = None,
        stream_ttl: float = 10.0,
    ):
        from setlist.core.settings import get_settings

        self.api_url = api_url
        self.pools = pools
        self.window = window
        self.profile_ttl = profile_ttl
        self.storage_ttl = storage_ttl
        self.backup_block = backup_block or get_settings().backup_block
        self._stores = PlatformStores({})
        self._stores_at = -math.inf
        self._usage = UsageCache(self._measure, ttl=storage_ttl)
        self._storage: dict[str, StorageUsage] = {}
        self._live = LiveSnapshots(ttl=stream_ttl, idle_ttl=storage_ttl)
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._finished: dict[str, RunFacts] = {}  # within the window, by run id
        self._watermark: datetime | None = None
        self._counted: dict[str, datetime | None] = {}  # run id → end time counted
        self._finished_total: Counter[tuple[str, str, str, str]] = Counter()
        self._hist: dict[str, list[int]] = defaultdict(lambda: [0] * (len(self.buckets) + 1))
        self._hist_sum: Counter[str] = Counter()
        self._quotas: dict[str, TenantQuota] = {}
        self._quotas_at = -math.inf
        self.last_api_calls = 0
        self.last_scrape_s = 0.0

    # ------------------------------------------------------------------ reads

    def _read_quotas(self, api: PrefectReader) -> None:
        if time.monotonic() - self._quotas_at < self.profile_ttl:
            return
        quotas = {}
        body = {"block_types": {"slug": {"any_": [PROFILE_SLUG]}}, "include_secrets": False}
        for doc in api.paged("block_documents/filter", body):
            data = doc.get("data") or {}
            quota = data.get("quota") or {}
            if data.get("tenant_id"):
                quotas[data["tenant_id"]] = TenantQuota(
                    int(quota.get("concurrent_jobs", 0)),
                    float(quota.get("weight", 1.0)),
                    int(quota.get("storage_gb", 0)),
                    data.get("storage_block") or "setlist-storage",
                )
        self._quotas, self._quotas_at = quotas, time.monotonic()

    def _read_stores(self, api: PrefectReader) -> None:
        """The platform's store blocks the tenants use, with their credentials (the
        exporter runs with the platform's API credential, as ``setlist up`` does)."""
        from blocks.storage import LocalStorageConfig, S3StorageConfig

        if time.monotonic() - self._stores_at < self.storage_ttl:
            return
        names = sorted({q.storage_block for q in self._quotas.values()} | {self.backup_block})
        body = {
            "block_documents": {"name": {"any_": names}},
            "block_types": {"slug": {"any_": list(STORE_SLUGS)}},
            "include_secrets": True,
        }
        types = {"setlist-local-storage": LocalStorageConfig, "setlist-s3-storage": S3StorageConfig}
        configs: dict[str, object] = {}
        for doc in api.paged("block_documents/filter", body):
            block_type = types.get((doc.get("block_type") or {}).get("slug", ""))
            if block_type is not None and doc.get("name"):
                try:
                    configs[doc["name"]] = block_type(**(doc.get("data") or {}))
                except ValueError as exc:  # a block this release can't read: no usage
                    logger.warning("storage block %s unreadable: %s", doc["name"], exc)
        self._stores, self._stores_at = PlatformStores(configs), time.monotonic()

    def _measure(self, tenant_id: str) -> StorageUsage:
        block = self._quotas[tenant_id].storage_block
        return self._stores.measure(tenant_id, block, self.backup_block)

    def _read_storage(self) -> None:
        """Each tenant's usage, measured at most every ``storage_ttl`` seconds; a tenant
        whose store fails keeps no sample (a stale or zero one would mislead)."""
        storage = {}
        for tenant_id in sorted(self._quotas):
            try:
                storage[tenant_id] = self._usage.get(tenant_id)
            except Exception as exc:  # noqa: BLE001 - one store's fault must not end the scrape
                logger.warning("storage usage of %s not measured: %s", tenant_id, exc)
        self._usage.forget(self._quotas)
        self._storage = storage

    def _read_live(self, active: list[RunFacts]) -> None:
        """The tenants' live analytics snapshots, each at its cadence (``stream_metrics``)."""
        streaming = {f.tenant for f in active if f.job_type == STREAM_JOB}
        self._live.refresh(
            self._quotas,
            lambda tenant: self._stores.handle(tenant, self._quotas[tenant].storage_block),
            streaming,
        )

    def _read_finished(self, api: PrefectReader, now: datetime) -> None:
        since = now - self.window
        after = max(self._watermark - timedelta(seconds=5), since) if self._watermark else since
        body = {
            "flow_runs": {
                "tags": {"all_": ["setlist"]},
                "state": {"type": {"any_": list(TERMINAL)}},
                "end_time": {"after_": after.isoformat(), "before_": now.isoformat()},
            },
            "sort": "END_TIME_DESC",
        }
        for raw in api.paged("flow_runs/filter", body):
            facts = run_facts(raw)
            if facts is None:
                continue
            self._finished[facts.id] = facts
            if self._counted.get(facts.id, 0) != facts.end:  # once per finish
                self._counted[facts.id] = facts.end
                self._count(facts)
        self._watermark = now
        for run_id in [k for k, f in self._finished.items() if f.end and f.end < since]:
            del self._finished[run_id]
            self._counted.pop(run_id, None)

    def _count(self, f: RunFacts) -> None:
        self._finished_total[(f.tenant, f.job_type, f.band, f.state)] += 1
        if f.state in ("completed", "failed"):  # crashed/cancelled times say nothing of the job
            counts = self._hist[f.job_type]
            for i, bound in enumerate(self.buckets):
                if f.seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self._hist_sum[f.job_type] += f.seconds

    def _read_active(self, api: PrefectReader, now: datetime) -> list[RunFacts]:
        body = {
            "flow_runs": {
                "tags": {"all_": ["setlist"]},
                "state": {"type": {"any_": list(ACTIVE)}},
                "expected_start_time": {"before_": now.isoformat()},  # due, not merely planned
            },
            "sort": "EXPECTED_START_TIME_ASC",
        }
        return [f for raw in api.paged("flow_runs/filter", body) if (f := run_facts(raw))]

    def _read_workers(self, api: PrefectReader) -> dict[str, int]:
        online = {}
        for pool in self.pools:
            try:
                workers = api.post(f"work_pools/{pool}/workers/filter", {"limit": PAGE})
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 404:
                    continue  # a pool this installation doesn't use
                raise
            online[pool] = sum(1 for w in workers if w.get("status") == "ONLINE")
        return online

    def _read(self, api: PrefectReader, now: datetime) -> tuple[list[RunFacts], dict[str, int]]:
        """What a scrape reads: quotas (when stale), newly finished runs, due and busy runs,
        workers; returns (active runs, workers online by pool)."""
        self._read_quotas(api)
        self._read_finished(api, now)
        return self._read_active(api, now), self._read_workers(api)

    def snapshot(self) -> Snapshot:
        """The same reads as a scrape, as data; raises ``httpx.HTTPError`` when the API
        can't be read."""
        with self._lock:
            now = datetime.now(UTC)
            api = PrefectReader(self.api_url)
            try:
                active, workers = self._read(api, now)
            finally:
                api.close()
            return Snapshot(now, active, list(self._finished.values()), workers, dict(self._quotas))

    def prime(self) -> bool:
        """Read the window of finished runs now, so the first scrape is as cheap as any.

        False if the API can't be read (the first scrape then reads the window)."""
        with self._lock:
            api = PrefectReader(self.api_url)
            try:
                self._read_quotas(api)
                self._read_finished(api, datetime.now(UTC))
                return True
            except httpx.HTTPError:
                return False
            finally:
                api.close()

    # ------------------------------------------------------------------ scrape

    def collect(self) -> Iterator[Any]:
        with self._lock:
            yield from self._scrape()

    def _scrape(self) -> Iterator[Any]:
        t0 = time.perf_counter()
        now = datetime.now(UTC)
        api = PrefectReader(self.api_url)
        up = GaugeMetricFamily("setlist_up", "1 when the Prefect API answered this scrape")
        try:
            active, workers = self._read(api, now)
            self._read_stores(api)  # a scrape's only: `setlist monitor` shows no storage
        except httpx.HTTPError:
            up.add_metric([], 0)
            yield up
            return
        finally:
            api.close()
        self._read_storage()
        self._read_live(active)
        up.add_metric([], 1)
        yield up
        yield from self._families(active, workers, now)
        self.last_api_calls = api.calls
        self.last_scrape_s = time.perf_counter() - t0
        calls = GaugeMetricFamily(
            "setlist_exporter_api_calls", "Prefect API calls the last scrape made"
        )
        calls.add_metric([], api.calls)
        yield calls
        took = GaugeMetricFamily(
            "setlist_exporter_scrape_seconds", "time the last scrape spent reading the API"
        )
        took.add_metric([], self.last_scrape_s)
        yield took

    def _families(self, active: list[RunFacts], workers: dict[str, int], now: datetime):
        tbjs = ["tenant", "job_type", "band", "state"]
        jobs = GaugeMetricFamily(
            "setlist_jobs",
            "runs due or under way, by tenant, job type, band and state",
            labels=tbjs,
        )
        for key, n in sorted(
            Counter((f.tenant, f.job_type, f.band, f.state) for f in active).items()
        ):
            jobs.add_metric(list(key), n)
        yield jobs

        finished = CounterMetricFamily(
            "setlist_jobs_finished", "runs that finished, by final state", labels=tbjs
        )
        for key, n in sorted(self._finished_total.items()):
            finished.add_metric(list(key), n)
        yield finished

        duration = HistogramMetricFamily(
            "setlist_job_duration_seconds",
            "run time of completed and failed runs",
            labels=["job_type"],
        )
        for job_type, counts in sorted(self._hist.items()):
            buckets = [(str(b), counts[i]) for i, b in enumerate(self.buckets)]
            buckets.append(("+Inf", counts[-1]))
            duration.add_metric([job_type], buckets, self._hist_sum[job_type])
        yield duration

        window = f"{int(self.window.total_seconds() // 3600)}h"
        by_type: dict[str, Counter] = defaultdict(Counter)
        for f in self._finished.values():
            by_type[f.job_type][f.state] += 1
        ratio = GaugeMetricFamily(
            "setlist_job_success_ratio",
            f"completed / (completed + failed + crashed) over the window (SLA: "
            f"{SLA_SUCCESS_RATIO})",
            labels=["job_type", "window"],
        )
        in_window = GaugeMetricFamily(
            "setlist_jobs_window",
            "runs finished within the window",
            labels=["job_type", "state", "window"],
        )
        for job_type, states in sorted(by_type.items()):
            decided = states["completed"] + states["failed"] + states["crashed"]
            if decided:
                ratio.add_metric([job_type, window], states["completed"] / decided)
            for state, n in sorted(states.items()):
                in_window.add_metric([job_type, state, window], n)
        yield ratio
        yield in_window

        depth = GaugeMetricFamily(
            "setlist_queue_depth",
            "runs due and waiting, by tenant and band",
            labels=["tenant", "band"],
        )
        oldest = GaugeMetricFamily(
            "setlist_queue_oldest_wait_seconds",
            "how long the oldest due run has waited",
            labels=["tenant", "band"],
        )
        for key, ages in sorted(queue_waits(active, now).items()):
            depth.add_metric(list(key), len(ages))
            oldest.add_metric(list(key), max(0.0, max(ages)))
        yield depth
        yield oldest

        late = GaugeMetricFamily("setlist_jobs_late", "runs Prefect marked Late", labels=["tenant"])
        for tenant, n in sorted(Counter(f.tenant for f in active if f.late).items()):
            late.add_metric([tenant], n)
        yield late

        running = GaugeMetricFamily(
            "setlist_tenant_running",
            "runs Pending, Running or Cancelling (what the quota limits)",
            labels=["tenant"],
        )
        quota = GaugeMetricFamily(
            "setlist_tenant_quota", "the tenant's concurrent-jobs quota", labels=["tenant"]
        )
        busy = Counter(f.tenant for f in active if f.state.upper() in BUSY)
        for tenant in sorted(set(busy) | set(self._quotas)):
            running.add_metric([tenant], busy.get(tenant, 0))
            if tenant in self._quotas:
                quota.add_metric([tenant], self._quotas[tenant].concurrent_jobs)
        yield running
        yield quota

        stored = GaugeMetricFamily(
            "setlist_tenant_storage_bytes",
            "bytes the tenant holds in the object store (its data and backup prefixes)",
            labels=["tenant"],
        )
        storage_quota = GaugeMetricFamily(
            "setlist_tenant_storage_quota_bytes",
            "the tenant's storage quota (storage_gb GiB); jobs that write are refused at it",
            labels=["tenant"],
        )
        for tenant, usage in sorted(self._storage.items()):
            stored.add_metric([tenant], usage.bytes)
        for tenant, q in sorted(self._quotas.items()):
            if q.storage_gb > 0:
                storage_quota.add_metric([tenant], q.storage_gb * GIB)
        yield stored
        yield storage_quota
        yield from self._live.families(now)

        online = GaugeMetricFamily(
            "setlist_workers_online", "workers polling the pool", labels=["pool"]
        )
        for pool, n in sorted(workers.items()):
            online.add_metric([pool], n)
        yield online

        sla = GaugeMetricFamily(
            "setlist_job_sla_seconds", "the run-time SLA of each job type", labels=["job_type"]
        )
        for job_type, seconds in sorted(JOB_DEADLINE_SECONDS.items()):
            sla.add_metric([job_type.value], seconds)
        yield sla


def registry_for(exporter: Exporter) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    return registry


def serve(exporter: Exporter, port: int, addr: str = "0.0.0.0"):
    """Serve /metrics over HTTP in a background thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr, registry=registry_for(exporter))


def run(api_url: str, pools: list[str], port: int, addr: str, window_hours: int = 24) -> None:
    """Prime, serve, and stay until interrupted (``setlist metrics`` and ``make up``),
    sending the warnings' digest every ``SETLIST_ALERT_DIGEST_MINUTES`` meanwhile: the
    exporter is the one observability process that always runs, once."""
    exporter = Exporter(api_url, pools, window=timedelta(hours=window_hours))
    exporter.prime()  # the window's history once, before Prometheus's first scrape
    serve(exporter, port, addr=addr)
    print(f"serving Setlist metrics on http://{addr}:{port}/metrics from {api_url}", flush=True)
    from setlist.core.settings import get_settings

    minutes = get_settings().alert_digest_minutes
    while True:
        time.sleep(minutes * 60 if minutes else 3600)
        if minutes:
            _send_digest()


def _send_digest() -> None:
    """One due digest; a failure is logged and the period stays due for the next."""
    import anyio
    from prefect.client.orchestration import get_client

    from setlist.observability.digest import send_due

    async def send() -> None:
        async with get_client() as client:
            done = await send_due(client)
        if done and done.sent_to:
            print(f"digest of {done.warnings} warnings sent to {done.sent_to}", flush=True)

    try:
        anyio.run(send)
    except Exception as exc:  # noqa: BLE001 - the exporter must keep serving
        print(f"digest not sent ({_reason(exc)}); retried next period", flush=True)


def _reason(exc: Exception) -> str:
    """Why a send failed, without what a block keeps secret: a webhook's URL can be its
    credential (Slack's is), and an HTTP error's text names the URL."""
    import httpx
    from prefect.blocks.abstract import NotificationError

    if isinstance(exc, NotificationError):
        return exc.log  # the block's own account (SmtpEmail's names no password)
    if isinstance(exc, httpx.HTTPStatusError):
        return f"the notification endpoint answered {exc.response.status_code}"
    return type(exc).__name__


if (
    __name__ == "__main__"
):  # python -m setlist.observability.metrics --port 9464 (how `setlist up` runs it)
    import argparse

    from prefect.settings import PREFECT_API_URL

    from setlist.core.settings import get_settings

    parser = argparse.ArgumentParser(description="Setlist Prometheus exporter")
    parser.add_argument("--addr", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9464)
    args = parser.parse_args()
    run(PREFECT_API_URL.value(), get_settings().pools, args.port, args.addr)
