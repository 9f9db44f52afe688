"""Is the platform healthy? One check per dependency, each with its reason.

Checks: the Prefect server answers, its database is reachable, every Setlist pool exists,
is not paused and has a live worker, no tenant queue is paused, the block types and the
storage block are registered, the object store is reachable, and (when configured) the
Kubernetes API answers. ``deep`` also runs a canary job end to end for one tenant.
A check that can't run because an earlier one failed says so ("skipped").
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from uuid import uuid4

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import WorkerStatus
from prefect.exceptions import ObjectNotFound

from blocks import ALL_BLOCK_TYPES, LocalStorageConfig, S3StorageConfig
from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, s3_client
from setlist.core.tenancy import SetlistError, parse_queue_name
from setlist.dispatch.queues import read_pool_queues
from setlist.k8s.client import load_api_client


@dataclass
class Check:
    name: str
    ok: bool
    reason: str
    skipped: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _http_checks(api_url: str) -> list[Check]:
    try:
        health = httpx.get(f"{api_url}/health", timeout=5)
    except httpx.HTTPError as exc:
        return [
            Check("server", False, f"Prefect API at {api_url} unreachable: {type(exc).__name__}"),
            Check("database", False, "skipped: the server is unreachable", skipped=True),
        ]
    if health.status_code != 200 or health.json() is not True:
        server = Check(
            "server", False, f"/health answered {health.status_code}: {health.text[:200]}"
        )
    else:
        server = Check("server", True, f"Prefect API at {api_url} is healthy")
    try:
        ready = httpx.get(f"{api_url}/ready", timeout=10)
    except httpx.HTTPError as exc:
        return [server, Check("database", False, f"/ready failed: {type(exc).__name__}")]
    if ready.status_code == 200:
        database = Check("database", True, "the server reaches its database")
    else:
        database = Check(
            "database", False, f"/ready answered {ready.status_code}: {ready.text[:200]}"
        )
    return [server, database]


async def _pool_checks(client: PrefectClient, pools: list[str] | None = None) -> list[Check]:
    checks = []
    for pool in get_settings().pools if pools is None else pools:
        name = f"pool:{pool}"
        try:
            wp = await client.read_work_pool(pool)
        except ObjectNotFound:
            checks.append(Check(name, False, f"work pool {pool!r} does not exist; run setlist up"))
            continue
        if wp.is_paused:
            checks.append(Check(name, False, f"work pool {pool!r} is paused"))
            continue
        workers = await client.read_workers_for_work_pool(pool)
        online = [w for w in workers if w.status == WorkerStatus.ONLINE]
        if not online:
            seen = max((w.last_heartbeat_time for w in workers), default=None)
            last = f"; last heartbeat {seen.isoformat()}" if seen else "; no worker ever polled it"
            checks.append(Check(name, False, f"no worker online for pool {pool!r}{last}"))
        else:
            checks.append(Check(name, True, f"{len(online)} worker(s) online"))
        from setlist.dispatch.leadership import dispatcher_active

        if await dispatcher_active(client):
            # The dispatcher holds tenant queues paused and grants their runs one by
            # one: paused is their normal state, not an operator's pause.
            checks.append(Check(f"queues:{pool}", True, "tenant queues gated by the dispatcher"))
            continue
        paused = sorted(
            q.name
            for q in await read_pool_queues(client, pool)
            if q.is_paused and parse_queue_name(q.name)
        )
        if paused:
            shown = ", ".join(paused[:10]) + (" …" if len(paused) > 10 else "")
            checks.append(Check(f"queues:{pool}", False, f"{len(paused)} paused: {shown}"))
        else:
            checks.append(Check(f"queues:{pool}", True, "no tenant queue is paused"))
    return checks


async def _block_checks(client: PrefectClient) -> tuple[list[Check], object | None]:
    missing = []
    for block_type in ALL_BLOCK_TYPES:
        try:
            await client.read_block_type_by_slug(block_type.get_block_type_slug())
        except ObjectNotFound:
            missing.append(block_type.get_block_type_slug())
    checks = [
        Check(
            "block-types",
            not missing,
            f"not registered: {', '.join(missing)}" if missing else "all registered",
        )
    ]
    name = get_settings().storage_block
    try:
        config = await load_storage_config(name)
    except SetlistError as exc:
        checks.append(Check("storage-block", False, str(exc)))
        return checks, None
    checks.append(Check("storage-block", True, f"{name!r} is a {type(config).__name__}"))
    return checks, config


def _storage_check(config) -> Check:
    """Reach the store itself (no tenant data is read)."""
    from pathlib import Path

    if isinstance(config, LocalStorageConfig):
        root = Path(config.root)
        if not root.is_dir():
            return Check("storage", False, f"storage root {root} does not exist")
        probe = root / f".health-{uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            return Check("storage", False, f"storage root {root} is not writable: {exc.strerror}")
        return Check("storage", True, f"file://{root} is writable")
    if isinstance(config, S3StorageConfig):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            s3_client(config).head_bucket(Bucket=config.bucket)
        except (BotoCoreError, ClientError) as exc:
            return Check("storage", False, f"bucket {config.bucket!r} unreachable: {exc}")
        return Check("storage", True, f"s3://{config.bucket} reachable")
    return Check("storage", False, f"unsupported storage config {type(config).__name__}")


def _kubernetes_check() -> Check:
    settings = get_settings()
    if not (settings.kube_apply or settings.kubernetes_pools):
        return Check("kubernetes", True, "skipped: no cluster configured", skipped=True)
    from kubernetes import client as kube_client

    try:
        version = kube_client.VersionApi(load_api_client()).get_code(_request_timeout=5)
    except Exception as exc:  # any failure to reach the API is the finding
        return Check("kubernetes", False, f"Kubernetes API unreachable: {type(exc).__name__}")
    return Check("kubernetes", True, f"Kubernetes API {version.git_version}")


async def _canary_check(client: PrefectClient, tenant_id: str, timeout: float) -> Check:
    from setlist.tenants import submit as submitting

    name = f"canary:{tenant_id}"
    try:
        sub = await submitting.submit(client, "canary", tenant_id, "critical")
    except SetlistError as exc:
        return Check(name, False, str(exc))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await client.read_flow_run(sub.flow_run_id)
        if run.state and run.state.is_final():
            if run.state.is_completed():
                took = (run.end_time - run.start_time).total_seconds() if run.end_time else 0
                return Check(name, True, f"run {run.name} completed in {took:.1f} s")
            return Check(name, False, f"run {run.name} ended {run.state.name}: {run.state.message}")
        await asyncio.sleep(1)
    await submitting.cancel(client, sub.flow_run_id, tenant_id)
    return Check(name, False, f"run {sub.flow_run_name} not done after {timeout:.0f} s; cancelled")


async def run_checks(
    api_url: str,
    *,
    deep: bool = False,
    tenant_id: str | None = None,
    timeout: float = 120,
    pools: list[str] | None = None,
) -> list[Check]:
    """Every check, in order; ``pools`` replaces the settings' pools (``cluster check``)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    from setlist.core.credentials import client_settings

    checks = _http_checks(api_url)
    if not all(c.ok for c in checks):
        # Without a healthy API and database every other answer would be an error page.
        why = "skipped: the Prefect API or its database is not healthy"
        rest = ("pools", "block-types", "storage-block", "storage")
        skipped = [Check(name, False, why, skipped=True) for name in rest]
        return [*checks, *skipped, _kubernetes_check()]
    with temporary_settings(updates=client_settings(api_url)):
        async with get_client() as client:
            checks += await _pool_checks(client, pools)
            block_checks, config = await _block_checks(client)
            checks += block_checks
            if config is not None:
                checks.append(_storage_check(config))
            else:
                checks.append(Check("storage", False, "skipped: no storage block", skipped=True))
            checks.append(_kubernetes_check())
            if deep:
                checks.append(
                    await _canary_check(client, tenant_id or get_settings().tenant_id, timeout)
                )
    return checks
