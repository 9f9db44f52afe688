"""Soak: a long mixed load of every job type over many tenants and bands on the whole
local stack, to find what only shows after hundreds of runs: a service that leaks, a run
that never ends, a failure rate above the platform's floor.

    .venv/bin/python bench/soak.py [--runs 500] [--tenants 8] [--in-flight N]
                                   [--drain-s 900] [--sample-s 5] [--seed N] [--keep]

The stack is ``setlist.stack.start`` in a home of its own on free ports: the gated
Prefect server on the embedded PostgreSQL, the dispatcher, a process worker (its limit
is the pool's, ``PARALLEL_JOBS``), the webhook gateway and the metrics exporter, which
is scraped every 15 s as Prometheus would. ``--tenants`` tenants are onboarded with
concurrent-jobs quotas of 1 to 4 and different fair-share weights (so the pool is
contended and the dispatcher has choices to make), each with a small curated table and
raw files, and one more tenant whose raw files are all hostile.

The load (``--runs`` in all, a quick check is ``--runs 40``) is drawn at random, every
band and several tiers: canary, data-etl (each on a freshly dropped raw file),
ml-training (the smallest model the flow accepts), billing-report, security-scan and
tenant-backup submitted as ``setlist submit`` does; signed webhooks through the gateway,
each a data drop that triggers the tenant's data-etl; and runs that must fail on their
input (a data-etl of the hostile tenant, a billing report of a period in the future).
Those are counted apart and left out of ``success_ratio``, but each must fail for its
own reason. One tenant retrains after every ETL load (its deployment trigger), so runs
that nobody submitted are part of the load too. At most ``--in-flight`` runs (default:
twice the worker's limit, so a backlog always waits on bands and quotas) are due and
unfinished at once; the next is sent as one finishes, so the soak lasts long enough for
memory to mean something.

Memory: every ``--sample-s`` seconds, the RSS of each long-running process (server,
dispatcher, worker, gateway, metrics exporter) with any children it has, except the
worker's, which are the flow runs; for PostgreSQL the PSS of the postmaster and all its
backends (their RSS would count the shared buffers once per backend) less its shared
memory, which is sampled and reported beside it: a segment of fixed size whose pages
count as the buffer cache warms up, so it rises towards ``shared_buffers`` and can't
leak. Warm-up ends when a fifth of the runs have finished; growth is the median of the
last fifth of the samples taken from then until the last run was sent, over the median
of the first fifth of them, minus one. Every sample lands in the home's
``logs/memory.csv``, with the runs finished so far.

The last line is one JSON object: ``runs`` (every due run of the soak, whoever started
it), ``success_ratio`` (Completed among them, the on-purpose failures left out),
``stuck_runs`` (not finished ``--drain-s`` after the last was sent), ``rss_growth`` per
service and ``max_rss_growth``, ``p95_pending_to_running_s`` (from each run's state
history), ``bad_input_runs`` and how many failed as they should, per job type, band and
origin the states, the webhooks' fate, the first failed runs' messages, and submissions
the platform refused (``launch_errors``). ``passed``: ≥ 500 runs, success ratio ≥
0.995, no stuck run, no refused submission, no service grown more than 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.servers import free_port  # noqa: E402

BANDS = ("critical", "high", "normal", "low", "batch")
# Share of each kind of work in the load; "hook" is a webhook through the gateway.
MIX = {
    "canary": 0.24,
    "data-etl": 0.16,
    "ml-training": 0.10,
    "billing-report": 0.12,
    "security-scan": 0.12,
    "tenant-backup": 0.10,
    "hook": 0.12,
    "bad": 0.04,
}
# Tiers a submission may name (None: the tenant's default for the job type).
TIERS = {
    "canary": (None, "small", "medium"),
    "data-etl": (None, "medium", "large"),
    "ml-training": (None, "large", "xlarge"),
    "billing-report": (None, "small", "medium"),
    "security-scan": (None, "small", "medium"),
    "tenant-backup": (None, "medium", "large"),
}
QUOTAS = (1, 2, 3, 4, 2, 1, 3, 2)  # concurrent jobs of the tenants, in turn
WEIGHTS = (1.0, 2.0, 1.0, 0.5, 3.0, 1.0, 1.5, 1.0)
HOSTILE = "soak-hostile"
SOURCE = "soak"
SECRET = "soak-signing-secret-" + "0123456789abcdef"
# What a run that fails on purpose must say, so that failing for another reason shows.
BAD_REASONS = {"hostile-etl": "lines are bad", "future-billing": "in the future"}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
ACTIVE = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")
HOOK_WAIT_S = 120  # a webhook's run not seen after this long stops holding a slot
SCRAPE_S = 15


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- the plan


@dataclass
class Item:
    """One unit of the load: a submission, a webhook, or a run that must fail."""

    n: int
    kind: str  # a job type, "hook" or "bad"
    tenant: str
    band: str | None = None
    tier: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    bad: str | None = None  # the on-purpose failure, a key of BAD_REASONS

    @property
    def job(self) -> str:
        if self.kind == "hook":
            return "data-etl"
        if self.kind == "bad":
            return "data-etl" if self.bad == "hostile-etl" else "billing-report"
        return self.kind


def _params(job: str, rng: random.Random) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    if job == "canary":
        return {"payload_bytes": rng.choice([256, 1024, 65536]), "hold_seconds": rng.choice([0, 1])}
    if job == "data-etl":
        return {"workers": 1, "batch_rows": 1000}
    if job == "ml-training":
        # The smallest model the flow accepts; a seed in few values, so some runs find
        # their model already registered and return at once, as retries would.
        return {
            "params": {
                "factors": rng.choice([2, 4]),
                "iterations": rng.choice([1, 2]),
                "cg_steps": 1,
                "seed": rng.randrange(4),
            },
            "device": "cpu",
        }
    if job == "billing-report":
        return {"period": rng.choice(["yesterday", today.isoformat(), today.strftime("%Y-%m")])}
    if job == "security-scan":
        return {"sample_rate": 0.2, "posture_source": "rendered"}
    if job == "tenant-backup":
        return {"prune_after": rng.random() < 0.2}
    raise ValueError(job)


def make_plan(runs: int, tenants: list[str], rng: random.Random) -> list[Item]:
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=runs)
    # Every kind at least once, even in a quick run.
    for i, kind in enumerate(MIX):
        if kind not in kinds and i < runs:
            kinds[rng.randrange(runs)] = kind
    items = []
    for n, kind in enumerate(kinds):
        tenant = rng.choice(tenants)
        if kind == "hook":
            items.append(Item(n, kind, tenant))
        elif kind == "bad":
            bad = rng.choice(list(BAD_REASONS))
            if bad == "hostile-etl":
                items.append(Item(n, kind, HOSTILE, rng.choice(BANDS), None, {"workers": 1}, bad))
            else:
                future = {"period": f"{datetime.now(UTC).year + 3}-01"}
                items.append(Item(n, kind, tenant, rng.choice(BANDS), None, future, bad))
        else:
            tier = rng.choice(TIERS[kind])
            items.append(Item(n, kind, tenant, rng.choice(BANDS), tier, _params(kind, rng)))
    return items


# ------------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids[ppid].append(int(entry.name))
    return kids


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _kib(pid: int, fields: tuple[str, ...], source: str = "status") -> dict[str, int]:
    """``kB`` fields of /proc/PID/status (VmRSS) or /proc/PID/smaps_rollup (Pss…);
    nothing for a process that is gone."""
    try:
        lines = Path(f"/proc/{pid}/{source}").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in fields:
            out[name] = int(rest.split()[0])
    return out


PG_FIELDS = ("Pss", "Pss_Anon", "Pss_Shmem")


class Memory:
    """Timed samples of each long-running process's memory, in MiB.

    PostgreSQL's is its processes' own (PSS less shared memory); its shared memory is
    sampled beside it (``postgres.shmem``) but judged apart: it is one segment of fixed
    size allocated at start (``shared_buffers`` and the like), whose pages count only
    once touched, so it "grows" as the buffer cache warms up to a bound set in advance
    and can't leak. ``postgres.total`` is both; ``postgres.processes`` how many backends
    and helpers there were (backends come and go with connections)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.children_seen: dict[str, int] = {}

    def sample(self, finished: int = 0) -> dict[str, float]:
        kids = _children()
        row: dict[str, float] = {"_finished": finished}
        for name, pid in self.pids.items():
            # The worker's children are the flow runs, not the worker.
            procs = [pid] if name == "worker" else _tree(pid, kids)
            self.children_seen[name] = max(self.children_seen.get(name, 0), len(procs) - 1)
            if name == "postgres":
                total: Counter = Counter()
                for p in procs:
                    total.update(_kib(p, PG_FIELDS, "smaps_rollup"))
                row[name] = round((total["Pss"] - total["Pss_Shmem"]) / 1024, 1)
                row["postgres.shmem"] = round(total["Pss_Shmem"] / 1024, 1)
                row["postgres.total"] = round(total["Pss"] / 1024, 1)
                row["postgres.processes"] = len(procs)
            else:
                rss = sum(_kib(p, ("VmRSS",)).get("VmRSS", 0) for p in procs)
                row[name] = round(rss / 1024, 1)
        self.samples.append((time.time(), row))
        return row

    def write_csv(self, path: Path, marks: dict[str, float | None]) -> None:
        """Every sample, for a plot of what grew and when (``marks``: phase times)."""
        names = list(self.samples[0][1]) if self.samples else []
        lines = [",".join(["t", *names])]
        lines += [
            ",".join([f"{t:.1f}", *(str(r.get(n, "")) for n in names)]) for t, r in self.samples
        ]
        lines += [f"# {k}={v}" for k, v in marks.items()]
        path.write_text("\n".join(lines) + "\n")

    def growth(self, since: float | None, until: float | None) -> dict[str, Any]:
        """Median of the last fifth over median of the first fifth of the samples taken
        in [since, until], minus one, per series."""
        if since is None:
            return {"error": "warm-up never ended", "samples": len(self.samples)}
        window = [r for t, r in self.samples if since <= t <= (until or float("inf"))]
        if len(window) < 10:
            return {"error": f"{len(window)} samples after warm-up; 10 needed"}
        fifth = max(2, len(window) // 5)
        first, last = window[:fifth], window[-fifth:]
        out: dict[str, Any] = {"samples": len(window), "per_service": {}}
        for name in (n for n in window[0] if not n.startswith("_")):
            a = round(statistics.median(r.get(name, 0) for r in first), 1)
            b = round(statistics.median(r.get(name, 0) for r in last), 1)
            out["per_service"][name] = {
                "mib_after_warmup": a,
                "mib_at_end": b,
                "growth": round(b / a - 1, 4) if a else None,
                "peak_mib": max(r.get(name, 0) for r in window),
            }
        return out


# ------------------------------------------------------------------- the stack


def shared_buffers(home: Path) -> str | None:
    """The embedded PostgreSQL's ``shared_buffers``: where its shared memory stops."""
    try:
        conf = (home / "postgres" / "data" / "postgresql.conf").read_text()
    except OSError:
        return None
    found = None
    for line in conf.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "shared_buffers":
            found = value.split("#")[0].strip()
    return found


def bring_up(home: Path) -> tuple[Any, int, int]:
    from setlist import stack
    from setlist.core.settings import get_settings

    os.environ["SETLIST_HOME"] = str(home)
    get_settings.cache_clear()
    gateway_port, metrics_port = free_port(), free_port()
    state = stack.start(
        port=free_port(), gateway_port=gateway_port, metrics_port=metrics_port, echo=log
    )
    return state, gateway_port, metrics_port


async def wait_answering(url: str, what: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=3) as http:
        while True:
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the {what} did not answer at {url} in {timeout:.0f} s")
            await asyncio.sleep(0.5)


async def onboard(tenants: list[str], seed: int) -> Any:
    """The tenants (contended quotas), their data, the hostile one, the webhook source.
    → the storage config the tenants' data is on."""
    from prefect.client.orchestration import get_client

    from blocks.webhook import SignatureScheme
    from setlist.core.settings import get_settings
    from setlist.core.storage import load_storage_config, tenant_storage
    from setlist.core.tenancy import TenantQuota
    from setlist.etl.demo import listening_table, publish_curated, raw_files, write_sample_data
    from setlist.gateway.sources import save_source
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    config = await load_storage_config(get_settings().storage_block)
    async with get_client() as client:
        for i, tenant in enumerate(tenants):
            quota = TenantQuota(concurrent_jobs=QUOTAS[i % len(QUOTAS)], weight=WEIGHTS[i % 8])
            spec = TenantSpec(
                tenant_id=tenant,
                quota=quota,
                default_priority=BANDS[i % len(BANDS)],
                training_policy="after-etl" if i == 0 else "manual",
            )
            await create_tenant(client, spec)
            storage = tenant_storage(tenant, config)
            write_sample_data(storage, events=400, files=2, seed=seed + i)
            events = listening_table(tenant, users=150, tracks=120, events=4000, days=14, seed=i)
            publish_curated(storage, events)
        spec = TenantSpec(tenant_id=HOSTILE, quota=TenantQuota(concurrent_jobs=1))
        await create_tenant(client, spec)
    # Every line defective: any data-etl of this tenant must refuse the load.
    files, _ = raw_files(HOSTILE, events=300, files=2, defect_share=1.0, prefix="raw/hostile")
    storage = tenant_storage(HOSTILE, config)
    for key, data in files.items():
        storage.put_bytes(key, data)
    await save_source(
        SOURCE,
        SECRET,
        scheme=SignatureScheme.setlist,
        allowed_tenants=tenants,
        rate_limit_per_s=1000,
        burst=1000,
    )
    return config


def drop_raw_file(config: Any, tenant: str, n: int, seed: int) -> str:
    """A fresh small raw file for the tenant, as a partner's data drop: the next data-etl
    has something new to load."""
    from setlist.core.storage import tenant_storage
    from setlist.etl.demo import raw_files

    prefix = f"raw/soak-{n:05d}"
    files, _ = raw_files(tenant, events=150, files=1, seed=seed * 100_003 + n, prefix=prefix)
    storage = tenant_storage(tenant, config)
    for key, data in files.items():
        storage.put_bytes(key, data)
    return next(iter(files))


# ------------------------------------------------------------------- the load


@dataclass
class Soak:
    client: Any
    storage: Any  # the storage config of the tenants' data
    items: list[Item]
    in_flight: int
    gateway: str
    metrics: str
    memory: Memory
    seed: int
    sample_s: float
    poll_s: float = 2.0
    launched: dict[str, Item] = field(default_factory=dict)  # run id → what made it
    hooks: list[dict[str, Any]] = field(default_factory=list)
    hook_runs: set[str] = field(default_factory=set)  # data-etl runs nobody here submitted
    other_runs: set[str] = field(default_factory=set)  # a trigger's or a schedule's
    launch_errors: list[dict[str, Any]] = field(default_factory=list)
    scrapes: Counter = field(default_factory=Counter)
    warm_at: float | None = None
    sent_all_at: float | None = None

    async def busy(self) -> list[Any]:
        """The soak's runs that are due and not finished."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterExpectedStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )

        flt = FlowRunFilter(
            tags=FlowRunFilterTags(all_=["setlist"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE))),
            expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(UTC)),
        )
        out, offset = [], 0
        while True:
            page = await self.client.read_flow_runs(flow_run_filter=flt, limit=200, offset=offset)
            out += page
            if len(page) < 200:
                return out
            offset += 200

    async def launch(self, item: Item) -> None:
        from setlist.tenants.submit import submit

        try:
            if item.kind == "hook":
                await self.send_hook(item)
                return
            if item.kind == "data-etl":
                await asyncio.to_thread(drop_raw_file, self.storage, item.tenant, item.n, self.seed)
            sub = await submit(
                self.client, item.job, item.tenant, item.band, item.tier, item.params
            )
            self.launched[str(sub.flow_run_id)] = item
        except Exception as exc:  # noqa: BLE001 - a refusal is a finding, not the end
            self.launch_errors.append({"item": item.n, "kind": item.kind, "error": repr(exc)})
            log(f"launch of {item.kind} for {item.tenant} failed: {exc!r}")

    async def send_hook(self, item: Item) -> None:
        import httpx

        from setlist.gateway.signatures import sign_setlist

        key = await asyncio.to_thread(drop_raw_file, self.storage, item.tenant, item.n, self.seed)
        body = json.dumps({"tenant_id": item.tenant, "files": [key]}).encode()
        delivery = uuid.uuid4().hex
        seen: dict[str, Any] = {"item": item.n, "tenant": item.tenant, "status": None}
        async with httpx.AsyncClient(timeout=10) as http:
            for attempt in range(10):  # a sender retries what the gateway can't take now
                headers = {
                    "content-type": "application/json",
                    "x-setlist-signature": sign_setlist(SECRET, body),
                    "x-setlist-delivery": delivery,
                }
                try:
                    r = await http.post(
                        f"{self.gateway}/hooks/{SOURCE}", content=body, headers=headers
                    )
                    seen["status"] = r.status_code
                    if r.status_code in (200, 202):
                        seen["accepted_at"] = time.time()
                        break
                except httpx.HTTPError as exc:
                    seen["status"] = type(exc).__name__
                await asyncio.sleep(min(0.5 * (attempt + 1), 3))
        self.hooks.append(seen)
        if "accepted_at" not in seen:
            log(f"webhook for {item.tenant} not accepted: {seen['status']}")

    def hooks_waiting(self) -> int:
        """Accepted webhooks whose run has not been seen yet (recent ones only)."""
        accepted = sorted(h["accepted_at"] for h in self.hooks if "accepted_at" in h)
        unseen = accepted[len(self.hook_runs) :]
        return sum(1 for t in unseen if time.time() - t < HOOK_WAIT_S)

    async def scrape(self, http) -> None:
        try:
            r = await http.get(f"{self.metrics}/metrics")
            self.scrapes["ok" if r.status_code == 200 else str(r.status_code)] += 1
        except Exception as exc:  # noqa: BLE001 - counted; the exporter's RSS is the point
            self.scrapes[type(exc).__name__] += 1

    async def run(self, drain_s: float) -> None:
        import httpx

        queue = list(self.items)
        total = len(queue)
        t0 = last_report = last_sample = last_scrape = time.monotonic()
        self.memory.sample()
        async with httpx.AsyncClient(timeout=30) as http:
            while True:
                busy = await self.busy()
                for run in busy:
                    rid = str(run.id)
                    if rid not in self.launched:
                        seen = self.hook_runs if _tag(run, "job") == "data-etl" else self.other_runs
                        seen.add(rid)
                waiting = self.hooks_waiting()
                sent = total - len(queue)
                known = len(self.launched) + len(self.hook_runs) + len(self.other_runs)
                finished = known - len(busy)
                if self.warm_at is None and finished >= total / 5:
                    self.warm_at = time.time()
                    log(f"warm-up over: {finished} runs finished")
                slots = self.in_flight - len(busy) - waiting
                while queue and slots > 0:
                    await self.launch(queue.pop(0))
                    slots -= 1
                if not queue and self.sent_all_at is None:
                    self.sent_all_at = time.time()
                    log(f"all {total} sent; draining (at most {drain_s:.0f} s)")
                now = time.monotonic()
                if now - last_sample >= self.sample_s:
                    last_sample = now
                    self.memory.sample(finished)
                if now - last_scrape >= SCRAPE_S:
                    last_scrape = now
                    await self.scrape(http)
                if now - last_report >= 30:
                    last_report = now
                    mem = self.memory.samples[-1][1]
                    log(
                        f"{sent}/{total} sent, {len(busy)} due and unfinished, "
                        f"{waiting} webhooks awaiting their run, {now - t0:.0f} s; MiB {mem}"
                    )
                if not queue and not busy and not waiting:
                    return
                if self.sent_all_at and time.time() - self.sent_all_at > drain_s:
                    log(f"drain timeout: {len(busy)} runs unfinished")
                    return
                await asyncio.sleep(self.poll_s)


# ------------------------------------------------------------------- what happened


def _tag(run, key: str) -> str | None:
    for tag in run.tags:
        if tag.startswith(f"{key}:"):
            return tag.split(":", 1)[1]
    return None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def all_runs(client, since: datetime) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterTags,
    )

    flt = FlowRunFilter(
        tags=FlowRunFilterTags(all_=["setlist"]),
        expected_start_time=FlowRunFilterExpectedStartTime(after_=since, before_=datetime.now(UTC)),
    )
    out, offset = [], 0
    while True:
        page = await client.read_flow_runs(flow_run_filter=flt, limit=200, offset=offset)
        out += page
        if len(page) < 200:
            return out
        offset += 200


async def histories(client, runs: list[Any]) -> dict[str, list[Any]]:
    slots = asyncio.Semaphore(8)

    async def one(run) -> tuple[str, list[Any]]:
        async with slots:
            states = await client.read_flow_run_states(run.id)
        return str(run.id), sorted(states, key=lambda s: s.timestamp)

    return dict(await asyncio.gather(*(one(r) for r in runs)))


def _origin(run, soak: Soak) -> str:
    item = soak.launched.get(str(run.id))
    if item is not None:
        return "bad-input" if item.bad else "submitted"
    by = (run.created_by.type if run.created_by else None) or ""
    job = _tag(run, "job")
    if job == "data-etl":
        return "webhook"
    if job == "ml-training":
        return "after-etl-trigger"
    return f"other:{by.lower() or 'unknown'}"


def _first_after(states, kind: str, after: float) -> float | None:
    for s in states:
        t = s.timestamp.timestamp()
        if s.type.value == kind and t >= after:
            return t
    return None


async def account(client, soak: Soak, since: datetime) -> dict[str, Any]:
    from setlist.tenants.submit import run_tag

    runs = await all_runs(client, since)
    states = await histories(client, runs)
    per_job: dict[str, Counter] = defaultdict(Counter)
    per_band: dict[str, Counter] = defaultdict(Counter)
    per_origin: dict[str, Counter] = defaultdict(Counter)
    run_s: dict[str, list[float]] = defaultdict(list)
    pending_to_running, scheduled_to_running = [], []
    good = completed = stuck = ran_twice = 0
    bad_total = bad_as_expected = 0
    failures, bad_surprises, stuck_list = [], [], []
    for run in runs:
        rid = str(run.id)
        final = run.state.type.value if run.state else "NONE"
        job = _tag(run, "job") or "?"
        origin = _origin(run, soak)
        per_job[job][final] += 1
        per_band[run_tag(run, "band") or "?"][final] += 1
        per_origin[origin][final] += 1
        history = states.get(rid, [])
        runnings = [s for s in history if s.type.value == "RUNNING"]
        ran_twice += len(runnings) > 1
        pending = _first_after(history, "PENDING", 0)
        if pending is not None:
            running = _first_after(history, "RUNNING", pending)
            if running is not None:
                pending_to_running.append(running - pending)
        if runnings:
            created = run.created.timestamp() if run.created else runnings[0].timestamp.timestamp()
            scheduled_to_running.append(runnings[0].timestamp.timestamp() - created)
            if final == "COMPLETED" and run.end_time:
                run_s[job].append(run.end_time.timestamp() - runnings[0].timestamp.timestamp())
        if final not in FINAL:
            stuck += 1
            stuck_list.append(
                {"id": rid, "job": job, "state": run.state.name if run.state else None}
            )
        message = (run.state.message or "")[:400] if run.state else ""
        item = soak.launched.get(rid)
        if item is not None and item.bad:
            bad_total += 1
            if final == "FAILED" and BAD_REASONS[item.bad] in message:
                bad_as_expected += 1
            else:
                bad_surprises.append(
                    {"id": rid, "bad": item.bad, "state": final, "message": message}
                )
            continue
        good += 1
        if final == "COMPLETED":
            completed += 1
        elif final in FINAL and len(failures) < 10:
            failures.append(
                {
                    "id": rid,
                    "name": run.name,
                    "job": job,
                    "tenant": _tag(run, "tenant"),
                    "origin": origin,
                    "state": run.state.name if run.state else None,
                    "message": message,
                }
            )
    accepted = sum(1 for h in soak.hooks if "accepted_at" in h)
    hook_runs = per_origin.get("webhook", Counter()).total()
    return {
        "runs": len(runs),
        "success_ratio": round(completed / good, 4) if good else None,
        "completed": completed,
        "not_completed": good - completed,
        "stuck_runs": stuck,
        "p95_pending_to_running_s": _pct(pending_to_running, 0.95),
        "p50_pending_to_running_s": _pct(pending_to_running, 0.5),
        "p95_created_to_running_s": _pct(scheduled_to_running, 0.95),
        "bad_input_runs": bad_total,
        "bad_input_failed_as_expected": bad_as_expected,
        "ran_twice": ran_twice,
        "per_job_type": {
            j: {
                "runs": c.total(),
                "states": dict(c),
                "p50_run_s": _pct(run_s[j], 0.5),
                "p95_run_s": _pct(run_s[j], 0.95),
            }
            for j, c in sorted(per_job.items())
        },
        "per_band": {b: dict(c) for b, c in sorted(per_band.items())},
        "per_origin": {o: dict(c) for o, c in sorted(per_origin.items())},
        "webhooks": {
            "sent": len(soak.hooks),
            "accepted": accepted,
            "runs": hook_runs,
            "lost": max(accepted - hook_runs, 0),
            "extra": max(hook_runs - accepted, 0),
            "refused": Counter(str(h["status"]) for h in soak.hooks if "accepted_at" not in h),
        },
        "failures": failures,
        "bad_input_surprises": bad_surprises[:10],
        "stuck": stuck_list[:10],
    }


# ------------------------------------------------------------------- main


async def soak_async(args, state, gateway_port: int, metrics_port: int) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    from setlist.core.settings import get_settings

    gateway = f"http://127.0.0.1:{gateway_port}"
    metrics = f"http://127.0.0.1:{metrics_port}"
    await wait_answering(f"{gateway}/health", "gateway")
    await wait_answering(f"{metrics}/metrics", "metrics exporter")
    rng = random.Random(args.seed)
    tenants = [f"soak-{i:02d}" for i in range(args.tenants)]
    t_setup = time.monotonic()
    config = await onboard(tenants, args.seed)
    log(f"{len(tenants)} tenants and {HOSTILE} onboarded in {time.monotonic() - t_setup:.0f} s")
    items = make_plan(args.runs, tenants, rng)
    log(f"plan: {dict(Counter(i.kind for i in items))}")
    pids = {
        "server": state.server_pid,
        "dispatcher": state.dispatcher_pid,
        "worker": state.worker_pid,
        "gateway": state.gateway_pid,
        "metrics": state.metrics_pid,
        "postgres": state.postgres_pid,
    }
    memory = Memory({k: v for k, v in pids.items() if v})
    in_flight = args.in_flight or 2 * get_settings().parallel_jobs
    since = datetime.now(UTC) - timedelta(seconds=5)
    t0 = time.monotonic()
    async with get_client() as client:
        soak = Soak(
            client, config, items, in_flight, gateway, metrics, memory, args.seed, args.sample_s
        )
        await soak.run(args.drain_s)
        load_s = time.monotonic() - t0
        log("reading every run's history")
        result = await account(client, soak, since)
    growth = memory.growth(soak.warm_at, soak.sent_all_at)
    marks = {"warm_at": soak.warm_at, "sent_all_at": soak.sent_all_at}
    memory.write_csv(get_settings().home / "logs" / "memory.csv", marks)
    per = growth.get("per_service", {})
    rss_growth = {k: v["growth"] for k, v in per.items() if k in memory.pids}
    known = [g for g in rss_growth.values() if g is not None]
    result.update(
        rss_growth=rss_growth,
        max_rss_growth=max(known) if known else None,
        rss=growth,
        postgres_shared_buffers=shared_buffers(get_settings().home),
        children_seen=memory.children_seen,
        in_flight=in_flight,
        tenants=len(tenants) + 1,
        planned=len(items),
        launch_errors=soak.launch_errors[:10],
        launch_error_count=len(soak.launch_errors),
        metrics_scrapes=dict(soak.scrapes),
        load_s=round(load_s, 1),
    )
    result["passed"] = bool(
        result["runs"] >= 500
        and (result["success_ratio"] or 0) >= 0.995
        and result["stuck_runs"] == 0
        and not soak.launch_errors
        and result["max_rss_growth"] is not None
        and result["max_rss_growth"] <= 0.10
    )
    return result


def _term(*_):
    raise KeyboardInterrupt  # so that the stack is stopped on the way out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500, help="units of load (≥ 500 to pass)")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=0, help="default: 2 × PARALLEL_JOBS")
    parser.add_argument("--drain-s", type=float, default=900)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    parser.add_argument("--keep", action="store_true", help="keep the stack's home (logs)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _term)

    import anyio
    from prefect.settings import temporary_settings

    from setlist import stack
    from setlist.core.credentials import client_settings, operator_auth_string

    home = Path(tempfile.mkdtemp(prefix="setlist-soak-"))
    log(f"seed {args.seed}; stack home {home}")
    t0 = time.monotonic()
    result: dict[str, Any] | None = None
    try:
        state, gateway_port, metrics_port = bring_up(home)
        auth = operator_auth_string(home)
        with temporary_settings(updates=client_settings(state.api_url, auth)):
            result = anyio.run(soak_async, args, state, gateway_port, metrics_port)
    finally:
        try:
            stack.stop(log)
        finally:
            failed = result is None or not result.get("passed")
            if args.keep or failed:
                log(f"kept {home} (logs under logs/)")
            else:
                shutil.rmtree(home, ignore_errors=True)
    result.update(seconds=round(time.monotonic() - t0, 1), seed=args.seed, home=str(home))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
