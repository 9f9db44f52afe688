"""The scenarios of ``bench/chaos.py`` and what they share.

A scenario is ``async def scenario(ctx: Context, args, rng) -> dict``: it injects one
fault at a point ``rng`` picks inside real work, lets the platform recover as it would in
production, and returns what it found. Every result carries ``name``, ``survived``,
``lost_runs`` and ``lost_or_duplicate_rows``; a scenario that can see them adds
``duplicate_runs`` and ``lost_events``. ``ctx`` holds what every scenario may use: a
Prefect server on a fresh embedded PostgreSQL (``ctx.client``, also the process's
``PREFECT_API_URL``) and moto's S3 and IAM (``ctx.s3``). A scenario that needs its own
server, worker or database process starts it and stops it itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any


@dataclass
class Context:
    client: Any  # a PrefectClient on the shared server
    s3: str  # moto's URL: S3 and IAM
    api_url: str  # the shared server's API URL


@contextlib.contextmanager
def running(server: ThreadingHTTPServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def table_state(storage) -> dict:
    """The published table: its manifest's partitions, each checked against the bytes
    stored under its key (a partition whose object differs counts as corrupt)."""
    from setlist.etl.curated import read_manifest

    manifest = read_manifest(storage)
    corrupt = [
        date
        for date, part in manifest.partitions.items()
        if hashlib.sha256(storage.get_bytes(part.key)).hexdigest() != part.sha256
    ]
    return {
        "version": manifest.version,
        "rows": manifest.rows,
        "partitions": {d: p.sha256 for d, p in sorted(manifest.partitions.items())},
        "corrupt": corrupt,
    }


async def onboard(client, tenant_id: str, endpoint: str):
    """A tenant on a new bucket of an S3 store at ``endpoint`` (through the proxy when
    it is one), with its own IAM key; → the platform's handle of its prefix."""
    from setlist.core.storage import tenant_storage
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from tests.helpers import fresh_s3_store

    store = fresh_s3_store(endpoint)
    await store.asave(f"{tenant_id}-store", overwrite=True, client=client)
    await create_tenant(client, TenantSpec(tenant_id=tenant_id, storage_block=f"{tenant_id}-store"))
    return tenant_storage(tenant_id, store)


async def run_etl(tenant_id: str, workers: int = 1):
    """The data-etl flow, run here as a worker's process would run it; → its final state."""
    from setlist.core.catalog import load_flow

    flow = load_flow("flows/etl.py:data_etl")
    return await flow(tenant_id=tenant_id, workers=workers, return_state=True)


def reference_table(tenant_id: str, events: int, files: int, seed: int) -> dict:
    """What a clean load of the same raw files publishes (a local store, no faults)."""
    from blocks.storage import LocalStorageConfig
    from setlist.core.storage import tenant_storage
    from setlist.etl.demo import write_sample_data
    from setlist.etl.load import load_new_files

    with tempfile.TemporaryDirectory(prefix="setlist-chaos-ref-") as root:
        storage = tenant_storage(tenant_id, LocalStorageConfig(root=root))
        write_sample_data(storage, events=events, files=files, defect_share=0.01, seed=seed)
        load_new_files(storage, tenant_id, workers=1)
        return table_state(storage)
