"""A node lost mid-job: the worker and everything it started (the flow-run process and
that one's own children) SIGKILLed at once, at a point ``rng`` picks inside the work.
Nothing is left to say the run ended: the platform must notice the silence (the run's
heartbeats stop; its unresponsive-run automation marks it Crashed), free what the dead
run held (its tenant locks' leases run out), and let the next run finish the work.

- ``worker-kill-etl``: killed during a data-etl load, after a random share of its
  staged files and partitions were written. The run ends Crashed and is not billed; a
  re-run on a new worker completes, the curated files are byte for byte those of a
  clean load, and no event id appears twice.
- ``worker-kill-backup``: killed during a tenant backup, after a random number of its
  packs were written. The next backup completes, writes none of the chunks already
  written again (the bytes it wrote again are measured), and ``setlist backup verify``
  passes.
- ``worker-kill-restore``: the operator's ``setlist backup restore`` process killed
  during the restore, while staging or mid-switch. At every point the curated table a
  reader sees is the old one or the restored one; the files are the old ones, the new
  ones, or a switch its journal records (which keeps backups out and which the next
  restore finishes); after the operator runs the restore again, the tenant's data is
  the snapshot's, byte for byte.

Each scenario starts its own control plane: Setlist's gated server
(``python -m setlist.controlplane``, with its services) on an embedded PostgreSQL.
``ctx``'s server is Prefect's ephemeral one, which runs neither the repossessor (a dead
holder's lock lease would never be taken back) nor the gate a job's run token and its
sealed records go through. Jobs beat every 30 s (Prefect's shortest) and a run silent
for 60 s is presumed dead (the shortest the platform's settings accept: a lock's lease
is as long, and Prefect grants none shorter), so that a scenario takes minutes, not the
production defaults' quarter of an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.faults import Context, onboard, table_state

HEARTBEAT_S = 30
UNRESPONSIVE_S = 60
POOL = "setlist-local"
# What a crash takes to be noticed at the latest: the last beat, the window, the
# automation service's evaluation period (5 s), and room for a loaded machine.
NOTICED_S = HEARTBEAT_S + UNRESPONSIVE_S + 60
ETL_EVENTS, ETL_FILES = 300_000, 6  # a load of several seconds on two cores
BULK_MIB = 96  # the backup's data beyond the sample events: several 16 MiB packs
RESTORE_FILES, RESTORE_MIB = 20, 3  # a restore's files, each under S3's multipart size


# ------------------------------------------------------------------ the platform


@dataclass
class Platform:
    """A control plane of its own, its workers, and the environment its processes get."""

    home: Path
    url: str
    auth: str
    client: Any
    server: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """What the platform's processes run with: the API and the operator credential
        (a worker hands its jobs run tokens instead), the short liveness timings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.update(
            PREFECT_API_URL=self.url,
            PREFECT_API_AUTH_STRING=self.auth,
            PREFECT_HOME=str(self.home / "prefect"),
            PREFECT_LOCAL_STORAGE_PATH=str(self.home / "results"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="INFO",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="1",
            SETLIST_HEARTBEAT_SECONDS=str(HEARTBEAT_S),
            SETLIST_UNRESPONSIVE_SECONDS=str(UNRESPONSIVE_S),
            **extra,
        )
        return env

    async def start_worker(self) -> subprocess.Popen:
        """``prefect worker start --type setlist-process`` on the pool, its own process
        group (a machine of its own), online before this returns."""
        from prefect.client.schemas.objects import WorkerStatus

        name = f"chaos-node-{len(self.workers) + 1}"
        with open(self.home / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                 "--type", "setlist-process", "--limit", "2", "--name", name],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.workers.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = await self.client.read_workers_for_work_pool(POOL)
            if any(w.name == name and w.status == WorkerStatus.ONLINE for w in workers):
                return proc
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.5)
        raise RuntimeError(f"worker {name} did not come online: {self.log_tail(name)}")

    def cli(self, *args: str, **env: str) -> subprocess.Popen:
        """The operator's ``setlist`` command, in a process group of its own."""
        exe = Path(sys.executable).with_name("setlist")
        with open(self.home / "cli.log", "ab") as log:  # the child keeps its own handle
            return subprocess.Popen(
                [str(exe), *args],
                env=self.env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.home / f"{name}.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    async def run_state(self, run_id) -> Any:
        return (await self.client.read_flow_run(run_id)).state

    async def until(self, run_id, done, timeout: float) -> Any:
        """The run's state once ``done(state)`` holds (or when ``timeout`` runs out)."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.run_state(run_id)
            if (state and done(state)) or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.25)

    async def final(self, run_id, timeout: float) -> Any:
        return await self.until(run_id, lambda s: s.is_final(), timeout)


@contextlib.asynccontextmanager
async def platform():
    """Setlist's control plane on a fresh embedded PostgreSQL, bootstrapped as ``setlist
    up`` does, with the unresponsive-run automation on the benchmark's window. Everything
    it started is stopped on the way out."""
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    from setlist.controlplane.local import start_local_server
    from setlist.controlplane.postgres import EmbeddedPostgres
    from setlist.core.credentials import client_settings
    from setlist.observability.automations import apply_platform
    from setlist.stack import bootstrap_platform

    home = Path(tempfile.mkdtemp(prefix="setlist-chaos-kill-"))
    postgres = EmbeddedPostgres(home / "postgres")
    auth = f"setlist:{secrets.token_urlsafe(24)}"
    server = None
    p: Platform | None = None
    try:
        database = await asyncio.to_thread(postgres.start)
        server, url = await asyncio.to_thread(start_local_server, home, auth, database_url=database)
        with temporary_settings(updates=client_settings(url, auth)):
            await bootstrap_platform(home / "storage")
            async with get_client() as client:
                await apply_platform(client, timedelta(seconds=UNRESPONSIVE_S))
                p = Platform(home=home, url=url, auth=auth, client=client, server=server)
                yield p
    finally:
        for proc in p.workers if p else []:
            kill_node(proc.pid)
            proc.wait()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        await asyncio.to_thread(postgres.stop)
        shutil.rmtree(home, ignore_errors=True)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def kill_node(pid: int) -> int:
    """SIGKILL ``pid`` and all its descendants at once, as a node loss does: stopped
    first, so that none starts a child between the reads. → how many were killed."""
    stopped: set[int] = set()
    for _ in range(3):
        for p in _process_tree(pid):
            if p not in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGSTOP)
                stopped.add(p)
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return len(stopped)


async def _kill_when(
    p: Platform, run_id, proc: subprocess.Popen, progress, target: int, rng: random.Random
) -> dict:
    """Once the run is Running and ``progress()`` reaches ``target`` (0: a random moment
    in its first seconds), kill the node. → what was injected."""
    t0 = time.monotonic()
    state = await p.until(run_id, lambda s: s.is_running() or s.is_final(), timeout=300)
    if not state.is_running():
        return {"injected": False, "why": f"the run was {state.name} before the kill"}
    running = time.monotonic()
    if target == 0:
        await asyncio.sleep(rng.uniform(0.0, 3.0))
    done = 0
    while target and (done := await asyncio.to_thread(progress)) < target:
        state = await p.run_state(run_id)
        if state.is_final():
            return {"injected": False, "why": f"the run was {state.name} at {done}/{target}"}
        await asyncio.sleep(0.1)
    if (await p.run_state(run_id)).is_final():
        return {"injected": False, "why": "the run ended before the kill"}
    killed = await asyncio.to_thread(kill_node, proc.pid)
    await asyncio.to_thread(proc.wait)
    return {
        "injected": True,
        "processes_killed": killed,
        "progress_at_kill": [done, target],
        "seconds_running_at_kill": round(time.monotonic() - running, 1),
        "seconds_to_running": round(running - t0, 1),
        "killed_at": time.monotonic(),
    }


async def _noticed(p: Platform, run_id, injected: dict) -> tuple[Any, float | None]:
    """The killed run's state once the platform noticed (or the timeout ran out), and
    how long after the kill that was."""
    if not injected["injected"]:
        return await p.run_state(run_id), None
    state = await p.final(run_id, NOTICED_S)
    after = time.monotonic() - injected["killed_at"] if state.is_final() else None
    return state, None if after is None else round(after, 1)


def _digests(storage, *prefixes: str) -> dict[str, str]:
    return {
        key: hashlib.sha256(storage.get_bytes(key)).hexdigest()
        for prefix in prefixes
        for key in storage.list_keys(prefix)
    }


async def _billed(client, tenant: str, since: datetime) -> dict[str, bool]:
    """run id → whether the tenant's bill counts it."""
    from setlist.billing.metering import meter_runs

    meters = await meter_runs(client, tenant, since, datetime.now(UTC) + timedelta(minutes=1))
    return {m.run_id: m.billed for m in meters}


def _crash(state, noticed_after) -> dict:
    return {
        "killed_run_state": state.name,
        "killed_run_message": (state.message or "")[:160],
        "crash_noticed_after_s": noticed_after,
    }


# ----------------------------------------------------------------------------- etl


def clean_load(tenant: str, events: int, files: int, seed: int) -> dict:
    """What a clean load of the same raw files publishes (a local store, no faults):
    the table and the bytes of every curated and quarantined file."""
    from blocks.storage import LocalStorageConfig
    from setlist.core.storage import tenant_storage
    from setlist.etl.demo import write_sample_data
    from setlist.etl.load import load_new_files

    with tempfile.TemporaryDirectory(prefix="setlist-chaos-ref-") as root:
        storage = tenant_storage(tenant, LocalStorageConfig(root=root))
        write_sample_data(storage, events=events, files=files, defect_share=0.01, seed=seed)
        load_new_files(storage, tenant, workers=1)
        return {
            "table": table_state(storage),
            "curated": _digests(storage, "curated/"),
            "quarantine": _digests(storage, "quarantine/"),
        }


def _duplicate_event_ids(storage) -> int:
    import pyarrow.compute as pc

    from setlist.etl.curated import read_manifest, read_table

    ids = read_table(storage, read_manifest(storage), ["event_id"])["event_id"]
    return len(ids) - pc.count_distinct(ids).as_py()


async def worker_kill_etl(ctx: Context, args, rng: random.Random) -> dict:
    from setlist.etl.demo import write_sample_data
    from setlist.tenants.submit import submit

    tenant = f"chaos-kill-etl-{uuid.uuid4().hex[:6]}"
    events, files = max(args.events, ETL_EVENTS), max(args.files, ETL_FILES)
    expected = clean_load(tenant, events, files, args.seed)
    # The load's observable steps: one quarantine file per raw file, one file per date.
    steps = len(expected["quarantine"]) + len(expected["table"]["partitions"])
    target = rng.randrange(steps)
    since = datetime.now(UTC) - timedelta(minutes=1)
    async with platform() as p:
        storage = await onboard(p.client, tenant, ctx.s3)
        write_sample_data(storage, events=events, files=files, defect_share=0.01,
                          seed=args.seed)  # fmt: skip

        def progress() -> int:
            return len(storage.list_keys("quarantine/")) + sum(
                k.endswith(".parquet") for k in storage.list_keys("curated/events/")
            )

        node = await p.start_worker()
        killed = (await submit(p.client, "data-etl", tenant)).flow_run_id
        injected = await _kill_when(p, killed, node, progress, target, rng)
        state, noticed = await _noticed(p, killed, injected)
        after_kill = table_state(storage)
        await p.start_worker()
        rerun = (await submit(p.client, "data-etl", tenant)).flow_run_id
        # The re-run waits for the etl lock until the dead holder's lease runs out.
        final = await p.final(rerun, UNRESPONSIVE_S + 15 + 600)
        recovered = table_state(storage)
        curated = _digests(storage, "curated/")
        quarantine = _digests(storage, "quarantine/")
        duplicates = _duplicate_event_ids(storage) if recovered["rows"] else 0
        billed = await _billed(p.client, tenant, since)
        worker_log = p.log_tail("chaos-node-2") if not final.is_completed() else ""
    empty = {"version": 0, "rows": 0, "partitions": {}, "corrupt": []}
    identical = curated == expected["curated"]
    completed = [s for s in (state, final) if s.is_completed()]
    survived = bool(
        injected["injected"]
        and state.is_crashed()
        and final.is_completed()
        and after_kill in (empty, expected["table"])
        and recovered == expected["table"]
        and identical
        and duplicates == 0
        and billed.get(str(killed)) is False
        and billed.get(str(rerun)) is True
    )
    return {
        "name": "worker-kill-etl",
        "events": events,
        "files": files,
        **{k: v for k, v in injected.items() if k != "killed_at"},
        "load_steps": steps,
        **_crash(state, noticed),
        "killed_run_billed": billed.get(str(killed)),
        "table_after_kill": "previous" if after_kill == empty else
        "clean" if after_kill == expected["table"] else "MIXED",
        "rerun_state": final.name,
        "rerun_billed": billed.get(str(rerun)),
        "curated_files_identical": identical,
        "quarantine_identical": quarantine == expected["quarantine"],
        "rows": recovered["rows"],
        "expected_rows": expected["table"]["rows"],
        "duplicate_event_ids": duplicates,
        "lost_runs": 0 if final.is_completed() else 1,
        "duplicate_runs": max(0, len(completed) - 1),
        "lost_or_duplicate_rows": abs(recovered["rows"] - expected["table"]["rows"]) + duplicates,
        "survived": survived,
        **({"worker_log": worker_log} if worker_log else {}),
    }  # fmt: skip


# -------------------------------------------------------------------------- backup


def write_bulk(storage, mib: int, files: int, seed: int, prefix: str = "exports/") -> dict:
    """Incompressible files (exports, media): what makes a backup big. → key: bytes."""
    rng = random.Random(seed)
    size = mib * 1024 * 1024 // files
    written = {f"{prefix}bulk-{n:02d}.bin": rng.randbytes(size) for n in range(files)}
    for key, data in written.items():
        storage.put_bytes(key, data)
    return written


def _repo_dir(p: Platform, tenant: str) -> Path:
    return p.home / "backups" / "tenants" / tenant


def _pack_entries(repo) -> dict[str, list[tuple[str, int]]]:
    """pack id → its (chunk id, sealed length) entries, for the packs an index names."""
    return {
        pack: [(cid, size) for cid, _offset, size in entries]
        for pack, entries in repo.packs().items()
    }


async def worker_kill_backup(ctx: Context, args, rng: random.Random) -> dict:
    from setlist.backup.platform import tenant_repository
    from setlist.backup.repository import PACK_TARGET
    from setlist.etl.demo import write_sample_data
    from setlist.tenants.submit import submit

    tenant = f"chaos-kill-bak-{uuid.uuid4().hex[:6]}"
    since = datetime.now(UTC) - timedelta(minutes=1)
    async with platform() as p:
        storage = await onboard(p.client, tenant, ctx.s3)
        write_sample_data(storage, events=args.events, files=args.files, seed=args.seed)
        write_bulk(storage, BULK_MIB, 8, args.seed)
        data_bytes = sum(size for _key, size in storage.iter_objects(""))
        index = _repo_dir(p, tenant) / "index"
        # Packs fill to 16 MiB on each of the writer's threads: most are written during
        # the run, the last ones (one per thread) when it flushes.
        target = rng.randrange(max(1, data_bytes // PACK_TARGET - 2))

        def progress() -> int:
            return len(list(index.iterdir())) if index.is_dir() else 0

        node = await p.start_worker()
        killed = (await submit(p.client, "tenant-backup", tenant)).flow_run_id
        injected = await _kill_when(p, killed, node, progress, target, rng)
        state, noticed = await _noticed(p, killed, injected)
        try:
            repo = await tenant_repository(tenant)
            before = _pack_entries(repo)
            snapshots_after_kill = len(repo.snapshot_ids())
        except Exception:  # killed before the repository was made: nothing written yet
            before, snapshots_after_kill = {}, 0
        written = {cid for entries in before.values() for cid, _n in entries}
        indexed = set(before)
        orphans = [
            k.name for k in (_repo_dir(p, tenant) / "packs").glob("*/*") if k.name not in indexed
        ] if (_repo_dir(p, tenant) / "packs").is_dir() else []  # fmt: skip
        await p.start_worker()
        rerun = (await submit(p.client, "tenant-backup", tenant)).flow_run_id
        final = await p.final(rerun, UNRESPONSIVE_S + 15 + 600)
        repo = await tenant_repository(tenant)
        after = _pack_entries(repo)
        new_packs = {k: v for k, v in after.items() if k not in before}
        written_again = [(cid, n) for entries in new_packs.values() for cid, n in entries
                         if cid in written]  # fmt: skip
        snapshot = repo.get_manifest(repo.snapshot_ids()[-1]) if repo.snapshot_ids() else None
        needed = {cid for f in (snapshot or {}).get("files", []) for cid, _n in f["chunks"]}
        verify = await asyncio.to_thread(
            lambda: p.cli("backup", "verify", "--tenant", tenant).wait(timeout=300)
        )
        billed = await _billed(p.client, tenant, since)
        worker_log = p.log_tail("chaos-node-2") if not final.is_completed() else ""
    survived = bool(
        injected["injected"]
        and state.is_crashed()
        and snapshots_after_kill == 0
        and final.is_completed()
        and not written_again
        and verify == 0
        and billed.get(str(killed)) is False
    )
    return {
        "name": "worker-kill-backup",
        "data_bytes": data_bytes,
        **{k: v for k, v in injected.items() if k != "killed_at"},
        **_crash(state, noticed),
        "killed_run_billed": billed.get(str(killed)),
        "snapshots_after_kill": snapshots_after_kill,
        "packs_written_before_kill": len(before),
        "chunks_written_before_kill": len(written),
        "orphan_packs": len(orphans),
        "rerun_state": final.name,
        "chunks_reused": len(written & needed),
        "chunks_written_again": len(written_again),
        "bytes_written_again": sum(n for _c, n in written_again),
        "bytes_written_by_rerun": sum(n for e in new_packs.values() for _c, n in e),
        "verify_exit": verify,
        "lost_runs": 0 if final.is_completed() else 1,
        "duplicate_runs": 0,
        "lost_or_duplicate_rows": 0,
        "survived": survived,
        **({"worker_log": worker_log} if worker_log else {}),
    }


# ------------------------------------------------------------------------- restore


def _contents(storage) -> dict[str, str]:
    return _digests(storage, "")


def _table(storage) -> Any:
    """The table a reader gets through the manifest: its event ids, or why it can't."""
    from setlist.etl.curated import read_manifest, read_table

    try:
        ids = read_table(storage, read_manifest(storage), ["event_id"])["event_id"]
    except Exception as exc:  # a manifest naming files that are not there
        return f"BROKEN: {type(exc).__name__}"
    return sorted(ids.to_pylist())


async def _restore_run(p: Platform, tenant: str, started: datetime, timeout: float = 300):
    """The flow run of the operator's restore of ``tenant``, once it exists."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = await p.client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["tenant-restore"])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started)),
        )
        for run in runs:
            if run.parameters.get("tenant_id") == tenant:
                return run.id
        await asyncio.sleep(0.25)
    raise RuntimeError(f"no tenant-restore run of {tenant} appeared: {p.log_tail('cli')}")


async def worker_kill_restore(ctx: Context, args, rng: random.Random) -> dict:
    from setlist.backup.platform import tenant_repository
    from setlist.backup.snapshots import JOURNAL, create_snapshot
    from setlist.etl.demo import write_sample_data
    from setlist.etl.load import load_new_files

    tenant = f"chaos-kill-rst-{uuid.uuid4().hex[:6]}"
    async with platform() as p:
        storage = await onboard(p.client, tenant, ctx.s3)

        def load(seed: int, prefix: str) -> None:
            write_sample_data(storage, events=args.events, files=args.files, seed=seed,
                              prefix=prefix)  # fmt: skip
            load_new_files(storage, tenant, workers=1)

        # What the snapshot holds (the new data, once restored) ...
        load(args.seed, "raw/a")
        write_bulk(storage, RESTORE_MIB * RESTORE_FILES, RESTORE_FILES, args.seed)
        repo = await tenant_repository(tenant, create=True)
        snapshot = create_snapshot(storage, repo).snapshot_id
        new, new_table = _contents(storage), _table(storage)
        restore_bytes = sum(size for _key, size in storage.iter_objects(""))
        # ... and what the tenant has now (the old): two more loads since (the
        # snapshot's partition files are gone from the store), half of the bulk
        # rewritten, a quarter deleted.
        load(args.seed + 1, "raw/b")
        load(args.seed + 2, "raw/c")
        bulk = sorted(k for k in new if k.startswith("exports/"))
        write_bulk(storage, RESTORE_MIB * RESTORE_FILES // 2, RESTORE_FILES // 2,
                   args.seed + 3)  # fmt: skip
        for key in bulk[-RESTORE_FILES // 4 :]:
            storage.delete(key)
        old, old_table = _contents(storage), _table(storage)
        fingerprints = {e.key: e.fingerprint for e in storage.iter_entries("")}
        scratch = p.home / "scratch"
        scratch.mkdir()
        journal = _repo_dir(p, tenant) / JOURNAL
        # The restore's observable steps: each file staged, then each file uploaded.
        staged_steps = len(new)
        target = rng.randrange(2 * len(new))

        def progress() -> int:
            staged = sum(1 for f in scratch.rglob("*") if f.is_file())
            if not journal.exists():
                return min(staged, staged_steps - 1) if staged_steps > 1 else 0
            uploaded = sum(1 for e in storage.iter_entries("")
                           if fingerprints.get(e.key) != e.fingerprint)  # fmt: skip
            return staged_steps + uploaded

        started = datetime.now(UTC) - timedelta(seconds=5)
        cli = p.cli("backup", "restore", "--tenant", tenant, "--snapshot", snapshot, "--yes",
                    SETLIST_SCRATCH=str(scratch),
                    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_S))  # fmt: skip
        killed = await _restore_run(p, tenant, started)
        injected = await _kill_when(p, killed, cli, progress, target, rng)
        state, noticed = await _noticed(p, killed, injected)
        files_after_kill, table_after_kill = _contents(storage), _table(storage)
        journal_after_kill = journal.exists()
        # The operator runs the restore again (the platform's alert, or the dead
        # command, tells them); it waits for the dead one's locks to run out.
        again = p.cli("backup", "restore", "--tenant", tenant, "--snapshot", snapshot, "--yes",
                      SETLIST_SCRATCH=str(scratch))  # fmt: skip
        try:
            exit_code = await asyncio.to_thread(again.wait, UNRESPONSIVE_S + 15 + 600)
        except subprocess.TimeoutExpired:
            kill_node(again.pid)
            exit_code = again.wait()
        final, final_table = _contents(storage), _table(storage)
        cli_log = p.log_tail("cli", 30) if exit_code else ""
    files_state = (
        "old" if files_after_kill == old else "new" if files_after_kill == new else
        "switching (journal)" if journal_after_kill else "MIXED"
    )  # fmt: skip
    table_seen = (
        "old" if table_after_kill == old_table else "new" if table_after_kill == new_table
        else "BROKEN" if isinstance(table_after_kill, str) else "MIXED"
    )  # fmt: skip
    survived = bool(
        injected["injected"]
        and state.is_crashed()
        and files_state != "MIXED"
        and table_seen in ("old", "new")
        and exit_code == 0
        and final == new
        and final_table == new_table
    )
    rows = len(final_table) if isinstance(final_table, list) else 0
    return {
        "name": "worker-kill-restore",
        "files": len(new),
        "bytes": restore_bytes,
        "phase_at_kill": "staging" if target < staged_steps else "switching",
        **{k: v for k, v in injected.items() if k != "killed_at"},
        **_crash(state, noticed),
        "files_after_kill": files_state,
        "table_after_kill": table_seen,
        "journal_after_kill": journal_after_kill,
        "rerun_exit": exit_code,
        "data_after_rerun": "new" if final == new else "old" if final == old else "MIXED",
        "lost_runs": 0 if exit_code == 0 else 1,
        "duplicate_runs": 0,
        "lost_or_duplicate_rows": abs(rows - len(new_table))
        if isinstance(new_table, list) else 0,
        "survived": survived,
        **({"cli_log": cli_log} if cli_log else {}),
    }  # fmt: skip
