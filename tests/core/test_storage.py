"""Tenant-scoped storage on both backends; S3 is boto3 against moto's real server."""

from __future__ import annotations

import os

import pytest

from blocks.storage import LocalStorageConfig, S3StorageConfig
from setlist.core.storage import ObjectNotFound, StorageKeyError, normalize_key, tenant_storage


@pytest.fixture
def config(storage_config):
    return storage_config


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "../b/x", "a/../../b", "a/./b", "a\\b", "C:x", "a\x00b", "..", "/"],
)
def test_bad_keys_are_refused(bad):
    with pytest.raises(StorageKeyError):
        normalize_key(bad)


def test_keys_are_canonical():
    assert normalize_key("raw//2026/a.json") == "raw/2026/a.json"


def test_round_trip_list_delete(config):
    a = tenant_storage("acme", config)
    assert a.put_bytes("raw/x.json", b"{}") == 2
    a.put_text("raw/sub/y.txt", "hello")
    a.put_text("curated/z", "z")
    assert a.get_bytes("raw/x.json") == b"{}"
    assert a.list_keys("raw") == ["raw/sub/y.txt", "raw/x.json"]
    assert a.list_keys() == ["curated/z", "raw/sub/y.txt", "raw/x.json"]
    assert a.delete("raw/x.json") is True
    assert a.delete("raw/x.json") is False
    assert not a.exists("raw/x.json")
    with pytest.raises(ObjectNotFound, match="no object 'raw/x.json' for acme"):
        a.get_bytes("raw/x.json")


def test_tenants_cannot_see_each_other(config):
    a = tenant_storage("acme", config)
    ab = tenant_storage("acme-b", config)  # shares a string prefix with "acme"
    a.put_text("secret.txt", "a's")
    ab.put_text("secret.txt", "b's")
    assert a.get_text("secret.txt") == "a's"
    assert ab.get_text("secret.txt") == "b's"
    assert a.list_keys() == ["secret.txt"]
    for escape in ("../acme-b/secret.txt", "/tenants/acme-b/secret.txt", "..%2F../x"):
        with pytest.raises((StorageKeyError, ObjectNotFound)):
            a.get_bytes(escape)
    with pytest.raises(StorageKeyError):
        a.put_bytes("../acme-b/secret.txt", b"overwrite")
    assert ab.get_text("secret.txt") == "b's"


def test_overwrite_is_whole(config):
    s = tenant_storage("acme", config)
    s.put_bytes("k", b"1" * 1000)
    s.put_bytes("k", b"2")
    assert s.get_bytes("k") == b"2"


def test_local_symlink_escape_is_refused(tmp_path):
    config = LocalStorageConfig(root=str(tmp_path))
    a = tenant_storage("acme", config)
    b = tenant_storage("bravo", config)
    b.put_text("data.txt", "bravo's")
    a.put_text("placeholder", "x")
    os.symlink(b.dir, a.dir / "link")
    with pytest.raises(StorageKeyError, match="outside"):
        a.get_bytes("link/data.txt")


def test_s3_handle_stays_under_platform_prefix(config):
    s = tenant_storage("acme", config)
    if isinstance(config, S3StorageConfig):
        assert s.describe() == f"s3://{config.bucket}/platform/tenants/acme/"
        assert "test" not in s.describe()  # never credentials in messages


def test_bad_tenant_cannot_get_a_handle(tmp_path):
    with pytest.raises(ValueError, match="DNS-1123"):
        tenant_storage("../x", LocalStorageConfig(root=str(tmp_path)))
