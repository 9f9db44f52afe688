"""Each tenant's own object-store credential, good for its own prefix only.

Tenants share one bucket; each tenant's objects live under ``<prefix>/tenants/<id>/``
(``setlist.core.storage.s3_tenant_key_base``). A ``TenantStorage`` handle never names a
key outside that prefix, but code running in a tenant's job can build its own S3 client
from whatever credential the job holds. So the job must never hold the platform's
bucket-wide key: on an S3 store, onboarding gives each tenant an IAM user of its own,

- ``setlist-data-<tenant>`` for the data store (block ``identity_block_name``) and
- ``setlist-backup-<tenant>`` for the backup repository (``backup_identity_block_name``),

whose one inline policy allows ``s3:GetObject``, ``s3:PutObject``, ``s3:DeleteObject``
and ``s3:AbortMultipartUpload`` on ``arn:aws:s3:::<bucket>/<tenant prefix>*`` and
``s3:ListBucket`` on the bucket only for ``s3:prefix`` values inside the tenant prefix.
Its access key is saved as an ``S3StorageConfig`` block with the platform store's
bucket, prefix, endpoint and region; a job loads that block (``tenant_store_config``)
and never the platform's.

What the operator credential of the platform store needs on IAM (resource
``arn:aws:iam::<account>:user/setlist/*``): ``CreateUser``, ``TagUser``,
``PutUserPolicy``, ``DeleteUserPolicy``, ``ListAccessKeys``, ``CreateAccessKey``,
``DeleteAccessKey``, ``DeleteUser``. IAM is called at ``iam_endpoint_url`` of the
store's block, else at its ``endpoint_url`` (moto and LocalStack serve IAM there),
else at AWS's global IAM endpoint. A store without an IAM API (MinIO has its own admin
API instead) cannot be given per-tenant credentials by this module: onboarding fails.

Keys are kept, not rotated, on every re-run of onboarding (``setlist up`` converges
all tenants; rotating each time would cut off running jobs). A new key is made when
the tenant's block is missing or names a key that is no longer live, or on
``rotate=True``; the old keys are deleted first, so at most one key is ever live.

A local directory store (``LocalStorageConfig``) has no per-tenant credential:
``ensure_identity`` returns the platform config unchanged and ``revoke_identity`` only
removes a left-over identity block. There, isolation is only the key check of
``LocalTenantStorage`` (keys are relative, no ``..``, no symlink out of the tenant's
directory), which code that goes around the handle is not bound by: a job on the local
process pool runs as the operator's OS user and can read every tenant's directory. The
local store is for one trusted operator's machine, not for mutually distrusting tenants.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import anyio
from prefect.client.orchestration import PrefectClient, get_client
from prefect.exceptions import ObjectNotFound

from blocks.storage import LocalStorageConfig, S3StorageConfig
from setlist.core.storage import load_storage_config, load_storage_location, s3_tenant_key_base
from setlist.core.tenancy import (
    SetlistError,
    backup_identity_block_name,
    identity_block_name,
    validate_tenant_id,
)

StorageConfig = LocalStorageConfig | S3StorageConfig

PURPOSES = ("data", "backup")
IAM_PATH = "/setlist/"
IAM_USER_MAX = 64
POLICY_NAME = "setlist-tenant-prefix"
OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]

log = logging.getLogger(__name__)


def _purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise SetlistError(f"unknown storage purpose {purpose!r}; accepted: {', '.join(PURPOSES)}")
    return purpose


def identity_block_for(tenant_id: str, purpose: str = "data") -> str:
    """The block holding the tenant's credential for ``purpose`` (data or backup)."""
    make = identity_block_name if _purpose(purpose) == "data" else backup_identity_block_name
    return make(tenant_id)


def identity_user_name(tenant_id: str, purpose: str = "data") -> str:
    """``setlist-<purpose>-<tenant>``; past IAM's 64 characters, cut and given a hash of
    the whole name, so it stays unique and the same on every run."""
    name = f"setlist-{_purpose(purpose)}-{validate_tenant_id(tenant_id)}"
    if len(name) <= IAM_USER_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: IAM_USER_MAX - len(digest) - 1].rstrip('-')}-{digest}"


def _partition(region: str | None) -> str:
    region = region or ""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def identity_policy(tenant_id: str, config: S3StorageConfig) -> dict[str, Any]:
    """The inline policy of the tenant's user: its own prefix of the store, nothing else."""
    base = s3_tenant_key_base(tenant_id, config.prefix)
    bucket_arn = f"arn:{_partition(config.region_name)}:s3:::{config.bucket}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "TenantObjects",
                "Effect": "Allow",
                "Action": OBJECT_ACTIONS,
                "Resource": [f"{bucket_arn}/{base}*"],
            },
            {
                "Sid": "TenantListing",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [bucket_arn],
                "Condition": {"StringLike": {"s3:prefix": [f"{base}*", base]}},
            },
        ],
    }


def iam_client(config: S3StorageConfig):
    import boto3

    secret = config.aws_secret_access_key
    token = config.aws_session_token
    return boto3.client(
        "iam",
        endpoint_url=config.iam_endpoint_url or config.endpoint_url,
        region_name=config.region_name,
        aws_access_key_id=config.aws_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        aws_session_token=token.get_secret_value() if token else None,
    )


def _same_place(a: S3StorageConfig, b: S3StorageConfig) -> bool:
    return (
        a.bucket == b.bucket
        and a.prefix.strip("/") == b.prefix.strip("/")
        and (a.endpoint_url or "") == (b.endpoint_url or "")
        and (a.region_name or "") == (b.region_name or "")
    )


def _converge_user(
    tenant_id: str, config: S3StorageConfig, purpose: str, keep_key: str | None
) -> tuple[str, str] | None:
    """Make the user and its policy; keep ``keep_key`` if it is live, else replace every
    key by a new one. Returns the new (id, secret), or None when ``keep_key`` stays."""
    iam = iam_client(config)
    user = identity_user_name(tenant_id, purpose)
    try:
        iam.create_user(
            UserName=user,
            Path=IAM_PATH,
            Tags=[
                {"Key": "setlist:tenant", "Value": tenant_id},
                {"Key": "setlist:purpose", "Value": purpose},
            ],
        )
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    iam.put_user_policy(
        UserName=user,
        PolicyName=POLICY_NAME,
        PolicyDocument=json.dumps(identity_policy(tenant_id, config)),
    )
    live = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]]
    keep = keep_key if keep_key in live else None
    for key_id in live:
        if key_id != keep:  # orphans of an interrupted run, or the key being rotated
            iam.delete_access_key(UserName=user, AccessKeyId=key_id)
    if keep is not None:
        return None
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _remove_user(tenant_id: str, config: S3StorageConfig, purpose: str) -> bool:
    """Delete the user's keys, policy and the user; False if there was no user."""
    iam = iam_client(config)
    user = identity_user_name(tenant_id, purpose)
    gone = iam.exceptions.NoSuchEntityException
    try:
        keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    except gone:
        return False
    for key in keys:
        try:
            iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
        except gone:
            pass
    try:
        iam.delete_user_policy(UserName=user, PolicyName=POLICY_NAME)
    except gone:
        pass
    try:
        iam.delete_user(UserName=user)
    except gone:
        return False
    return True


async def load_identity(
    tenant_id: str, purpose: str = "data", client: PrefectClient | None = None
) -> S3StorageConfig | None:
    """The tenant's credential block for ``purpose``; None if it has none."""
    try:
        return await S3StorageConfig.aload(identity_block_for(tenant_id, purpose), client=client)
    except ValueError:
        return None


async def ensure_identity(
    tenant_id: str,
    config: StorageConfig,
    *,
    purpose: str = "data",
    rotate: bool = False,
    client: PrefectClient | None = None,
) -> StorageConfig:
    """Give the tenant its own credential on the store ``config`` (the platform's, with the
    operator's key) and save it as its identity block; returns that block.

    Idempotent: re-running keeps a live key (``rotate`` replaces it). On a local store
    nothing is made and ``config`` comes back as it is.
    """
    validate_tenant_id(tenant_id)
    _purpose(purpose)
    if not isinstance(config, S3StorageConfig):
        return config
    existing = None if rotate else await load_identity(tenant_id, purpose, client=client)
    keep = existing.aws_access_key_id if existing is not None else None
    new = await anyio.to_thread.run_sync(_converge_user, tenant_id, config, purpose, keep)
    if new is None:
        assert existing is not None
        key_id, secret = keep, existing.aws_secret_access_key
    else:
        key_id, secret = new
    identity = S3StorageConfig(
        bucket=config.bucket,
        prefix=config.prefix,
        endpoint_url=config.endpoint_url,
        region_name=config.region_name,
        iam_endpoint_url=config.iam_endpoint_url,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )
    if new is not None or existing is None or not _same_place(existing, identity):
        await identity.asave(identity_block_for(tenant_id, purpose), overwrite=True, client=client)
    return identity


async def _delete_block(name: str, client: PrefectClient) -> bool:
    try:
        doc = await client.read_block_document_by_name(
            name, S3StorageConfig.get_block_type_slug(), include_secrets=False
        )
        await client.delete_block_document(doc.id)
    except ObjectNotFound:
        return False
    return True


async def revoke_identity(
    tenant_id: str,
    config: StorageConfig | None,
    purpose: str = "data",
    *,
    client: PrefectClient | None = None,
) -> bool:
    """Take the tenant's credential away: its keys, policy and user, then its block.

    Idempotent. On a local store (or ``config`` None: the store's block is gone) there is
    no user to remove; a left-over block still goes.
    True if anything was removed.
    """
    validate_tenant_id(tenant_id)
    removed = False
    if isinstance(config, S3StorageConfig):
        removed = await anyio.to_thread.run_sync(_remove_user, tenant_id, config, purpose)
    name = identity_block_for(tenant_id, purpose)
    if client is not None:
        return await _delete_block(name, client) or removed
    async with get_client() as own:
        return await _delete_block(name, own) or removed


def _warn(message: str, *args: Any) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message, *args)
    except MissingContextError:
        log.warning(message, *args)


async def tenant_store_config(
    tenant_id: str, block_name: str, *, purpose: str = "data"
) -> StorageConfig:
    """The config a tenant's job opens the store ``block_name`` with.

    On S3: the tenant's identity block for ``purpose``. Only when it has none that fits
    the store (a tenant onboarded before identities existed) the platform's block is
    loaded, with a warning: re-running onboarding (``setlist tenant update`` or
    ``setlist up``) makes the identity. Where the platform's block is guarded from tenant
    jobs, that fallback is refused, which is the point.
    """
    location = await load_storage_location(block_name)
    if not isinstance(location, S3StorageConfig):
        return location  # a local directory: no credential to scope
    identity = await load_identity(tenant_id, purpose)
    if identity is not None and _same_place(identity, location):
        return identity
    _warn(
        "tenant %s has no %s storage identity for %s (block %s %s); using the platform's "
        "credential: re-run onboarding to give it one",
        tenant_id,
        purpose,
        block_name,
        identity_block_for(tenant_id, purpose),
        "is missing" if identity is None else "names another bucket or prefix",
    )
    return await load_storage_config(block_name)
