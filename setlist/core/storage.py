"""Tenant-scoped object storage over a local directory or S3.

A ``TenantStorage`` is a handle bound to one tenant's prefix (``tenants/<id>/``). Every
key is checked before any I/O: relative, no ``..``, no absolute paths, no backslashes or
control characters. So a handle can only ever name objects of its own tenant, whatever
string a caller (or a flow parameter typed in the UI) passes.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from setlist.core.tenant_ids import SetlistError, validate_tenant_id

if TYPE_CHECKING:  # imported where used: they import Prefect, which a worker process of a
    # load (setlist.etl.curated) does without
    from blocks.storage import LocalStorageConfig, S3StorageConfig

TENANTS_PREFIX = "tenants"


class StorageKeyError(SetlistError):
    """A key that would leave the tenant's prefix or is not a plain relative path."""


class ObjectNotFound(SetlistError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def normalize_key(key: str) -> str:
    """Validate a tenant-relative object key and return its canonical form."""
    if not isinstance(key, str) or not key.strip():
        raise StorageKeyError("object key is empty; expected a relative path like 'raw/a.json'")
    if any(ord(c) < 32 or c == "\x7f" for c in key):
        raise StorageKeyError(f"object key {key!r} contains control characters")
    if "\\" in key:
        raise StorageKeyError(f"object key {key!r} contains '\\'; use '/' as separator")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise StorageKeyError(f"object key {key!r} is absolute; keys are relative to the tenant")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts):
        raise StorageKeyError(f"object key {key!r} contains '.' or '..' segments")
    parts = [p for p in parts if p]
    if not parts:
        raise StorageKeyError(f"object key {key!r} names no object")
    return "/".join(parts)


def normalize_prefix(prefix: str) -> str:
    """Like ``normalize_key`` but '' (the tenant's whole space) is allowed."""
    if prefix in ("", "/"):
        return ""
    return normalize_key(prefix) + "/"


@dataclass(frozen=True)
class ObjectEntry:
    """One object with what tells a change without reading it (for incremental backups).

    ``kind`` is ``file`` for a regular object; a local store may also hold ``symlink`` or
    ``special`` (device, FIFO, socket) entries, which no reader should open.
    """

    key: str
    size: int
    fingerprint: str
    mode: int = 0o644
    kind: str = "file"


class TenantStorage(ABC):
    """One tenant's view of the object store. Construct via ``tenant_storage``."""

    def __init__(self, tenant_id: str):
        self.tenant_id = validate_tenant_id(tenant_id)
        self.base = f"{TENANTS_PREFIX}/{self.tenant_id}/"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> int:
        """Write an object atomically (readers see the old or the new bytes); returns size."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete an object; False if it was not there."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def iter_objects(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(tenant-relative key, size in bytes) under ``prefix``, sorted by key."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A stream of the object's bytes, for reading large objects in bounded memory."""

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        return (key for key, _size in self.iter_objects(prefix))

    @abstractmethod
    def iter_entries(self, prefix: str = "") -> Iterator[ObjectEntry]:
        """Every entry under ``prefix`` with size, change fingerprint and mode, by key."""

    def put_parts(self, key: str, parts: list[bytes]) -> int:
        """Write an object made of ``parts`` (a local store writes them without joining)."""
        return self.put_bytes(key, b"".join(parts))

    @abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer if the object is shorter)."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> int:
        """Write an object from a local file, atomically, without holding it in memory."""

    @abstractmethod
    def describe(self) -> str:
        """Where the tenant's data lives, for messages (never credentials)."""

    def list_keys(self, prefix: str = "") -> list[str]:
        return list(self.iter_keys(prefix))

    def put_text(self, key: str, text: str) -> int:
        return self.put_bytes(key, text.encode())

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode()


class LocalTenantStorage(TenantStorage):
    def __init__(self, tenant_id: str, root: str | os.PathLike[str]):
        super().__init__(tenant_id)
        self.root = Path(root).resolve()
        self.dir = self.root / TENANTS_PREFIX / self.tenant_id
        self._real: str | None = None

    def _path(self, key: str) -> Path:
        rel = normalize_key(key)
        path = self.dir / rel
        # A symlink planted inside the tenant dir must not lead out of it. Only the key's
        # own components can be links the tenant's data planted: lstat just those, and
        # resolve (a syscall per component of the whole path) only when one is a link.
        base = self._real_dir()
        probe = base
        for part in rel.split("/"):
            probe = os.path.join(probe, part)
            try:
                is_link = stat.S_ISLNK(os.lstat(probe).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                break
            if is_link:
                if not path.resolve().is_relative_to(base):
                    raise StorageKeyError(
                        f"object key {key!r} resolves outside the tenant's storage"
                    )
                break
        return path

    def _real_dir(self) -> str:
        # The tenant's directory is the platform's, not the tenant's: resolved once it exists.
        if self._real is None:
            real = os.path.realpath(self.dir)
            if not os.path.isdir(real):
                return real
            self._real = real
        return self._real

    def _write_atomic(self, key: str, fill) -> int:
        """Write through a temp file in the target's directory, then rename over it:
        readers see the old or the new bytes, and a crash leaves only a ``.tmp-`` file."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                size = fh.tell()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def put_bytes(self, key: str, data: bytes) -> int:
        return self._write_atomic(key, lambda fh: fh.write(data))

    def put_parts(self, key: str, parts: list[bytes]) -> int:
        return self._write_atomic(key, lambda fh: fh.writelines(parts))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {normalize_key(key)!r} for {self.tenant_id}") from None

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {normalize_key(key)!r} for {self.tenant_id}") from None

    def iter_objects(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        pfx = normalize_prefix(prefix)
        if not self.dir.is_dir():
            return iter(())
        found = []
        for dirpath, _dirs, files in os.walk(self.dir):
            rel = Path(dirpath).relative_to(self.dir).as_posix()
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = name if rel == "." else posixpath.join(rel, name)
                if key.startswith(pfx):
                    found.append((key, (Path(dirpath) / name).stat().st_size))
        return iter(sorted(found))

    def iter_entries(self, prefix: str = "") -> Iterator[ObjectEntry]:
        pfx = normalize_prefix(prefix)
        if not self.dir.is_dir():
            return iter(())
        found = []
        for dirpath, _dirs, files in os.walk(self.dir):  # os.walk never follows symlinks
            rel = Path(dirpath).relative_to(self.dir).as_posix()
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = name if rel == "." else posixpath.join(rel, name)
                if not key.startswith(pfx):
                    continue
                st = os.lstat(Path(dirpath) / name)
                kind = (
                    "file"
                    if stat.S_ISREG(st.st_mode)
                    else "symlink"
                    if stat.S_ISLNK(st.st_mode)
                    else "special"
                )
                fingerprint = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
                found.append(
                    ObjectEntry(key, st.st_size, fingerprint, stat.S_IMODE(st.st_mode), kind)
                )
        return iter(sorted(found, key=lambda e: e.key))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with self.open_read(key) as fh:
            fh.seek(offset)
            return fh.read(length)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> int:
        import shutil

        def fill(fh) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, 8 << 20)

        return self._write_atomic(key, fill)

    def describe(self) -> str:
        return f"file://{self.dir}"


def s3_tenant_key_base(tenant_id: str, prefix: str) -> str:
    """The key prefix of a tenant's objects in a bucket whose store prefix is ``prefix``:
    ``<prefix>/tenants/<id>/`` (``tenants/<id>/`` without one). Handles and the tenant's
    access policy (``setlist.tenants.storage_identity``) both derive it from here."""
    base = f"{TENANTS_PREFIX}/{validate_tenant_id(tenant_id)}/"
    root = prefix.strip("/")
    return f"{root}/{base}" if root else base


class S3TenantStorage(TenantStorage):
    def __init__(self, tenant_id: str, config: S3StorageConfig, client=None):
        super().__init__(tenant_id)
        self.bucket = config.bucket
        self.key_base = s3_tenant_key_base(self.tenant_id, config.prefix)
        self._client = client or s3_client(config)

    def _key(self, key: str) -> str:
        return self.key_base + normalize_key(key)

    def put_bytes(self, key: str, data: bytes) -> int:
        # A single PUT is atomic in S3: readers see the old or the new object.
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return len(data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self._client.exceptions.NoSuchKey:
            raise ObjectNotFound(f"no object {normalize_key(key)!r} for {self.tenant_id}") from None

    def delete(self, key: str) -> bool:
        existed = self.exists(key)
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return existed

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def open_read(self, key: str) -> BinaryIO:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self._client.exceptions.NoSuchKey:
            raise ObjectNotFound(f"no object {normalize_key(key)!r} for {self.tenant_id}") from None

    def iter_objects(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        full = self.key_base + normalize_prefix(prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        for page in pages:  # S3 lists in UTF-8 binary order: already sorted
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.key_base) :], obj["Size"]

    def iter_entries(self, prefix: str = "") -> Iterator[ObjectEntry]:
        full = self.key_base + normalize_prefix(prefix)
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        for page in pages:
            for obj in page.get("Contents", []):
                stamp = obj["LastModified"].isoformat()
                yield ObjectEntry(
                    obj["Key"][len(self.key_base) :],
                    obj["Size"],
                    f"{obj['Size']}:{obj.get('ETag', '')}:{stamp}",
                )

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        if length <= 0:
            return b""
        try:
            return self._client.get_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Range=f"bytes={offset}-{offset + length - 1}",
            )["Body"].read()
        except self._client.exceptions.NoSuchKey:
            raise ObjectNotFound(f"no object {normalize_key(key)!r} for {self.tenant_id}") from None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # past the end: the object is shorter
            raise

    def put_file(self, key: str, path: str | os.PathLike[str]) -> int:
        # upload_file goes multipart for large files; the object appears only on completion.
        self._client.upload_file(str(path), self.bucket, self._key(key))
        return os.path.getsize(path)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key_base}"


def s3_client(config: S3StorageConfig):
    import boto3

    secret = config.aws_secret_access_key
    token = config.aws_session_token
    return boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region_name,
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        aws_session_token=token.get_secret_value() if token else None,
    )


def tenant_storage(tenant_id: str, config: LocalStorageConfig | S3StorageConfig) -> TenantStorage:
    """The handle of ``tenant_id`` on the store ``config`` describes."""
    from blocks.storage import LocalStorageConfig, S3StorageConfig

    if isinstance(config, LocalStorageConfig):
        return LocalTenantStorage(tenant_id, config.root)
    if isinstance(config, S3StorageConfig):
        return S3TenantStorage(tenant_id, config)
    raise SetlistError(f"unsupported storage config {type(config).__name__}")


async def load_storage_config(name: str) -> LocalStorageConfig | S3StorageConfig:
    """Load the storage block ``name``, whichever of the storage types it is."""
    from blocks.storage import LocalStorageConfig, S3StorageConfig

    for block_type in (LocalStorageConfig, S3StorageConfig):
        try:
            return await block_type.aload(name)
        except ValueError:
            continue
    raise SetlistError(
        f"no storage block named {name!r}; create one (setlist up does) of type "
        "setlist-local-storage or setlist-s3-storage"
    )


async def load_storage_location(name: str) -> LocalStorageConfig | S3StorageConfig:
    """Where the storage block ``name`` points, read without its secrets.

    For deciding which store a block is and comparing places; an S3 result carries no
    secret key (never use it for I/O). A tenant's job may read this much of a platform
    block; its credentials it may not.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound as BlockNotFound

    from blocks.storage import LocalStorageConfig, S3StorageConfig

    async with get_client() as client:
        for block_type in (LocalStorageConfig, S3StorageConfig):
            try:
                doc = await client.read_block_document_by_name(
                    name, block_type.get_block_type_slug(), include_secrets=False
                )
            except BlockNotFound:
                continue
            config = block_type._from_block_document(doc)
            if isinstance(config, S3StorageConfig):
                config = config.model_copy(
                    update={"aws_secret_access_key": None, "aws_session_token": None}
                )
            return config
    raise SetlistError(
        f"no storage block named {name!r}; create one (setlist up does) of type "
        "setlist-local-storage or setlist-s3-storage"
    )
