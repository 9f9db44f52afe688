"""The configuration archive: one deterministic ``.tar.gz``, written and checked.

``build_archive`` writes ``manifest.json`` (format version, time of export, counts, the
SHA-256 of every other member), ``seal.json`` (a MAC of the manifest: ``seal``) and one
JSON file per kind of object, plus ``secrets.enc.json`` when secrets are included.
Deterministic (sorted members, fixed owners, modes and times): the same snapshot
exported at the same time gives the same bytes, the sealed secrets and a passphrase
seal aside, which carry a random salt and nonce.

``load_archive`` checks an archive entirely in memory before anything is written:
member names from a fixed list (no paths, so no ``../`` and no absolute names), regular
files only (no links, devices or FIFOs), bounded size and count read through a capped
decompressor (a gzip or tar bomb is refused without being inflated), every SHA-256
matching the manifest and the manifest matching its seal (checked first: nothing of an
altered archive is parsed), every object well-formed, only allowed pull steps and
automation actions, the secrets decrypting.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from setlist.backup.config.entries import (
    ALLOWED_MEMBERS,
    FORMAT,
    FORMAT_VERSION,
    KIND_MEMBERS,
    MANIFEST,
    MIN_PASSPHRASE,
    SEAL_MEMBER,
    SECRETS_MEMBER,
    ArchiveRejected,
    ConfigBackupError,
    PassphraseRequired,
    Snapshot,
    _dumps,
)
from setlist.backup.config.seal import check_seal, make_seal
from setlist.backup.config.secrets import _aad, _decrypt, _encrypt

MAX_ARCHIVE_BYTES = 64 * 1024 * 1024  # compressed size of the file
MAX_UNCOMPRESSED_BYTES = 64 * 1024 * 1024  # the whole tar stream, headers included
MAX_MEMBERS = 32


def _snapshot_members(snapshot: Snapshot) -> dict[str, bytes]:
    data = snapshot.model_dump(mode="json", exclude={"secrets"})
    members: dict[str, bytes] = {}
    for member, kind in KIND_MEMBERS.items():
        if isinstance(kind, tuple):
            members[member] = _dumps({k: data[k] for k in kind})
        else:
            members[member] = _dumps(data[kind])
    return members


def build_archive(
    snapshot: Snapshot, *, passphrase: str | None = None, exported_at: datetime | None = None
) -> bytes:
    """The archive's bytes: the same snapshot and time give the same bytes (the sealed
    secrets and a passphrase seal aside, which carry a random salt and nonce). Sealed
    with ``passphrase`` when given, else with the platform key."""
    exported_at = (exported_at or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    members = _snapshot_members(snapshot)
    if snapshot.secrets is not None:
        if not passphrase or len(passphrase) < MIN_PASSPHRASE:
            raise ConfigBackupError(
                f"secrets need a passphrase of at least {MIN_PASSPHRASE} characters "
                "(--passphrase or SETLIST_CONFIG_PASSPHRASE)"
            )
        payload = _dumps({"blocks": snapshot.secrets})
        aad = _aad(hashlib.sha256(members["blocks.json"]).hexdigest())
        members[SECRETS_MEMBER] = _encrypt(payload, passphrase, aad)
        del payload
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "exported_at": exported_at.isoformat().replace("+00:00", "Z"),
        "counts": snapshot.counts(),
        "secrets_included": snapshot.secrets is not None,
        "needs_secret": snapshot.blocks_needing_secret(),
        "members": {
            name: {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
            for name, body in sorted(members.items())
        },
    }
    manifest_bytes = _dumps(manifest)
    ordered = [
        (MANIFEST, manifest_bytes),
        (SEAL_MEMBER, make_seal(manifest_bytes, passphrase)),
        *sorted(members.items()),
    ]
    mtime = int(exported_at.timestamp())
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in ordered:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mtime = mtime
            info.mode = 0o600
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(body))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=mtime, compresslevel=9) as gz:
        gz.write(tar_bytes.getvalue())
    return out.getvalue()


class _CappedReader:
    """Reads a decompressing stream, refusing it once it yields more than ``cap`` bytes."""

    def __init__(self, raw: Any, cap: int) -> None:
        self._raw = raw
        self._left = cap

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        chunk = self._raw.read(want)
        if len(chunk) > self._left:
            raise ArchiveRejected(
                f"archive inflates beyond {MAX_UNCOMPRESSED_BYTES // (1024 * 1024)} MiB; "
                "refused as a decompression bomb"
            )
        self._left -= len(chunk)
        return chunk


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if member.isdir():
        return "a directory"
    return f"of tar type {member.type!r}"


def _check_name(name: str) -> None:
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or name.startswith("\\"):
        raise ArchiveRejected(f"archive member {name!r} has an absolute path; refused")
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        raise ArchiveRejected(f"archive member {name!r} climbs out with '..'; refused")
    if name not in ALLOWED_MEMBERS:
        raise ArchiveRejected(
            f"archive member {name!r} is not part of a Setlist config archive; expected "
            f"only: {', '.join(sorted(ALLOWED_MEMBERS))}"
        )


def read_members(source: Path | bytes) -> dict[str, bytes]:
    """The archive's members, checked one by one while reading, all in memory."""
    if isinstance(source, bytes):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ArchiveRejected(f"{path} is not a regular file")
        if path.stat().st_size > MAX_ARCHIVE_BYTES:
            raise ArchiveRejected(
                f"{path} is larger than {MAX_ARCHIVE_BYTES // (1024 * 1024)} MiB; refused"
            )
        chunks, total = [], 0
        with path.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                total += len(chunk)
                if total > MAX_ARCHIVE_BYTES:
                    raise ArchiveRejected(f"{path} grew beyond the size limit while being read")
                chunks.append(chunk)
        raw = b"".join(chunks)
    members: dict[str, bytes] = {}
    try:
        stream = _CappedReader(
            gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb"), MAX_UNCOMPRESSED_BYTES
        )
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ArchiveRejected(f"archive has more than {MAX_MEMBERS} members")
                _check_name(member.name)
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise ArchiveRejected(
                        f"archive member {member.name!r} is {_member_kind(member)}; only "
                        "regular files are accepted"
                    )
                if member.name in members:
                    raise ArchiveRejected(f"archive member {member.name!r} appears twice")
                if member.size > MAX_UNCOMPRESSED_BYTES:
                    raise ArchiveRejected(
                        f"archive member {member.name!r} declares {member.size} bytes; at most "
                        f"{MAX_UNCOMPRESSED_BYTES} accepted (a decompression bomb?)"
                    )
                handle = tar.extractfile(member)
                body = handle.read() if handle is not None else b""
                if len(body) != member.size:
                    raise ArchiveRejected(f"archive member {member.name!r} is truncated")
                members[member.name] = body
    except ArchiveRejected:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveRejected(
            f"not a readable .tar.gz config archive ({type(exc).__name__})"
        ) from None
    return members


@dataclass
class Archive:
    manifest: dict[str, Any]
    snapshot: Snapshot

    @property
    def secrets_included(self) -> bool:
        return bool(self.manifest.get("secrets_included"))


def _load_json(name: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ArchiveRejected(f"archive member {name!r} is not valid JSON") from None


def _check_manifest(members: dict[str, bytes]) -> dict[str, Any]:
    if MANIFEST not in members:
        raise ArchiveRejected(f"archive has no {MANIFEST}; not a Setlist config archive")
    manifest = _load_json(MANIFEST, members[MANIFEST])
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveRejected(f"{MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ArchiveRejected(
            f"archive format version {manifest.get('version')!r}; this Setlist reads "
            f"version {FORMAT_VERSION}"
        )
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise ArchiveRejected(f"{MANIFEST} lists no members")
    present = set(members) - {MANIFEST, SEAL_MEMBER}
    expected = set(KIND_MEMBERS) | ({SECRETS_MEMBER} if manifest.get("secrets_included") else set())
    if set(listed) != expected or present != expected:
        missing = sorted(expected - present) or sorted(expected - set(listed))
        extra = sorted((present | set(listed)) - expected)
        raise ArchiveRejected(
            f"archive members do not match its manifest (missing: {missing or 'none'}, "
            f"unexpected: {extra or 'none'})"
        )
    for name in sorted(expected):
        entry = listed[name]
        digest = hashlib.sha256(members[name]).hexdigest()
        if not isinstance(entry, dict) or entry.get("sha256") != digest:
            raise ArchiveRejected(
                f"archive member {name!r} does not match the SHA-256 in {MANIFEST}: it was "
                "altered or damaged"
            )
    return manifest


def _parse_snapshot(members: dict[str, bytes]) -> Snapshot:
    data: dict[str, Any] = {}
    for member, kind in KIND_MEMBERS.items():
        value = _load_json(member, members[member])
        if isinstance(kind, tuple):
            if not isinstance(value, dict):
                raise ArchiveRejected(f"{member} is not a JSON object")
            for k in kind:
                data[k] = value.get(k, [])
        else:
            data[kind] = value
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArchiveRejected(
            f"archive holds a malformed object at {where}: {first['msg']}"
        ) from None


def _parse_secrets(plain: bytes, snapshot: Snapshot) -> dict[str, list[tuple[list[str], Any]]]:
    try:
        blocks = json.loads(plain)["blocks"]
        secrets = {
            str(UUID(k)): [(list(map(str, path)), value) for path, value in v]
            for k, v in blocks.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ArchiveRejected(f"{SECRETS_MEMBER} does not hold block secrets") from None
    known = {str(b.id): b for b in snapshot.blocks}
    for block_id, values in secrets.items():
        block = known.get(block_id)
        if block is None or sorted(p for p, _ in values) != sorted(block.secret_paths):
            raise ArchiveRejected(f"{SECRETS_MEMBER} holds secrets of a block not in the archive")
    return secrets


def _check_consistency(snapshot: Snapshot) -> None:
    block_ids = {str(b.id) for b in snapshot.blocks}
    for block in snapshot.blocks:
        for name, ref in block.references.items():
            if str(ref) not in block_ids:
                raise ArchiveRejected(
                    f"block {block.label} refers to block {ref} in {name!r}, which is not in "
                    "the archive"
                )
    pools = {p.name for p in snapshot.work_pools}
    for queue in snapshot.work_queues:
        if queue.pool not in pools:
            raise ArchiveRejected(f"queue {queue.label} belongs to no pool in the archive")
    types = {t.slug for t in snapshot.block_types}
    schemas = {(s.checksum, s.version) for s in snapshot.block_schemas}
    for block in snapshot.blocks:
        if block.block_type_slug not in types or (
            (block.block_schema_checksum, block.block_schema_version) not in schemas
        ):
            raise ArchiveRejected(f"block {block.label} has no block type or schema in the archive")
    for kind, names in (
        ("work pool", [p.name for p in snapshot.work_pools]),
        ("queue", [q.label for q in snapshot.work_queues]),
        ("concurrency limit", [c.name for c in snapshot.concurrency_limits]),
        ("variable", [v.name for v in snapshot.variables]),
        ("block", [b.label for b in snapshot.blocks if not b.is_anonymous]),
        ("deployment", [d.label for d in snapshot.deployments]),
    ):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ArchiveRejected(f"archive holds {kind} {dupes[0]!r} twice")


# What a deployment may run before its flow, and what an automation may do. A pull step
# runs shell commands or fetches code (``run_shell_script``, ``git_clone``…) and a
# ``call-webhook`` action sends data anywhere: an archive brings neither.
PULL_STEPS = frozenset({"prefect.deployments.steps.set_working_directory"})
AUTOMATION_ACTIONS = frozenset(
    {
        "run-deployment",
        "pause-deployment",
        "resume-deployment",
        "cancel-flow-run",
        "change-flow-run-state",
        "suspend-flow-run",
        "resume-flow-run",
        "pause-work-queue",
        "resume-work-queue",
        "pause-work-pool",
        "resume-work-pool",
        "pause-automation",
        "resume-automation",
        "send-notification",
        "do-nothing",
    }
)


def _check_allowed(snapshot: Snapshot) -> None:
    for dep in snapshot.deployments:
        for step in dep.pull_steps or []:
            names = set(step) if isinstance(step, dict) else {"?"}
            if not names or names - PULL_STEPS:
                raise ArchiveRejected(
                    f"deployment {dep.label} has pull step {sorted(names)}; an archive brings "
                    f"only {', '.join(sorted(PULL_STEPS))}"
                )
    for automation in snapshot.automations:
        for action in (
            *automation.actions,
            *automation.actions_on_trigger,
            *automation.actions_on_resolve,
        ):
            kind = action.get("type") if isinstance(action, dict) else None
            if kind not in AUTOMATION_ACTIONS:
                raise ArchiveRejected(
                    f"automation {automation.name!r} has action {kind!r}, which an archive "
                    "may not bring (allowed: run, pause, resume, cancel, notify)"
                )


def load_archive(source: Path | bytes, passphrase: str | None = None) -> Archive:
    """Read and check an archive completely, in memory; nothing touches a server.

    Raises ``ArchiveRejected`` for anything unsafe or damaged, ``PassphraseRequired``
    when it holds secrets and no passphrase was given, ``WrongPassphrase``.
    """
    members = read_members(source)
    if MANIFEST not in members:
        raise ArchiveRejected(f"archive has no {MANIFEST}; not a Setlist config archive")
    check_seal(members[MANIFEST], members.get(SEAL_MEMBER), passphrase)
    manifest = _check_manifest(members)
    snapshot = _parse_snapshot(members)
    _check_consistency(snapshot)
    _check_allowed(snapshot)
    if manifest.get("secrets_included"):
        if not passphrase:
            raise PassphraseRequired(
                "this archive holds encrypted secrets: give its passphrase "
                "(--passphrase or SETLIST_CONFIG_PASSPHRASE)"
            )
        aad = _aad(hashlib.sha256(members["blocks.json"]).hexdigest())
        snapshot.secrets = _parse_secrets(
            _decrypt(members[SECRETS_MEMBER], passphrase, aad), snapshot
        )
    return Archive(manifest=manifest, snapshot=snapshot)
