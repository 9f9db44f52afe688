"""Tenant backups on both backends: byte-identical round trips, dedup, tamper and hostile
manifest refusal with nothing written, atomic and resumable restores, retention."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from datetime import UTC, datetime, timedelta

import pytest
import zstandard

from blocks.storage import LocalStorageConfig
from setlist.backup import restores
from setlist.backup import snapshots as backup
from setlist.backup.repository import (
    CHUNK_MAGIC,
    MAX_CHUNK,
    BackupError,
    BackupKey,
    IntegrityError,
    Repository,
    open_repository,
)
from setlist.backup.snapshots import Retention, snapshots_to_keep
from setlist.core.storage import LocalTenantStorage, tenant_storage


def _tree(storage, seed: int = 7) -> dict[str, bytes]:
    """Mixed files: big random (several chunks), a copy of it, text, tiny, empty."""
    rng = random.Random(seed)
    big = rng.randbytes(9 * 1024 * 1024)
    text = "".join(
        json.dumps({"event_id": i, "user": f"u{rng.randint(0, 99)}"}) + "\n" for i in range(40000)
    ).encode()
    files = {
        "raw/2026/big.bin": big,
        "raw/2026/copy-of-big.bin": big,
        "raw/events.jsonl": text,
        "curated/events/_manifest.json": b'{"version": 3}',
        "curated/events/date=2026-11-30/part.parquet": rng.randbytes(300_000),
        "models/empty": b"",
    }
    for key, data in files.items():
        storage.put_bytes(key, data)
    return files


def _snapshot_of(storage) -> dict[str, bytes]:
    return {key: storage.get_bytes(key) for key in storage.iter_keys("")}


def _wipe(storage) -> None:
    for key in list(storage.iter_keys("")):
        storage.delete(key)


@pytest.fixture
def repo_config(tmp_path):
    return LocalStorageConfig(root=str(tmp_path / "backups"))


def _repo(tenant: str, config, key: BackupKey | None = None) -> Repository:
    key = key or BackupKey.generate()[0]
    return open_repository(tenant_storage(tenant, config), key, create=True)


def test_backup_wipe_restore_is_byte_identical(storage_config, repo_config):
    data = tenant_storage("acme", storage_config)
    files = _tree(data)
    repo = _repo("acme", repo_config)
    done = backup.create_snapshot(data, repo)
    assert done.files == len(files) and done.bytes == sum(map(len, files.values()))
    # The copy of the 9 MiB file is stored once: only its first reading wrote chunks.
    assert done.reused_chunks >= 3
    _wipe(data)
    assert list(data.iter_keys("")) == []
    restored = restores.restore_snapshot(data, repo, "latest")
    assert restored.files == len(files)
    assert _snapshot_of(data) == files


def test_unchanged_data_stores_under_one_percent_and_reads_nothing(storage_config, repo_config):
    data = tenant_storage("acme", storage_config)
    files = _tree(data)
    repo = _repo("acme", repo_config)
    first = backup.create_snapshot(data, repo)
    second = backup.create_snapshot(data, repo)
    total = sum(map(len, files.values()))
    assert second.new_chunks == 0 and second.files_read == 0
    assert second.new_bytes + second.manifest_bytes < 0.01 * total
    # The random files do not compress; the copy of the big one is stored once.
    assert 0.4 * total < first.new_bytes < 0.6 * total
    # One changed file is read again, and only its new chunks are stored.
    data.put_bytes("raw/events.jsonl", files["raw/events.jsonl"] + b'{"event_id": -1}\n')
    third = backup.create_snapshot(data, repo)
    assert third.files_read == 1 and third.new_chunks >= 1
    assert len(repo.snapshot_ids()) == 3
    _wipe(data)
    restores.restore_snapshot(data, repo, repo.snapshot_ids()[1])
    assert _snapshot_of(data) == files


def test_chunks_are_content_defined_so_an_insert_reuses_the_rest(tmp_path, repo_config):
    data = LocalTenantStorage("acme", tmp_path / "data")
    blob = random.Random(1).randbytes(12 * 1024 * 1024)
    data.put_bytes("a.bin", blob)
    repo = _repo("acme", repo_config)
    first = backup.create_snapshot(data, repo)
    data.put_bytes("a.bin", blob[:100] + b"inserted" + blob[100:])
    second = backup.create_snapshot(data, repo)
    assert second.new_chunks <= 2 < first.new_chunks
    assert second.reused_chunks >= first.new_chunks - 2


def _data_state(storage) -> dict[str, str]:
    return {k: hashlib.sha256(storage.get_bytes(k)).hexdigest() for k in storage.iter_keys("")}


def _flip(path, offset: int = -20) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _chunk_files(repo_config, tenant="acme"):
    from pathlib import Path

    return sorted(Path(repo_config.root, "tenants", tenant, "packs").rglob("*"))


@pytest.mark.parametrize(
    "damage", ["chunk-byte", "chunk-truncated", "manifest-byte", "index-byte", "pack-gone"]
)
def test_damage_is_refused_and_nothing_is_written(storage_config, repo_config, damage):
    from pathlib import Path

    data = tenant_storage("acme", storage_config)
    _tree(data)
    repo = _repo("acme", repo_config)
    snap = backup.create_snapshot(data, repo).snapshot_id
    data.put_bytes("raw/events.jsonl", b"changed since the backup\n")
    before = _data_state(data)
    chunks = [p for p in _chunk_files(repo_config) if p.is_file()]
    victim = max(chunks, key=lambda p: p.stat().st_size)
    if damage == "chunk-byte":
        _flip(victim)
    elif damage == "chunk-truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "pack-gone":
        victim.unlink()
    elif damage == "index-byte":
        _flip(Path(repo_config.root, "tenants", "acme", "index", victim.name), 40)
    else:
        _flip(Path(repo_config.root, "tenants", "acme", "snapshots", snap), 30)
    repo = Repository(repo.store, repo.key)  # as the next run would open it
    with pytest.raises(IntegrityError) as err:
        restores.restore_snapshot(data, repo, snap)
    assert any(w in str(err.value) for w in ("authentication", "missing", "truncated"))
    assert _data_state(data) == before
    assert not backup.verify_snapshot(repo, snap).ok if damage != "manifest-byte" else True
    if isinstance(data, LocalTenantStorage):  # no staging left behind either
        assert [p.name for p in data.dir.parent.iterdir()] == ["acme"]


def test_wrong_key_is_refused_before_reading_anything(repo_config, tmp_path):
    data = LocalTenantStorage("acme", tmp_path / "data")
    _tree(data)
    repo = _repo("acme", repo_config)
    backup.create_snapshot(data, repo)
    other = BackupKey.generate()[0]
    with pytest.raises(BackupError, match="wrong backup key"):
        open_repository(tenant_storage("acme", repo_config), other)
    # Even bypassing the header check, the manifest does not open with another key.
    sneaky = Repository(tenant_storage("acme", repo_config), other)
    with pytest.raises(IntegrityError, match="authentication"):
        sneaky.get_manifest(repo.snapshot_ids()[-1])


def test_key_never_shows_in_repr_or_repository(repo_config, tmp_path):
    key, text = BackupKey.generate()
    data = LocalTenantStorage("acme", tmp_path / "data")
    _tree(data)
    backup.create_snapshot(data, _repo("acme", repo_config, key))
    assert text not in repr(key)
    material = __import__("base64").b64decode(text)
    from pathlib import Path

    for path in Path(repo_config.root).rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert material not in blob and text.encode() not in blob


def _forge(repo: Repository, files: list[dict], snapshot_id: str = "20261130T010000Z-aaaaaa"):
    """A manifest written by someone holding the key: authentic, but hostile."""
    repo.put_manifest(
        {"format": 1, "snapshot_id": snapshot_id, "tenant_id": repo.tenant_id, "files": files}
    )
    return snapshot_id


@pytest.mark.parametrize(
    "entry",
    [
        {"path": "../outside", "mode": 0o644},
        {"path": "/etc/cron.d/evil", "mode": 0o644},
        {"path": "raw/../../x", "mode": 0o644},
        {"path": "raw/link", "mode": 0o777, "kind": "symlink"},
        {"path": "raw/dev", "mode": stat.S_IFCHR | 0o644},
        {"path": "raw/suid", "mode": 0o4755},
    ],
)
def test_hostile_manifest_is_refused_before_anything_is_written(tmp_path, repo_config, entry):
    data = LocalTenantStorage("acme", tmp_path / "data")
    data.put_bytes("raw/keep.json", b"{}")
    repo = _repo("acme", repo_config)
    chunk = b"x" * 10
    cid = repo.key.chunk_id(chunk)
    repo.put_sealed(cid, repo.seal_chunk(cid, chunk))
    repo.flush()
    item = {"size": 10, "sha256": hashlib.sha256(chunk).hexdigest(), "chunks": [[cid, 10]]}
    snap = _forge(repo, [{**item, **entry}])
    with pytest.raises(IntegrityError):
        restores.restore_snapshot(data, repo, snap)
    assert _snapshot_of(data) == {"raw/keep.json": b"{}"}
    assert not (tmp_path / "outside").exists()
    assert sorted(p.name for p in data.dir.parent.iterdir()) == ["acme"]


def test_decompression_bomb_chunk_is_refused(tmp_path, repo_config):
    data = LocalTenantStorage("acme", tmp_path / "data")
    repo = _repo("acme", repo_config)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    claimed = b"\0" * 1000
    cid = repo.key.chunk_id(claimed)
    repo.put_sealed(cid, repo.key.seal(b"\x01" + bomb, repo._chunk_aad(cid), CHUNK_MAGIC))
    repo.flush()
    item = {"path": "a", "size": 1000, "sha256": hashlib.sha256(claimed).hexdigest()}
    snap = _forge(repo, [{**item, "chunks": [[cid, 1000]]}])
    with pytest.raises(IntegrityError, match="decompress to its recorded size"):
        restores.restore_snapshot(data, repo, snap)
    # A chunk longer than the format allows is refused from the manifest alone.
    big = _forge(
        repo,
        [{**item, "size": MAX_CHUNK + 1, "chunks": [[cid, MAX_CHUNK + 1]]}],
        "20261130T020000Z-bbbbbb",
    )
    with pytest.raises(IntegrityError, match="add up"):
        restores.restore_snapshot(data, repo, big)
    assert list(data.iter_keys("")) == []


def test_links_and_special_files_are_never_followed_or_restored(tmp_path, repo_config):
    data = LocalTenantStorage("acme", tmp_path / "data")
    data.put_bytes("raw/a.json", b"{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("other tenant's data")
    os.symlink(secret, data.dir / "raw" / "link-out")
    os.mkfifo(data.dir / "raw" / "pipe")  # opening it would block forever
    repo = _repo("acme", repo_config)
    done = backup.create_snapshot(data, repo)
    assert done.files == 1
    assert {s["path"] for s in done.skipped} == {"raw/link-out", "raw/pipe"}
    manifest = repo.get_manifest(done.snapshot_id)
    assert [f["path"] for f in manifest["files"]] == ["raw/a.json"]
    assert b"other tenant" not in b"".join(
        p.read_bytes() for p in _chunk_files(repo_config) if p.is_file()
    )


def test_a_restore_cannot_cross_tenants(tmp_path, repo_config):
    from pathlib import Path

    a = LocalTenantStorage("tenant-a", tmp_path / "data")
    b = LocalTenantStorage("tenant-b", tmp_path / "data")
    _tree(a)
    b.put_bytes("raw/b.json", b"b's own")
    repo_a = _repo("tenant-a", repo_config)
    repo_b = _repo("tenant-b", repo_config)
    snap = backup.create_snapshot(a, repo_a).snapshot_id
    with pytest.raises(BackupError, match="can't cross tenants"):
        restores.restore_snapshot(b, repo_a, snap)
    # B's repository doesn't see A's snapshots, and a manifest copied across is refused.
    assert repo_b.snapshot_ids() == []
    src = Path(repo_config.root, "tenants", "tenant-a", "snapshots", snap)
    dst = Path(repo_config.root, "tenants", "tenant-b", "snapshots", snap)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    with pytest.raises(IntegrityError):
        restores.restore_snapshot(b, repo_b, snap)
    assert _snapshot_of(b) == {"raw/b.json": b"b's own"}


def test_subset_restore_replaces_only_those_paths(storage_config, repo_config):
    data = tenant_storage("acme", storage_config)
    files = _tree(data)
    repo = _repo("acme", repo_config)
    backup.create_snapshot(data, repo)
    data.put_bytes("curated/events/_manifest.json", b'{"version": 99}')
    data.put_bytes("curated/events/date=2026-12-01/part.parquet", b"newer partition")
    data.put_bytes("raw/events.jsonl", b"newer raw")
    done = restores.restore_snapshot(data, repo, "latest", paths=["curated"])
    assert done.files == 2 and done.removed == 1
    now = _snapshot_of(data)
    assert {k: v for k, v in now.items() if k.startswith("curated/")} == {
        k: v for k, v in files.items() if k.startswith("curated/")
    }
    assert now["raw/events.jsonl"] == b"newer raw"
    assert now["raw/2026/big.bin"] == files["raw/2026/big.bin"]
    with pytest.raises(BackupError, match="holds nothing under"):
        restores.restore_snapshot(data, repo, "latest", paths=["nothing-here"])


def test_crashed_backup_leaves_no_snapshot_and_a_rerun_completes(tmp_path, repo_config):
    data = LocalTenantStorage("acme", tmp_path / "data")
    files = _tree(data)
    repo = _repo("acme", repo_config)
    real = repo.put_manifest

    def crash(_manifest):
        raise OSError("killed")

    repo.put_manifest = crash
    with pytest.raises(OSError):
        backup.create_snapshot(data, repo)
    assert repo.snapshot_ids() == []
    repo.put_manifest = real
    again = backup.create_snapshot(data, Repository(repo.store, repo.key))
    assert again.new_chunks == 0  # the crashed run's chunks are reused
    _wipe(data)
    restores.restore_snapshot(data, repo, "latest")
    assert _snapshot_of(data) == files


def test_interrupted_object_store_restore_rolls_forward(s3_endpoint, repo_config):
    import boto3

    from blocks.storage import S3StorageConfig

    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    bucket = f"setlist-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **creds).create_bucket(
        Bucket=bucket
    )
    config = S3StorageConfig(
        bucket=bucket, endpoint_url=s3_endpoint, region_name="us-east-1", **creds
    )
    data = tenant_storage("acme", config)
    files = _tree(data)
    repo = _repo("acme", repo_config)
    backup.create_snapshot(data, repo)
    for key in files:
        data.put_bytes(key, b"damaged")
    calls = {"n": 0}
    real = data.put_file

    def dies_midway(key, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("pod evicted")
        return real(key, path)

    data.put_file = dies_midway
    with pytest.raises(ConnectionError):
        restores.restore_snapshot(data, repo, "latest")
    assert backup.pending_journal(repo)["snapshot_id"] == repo.snapshot_ids()[-1]
    with pytest.raises(BackupError, match="interrupted"):
        backup.create_snapshot(data, repo)
    data.put_file = real
    restores.restore_snapshot(data, repo, backup.pending_journal(repo)["snapshot_id"])
    assert backup.pending_journal(repo) is None
    assert _snapshot_of(data) == files


def test_an_interrupted_object_store_restore_never_shows_a_broken_table(s3_endpoint, repo_config):
    """Wherever the switch stops (a node lost mid-upload), a reader of the curated table
    gets the table it had or the restored one: the manifest goes up after its files.
    The restored version's files are gone from the store by then (two loads since)."""
    import boto3

    from blocks.storage import S3StorageConfig
    from setlist.etl.curated import read_manifest, read_table
    from setlist.etl.demo import listening_table, publish_curated

    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    bucket = f"setlist-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **creds).create_bucket(
        Bucket=bucket
    )
    config = S3StorageConfig(
        bucket=bucket, endpoint_url=s3_endpoint, region_name="us-east-1", **creds
    )
    data = tenant_storage("acme", config)
    data.put_bytes("raw/a.jsonl", b"{}\n")

    def table() -> list:
        return sorted(read_table(data, read_manifest(data), ["event_id"])["event_id"].to_pylist())

    def load(seed: int) -> None:
        publish_curated(data, listening_table("acme", events=2000, days=3, seed=seed))

    repo = _repo("acme", repo_config)
    load(1)
    restored, restored_id = table(), backup.create_snapshot(data, repo).snapshot_id
    load(2)
    load(3)
    current, current_id = table(), backup.create_snapshot(data, repo).snapshot_id
    files = len(repo.get_manifest(restored_id)["files"])
    real = data.put_file
    for stop_at in range(1, files + 1):
        calls = {"n": 0}

        def node_lost(key, path, stop_at=stop_at, calls=calls):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise ConnectionError("node lost")
            return real(key, path)

        data.put_file = node_lost
        with pytest.raises(ConnectionError):
            restores.restore_snapshot(data, repo, restored_id)
        data.put_file = real
        assert table() in (current, restored), f"a broken table after {stop_at - 1} uploads"
        restores.restore_snapshot(data, repo, backup.pending_journal(repo)["snapshot_id"])
        assert table() == restored
        restores.restore_snapshot(data, repo, current_id)  # back to the start for the next
        assert table() == current


def test_verify_full_and_sampled(tmp_path, repo_config):
    data = LocalTenantStorage("acme", tmp_path / "data")
    _tree(data)
    repo = _repo("acme", repo_config)
    snap = backup.create_snapshot(data, repo).snapshot_id
    full = backup.verify_snapshot(repo, snap)
    assert full.ok and full.files_checked == 6 and full.chunks_checked >= full.chunks_total
    sampled = backup.verify_snapshot(repo, snap, sample=0.5, seed=1)
    assert sampled.ok and sampled.chunks_checked == round(sampled.chunks_total * 0.5)
    _flip(
        max((p for p in _chunk_files(repo_config) if p.is_file()), key=lambda p: p.stat().st_size)
    )
    bad = backup.verify_snapshot(repo, snap)
    assert not bad.ok and "authentication" in bad.errors[0]


def test_migrate_reencrypts_for_the_target(tmp_path, repo_config):
    a = LocalTenantStorage("tenant-a", tmp_path / "data")
    b = LocalTenantStorage("tenant-b", tmp_path / "data")
    files = _tree(a)
    b.put_bytes("raw/old.json", b"replaced by the migration")
    repo_a, repo_b = _repo("tenant-a", repo_config), _repo("tenant-b", repo_config)
    backup.create_snapshot(a, repo_a)
    copied = restores.migrate_snapshot(repo_a, repo_b)
    assert not (repo_a.known_chunks() & repo_b.known_chunks())  # re-keyed ids
    restores.restore_snapshot(b, repo_b, copied.snapshot_id)
    assert _snapshot_of(b) == files
    assert repo_b.get_manifest(copied.snapshot_id)["migrated_from"]["tenant_id"] == "tenant-a"
    with pytest.raises(BackupError):
        restores.migrate_snapshot(repo_a, repo_a)


def test_retention_keeps_the_newest_of_each_bucket():
    start = datetime(2026, 1, 1, 2, tzinfo=UTC)
    ids = [f"{start + timedelta(days=d):%Y%m%dT%H%M%SZ}-{d:06x}" for d in range(120)]
    keep = snapshots_to_keep(ids, Retention(daily=7, weekly=4, monthly=3))
    days = sorted(ids)[-7:]
    assert set(days) <= keep
    assert sorted(ids)[-1] in keep
    # Each kept snapshot is the newest of its day, week or month bucket.
    assert len(keep) <= 7 + 4 + 3
    # The last three months' newest: April's (the newest of all), March's, February's.
    assert {"20260331T020000Z-000059", "20260228T020000Z-00003a"} <= keep
    assert not any(k.startswith("202601") for k in keep)
    assert snapshots_to_keep(ids, Retention(0, 0, 0)) == {sorted(ids)[-1]}


def test_prune_never_deletes_a_referenced_chunk():
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    contents = st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=6)
    snapshots = st.lists(
        st.tuples(st.integers(0, 400), st.dictionaries(st.sampled_from("abcde"), contents)),
        min_size=1,
        max_size=8,
    )

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(snapshots, st.integers(0, 5), st.integers(0, 3), st.integers(0, 3))
    def check(history, daily, weekly, monthly):
        with tempfile.TemporaryDirectory() as tmp:
            data = LocalTenantStorage("acme", f"{tmp}/data")
            repo = _repo("acme", LocalStorageConfig(root=f"{tmp}/backups"))
            start = datetime(2026, 1, 1, tzinfo=UTC)
            for hours, tree in history:
                _wipe(data)
                for name, parts in tree.items():
                    data.put_bytes(name, b"|".join(parts))
                backup.create_snapshot(data, repo, now=start + timedelta(hours=hours * 7))
            before = repo.snapshot_ids()
            done = backup.prune(repo, Retention(daily, weekly, monthly))
            fresh = Repository(repo.store, repo.key)
            assert fresh.snapshot_ids() == done.kept
            assert set(done.kept) == snapshots_to_keep(before, Retention(daily, weekly, monthly))
            referenced = {
                cid
                for s in done.kept
                for f in fresh.get_manifest(s)["files"]
                for cid, _ in f["chunks"]
            }
            assert fresh.known_chunks() == referenced  # nothing referenced gone, no garbage kept
            for s in done.kept:
                assert backup.verify_snapshot(fresh, s).ok

    check()


def test_an_s3_repository_round_trips_and_detects_truncation(s3_endpoint, tmp_path):
    import boto3

    from blocks.storage import S3StorageConfig

    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    bucket = f"setlist-backups-{os.urandom(4).hex()}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **creds)
    s3.create_bucket(Bucket=bucket)
    config = S3StorageConfig(
        bucket=bucket, prefix="repo", endpoint_url=s3_endpoint, region_name="us-east-1", **creds
    )
    data = LocalTenantStorage("acme", tmp_path / "data")
    files = _tree(data)
    repo = _repo("acme", config)
    backup.create_snapshot(data, repo)
    assert backup.create_snapshot(data, repo).new_chunks == 0
    _wipe(data)
    restores.restore_snapshot(data, Repository(repo.store, repo.key), "latest")
    assert _snapshot_of(data) == files
    # Cut the biggest pack short: the chunks past the cut are refused, nothing is written.
    packs = [o for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if "/packs/" in o["Key"]]
    biggest = max(packs, key=lambda o: o["Size"])
    body = s3.get_object(Bucket=bucket, Key=biggest["Key"])["Body"].read()
    s3.put_object(Bucket=bucket, Key=biggest["Key"], Body=body[: len(body) // 2])
    data.put_bytes("raw/events.jsonl", b"newer")
    before = _snapshot_of(data)
    with pytest.raises(IntegrityError, match="truncated"):
        restores.restore_snapshot(data, Repository(repo.store, repo.key), "latest")
    assert _snapshot_of(data) == before


# ------------------------------------------------------------------- resuming a backup


def test_a_backup_killed_after_some_batches_reads_only_the_rest(storage_config, repo_config):
    """A crash after two of four batches (checkpoints written, no manifest): the next
    backup reads only the other two, and its snapshot restores byte-identically."""
    data = tenant_storage("acme", storage_config)
    rng = random.Random(3)
    files = {f"raw/part-{i}.bin": rng.randbytes(600_000) for i in range(8)}
    for key, blob in files.items():
        data.put_bytes(key, blob)
    repo = _repo("acme", repo_config)
    plan = backup.plan_snapshot(data, repo, batch_bytes=1_300_000)
    assert [len(b) for b in plan.batches] == [2, 2, 2, 2]
    finished = plan.batches[:2]
    for batch in finished:
        backup.back_up_batch(data, repo, batch)
    assert repo.snapshot_ids() == []  # no manifest: no snapshot
    # One file of a finished batch changes before the re-run: it must be read again.
    changed = finished[0][0].key
    files[changed] = rng.randbytes(600_000)
    data.put_bytes(changed, files[changed])

    done = backup.create_snapshot(data, repo, batch_bytes=1_300_000)
    assert done.files == 8 and done.files_read == 5  # 4 unfinished + the changed one
    assert done.bytes_read == 5 * 600_000
    assert list(repo.store.iter_keys("checkpoints")) == []  # dropped with the manifest
    _wipe(data)
    restores.restore_snapshot(data, repo)
    assert _snapshot_of(data) == files


def test_a_checkpoint_is_no_reason_to_trust_missing_chunks_or_a_forged_file(
    storage_config, repo_config
):
    data = tenant_storage("acme", storage_config)
    data.put_bytes("raw/a.bin", random.Random(1).randbytes(400_000))
    repo = _repo("acme", repo_config)
    plan = backup.plan_snapshot(data, repo)
    backup.back_up_batch(data, repo, plan.batches[0])
    # A planted "checkpoint" (not sealed with the tenant's key) is ignored, not trusted.
    repo.store.put_bytes("checkpoints/planted", json.dumps([{"path": "raw/a.bin"}]).encode())
    assert [f["path"] for f in repo.checkpoint_files()] == ["raw/a.bin"]
    # Chunks pruned since the checkpoint (no snapshot referenced them): read again.
    repo.drop_unreferenced(set())
    done = backup.create_snapshot(data, repo)
    assert done.files_read == 1
    _wipe(data)
    restores.restore_snapshot(data, repo)
    assert data.get_bytes("raw/a.bin") == random.Random(1).randbytes(400_000)


# ------------------------------------------------------ resuming a restore or a migration


def _eight_files(data, seed: int = 5) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {f"raw/part-{i}.bin": rng.randbytes(600_000) for i in range(8)}
    files["curated/events/_manifest.json"] = b'{"version": 1}'
    for key, blob in files.items():
        data.put_bytes(key, blob)
    return files


class _DiesAfter:
    """``repo.get_chunk`` that raises (the pod evicted) once ``limit`` bytes are read, and
    counts what every call reads."""

    def __init__(self, repo, limit: int | None) -> None:
        self.real, self.limit, self.read = repo.get_chunk, limit, 0

    def __call__(self, chunk_id, length):
        if self.limit is not None and self.read + length > self.limit:
            raise ConnectionError("pod evicted")
        self.read += length
        return self.real(chunk_id, length)


def test_a_restore_killed_halfway_reads_only_the_rest_again(storage_config, repo_config, tmp_path):
    """Killed after about half its bytes: the re-run stages only what is missing (the
    measure the seed's operators asked for: at most 60% read again), and the data is
    the snapshot's, byte for byte."""
    data = tenant_storage("acme", storage_config)
    files = _eight_files(data)
    repo = _repo("acme", repo_config)
    backup.create_snapshot(data, repo)
    for key in files:
        data.put_bytes(key, b"damaged since")
    total = sum(len(b) for b in files.values())
    scratch = tmp_path / "scratch"

    dying = _DiesAfter(repo, total // 2 + 100)
    repo.get_chunk = dying
    with pytest.raises(ConnectionError):
        restores.restore_snapshot(data, repo, scratch=scratch, batch_bytes=1_300_000)
    assert all(data.get_bytes(k) == b"damaged since" for k in files)  # nothing switched yet

    counting = _DiesAfter(repo, None)
    counting.real = dying.real
    repo.get_chunk = counting
    done = restores.restore_snapshot(data, repo, scratch=scratch, batch_bytes=1_300_000)
    assert counting.read == done.bytes_read <= 0.6 * total
    assert done.files_resumed >= 3 and done.files == len(files)
    assert _snapshot_of(data) == files
    leftovers = [p.name for p in scratch.iterdir()] if scratch.exists() else []
    if isinstance(data, LocalTenantStorage):
        leftovers = [p.name for p in data.dir.parent.iterdir() if p.name != "acme"]
    assert leftovers == []  # the staging went with the switch


def test_nothing_an_earlier_try_left_in_the_staging_is_trusted(repo_config, tmp_path):
    """Between a dead try and the next, a staged file is altered (same size), a file the
    snapshot doesn't hold and a link out of the staging are planted: the restore stages
    the altered file again, and neither plant reaches the tenant's data or is followed."""
    config = LocalStorageConfig(root=str(tmp_path / "store"))
    data = tenant_storage("acme", config)
    files = _eight_files(data)
    repo = _repo("acme", repo_config)
    backup.create_snapshot(data, repo)
    dying = _DiesAfter(repo, sum(len(b) for b in files.values()) // 2)
    repo.get_chunk = dying
    with pytest.raises(ConnectionError):
        restores.restore_snapshot(data, repo, batch_bytes=1_300_000)
    repo.get_chunk = dying.real
    (staging,) = [p for p in data.dir.parent.iterdir() if p.name.startswith(".restore-acme-")]
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    staged = sorted(p for p in staging.rglob("*.bin"))
    assert staged, "the dead try staged nothing"
    staged[0].write_bytes(b"x" * 600_000)
    (staging / "raw" / "planted.bin").write_bytes(b"not in the snapshot")
    (staging / "junk" / "deeper").mkdir(parents=True)  # nothing in it, nothing to restore
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    (staging / "raw" / "part-7.bin").unlink(missing_ok=True)
    (staging / "raw" / "part-7.bin").symlink_to(outside)
    # Another tenant whose id starts with this one's: its staging is not this restore's.
    other = data.dir.parent / (".restore-acme-2-" + "0" * 20)
    other.mkdir()

    done = restores.restore_snapshot(data, repo, batch_bytes=1_300_000)
    assert _snapshot_of(data) == files
    assert "raw/planted.bin" not in _snapshot_of(data)
    assert outside.read_bytes() == b"keep me"
    assert not (data.dir / "junk").exists()
    assert done.files_resumed < len(files)
    assert other.is_dir()


def test_a_stale_staging_of_another_snapshot_is_dropped(repo_config, tmp_path):
    config = LocalStorageConfig(root=str(tmp_path / "store"))
    data = tenant_storage("acme", config)
    files = _eight_files(data)
    repo = _repo("acme", repo_config)
    first = backup.create_snapshot(data, repo).snapshot_id
    repo.get_chunk = _DiesAfter(repo, 700_000)
    with pytest.raises(ConnectionError):
        restores.restore_snapshot(data, repo, first, paths=["raw"], batch_bytes=1_300_000)
    repo.get_chunk = repo.get_chunk.real
    restores.restore_snapshot(data, repo, first)  # the whole snapshot: another staging
    assert [p.name for p in data.dir.parent.iterdir()] == ["acme"]
    assert _snapshot_of(data) == files


def test_a_migration_killed_halfway_copies_only_the_rest(repo_config, tmp_path):
    config = LocalStorageConfig(root=str(tmp_path / "store"))
    a, b = tenant_storage("tenant-a", config), tenant_storage("tenant-b", config)
    files = _eight_files(a)
    repo_a, repo_b = _repo("tenant-a", repo_config), _repo("tenant-b", repo_config)
    backup.create_snapshot(a, repo_a)
    total = sum(len(x) for x in files.values())

    dying = _DiesAfter(repo_a, total // 2 + 100)
    repo_a.get_chunk = dying
    with pytest.raises(ConnectionError):
        restores.migrate_snapshot(repo_a, repo_b, batch_bytes=1_300_000)
    assert repo_b.snapshot_ids() == []  # no manifest: no copy yet
    counting = _DiesAfter(repo_a, None)
    counting.real = dying.real
    repo_a.get_chunk = counting
    copied = restores.migrate_snapshot(repo_a, repo_b, batch_bytes=1_300_000)
    assert counting.read == copied.bytes_read <= 0.6 * total
    assert copied.files == len(files)
    assert list(repo_b.store.iter_keys("checkpoints")) == []
    manifest = repo_b.get_manifest(copied.snapshot_id)
    assert all("migrated_from" not in f for f in manifest["files"])
    restores.restore_snapshot(b, repo_b, copied.snapshot_id)
    assert _snapshot_of(b) == files


def test_a_migration_checkpoint_of_another_snapshot_is_not_reused(repo_config, tmp_path):
    config = LocalStorageConfig(root=str(tmp_path / "store"))
    a = tenant_storage("tenant-a", config)
    files = _eight_files(a)
    repo_a, repo_b = _repo("tenant-a", repo_config), _repo("tenant-b", repo_config)
    first = backup.create_snapshot(a, repo_a).snapshot_id
    changed = "raw/part-0.bin"
    files[changed] = random.Random(9).randbytes(600_000)
    a.put_bytes(changed, files[changed])
    second = backup.create_snapshot(a, repo_a).snapshot_id
    plan = restores.plan_migration(repo_a, repo_b, first, batch_bytes=1_300_000)
    restores.copy_batch(repo_a, repo_b, plan, plan.batches[0])  # then the run died
    again = restores.plan_migration(repo_a, repo_b, second, batch_bytes=1_300_000)
    assert again.copied == {}  # checkpoints name the first snapshot, not this one
    same = restores.plan_migration(repo_a, repo_b, first, batch_bytes=1_300_000)
    assert set(same.copied) == {item["path"] for item in plan.batches[0]}


def test_a_restore_of_the_same_tenant_id_in_another_store_leaves_this_staging_alone(
    s3_endpoint, repo_config, tmp_path
):
    """Two platforms (two buckets) with a tenant of the same id, one scratch directory:
    one's restore must not take the other's staging for an abandoned one."""
    from tests.helpers import fresh_s3_store

    scratch = tmp_path / "shared-scratch"
    one = tenant_storage("acme", fresh_s3_store(s3_endpoint))
    two = tenant_storage("acme", fresh_s3_store(s3_endpoint))
    files = _eight_files(one)
    _eight_files(two, seed=6)
    repo_one = _repo("acme", repo_config)
    repo_two = _repo("acme", LocalStorageConfig(root=str(tmp_path / "backups-two")))
    backup.create_snapshot(one, repo_one)
    backup.create_snapshot(two, repo_two)
    plan = restores.plan_restore(one, repo_one, scratch=scratch, batch_bytes=1_300_000)
    restores.stage_batch(repo_one, plan.staging, plan.batches[0])
    restores.plan_restore(two, repo_two, scratch=scratch)  # the other platform's restore
    assert plan.staging.is_dir() and any(plan.staging.rglob("*.bin"))
    for batch in plan.batches[1:]:
        restores.stage_batch(repo_one, plan.staging, batch)
    done = restores.switch_restore(one, repo_one, plan)
    assert done.bytes_read == 0  # nothing had to be staged again
    assert _snapshot_of(one) == files


def test_batches_keep_order_and_cap_bytes_and_files():
    """What one backup or restore task run takes: never past the byte or file cap,
    except a file larger than the byte cap, which is a batch of its own."""
    sizes = [400, 400, 300, 1500, 100, 100, 100, 100, 50]
    batches = backup.batches_of(sizes, lambda n: n, batch_bytes=1000, batch_files=3)
    assert batches == [[400, 400], [300], [1500], [100, 100, 100], [100, 50]]
    assert backup.batches_of([], lambda n: n, batch_bytes=1000, batch_files=3) == []
