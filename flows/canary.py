"""Canary: the smallest real job, proving queue → worker → storage → result for a tenant.

It writes a probe object into the tenant's storage, reads it back, checks the bytes,
and deletes it. End-to-end tests and ``setlist health --deep`` submit it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Annotated
from uuid import uuid4

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from setlist.core.storage import TenantStorage
from setlist.core.tenancy import SetlistError
from setlist.observability.canary import PROBE_PREFIX, CanaryReport
from setlist.tenants.runtime import JOB_FLOW, enter_tenant

__all__ = ["PROBE_PREFIX", "CanaryReport", "canary"]


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def write_probe(storage: TenantStorage, key: str, data: bytes) -> float:
    """Write the probe; returns milliseconds spent."""
    t0 = time.perf_counter()
    storage.put_bytes(key, data)
    return (time.perf_counter() - t0) * 1000


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def read_probe(storage: TenantStorage, key: str, expected_sha256: str) -> float:
    """Read the probe back and insist on the same bytes."""
    t0 = time.perf_counter()
    got = storage.get_bytes(key)
    elapsed = (time.perf_counter() - t0) * 1000
    digest = hashlib.sha256(got).hexdigest()
    if digest != expected_sha256:
        raise SetlistError(f"probe {key} came back altered: sha256 {digest} != {expected_sha256}")
    return elapsed


@task(retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def delete_probe(storage: TenantStorage, key: str) -> float:
    t0 = time.perf_counter()
    storage.delete(key)
    if storage.exists(key):
        raise SetlistError(f"probe {key} still exists after delete")
    return (time.perf_counter() - t0) * 1000


@flow(name="canary", log_prints=True, persist_result=True, **JOB_FLOW)
async def canary(
    tenant_id: str,
    payload_bytes: Annotated[int, Field(ge=1, le=16 * 1024 * 1024)] = 1024,
    hold_seconds: Annotated[
        float, Field(ge=0, le=3600, description="stay running this long (capacity drills)")
    ] = 0.0,
) -> CanaryReport:
    """Round-trip a probe object through the tenant's storage."""
    tenant = await enter_tenant(tenant_id)
    logger = get_run_logger()
    data = os.urandom(payload_bytes)
    digest = hashlib.sha256(data).hexdigest()
    key = f"{PROBE_PREFIX}/{uuid4().hex}.bin"
    t0 = time.perf_counter()
    write_ms = write_probe(tenant.storage, key, data)
    read_ms = read_probe(tenant.storage, key, digest)
    delete_ms = delete_probe(tenant.storage, key)
    report = CanaryReport(
        tenant_id=tenant_id,
        probe_key=key,
        bytes=payload_bytes,
        sha256=digest,
        write_ms=round(write_ms, 3),
        read_ms=round(read_ms, 3),
        delete_ms=round(delete_ms, 3),
        round_trip_ms=round((time.perf_counter() - t0) * 1000, 3),
        storage=tenant.storage.describe(),
    )
    if hold_seconds:
        logger.info("holding for %.1f s", hold_seconds)
        await asyncio.sleep(hold_seconds)
    await acreate_markdown_artifact(
        key=f"canary-{tenant_id}",
        markdown=(
            f"### Canary for `{tenant_id}`\n\n| step | ms |\n|---|---|\n"
            f"| write | {report.write_ms} |\n| read | {report.read_ms} |\n"
            f"| delete | {report.delete_ms} |\n| round trip | {report.round_trip_ms} |\n\n"
            f"{payload_bytes} bytes, sha256 `{digest[:16]}…`, storage `{report.storage}`"
        ),
        description="storage round trip",
    )
    logger.info("canary ok: %s bytes round trip in %.1f ms", payload_bytes, report.round_trip_ms)
    return report
