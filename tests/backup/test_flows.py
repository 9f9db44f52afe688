"""The backup flows on the shared Prefect server: key handling, config in snapshots,
restore with config, explicit-only migration, prune, and no key in artifacts or logs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.server


async def _onboard(client, tenant_id: str, **spec) -> None:
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    await create_tenant(client, TenantSpec(tenant_id=tenant_id, **spec))


async def _data(tenant_id: str):
    from setlist.core.settings import get_settings
    from setlist.core.storage import load_storage_config, tenant_storage

    return tenant_storage(tenant_id, await load_storage_config(get_settings().storage_block))


async def test_backup_then_wipe_then_restore_with_config(client, tenant_id):
    from prefect.blocks.system import Secret

    from flows.backup import tenant_backup, tenant_restore
    from setlist.backup.platform import tenant_repository
    from setlist.core.tenancy import backup_key_block_name as key_block_name
    from setlist.tenants.onboarding import read_profile, update_tenant

    await _onboard(client, tenant_id, display_name="Before")
    data = await _data(tenant_id)
    files = {"raw/a.jsonl": b'{"event_id": "1"}\n' * 1000, "curated/x.parquet": b"PAR1" * 999}
    for key, blob in files.items():
        data.put_bytes(key, blob)

    first = await tenant_backup(tenant_id)
    assert first.files == 2 and first.files_read == 2
    key_text = str((await Secret.aload(key_block_name(tenant_id))).get())
    second = await tenant_backup(tenant_id)
    assert second.files_read == 0 and second.new_chunks == 0

    repo = await tenant_repository(tenant_id)
    config = repo.get_manifest(second.snapshot_id)["config"]
    assert config["profile"]["display_name"] == "Before"
    assert {q["name"].split(".")[0] for q in config["queues"]} == {tenant_id}
    assert config["quota_limit"]["limit"] >= 1
    assert {"data-etl", "tenant-backup"} <= {d["flow"] for d in config["deployments"]}

    # Wipe the data and change the profile; the restore brings both back.
    for key in list(data.iter_keys("")):
        data.delete(key)
    await update_tenant(client, tenant_id, {"display_name": "After"})
    restored = await tenant_restore(tenant_id, "latest", restore_config=True)
    assert restored.files == 2 and "profile" in restored.config
    assert {k: data.get_bytes(k) for k in data.iter_keys("")} == files
    assert (await read_profile(tenant_id)).display_name == "Before"

    # The key is in its Secret block only: not in artifacts, results or the audit trail.
    artifacts = await client.read_artifacts()
    assert artifacts and all(key_text not in str(a.data) for a in artifacts)
    assert key_text not in first.model_dump_json() + restored.model_dump_json()
    from tests.helpers import wait_for_events

    restored_events = await wait_for_events(client, tenant_id, "setlist.backup.restored")
    backed_up = await wait_for_events(client, tenant_id, "setlist.backup.completed", count=2)
    assert restored_events[0].payload["snapshot_id"] == restored.snapshot_id
    assert all(key_text not in e.model_dump_json() for e in [*restored_events, *backed_up])


async def test_a_lost_key_is_never_replaced_silently(client, tenant_id):
    from flows.backup import tenant_backup
    from setlist.backup.repository import BackupError
    from setlist.core.tenancy import backup_key_block_name as key_block_name

    await _onboard(client, tenant_id)
    (await _data(tenant_id)).put_bytes("raw/a.json", b"{}")
    await tenant_backup(tenant_id)
    block = await client.read_block_document_by_name(key_block_name(tenant_id), "secret")
    await client.delete_block_document(block.id)
    with pytest.raises(BackupError, match="restore the key block"):
        await tenant_backup(tenant_id)


async def test_migration_only_on_explicit_request(client, tenant_id):
    from flows.backup import tenant_backup, tenant_migrate, tenant_restore
    from setlist.backup.repository import BackupError

    source, target = f"{tenant_id}-a", f"{tenant_id}-b"
    await _onboard(client, source)
    await _onboard(client, target)
    a, b = await _data(source), await _data(target)
    a.put_bytes("raw/a.json", b"source data")
    b.put_bytes("raw/b.json", b"target data")
    snap = (await tenant_backup(source)).snapshot_id
    await tenant_backup(target)
    # A plain restore of the target can't name the source's snapshot: it isn't there.
    with pytest.raises(BackupError, match="no snapshot"):
        await tenant_restore(target, snap)
    with pytest.raises(BackupError, match="explicitly"):
        await tenant_migrate(source, target, snap)
    assert b.get_bytes("raw/b.json") == b"target data"
    done = await tenant_migrate(source, target, snap, confirm=f"{source}->{target}")
    assert done.source_tenant_id == source
    assert {k: b.get_bytes(k) for k in b.iter_keys("")} == {"raw/a.json": b"source data"}
    assert a.get_bytes("raw/a.json") == b"source data"  # the source is untouched


async def test_prune_flow_keeps_the_newest(client, tenant_id):
    from flows.backup import backup_prune, tenant_backup
    from setlist.backup.platform import tenant_repository
    from setlist.backup.results import RetentionPolicy
    from setlist.backup.snapshots import verify_snapshot

    await _onboard(client, tenant_id)
    data = await _data(tenant_id)
    for i in range(3):
        data.put_bytes("raw/a.json", f"version {i}".encode() * 100)
        await tenant_backup(tenant_id)
    repo = await tenant_repository(tenant_id)
    assert len(repo.snapshot_ids()) == 3
    pruned = await backup_prune(tenant_id, RetentionPolicy(daily=1, weekly=0, monthly=0))
    assert len(pruned.kept) == 1 and len(pruned.removed) == 2 and pruned.chunks_deleted == 2
    repo = await tenant_repository(tenant_id)
    assert repo.snapshot_ids() == pruned.kept
    assert verify_snapshot(repo, "latest").ok


async def test_backup_store_must_not_be_the_data_store(client, tenant_id, monkeypatch):
    from flows.backup import tenant_backup
    from setlist.backup.repository import BackupError
    from setlist.core.settings import get_settings

    await _onboard(client, tenant_id)
    monkeypatch.setattr(get_settings(), "backup_block", get_settings().storage_block)
    with pytest.raises(BackupError, match="is the tenants' data store"):
        await tenant_backup(tenant_id)


async def test_a_backup_is_a_task_graph_whose_failed_batch_is_retried_alone(
    client, tenant_id, monkeypatch
):
    """plan → one task per batch → manifest; a batch that fails once (a store error) is
    retried by itself and the snapshot is complete."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.backup import tenant_backup
    from setlist.backup import graph, snapshots
    from setlist.backup.platform import tenant_repository

    await _onboard(client, tenant_id)
    data = await _data(tenant_id)
    files = {f"raw/{i}.bin": bytes([i]) * 50_000 for i in range(6)}
    for key, blob in files.items():
        data.put_bytes(key, blob)
    real_plan, real_batch = snapshots.plan_snapshot, snapshots.back_up_batch
    failed = []

    def small_batches(data, repo):
        return real_plan(data, repo, batch_bytes=120_000)

    def flaky(data, repo, batch, **kw):
        if not failed and batch[0].key == "raw/2.bin":
            failed.append(batch[0].key)
            raise OSError("store answered 503")
        return real_batch(data, repo, batch, **kw)

    monkeypatch.setattr(graph, "plan_snapshot", small_batches)
    monkeypatch.setattr(graph, "back_up_batch", flaky)
    monkeypatch.setattr(graph.store_batch, "retry_delay_seconds", [0, 0])
    state = await tenant_backup(tenant_id, return_state=True)
    result = await state.result()
    assert failed == ["raw/2.bin"] and result.files == 6 and result.files_read == 6

    run_id = state.state_details.flow_run_id
    tasks = await client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    )
    names = sorted(t.name.rsplit("-", 1)[0] if "snapshot" in t.name or "manifest" in t.name
                   else t.name for t in tasks)  # fmt: skip
    assert names == ["plan-snapshot", "store batch 1 of 3", "store batch 2 of 3",
                     "store batch 3 of 3", "write-manifest"]  # fmt: skip
    retried = [t for t in tasks if t.name == "store batch 2 of 3"]
    assert retried[0].run_count == 2 and all(t.state.is_completed() for t in tasks)
    repo = await tenant_repository(tenant_id)
    assert len(repo.get_manifest(result.snapshot_id)["files"]) == 6


async def test_a_restore_is_a_task_graph_whose_failed_batch_is_retried_alone(
    client, tenant_id, monkeypatch
):
    """plan → one task per batch staged → switch; a batch that dies halfway (the store
    dropped the connection) is retried by itself, reads only its own files again, and
    the tenant's data is the snapshot's."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.backup import tenant_backup, tenant_restore
    from setlist.backup import graph, restores

    await _onboard(client, tenant_id)
    data = await _data(tenant_id)
    files = {f"raw/{i}.bin": bytes([i]) * 50_000 for i in range(6)}
    for key, blob in files.items():
        data.put_bytes(key, blob)
    await tenant_backup(tenant_id)
    for key in files:
        data.put_bytes(key, b"changed since the backup")
    real_plan, real_stage = restores.plan_restore, restores.stage_batch
    failed: list[str] = []

    def small_batches(*args, **kw):
        return real_plan(*args, **kw, batch_bytes=120_000)

    def flaky(repo, staging, batch):
        if not failed and batch[0]["path"] == "raw/2.bin":
            real_stage(repo, staging, batch[:1])  # one file staged, then the line drops
            failed.append(batch[0]["path"])
            raise ConnectionError("store dropped the connection")
        return real_stage(repo, staging, batch)

    monkeypatch.setattr(restores, "plan_restore", small_batches)
    monkeypatch.setattr(restores, "stage_batch", flaky)
    monkeypatch.setattr(graph.stage_batch, "retry_delay_seconds", [0, 0])
    state = await tenant_restore(tenant_id, "latest", return_state=True)
    result = await state.result()
    assert failed == ["raw/2.bin"] and result.files == 6
    assert {k: data.get_bytes(k) for k in files} == files

    run_id = state.state_details.flow_run_id
    tasks = await client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    )
    names = sorted(t.name.rsplit("-", 1)[0] if t.name.startswith(("plan-", "switch-"))
                   else t.name for t in tasks)  # fmt: skip
    assert names == ["plan-restore", "stage batch 1 of 3", "stage batch 2 of 3",
                     "stage batch 3 of 3", "switch-in"]  # fmt: skip
    retried = [t for t in tasks if t.name == "stage batch 2 of 3"]
    assert retried[0].run_count == 2 and all(t.state.is_completed() for t in tasks)
