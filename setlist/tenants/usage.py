"""A tenant's object-store usage against its storage quota (``TenantQuota.storage_gb``).

What counts. Every prefix the tenant owns: ``tenants/<id>/`` of its data store (the
profile's ``storage_block``) and of the backup store (``Settings.backup_block``: its
encrypted snapshots are its data too, and ``setlist tenant purge`` erases both). A
prefix is listed with a trailing ``/`` (``TenantStorage.iter_objects``: paginated
``list_objects_v2`` on S3), so tenant ``acme`` never counts ``acme-eu``'s objects. Two
handles on the same place count once. The quota is in GiB (2**30 bytes), as the
Kubernetes ``requests.storage`` quota the same field becomes (``storage_gb``Gi).

Who measures. A writing job (data-etl, ml-training, tenant-restore, tenant-migrate's
target) calls ``ensure_within_storage_quota`` first, with its own handles: on S3 its own
credential, which may list its own prefix and nothing else; a job never holds the
platform's key. The exporter measures every tenant with the platform's credential
(``UsageCache``, cached for a while: a listing costs one call per 1000 objects).

Refusal. ``StorageQuotaExceeded`` (a ``SetlistError``) is raised from the flow's own body
before it takes a lock or writes anything, so the run ends Failed with the reason (used
vs quota in GB) as its state message. Flows have no retries, and the job's tasks, which
do retry, are never reached: nothing retries a refusal that would only be refused again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from setlist.core.tenancy import SetlistError, TenantQuota

if TYPE_CHECKING:
    from setlist.core.storage import TenantStorage
    from setlist.tenants.runtime import TenantContext

GIB = 1024**3
WARN_SHARE = 0.8  # the Prometheus rule's warning; at 1.0 jobs that write are refused


class StorageQuotaExceeded(SetlistError):
    """A job that writes, refused because the tenant uses all of its storage quota."""


def quota_bytes(quota: TenantQuota) -> int:
    return quota.storage_gb * GIB


def gb(n: int) -> str:
    """Bytes as GB (GiB, as the quota counts them), two decimals."""
    return f"{n / GIB:.2f} GB"


@dataclass(frozen=True)
class StorageUsage:
    """Bytes and objects of one tenant, per store it was measured on."""

    tenant_id: str
    bytes_by_store: dict[str, int] = field(default_factory=dict)  # purpose → bytes
    objects: int = 0

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_store.values())

    def describe(self) -> str:
        parts = ", ".join(f"{p} {gb(n)}" for p, n in self.bytes_by_store.items())
        return f"{gb(self.bytes)} ({parts})" if len(self.bytes_by_store) > 1 else gb(self.bytes)


def measure_usage(tenant_id: str, stores: Iterable[tuple[str, TenantStorage]]) -> StorageUsage:
    """Sum the sizes of every object under each (purpose, handle) of ``tenant_id``.

    A handle names its tenant's prefix only, so nothing of another tenant is counted; a
    place listed twice (a data and a backup block on one prefix) is counted once."""
    by_store: dict[str, int] = {}
    seen: set[str] = set()
    objects = 0
    for purpose, store in stores:
        if store.tenant_id != tenant_id:
            raise SetlistError(
                f"a handle of tenant {store.tenant_id!r} can't measure {tenant_id!r}'s usage"
            )
        where = store.describe()
        if where in seen:
            continue
        seen.add(where)
        total = 0
        for _key, size in store.iter_objects(""):
            total += size
            objects += 1
        by_store[purpose] = by_store.get(purpose, 0) + total
    return StorageUsage(tenant_id, by_store, objects)


def check_storage_quota(usage: StorageUsage, quota: TenantQuota, job: str = "the job") -> None:
    """Refuse (``StorageQuotaExceeded``) when ``usage`` has reached the quota."""
    limit = quota_bytes(quota)
    if usage.bytes >= limit:
        raise StorageQuotaExceeded(
            f"tenant {usage.tenant_id!r} is at or over its storage quota: it uses "
            f"{usage.describe()} of {quota.storage_gb} GB ({usage.bytes} of {limit} bytes); "
            f"{job} writes to the object store, so it was refused before writing anything. "
            "Delete data, prune backups (backup-prune) or raise the quota "
            "(setlist tenant update --storage-gb)"
        )


async def tenant_stores(tenant: TenantContext) -> list[tuple[str, TenantStorage]]:
    """The tenant's data handle and its backup-store handle, as its job opens them (on S3
    with its own credentials). A backup store that is not configured holds nothing."""
    from setlist.core.settings import get_settings
    from setlist.core.storage import tenant_storage
    from setlist.tenants.storage_identity import tenant_store_config

    stores: list[tuple[str, TenantStorage]] = [("data", tenant.storage)]
    try:
        config = await tenant_store_config(
            tenant.tenant_id, get_settings().backup_block, purpose="backup"
        )
    except SetlistError:  # no backup block: no backups to count
        return stores
    stores.append(("backup", tenant_storage(tenant.tenant_id, config)))
    return stores


async def ensure_within_storage_quota(tenant: TenantContext, job: str) -> StorageUsage:
    """Measure the tenant's usage with its own handles and refuse ``job`` when it is at or
    over its storage quota; → the usage (for the run's log). Call it first in a job that
    writes, before any lock or write."""
    import anyio

    stores = await tenant_stores(tenant)
    usage = await anyio.to_thread.run_sync(measure_usage, tenant.tenant_id, stores)
    check_storage_quota(usage, tenant.profile.quota, job)
    return usage


class PlatformStores:
    """Any tenant's handles on the platform's stores, with the platform's credentials (for
    the exporter, never for a job): ``configs`` by block name, one S3 client per store."""

    def __init__(self, configs: dict[str, object]):
        self.configs = configs
        self._clients: dict[str, object] = {}

    def handle(self, tenant_id: str, block: str) -> TenantStorage | None:
        """The tenant's handle on ``block``; None when the block is unknown or a local
        directory this process can't see (it would measure 0 bytes, not the truth)."""
        from pathlib import Path

        from blocks.storage import LocalStorageConfig, S3StorageConfig
        from setlist.core.storage import LocalTenantStorage, S3TenantStorage, s3_client

        config = self.configs.get(block)
        if isinstance(config, LocalStorageConfig):
            return (
                LocalTenantStorage(tenant_id, config.root) if Path(config.root).is_dir() else None
            )
        if isinstance(config, S3StorageConfig):
            if block not in self._clients:
                self._clients[block] = s3_client(config)
            return S3TenantStorage(tenant_id, config, client=self._clients[block])
        return None

    def measure(self, tenant_id: str, data_block: str, backup_block: str) -> StorageUsage:
        stores = [
            (purpose, handle)
            for purpose, block in (("data", data_block), ("backup", backup_block))
            if (handle := self.handle(tenant_id, block)) is not None
        ]
        if not stores or stores[0][0] != "data":
            raise SetlistError(f"the data store {data_block!r} of {tenant_id!r} can't be read")
        return measure_usage(tenant_id, stores)


class UsageCache:
    """Per-tenant measurements kept ``ttl`` seconds, for a caller that asks often (the
    exporter, on every scrape). ``measure`` is called with the tenant id."""

    def __init__(self, measure: Callable[[str], StorageUsage], ttl: float = 300.0):
        self._measure = measure
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, StorageUsage]] = {}

    def get(self, tenant_id: str) -> StorageUsage:
        with self._lock:
            hit = self._cache.get(tenant_id)
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
        usage = self._measure(tenant_id)
        with self._lock:
            self._cache[tenant_id] = (time.monotonic(), usage)
        return usage

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the tenants not in ``keep`` (offboarded ones)."""
        keep = set(keep)
        with self._lock:
            for tenant_id in [t for t in self._cache if t not in keep]:
                del self._cache[tenant_id]
