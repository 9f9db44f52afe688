"""Storage usage against the storage quota: measured per tenant on moto's real S3 server
and on a local directory, exported as metrics, and the writing jobs refused at the quota
before they write anything."""

from __future__ import annotations

import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from setlist.core.storage import LocalTenantStorage, tenant_storage
from setlist.core.tenancy import SetlistError, TenantQuota
from setlist.tenants.usage import (
    GIB,
    StorageQuotaExceeded,
    StorageUsage,
    UsageCache,
    check_storage_quota,
    measure_usage,
)


def _ids() -> tuple[str, str]:
    """Tenant A, and tenant B whose id starts with A's (a bare prefix match takes both)."""
    a = f"usage-{uuid.uuid4().hex[:6]}"
    return a, f"{a}-eu"


def _sparse(store: LocalTenantStorage, key: str, size: int) -> None:
    """An object of ``size`` bytes that takes no disk: a quota's worth, cheaply."""
    path = store.dir / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)


# ------------------------------------------------------------------ measuring


def test_usage_counts_exactly_the_tenants_bytes(storage_config):
    """On each backend: A's bytes exactly; B's objects (B's id starts with A's) and a key
    of A's that names B's prefix go to their owner's count, never the other's."""
    a, b = _ids()
    mine, theirs = tenant_storage(a, storage_config), tenant_storage(b, storage_config)
    mine.put_bytes("raw/x.jsonl", b"x" * 100)
    mine.put_bytes("curated/y.parquet", b"y" * 2_500)
    mine.put_bytes(f"tenants/{b}/raw/z.jsonl", b"z" * 7)  # A's, though it looks like B's
    theirs.put_bytes("raw/x.jsonl", b"b" * 10_000)
    theirs.put_bytes("curated/big.parquet", b"b" * 50_000)

    assert measure_usage(a, [("data", mine)]) == StorageUsage(a, {"data": 2_607}, 3)
    assert measure_usage(b, [("data", theirs)]) == StorageUsage(b, {"data": 60_000}, 2)
    # the same place through two handles counts once
    again = tenant_storage(a, storage_config)
    assert measure_usage(a, [("data", mine), ("backup", again)]).bytes == 2_607
    with pytest.raises(SetlistError, match="can't measure"):
        measure_usage(a, [("data", theirs)])


def test_s3_usage_pages_past_1000_objects_and_ignores_other_prefixes(s3_endpoint):
    """list_objects_v2 returns 1000 keys a page: every page is counted. Objects of other
    stores' prefixes in the same bucket, and a key equal to A's prefix without its '/',
    are not A's."""
    from tests.helpers import fresh_s3_store

    a, b = _ids()
    data = fresh_s3_store(s3_endpoint)
    backups = data.model_copy(update={"prefix": "backups"})
    raw = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    base = f"platform/tenants/{a}/"

    def put(i: int) -> None:
        raw.put_object(Bucket=data.bucket, Key=f"{base}raw/{i:05d}", Body=b"." * (i % 7 + 1))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(1_203)))
    expected = sum(i % 7 + 1 for i in range(1_203))
    for stray in (f"platform/tenants/{a}", f"platform/tenants/{b}/x", f"other/tenants/{a}/x"):
        raw.put_object(Bucket=data.bucket, Key=stray, Body=b"!" * 999)
    tenant_storage(a, backups).put_bytes("repo.json", b"r" * 321)

    usage = measure_usage(
        a, [("data", tenant_storage(a, data)), ("backup", tenant_storage(a, backups))]
    )
    assert usage.bytes_by_store == {"data": expected, "backup": 321}
    assert usage.objects == 1_204 and usage.bytes == expected + 321


# ------------------------------------------------------------------ the guard


def test_the_guard_refuses_at_the_quota_and_names_used_and_quota():
    quota = TenantQuota(storage_gb=2)
    check_storage_quota(StorageUsage("acme", {"data": 2 * GIB - 1}), quota)  # under: passes
    with pytest.raises(StorageQuotaExceeded, match="2.00 GB of 2 GB"):  # at it: refused
        check_storage_quota(StorageUsage("acme", {"data": 2 * GIB}), quota)
    with pytest.raises(StorageQuotaExceeded) as refused:
        usage = StorageUsage("acme", {"data": 2 * GIB - 10, "backup": GIB // 2})
        check_storage_quota(usage, quota, "data-etl")
    message = str(refused.value)
    assert "'acme'" in message and "data-etl" in message
    assert "2.50 GB (data 2.00 GB, backup 0.50 GB) of 2 GB" in message
    assert f"{2 * GIB - 10 + GIB // 2} of {2 * GIB} bytes" in message
    assert isinstance(refused.value, SetlistError)


def test_a_sparse_quota_sized_file_is_measured_at_its_size(tmp_path):
    """What the flow tests below rely on: a local object's size is its length."""
    store = LocalTenantStorage("acme", tmp_path)
    _sparse(store, "media/big.bin", GIB + 1)
    usage = measure_usage("acme", [("data", store)])
    assert usage.bytes == GIB + 1
    with pytest.raises(StorageQuotaExceeded, match="1.00 GB of 1 GB"):
        check_storage_quota(usage, TenantQuota(storage_gb=1))


def test_the_cache_measures_again_only_after_its_ttl():
    calls: list[str] = []

    def measure(tenant_id: str) -> StorageUsage:
        calls.append(tenant_id)
        return StorageUsage(tenant_id, {"data": len(calls)})

    cache = UsageCache(measure, ttl=3600)
    assert cache.get("a").bytes == 1 and cache.get("a").bytes == 1
    assert cache.get("b").bytes == 2 and calls == ["a", "b"]
    cache.forget(["b"])
    assert cache.get("a").bytes == 3
    assert UsageCache(measure, ttl=0).get("a").bytes == 4  # no cache: measured each time


# ------------------------------------------------------------------ the flows


def _everything(*stores) -> dict[str, int]:
    return {f"{s.describe()}{k}": n for s in stores for k, n in s.iter_objects("")}


async def _local_stores(tenant_id: str):
    from setlist.core.settings import get_settings
    from setlist.core.storage import load_storage_config

    settings = get_settings()
    data = tenant_storage(tenant_id, await load_storage_config(settings.storage_block))
    backups = tenant_storage(tenant_id, await load_storage_config(settings.backup_block))
    assert isinstance(data, LocalTenantStorage)  # the session's stores: sparse files work
    return data, backups


@pytest.mark.server
async def test_data_etl_over_quota_is_refused_with_the_reason_and_writes_nothing(client, tenant_id):
    from flows.etl import data_etl
    from setlist.etl.demo import raw_files
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    await create_tenant(client, TenantSpec(tenant_id=tenant_id, quota=TenantQuota(storage_gb=1)))
    data, backups = await _local_stores(tenant_id)
    files, expected = raw_files(tenant_id, events=500, files=1, defect_share=0.0)
    for key, blob in files.items():
        data.put_bytes(key, blob)
    backups.put_bytes("repo.json", b"r" * 100)
    _sparse(data, "media/master.wav", GIB - 50)  # with the backup's 100 bytes: over
    before = _everything(data, backups)

    state = await data_etl(tenant_id=tenant_id, workers=1, return_state=True)
    assert state.is_failed()
    assert "StorageQuotaExceeded" in state.message
    assert f"tenant {tenant_id!r} is at or over its storage quota" in state.message
    assert "of 1 GB" in state.message and "backup 0.00 GB" in state.message
    assert _everything(data, backups) == before  # no curated table, no manifest

    # Under the quota the same load goes through: it was the quota that refused it.
    data.delete("media/master.wav")
    state = await data_etl(tenant_id=tenant_id, workers=1, return_state=True)
    assert state.is_completed(), state.message
    report = await state.result()
    assert report.loaded_rows == expected["valid"]
    assert data.list_keys("curated")


@pytest.mark.server
async def test_a_restore_over_quota_is_refused_before_staging_anything(client, tenant_id):
    from flows.backup import tenant_backup, tenant_restore
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    await create_tenant(client, TenantSpec(tenant_id=tenant_id, quota=TenantQuota(storage_gb=1)))
    data, backups = await _local_stores(tenant_id)
    data.put_bytes("raw/a.jsonl", b'{"event_id": "1"}\n' * 100)
    await tenant_backup(tenant_id)
    data.put_bytes("raw/a.jsonl", b"changed since the snapshot")
    _sparse(data, "media/master.wav", GIB)
    before = _everything(data, backups)

    state = await tenant_restore(tenant_id, "latest", return_state=True)
    assert state.is_failed() and "StorageQuotaExceeded" in state.message
    assert "tenant-restore" in state.message
    assert _everything(data, backups) == before
    assert data.get_bytes("raw/a.jsonl") == b"changed since the snapshot"


@pytest.mark.server
async def test_a_migration_into_a_tenant_over_quota_copies_nothing(client, tenant_id):
    from flows.backup import tenant_backup, tenant_migrate
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    source, target = f"{tenant_id[:40]}-a", f"{tenant_id[:40]}-b"
    await create_tenant(client, TenantSpec(tenant_id=source))
    await create_tenant(client, TenantSpec(tenant_id=target, quota=TenantQuota(storage_gb=1)))
    src, _ = await _local_stores(source)
    src.put_bytes("raw/a.jsonl", b"source data")
    snap = (await tenant_backup(source)).snapshot_id
    data, backups = await _local_stores(target)
    _sparse(data, "media/master.wav", GIB)
    before = _everything(data, backups)

    state = await tenant_migrate(
        source, target, snap, confirm=f"{source}->{target}", return_state=True
    )
    assert state.is_failed() and "StorageQuotaExceeded" in state.message
    assert f"tenant {target!r}" in state.message and "tenant-migrate" in state.message
    assert _everything(data, backups) == before  # no snapshot copied, nothing restored


# ------------------------------------------------------------------ the exporter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.server
async def test_the_exporter_exports_each_tenants_usage_and_quota(
    client, prefect_server, s3_endpoint, tenant_id
):
    """One tenant on an S3 data store (its block's secret read back through the API), one
    on the session's local store; the local backup store counts for both."""
    import anyio

    from setlist.observability.metrics import Exporter, serve
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from tests.helpers import fresh_s3_store

    s3_tenant, local_tenant = f"{tenant_id[:40]}-s3", f"{tenant_id[:40]}-lo"
    store = fresh_s3_store(s3_endpoint)
    block = f"usage-s3-{uuid.uuid4().hex[:6]}"
    await store.asave(block, client=client)
    await create_tenant(
        client,
        TenantSpec(tenant_id=s3_tenant, storage_block=block, quota=TenantQuota(storage_gb=3)),
    )
    await create_tenant(client, TenantSpec(tenant_id=local_tenant))
    tenant_storage(s3_tenant, store).put_bytes("raw/a.jsonl", b"a" * 4_321)
    tenant_storage(f"{s3_tenant}-x", store).put_bytes("raw/a.jsonl", b"x" * 99_999)  # not its
    data, backups = await _local_stores(local_tenant)
    data.put_bytes("raw/b.jsonl", b"b" * 1_000)
    backups.put_bytes("repo.json", b"r" * 24)
    s3_backups = (await _local_stores(s3_tenant))[1]
    s3_backups.put_bytes("repo.json", b"r" * 7)

    exporter = Exporter(prefect_server, ["setlist-local"], profile_ttl=0, storage_ttl=0)
    port = _free_port()
    server, _thread = serve(exporter, port, addr="127.0.0.1")
    try:
        first = await anyio.to_thread.run_sync(_samples, port)
        tenant_storage(s3_tenant, store).put_bytes("curated/c.parquet", b"c" * 500)
        second = await anyio.to_thread.run_sync(_samples, port)
    finally:
        server.shutdown()

    def value(samples, name, tenant):
        return samples.get((name, (("tenant", tenant),)))

    used, quota = "setlist_tenant_storage_bytes", "setlist_tenant_storage_quota_bytes"
    assert value(first, used, s3_tenant) == 4_321 + 7
    assert value(first, quota, s3_tenant) == 3 * GIB
    assert value(first, used, local_tenant) == 1_000 + 24
    assert value(first, quota, local_tenant) == 100 * GIB
    assert value(second, used, s3_tenant) == 4_321 + 7 + 500  # storage_ttl=0: fresh
    labels = {labels for (name, labels) in second if name in (used, quota)}
    assert all(len(ls) == 1 and ls[0][0] == "tenant" for ls in labels)  # tenant only


def test_the_storage_alerts_use_the_exported_metrics_at_80_and_100_percent():
    import yaml

    rules = Path(__file__).resolve().parents[2] / "k8s" / "observability" / "prometheus-rules.yaml"
    doc = yaml.safe_load(rules.read_text())
    alerts = {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"]}
    high, full = alerts["SetlistTenantStorageHigh"], alerts["SetlistTenantStorageQuotaReached"]
    assert high["labels"]["severity"] == "warning" and ">= 0.8" in high["expr"]
    assert full["labels"]["severity"] == "critical" and ">= 1" in full["expr"]
    for rule in (high, full):
        assert "setlist_tenant_storage_bytes" in rule["expr"]
        assert "setlist_tenant_storage_quota_bytes" in rule["expr"]
