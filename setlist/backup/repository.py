"""A tenant's backup repository: encrypted, content-addressed chunks and snapshot manifests.

Layout under the repository store's handle of the tenant (``tenants/<id>/`` of the backup
store, never the tenant's data store)::

    repo.json                 format, tenant, and a key check (wrong key → refused early)
    packs/<id[:2]>/<id>       sealed chunks back to back: magic, nonce, AES-256-GCM(zstd)
    index/<pack-id>           the pack's chunk ids and offsets: AES-256-GCM(JSON)
    snapshots/<snapshot-id>   one manifest: magic, nonce, AES-256-GCM(zstd(JSON))

Chunk ids are keyed (BLAKE3 in keyed mode, under a key derived from the tenant's key),
so the store reveals nothing about content, not even equality with a known file.
Every ciphertext is bound to its tenant and its name through the GCM associated data:
a chunk, index or manifest swapped, renamed, copied from another tenant or flipped by a
single bit fails authentication. Decompression is capped by the size the
format allows, so a forged chunk can't inflate into a bomb.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from setlist.core.storage import ObjectNotFound, TenantStorage
from setlist.core.tenancy import SetlistError

FORMAT = "setlist-backup/1"
CHUNK_MAGIC = b"SLC1"
MANIFEST_MAGIC = b"SLM1"
INDEX_MAGIC = b"SLI1"
CHECKPOINT_MAGIC = b"SLC1"
PACK_TARGET = 16 * 1024 * 1024
NONCE = 12
MIN_CHUNK = 256 * 1024
AVG_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
MAX_MANIFEST = 512 * 1024 * 1024
_RAW, _ZSTD = b"\x00", b"\x01"
_SNAPSHOT_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
_CHUNK_ID = re.compile(r"^[0-9a-f]{64}$")
_PACK_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_SEALED = MAX_CHUNK + 64  # encoding byte, magic, nonce and tag around a raw chunk


class _OpenPack:
    """Sealed chunks waiting to be written as one pack (one per writing thread)."""

    def __init__(self) -> None:
        self.entries: list[list] = []
        self.blobs: list[bytes] = []
        self.size = 0

    def add(self, chunk_id: str, blob: bytes) -> None:
        self.entries.append([chunk_id, self.size, len(blob)])
        self.blobs.append(blob)
        self.size += len(blob)

    def take(self) -> tuple[list[list], list[bytes]]:
        out = (self.entries, self.blobs)
        self.entries, self.blobs, self.size = [], [], 0
        return out


class BackupError(SetlistError):
    """A backup can't be read or written as asked; nothing was changed."""


class IntegrityError(BackupError):
    """Stored bytes fail authentication or their hash: tampering, corruption or truncation."""


class BackupKey:
    """A tenant's 256-bit backup key and the subkeys derived from it.

    The repr never shows key material, so a key passed around in a flow can't leak
    into a log line or a traceback's locals.
    """

    __slots__ = ("_enc", "_ids", "fingerprint")

    def __init__(self, material: bytes):
        if len(material) != 32:
            raise BackupError("a backup key is 32 bytes")
        self._enc = AESGCM(_derive(material, b"setlist-backup/encrypt"))
        self._ids = _derive(material, b"setlist-backup/chunk-id")
        # Identifies the key in messages without revealing it (one-way, separate label).
        self.fingerprint = _derive(material, b"setlist-backup/fingerprint")[:6].hex()

    @classmethod
    def generate(cls) -> tuple[BackupKey, str]:
        material = secrets.token_bytes(32)
        return cls(material), base64.b64encode(material).decode()

    @classmethod
    def from_text(cls, text: str) -> BackupKey:
        try:
            material = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise BackupError("the backup key is not base64") from None
        return cls(material)

    def chunk_id(self, data: bytes | memoryview) -> str:
        """Keyed BLAKE3 of the plaintext: a PRF, so ids reveal nothing without the key,
        and several times faster than SHA-256 on the path every byte takes."""
        return blake3.blake3(data, key=self._ids).hexdigest()

    def seal(self, plaintext: bytes, aad: bytes, magic: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE)
        return magic + nonce + self._enc.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes, magic: bytes, what: str) -> bytes:
        if len(blob) < len(magic) + NONCE + 16 or not blob.startswith(magic):
            raise IntegrityError(f"{what} is truncated or not a Setlist backup object")
        nonce = blob[len(magic) : len(magic) + NONCE]
        try:
            return self._enc.decrypt(nonce, blob[len(magic) + NONCE :], aad)
        except InvalidTag:
            raise IntegrityError(
                f"{what} fails authentication: tampered, truncated, or another key"
            ) from None

    def __repr__(self) -> str:
        return f"BackupKey(fingerprint={self.fingerprint})"


def _derive(material: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(material)


def new_snapshot_id(now: datetime | None = None, after: str | None = None) -> str:
    """A new id, later in sort order than ``after`` (ids sort by time to the second, so
    a second snapshot within the same second is stamped one second later)."""
    from datetime import timedelta

    now = now or datetime.now(UTC)
    if after and f"{now:%Y%m%dT%H%M%SZ}" <= after[:16]:
        now = snapshot_time(after) + timedelta(seconds=1)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def snapshot_time(snapshot_id: str) -> datetime:
    return datetime.strptime(snapshot_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@dataclass
class ChunkStats:
    new_chunks: int = 0
    new_bytes: int = 0  # stored (compressed + encrypted) bytes written
    reused_chunks: int = 0


class Repository:
    """One tenant's repository on the backup store. Not shared across tenants: the
    handle is scoped to ``tenants/<id>/`` and every ciphertext is bound to the id."""

    def __init__(self, store: TenantStorage, key: BackupKey, level: int = 3):
        self.store = store
        self.tenant_id = store.tenant_id
        self.key = key
        self.level = level
        self._known: set[str] | None = None
        self._index: dict[str, tuple[str, int, int]] | None = None
        self._packs: dict[str, list[tuple[str, int, int]]] = {}
        self._open: list[_OpenPack] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    # -------------------------------------------------------------- repository header
    def _check_aad(self) -> bytes:
        return f"{FORMAT}/key-check/{self.tenant_id}".encode()

    def exists(self) -> bool:
        return self.store.exists("repo.json")

    def init(self) -> None:
        """Create the header, or check the key against an existing one."""
        if self.exists():
            self.check_key()
            return
        header = {
            "format": FORMAT,
            "tenant": self.tenant_id,
            "created_at": datetime.now(UTC).isoformat(),
            "key_fingerprint": self.key.fingerprint,
            "key_check": base64.b64encode(
                self.key.seal(b"setlist", self._check_aad(), b"SLK1")
            ).decode(),
        }
        self.store.put_text("repo.json", json.dumps(header, indent=2))

    def check_key(self) -> None:
        try:
            header = json.loads(self.store.get_text("repo.json"))
        except ObjectNotFound:
            raise BackupError(
                f"no backup repository for tenant {self.tenant_id!r} at {self.store.describe()}"
            ) from None
        except ValueError:
            raise IntegrityError("the repository header is not JSON") from None
        if header.get("format") != FORMAT or header.get("tenant") != self.tenant_id:
            raise IntegrityError(
                f"the repository header names {header.get('tenant')!r}/{header.get('format')!r},"
                f" not {self.tenant_id!r}/{FORMAT}"
            )
        try:
            blob = base64.b64decode(header["key_check"])
            self.key.open(blob, self._check_aad(), b"SLK1", "the key check")
        except (KeyError, ValueError, IntegrityError):
            raise BackupError(
                f"wrong backup key for tenant {self.tenant_id!r}: key {self.key.fingerprint} "
                f"does not open this repository (made with {header.get('key_fingerprint')})"
            ) from None

    # ---------------------------------------------------------------- chunks, packs
    #
    # Chunks are stored in pack files of about PACK_TARGET bytes (sealed chunks back to
    # back), each with an index object listing its chunks' offsets. One object per
    # chunk would cost an object write (and on S3 a PUT) per small file; a pack costs one
    # per 16 MiB. A pack is written before its index, so a pack without an index is an
    # orphan of a crash: invisible to readers, deleted by the next prune.

    def _chunk_aad(self, chunk_id: str) -> bytes:
        return f"{FORMAT}/chunk/{self.tenant_id}/{chunk_id}".encode()

    def _index_aad(self, pack_id: str) -> bytes:
        return f"{FORMAT}/index/{self.tenant_id}/{pack_id}".encode()

    @staticmethod
    def pack_key(pack_id: str) -> str:
        return f"packs/{pack_id[:2]}/{pack_id}"

    def index(self) -> dict[str, tuple[str, int, int]]:
        """chunk id → (pack id, offset, sealed length), read from every pack index once."""
        if self._index is None:
            index: dict[str, tuple[str, int, int]] = {}
            self._packs = {}
            for key in self.store.iter_keys("index"):
                pack_id = key.rsplit("/", 1)[1]
                if not _PACK_ID.match(pack_id):
                    continue
                entries = self._read_index(pack_id)
                self._packs[pack_id] = entries
                for chunk_id, offset, size in entries:
                    index.setdefault(chunk_id, (pack_id, offset, size))
            self._index = index
        return self._index

    def packs(self) -> dict[str, list[tuple[str, int, int]]]:
        self.index()
        return self._packs

    def _read_index(self, pack_id: str) -> list[tuple[str, int, int]]:
        blob = self.store.get_bytes(f"index/{pack_id}")
        body = self.key.open(blob, self._index_aad(pack_id), INDEX_MAGIC, f"index {pack_id}")
        try:
            entries = [(str(c), int(o), int(n)) for c, o, n in json.loads(body)]
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"index {pack_id} is unreadable: {exc}") from None
        if any(not _CHUNK_ID.match(c) or o < 0 or not 0 < n <= MAX_SEALED for c, o, n in entries):
            raise IntegrityError(f"index {pack_id} lists an impossible chunk")
        return entries

    def known_chunks(self) -> set[str]:
        """Ids of the chunks stored; ``put_sealed`` adds to it."""
        if self._known is None:
            self._known = set(self.index())
        return self._known

    def seal_chunk(self, chunk_id: str, data: bytes | memoryview) -> bytes:
        compressed = self._compressor().compress(data)
        # Already-compressed data (Parquet, gzip) is kept raw: zstd would only add bytes.
        body = _ZSTD + compressed if len(compressed) < len(data) * 0.97 else _RAW + bytes(data)
        return self.key.seal(body, self._chunk_aad(chunk_id), CHUNK_MAGIC)

    def _compressor(self) -> zstandard.ZstdCompressor:
        # One context per thread, reused: making one per chunk costs more than a chunk.
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return cctx

    def put_sealed(self, chunk_id: str, blob: bytes) -> int:
        """Add a sealed chunk to this thread's open pack; written when full or on flush."""
        pack = getattr(self._local, "pack", None)
        if pack is None:
            pack = self._local.pack = _OpenPack()
            with self._lock:
                self._open.append(pack)
        pack.add(chunk_id, blob)
        if self._known is not None:
            self._known.add(chunk_id)
        if pack.size >= PACK_TARGET:
            self._write_pack(pack)
        return len(blob)

    def flush(self) -> None:
        """Write every open pack (call once the threads that filled them are done)."""
        with self._lock:
            packs, self._open = self._open, []
        for pack in packs:
            self._write_pack(pack)
        self._local = threading.local()

    def _write_pack(self, pack: _OpenPack) -> None:
        if not pack.entries:
            return
        pack_id = secrets.token_hex(16)
        entries, blobs = pack.take()
        self.store.put_parts(self.pack_key(pack_id), blobs)
        self.store.put_bytes(
            f"index/{pack_id}",
            self.key.seal(
                json.dumps(entries, separators=(",", ":")).encode(),
                self._index_aad(pack_id),
                INDEX_MAGIC,
            ),
        )
        with self._lock:
            if self._index is not None:
                for chunk_id, offset, size in entries:
                    self._index.setdefault(chunk_id, (pack_id, offset, size))
                self._packs[pack_id] = [tuple(e) for e in entries]

    def get_sealed(self, chunk_id: str) -> bytes:
        try:
            pack_id, offset, size = self.index()[chunk_id]
        except KeyError:
            raise IntegrityError(f"chunk {chunk_id[:12]}… is missing from the repository") from None
        try:
            blob = self.store.read_range(self.pack_key(pack_id), offset, size)
        except ObjectNotFound:
            raise IntegrityError(
                f"chunk {chunk_id[:12]}… is missing: its pack {pack_id} is gone"
            ) from None
        if len(blob) != size:
            raise IntegrityError(f"chunk {chunk_id[:12]}… is truncated in pack {pack_id}")
        return blob

    def get_chunk(self, chunk_id: str, length: int) -> bytes:
        """The chunk's plaintext, authenticated, size-checked and hash-checked."""
        if not _CHUNK_ID.match(chunk_id) or not 0 <= length <= MAX_CHUNK:
            raise IntegrityError(f"manifest names an impossible chunk {chunk_id[:16]!r}/{length}")
        blob = self.get_sealed(chunk_id)
        body = self.key.open(
            blob, self._chunk_aad(chunk_id), CHUNK_MAGIC, f"chunk {chunk_id[:12]}…"
        )
        if body[:1] == _ZSTD:
            data = _inflate(body[1:], length, f"chunk {chunk_id[:12]}…")
        elif body[:1] == _RAW:
            data = body[1:]
        else:
            raise IntegrityError(f"chunk {chunk_id[:12]}… has an unknown encoding")
        if len(data) != length or self.key.chunk_id(data) != chunk_id:
            raise IntegrityError(f"chunk {chunk_id[:12]}… does not match its id")
        return data

    def drop_unreferenced(self, referenced: set[str]) -> tuple[int, int]:
        """Keep exactly the ``referenced`` chunks: packs holding none are deleted, packs
        holding some are rewritten with only those (sealed bytes copied, never decrypted),
        packs no index names are deleted. Each new pack and index is written before the
        old index goes, and an old index before its pack: a crash leaves duplicates or
        orphans, never a referenced chunk without a copy. Returns (deleted, kept)."""
        packs = dict(self.packs())
        gone: set[str] = set()
        deleted = kept = 0
        for pack_id, entries in sorted(packs.items()):
            live = [e for e in entries if e[0] in referenced]
            if len(live) == len(entries):
                kept += len(live)
                continue
            if live:
                blob = self.store.get_bytes(self.pack_key(pack_id))
                for chunk_id, offset, size in live:
                    piece = blob[offset : offset + size]
                    if len(piece) != size:
                        raise IntegrityError(f"pack {pack_id} is truncated; prune stopped")
                    self.put_sealed(chunk_id, piece)
                self.flush()
            self.store.delete(f"index/{pack_id}")
            self.store.delete(self.pack_key(pack_id))
            gone.add(pack_id)
            deleted += len(entries) - len(live)
            kept += len(live)
        indexed = set(self._packs) - gone
        for key in list(self.store.iter_keys("packs")):
            if key.rsplit("/", 1)[1] not in indexed:
                self.store.delete(key)  # an orphan: written by a crashed run, never indexed
        self._index = self._known = None
        return deleted, kept

    # ----------------------------------------------------------------- manifests
    def _manifest_aad(self, snapshot_id: str) -> bytes:
        return f"{FORMAT}/manifest/{self.tenant_id}/{snapshot_id}".encode()

    def put_manifest(self, manifest: dict) -> int:
        snapshot_id = manifest["snapshot_id"]
        body = zstandard.ZstdCompressor(level=3).compress(
            json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        )
        blob = self.key.seal(body, self._manifest_aad(snapshot_id), MANIFEST_MAGIC)
        # Written last: a snapshot exists only once all its chunks do.
        return self.store.put_bytes(f"snapshots/{snapshot_id}", blob)

    def snapshot_ids(self) -> list[str]:
        return sorted(
            key.split("/", 1)[1]
            for key in self.store.iter_keys("snapshots")
            if _SNAPSHOT_ID.match(key.split("/", 1)[1])
        )

    def resolve(self, snapshot: str) -> str:
        ids = self.snapshot_ids()
        if snapshot == "latest":
            if not ids:
                raise BackupError(f"tenant {self.tenant_id!r} has no backup yet")
            return ids[-1]
        if not _SNAPSHOT_ID.match(snapshot):
            raise BackupError(f"{snapshot!r} is not a snapshot id (like 20261201T020000Z-a1b2c3)")
        if snapshot not in ids:
            raise BackupError(f"tenant {self.tenant_id!r} has no snapshot {snapshot!r}")
        return snapshot

    def get_manifest(self, snapshot_id: str) -> dict:
        try:
            blob = self.store.get_bytes(f"snapshots/{snapshot_id}")
        except ObjectNotFound:
            raise BackupError(
                f"tenant {self.tenant_id!r} has no snapshot {snapshot_id!r}"
            ) from None
        body = self.key.open(
            blob, self._manifest_aad(snapshot_id), MANIFEST_MAGIC, f"manifest {snapshot_id}"
        )
        raw = _inflate(body, MAX_MANIFEST, f"manifest {snapshot_id}", exact=False)
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError(f"manifest {snapshot_id} is unreadable: {exc}") from None
        if (
            manifest.get("tenant_id") != self.tenant_id
            or manifest.get("snapshot_id") != snapshot_id
        ):
            raise IntegrityError(f"manifest {snapshot_id} names another tenant or snapshot")
        return manifest

    def delete_manifest(self, snapshot_id: str) -> None:
        self.store.delete(f"snapshots/{snapshot_id}")

    # ----------------------------------------------------------------- checkpoints
    # A batch of files a snapshot has chunked and stored (its packs and indexes written):
    # the entries, as they will be in the manifest. A backup that dies before its
    # manifest leaves them, and the next backup reuses every entry whose file is
    # unchanged and whose chunks are all still there instead of reading it again.
    def _checkpoint_aad(self, name: str) -> bytes:
        return f"{FORMAT}/checkpoint/{self.tenant_id}/{name}".encode()

    def put_checkpoint(self, files: list[dict]) -> str:
        name = secrets.token_hex(16)
        body = zstandard.ZstdCompressor(level=3).compress(
            json.dumps(files, separators=(",", ":")).encode()
        )
        blob = self.key.seal(body, self._checkpoint_aad(name), CHECKPOINT_MAGIC)
        self.store.put_bytes(f"checkpoints/{name}", blob)
        return name

    def checkpoint_files(self) -> list[dict]:
        """Every checkpointed file entry; a checkpoint that can't be opened is skipped
        (it only ever saves a read)."""
        found: list[dict] = []
        for key in self.store.iter_keys("checkpoints"):
            name = key.split("/", 1)[1]
            try:
                body = self.key.open(
                    self.store.get_bytes(key),
                    self._checkpoint_aad(name),
                    CHECKPOINT_MAGIC,
                    f"checkpoint {name}",
                )
                files = json.loads(_inflate(body, MAX_MANIFEST, f"checkpoint {name}", exact=False))
            except (BackupError, ObjectNotFound, ValueError):
                continue
            found += [f for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)]
        return found

    def drop_checkpoints(self) -> int:
        keys = list(self.store.iter_keys("checkpoints"))
        for key in keys:
            self.store.delete(key)
        return len(keys)


def _inflate(blob: bytes, limit: int, what: str, *, exact: bool = True) -> bytes:
    """Decompress at most ``limit`` bytes: a frame claiming or producing more is refused
    without ever being inflated (zstd would otherwise size its buffer from the header)."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as reader:
            data = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what} does not decompress: {exc}") from None
    if len(data) > limit or (exact and len(data) != limit):
        raise IntegrityError(
            f"{what} does not decompress to its recorded size ({limit} bytes): refused"
        )
    return data


def open_repository(store: TenantStorage, key: BackupKey, *, create: bool = False) -> Repository:
    repo = Repository(store, key, level=int(os.environ.get("SETLIST_BACKUP_ZSTD_LEVEL", "3")))
    if create:
        repo.init()
    else:
        repo.check_key()
    return repo
