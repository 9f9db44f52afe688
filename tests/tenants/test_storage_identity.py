"""Per-tenant object-store credentials, against moto's real server with IAM enforced.

moto checks every request's signature and the caller's IAM policies once its
``INITIAL_NO_AUTH_ACTION_COUNT`` is used up (``POST /moto-api/reset-auth`` sets it, and
resets the count, in the server's process). The module's server makes its admin user in
the unauthenticated window, then sets the count to 0: from then on an unknown key is
``InvalidAccessKeyId`` and a request no policy allows is ``AccessDenied``.

moto evaluates ``Action`` and ``Resource`` but not an S3 ``Condition``: it never passes
``s3:prefix`` to the policy check and ignores ``StringLike`` (moto 5.2, access_control.py
"TODO add support for the Resource and Condition parts"). So without help it lets any
key that may ``s3:ListBucket`` list the whole bucket. ``_evaluate_s3_prefix`` below gives
moto what AWS does for that one key: ``s3:prefix`` from the request's ``prefix``
parameter (absent: no match) and ``StringLike`` with ``*`` and ``?``. The listing tests
prove the policy's condition under that evaluation; the object tests need no help.

The setting is process-wide (so is moto's state): enforcement is on for this module's
tests only and put back after them.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests
from botocore.exceptions import ClientError

from blocks.storage import LocalStorageConfig, S3StorageConfig
from setlist.core.storage import S3TenantStorage, tenant_storage
from setlist.core.tenancy import backup_identity_block_name, identity_block_name
from setlist.tenants import storage_identity as si
from setlist.tenants.storage_identity import (
    ensure_identity,
    identity_policy,
    identity_user_name,
    load_identity,
    revoke_identity,
)

server = pytest.mark.server
REGION = "us-east-1"


def _string_like(expected, actual: str) -> bool:
    patterns = [expected] if isinstance(expected, str) else expected
    return any(
        re.fullmatch(re.escape(p).replace(r"\*", ".*").replace(r"\?", "."), actual, re.DOTALL)
        for p in patterns
    )


def _evaluate_s3_prefix(self, resource: str) -> None:
    """moto's ``IAMRequestBase.check_action_permitted`` plus the ``s3:prefix`` context
    key of the request, as AWS evaluates it."""
    from moto.iam.access_control import IAMPolicy, PermissionResult

    query = parse_qs(urlsplit(self._path).query, keep_blank_values=True)
    context = {"s3:prefix": query.get("prefix", [""])[0]}
    permitted = False
    for policy in self._access_key.collect_policies():
        result = IAMPolicy(policy).is_action_permitted(self._action, resource, None, context)
        if result == PermissionResult.DENIED:
            self._raise_access_denied()
        permitted = permitted or result == PermissionResult.PERMITTED
    if not permitted:
        self._raise_access_denied()


@pytest.fixture(scope="module")
def iam_store():
    """A bucket in a moto server that enforces IAM, and the platform's (admin) config."""
    from moto.iam import access_control, policy_conditions
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    anon = {"endpoint_url": endpoint, "region_name": REGION}
    anon |= {"aws_access_key_id": "anonymous", "aws_secret_access_key": "anonymous"}
    bucket = f"setlist-iam-{uuid.uuid4().hex[:8]}"
    admin = f"setlist-admin-{uuid.uuid4().hex[:8]}"
    patch = pytest.MonkeyPatch()
    previous = None
    try:
        # The unauthenticated window: requests are not checked until reset-auth below.
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName=admin)
        iam.put_user_policy(
            UserName=admin,
            PolicyName="admin",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName=admin)["AccessKey"]
        boto3.client("s3", **anon).create_bucket(Bucket=bucket)
        patch.setattr(access_control.S3IAMRequest, "check_action_permitted", _evaluate_s3_prefix)
        patch.setitem(policy_conditions.CONDITION_OPERATIONS, "StringLike", _string_like)
        reply = requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
        previous = reply.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
        with pytest.raises(ClientError) as unsigned:  # enforcement is on
            boto3.client("s3", **anon).list_objects_v2(Bucket=bucket)
        assert unsigned.value.response["Error"]["Code"] == "InvalidAccessKeyId"
        config = S3StorageConfig(
            bucket=bucket,
            prefix="/platform/",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )
        yield SimpleNamespace(
            endpoint=endpoint,
            bucket=bucket,
            config=config,
            admin_s3=_s3(endpoint, key["AccessKeyId"], key["SecretAccessKey"]),
            admin_iam=si.iam_client(config),
        )
    finally:
        if previous is not None:
            requests.post(f"{endpoint}/moto-api/reset-auth", data=previous.encode(), timeout=10)
        patch.undo()
        srv.stop()


def _s3(endpoint: str, key_id: str, secret: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def _client_of(identity: S3StorageConfig):
    """A raw S3 client with the tenant's key: what code in its job can build itself."""
    return _s3(
        identity.endpoint_url,
        identity.aws_access_key_id,
        identity.aws_secret_access_key.get_secret_value(),
    )


def _code(call, *args, **kwargs) -> str:
    with pytest.raises(ClientError) as err:
        call(*args, **kwargs)
    return err.value.response["Error"]["Code"]


def _live_keys(iam_store, tenant_id: str, purpose: str = "data") -> list[str]:
    keys = iam_store.admin_iam.list_access_keys(UserName=identity_user_name(tenant_id, purpose))
    return [k["AccessKeyId"] for k in keys["AccessKeyMetadata"]]


# ------------------------------------------------------------------------ pure rules


def test_user_names_fit_iam_and_stay_distinct():
    assert identity_user_name("acme") == "setlist-data-acme"
    assert identity_user_name("acme", "backup") == "setlist-backup-acme"
    longest = "a" * 49 + "b"
    names = {identity_user_name(t, p) for t in (longest, "a" * 50) for p in ("data", "backup")}
    assert len(names) == 4
    assert all(len(n) <= 64 and re.fullmatch(r"[\w+=,.@-]+", n) for n in names)
    assert identity_user_name(longest, "backup") == identity_user_name(longest, "backup")
    with pytest.raises(ValueError, match="unknown storage purpose"):
        identity_user_name("acme", "logs")
    assert identity_block_name("acme") == "setlist-storage-identity-acme"
    assert backup_identity_block_name("acme") == "setlist-backup-identity-acme"


def test_policy_names_exactly_the_prefix_of_the_tenants_handle():
    config = S3StorageConfig(bucket="bkt", prefix="/platform/", aws_access_key_id="AK")
    handle = S3TenantStorage("acme", config, client=object())
    assert handle.key_base == "platform/tenants/acme/"
    policy = identity_policy("acme", config)
    objects, listing = policy["Statement"]
    assert objects["Resource"] == ["arn:aws:s3:::bkt/platform/tenants/acme/*"]
    assert set(objects["Action"]) == {
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
    }
    assert listing["Action"] == ["s3:ListBucket"] and listing["Resource"] == ["arn:aws:s3:::bkt"]
    assert listing["Condition"] == {
        "StringLike": {"s3:prefix": ["platform/tenants/acme/*", "platform/tenants/acme/"]}
    }
    bare = identity_policy("acme", S3StorageConfig(bucket="bkt", region_name="cn-north-1"))
    assert bare["Statement"][0]["Resource"] == ["arn:aws-cn:s3:::bkt/tenants/acme/*"]


# ------------------------------------------------------------ against moto with IAM


@server
async def test_a_tenants_key_reaches_its_own_prefix_only(client, iam_store, tenant_id):
    other = f"{tenant_id}-b"  # its prefix begins with tenant_id's name: only '/' parts them
    mine = await ensure_identity(tenant_id, iam_store.config, client=client)
    theirs = await ensure_identity(other, iam_store.config, client=client)
    assert mine.aws_access_key_id not in (
        iam_store.config.aws_access_key_id,
        theirs.aws_access_key_id,
    )
    saved = await load_identity(tenant_id, client=client)
    assert saved is not None and saved.aws_access_key_id == mine.aws_access_key_id
    assert (saved.bucket, saved.prefix) == (iam_store.bucket, "/platform/")

    # Through the platform's handle: everything of its own works.
    handle = tenant_storage(tenant_id, mine)
    handle.put_text("raw/a.json", "{}")
    assert handle.get_text("raw/a.json") == "{}"
    assert handle.list_keys() == ["raw/a.json"]
    assert handle.exists("raw/a.json") and not handle.exists("raw/none.json")
    assert handle.delete("raw/a.json") and handle.list_keys() == []
    tenant_storage(other, theirs).put_text("raw/b.json", "secret of b")

    # Going around the handle with the same key: the store refuses.
    s3, bucket = _client_of(mine), iam_store.bucket
    b_key = f"platform/tenants/{other}/raw/b.json"
    assert _code(s3.get_object, Bucket=bucket, Key=b_key) == "AccessDenied"
    assert _code(s3.head_object, Bucket=bucket, Key=b_key) == "403"
    assert _code(s3.put_object, Bucket=bucket, Key=b_key, Body=b"x") == "AccessDenied"
    assert _code(s3.delete_object, Bucket=bucket, Key=b_key) == "AccessDenied"
    for prefix in (f"platform/tenants/{other}/", f"platform/tenants/{tenant_id}", ""):
        assert _code(s3.list_objects_v2, Bucket=bucket, Prefix=prefix) == "AccessDenied"
    assert _code(s3.list_objects_v2, Bucket=bucket) == "AccessDenied"
    own = s3.list_objects_v2(Bucket=bucket, Prefix=f"platform/tenants/{tenant_id}/")
    assert own["KeyCount"] == 0
    # B's object is untouched.
    body = iam_store.admin_s3.get_object(Bucket=bucket, Key=b_key)["Body"].read()
    assert body == b"secret of b"


@server
async def test_objects_outside_every_tenant_prefix_are_out_of_reach(client, iam_store, tenant_id):
    mine = await ensure_identity(tenant_id, iam_store.config, client=client)
    s3, bucket = _client_of(mine), iam_store.bucket
    for key in ("platform/shared/prices.json", "loose.txt", f"backups/tenants/{tenant_id}/x"):
        iam_store.admin_s3.put_object(Bucket=bucket, Key=key, Body=b"platform")
        assert _code(s3.get_object, Bucket=bucket, Key=key) == "AccessDenied"
        assert _code(s3.put_object, Bucket=bucket, Key=key, Body=b"x") == "AccessDenied"
    # The platform's own key still reads them: the refusals are the tenant key's.
    got = iam_store.admin_s3.get_object(Bucket=bucket, Key="loose.txt")["Body"].read()
    assert got == b"platform"


@server
async def test_rerun_keeps_the_key_rotation_replaces_it(client, iam_store, tenant_id):
    first = await ensure_identity(tenant_id, iam_store.config, client=client)
    again = await ensure_identity(tenant_id, iam_store.config, client=client)
    assert again.aws_access_key_id == first.aws_access_key_id
    assert _live_keys(iam_store, tenant_id) == [first.aws_access_key_id]

    # A key left by an interrupted run is removed; the block's key stays.
    user = identity_user_name(tenant_id)
    orphan = iam_store.admin_iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    await ensure_identity(tenant_id, iam_store.config, client=client)
    assert _live_keys(iam_store, tenant_id) == [first.aws_access_key_id]

    rotated = await ensure_identity(tenant_id, iam_store.config, rotate=True, client=client)
    assert rotated.aws_access_key_id not in (first.aws_access_key_id, orphan)
    assert _live_keys(iam_store, tenant_id) == [rotated.aws_access_key_id]
    assert (await load_identity(tenant_id, client=client)).aws_access_key_id == (
        rotated.aws_access_key_id
    )
    own = f"platform/tenants/{tenant_id}/a"
    assert (
        _code(_client_of(first).put_object, Bucket=iam_store.bucket, Key=own, Body=b"x")
        == "InvalidAccessKeyId"
    )
    _client_of(rotated).put_object(Bucket=iam_store.bucket, Key=own, Body=b"x")


@server
async def test_revoke_refuses_the_key_and_is_idempotent(client, iam_store, tenant_id):
    mine = await ensure_identity(tenant_id, iam_store.config, client=client)
    handle = tenant_storage(tenant_id, mine)
    handle.put_text("raw/a.json", "{}")

    assert await revoke_identity(tenant_id, iam_store.config, client=client) is True
    own = f"platform/tenants/{tenant_id}/raw/a.json"
    assert _code(_client_of(mine).get_object, Bucket=iam_store.bucket, Key=own) == (
        "InvalidAccessKeyId"
    )
    assert _code(iam_store.admin_iam.get_user, UserName=identity_user_name(tenant_id)) == (
        "NoSuchEntity"
    )
    assert await load_identity(tenant_id, client=client) is None
    assert await revoke_identity(tenant_id, iam_store.config, client=client) is False
    # The data stays: offboarding removes access, not objects.
    assert iam_store.admin_s3.get_object(Bucket=iam_store.bucket, Key=own)["Body"].read() == b"{}"


@server
async def test_a_local_store_gets_no_identity(client, tmp_path, tenant_id):
    local = LocalStorageConfig(root=str(tmp_path / "store"))
    assert await ensure_identity(tenant_id, local, client=client) is local
    assert await load_identity(tenant_id, client=client) is None
    assert await revoke_identity(tenant_id, local, client=client) is False


# ------------------------------------------------------------ onboarding and runtime


@pytest.fixture
def s3_platform(client, iam_store, tenant_id, monkeypatch):
    """The tenant's data store and the backup store as S3 blocks with the admin key."""
    from setlist.core.settings import get_settings

    async def make() -> tuple[str, str]:
        data, backups = f"{tenant_id}-store", f"{tenant_id}-backups"
        await iam_store.config.asave(data, overwrite=True, client=client)
        backup = iam_store.config.model_copy(update={"prefix": "backups"})
        await backup.asave(backups, overwrite=True, client=client)
        monkeypatch.setenv("SETLIST_BACKUP_BLOCK", backups)
        get_settings.cache_clear()
        return data, backups

    yield make
    monkeypatch.undo()
    get_settings.cache_clear()


def _signing_key(handle) -> str:
    return handle._client._request_signer._credentials.access_key


@server
async def test_onboarding_on_s3_gives_jobs_the_tenants_own_keys(
    client, iam_store, tenant_id, s3_platform
):
    from setlist.backup.platform import tenant_repository
    from setlist.tenants.onboarding import TenantSpec, create_tenant, delete_tenant
    from setlist.tenants.runtime import enter_tenant

    store, _backups = await s3_platform()
    result = await create_tenant(client, TenantSpec(tenant_id=tenant_id, storage_block=store))
    assert result["storage_identities"] == {
        "data": identity_user_name(tenant_id),
        "backup": identity_user_name(tenant_id, "backup"),
    }
    data_id = await load_identity(tenant_id, client=client)
    backup_id = await load_identity(tenant_id, "backup", client=client)
    platform_key = iam_store.config.aws_access_key_id
    assert data_id.aws_access_key_id not in (platform_key, backup_id.aws_access_key_id)

    tenant = await enter_tenant(tenant_id)
    assert tenant.storage_config.aws_access_key_id == data_id.aws_access_key_id
    assert _signing_key(tenant.storage) == data_id.aws_access_key_id != platform_key
    tenant.storage.put_text("raw/a.json", "{}")
    assert tenant.storage.list_keys() == ["raw/a.json"]

    repo = await tenant_repository(tenant_id, create=True)
    assert _signing_key(repo.store) == backup_id.aws_access_key_id
    assert repo.store.exists("repo.json")
    repo_key = f"backups/tenants/{tenant_id}/repo.json"
    # A job's data key does not reach its backups (nor the other way round).
    assert _code(_client_of(data_id).get_object, Bucket=iam_store.bucket, Key=repo_key) == (
        "AccessDenied"
    )
    data_key = f"platform/tenants/{tenant_id}/raw/a.json"
    assert _code(_client_of(backup_id).get_object, Bucket=iam_store.bucket, Key=data_key) == (
        "AccessDenied"
    )

    # update converges without rotating: a running job's key stays good.
    from setlist.tenants.onboarding import update_tenant

    await update_tenant(client, tenant_id, {"display_name": "Renamed"})
    assert (await load_identity(tenant_id, client=client)).aws_access_key_id == (
        data_id.aws_access_key_id
    )

    done = await delete_tenant(client, tenant_id)
    assert done["storage_identities_revoked"] == ["data", "backup"]
    for purpose in ("data", "backup"):
        user = identity_user_name(tenant_id, purpose)
        assert _code(iam_store.admin_iam.get_user, UserName=user) == "NoSuchEntity"
        assert await load_identity(tenant_id, purpose, client=client) is None
    assert _code(tenant.storage.get_bytes, "raw/a.json") == "InvalidAccessKeyId"


@server
async def test_a_tenant_without_identity_falls_back_with_a_warning(
    client, iam_store, tenant_id, s3_platform, caplog
):
    from setlist.tenants.onboarding import TenantSpec, create_tenant
    from setlist.tenants.runtime import enter_tenant

    store, _ = await s3_platform()
    await create_tenant(client, TenantSpec(tenant_id=tenant_id, storage_block=store))
    doc = await client.read_block_document_by_name(
        identity_block_name(tenant_id), S3StorageConfig.get_block_type_slug()
    )
    await client.delete_block_document(doc.id)  # as for a tenant onboarded before identities

    with caplog.at_level(logging.WARNING, logger=si.__name__):
        tenant = await enter_tenant(tenant_id)
    assert _signing_key(tenant.storage) == iam_store.config.aws_access_key_id
    warnings = [r.getMessage() for r in caplog.records if r.name == si.__name__]
    assert any("has no data storage identity" in w and "is missing" in w for w in warnings)
