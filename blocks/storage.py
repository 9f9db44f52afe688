"""Object-storage configuration blocks: where tenants' data lives.

One block configures the platform's store; each tenant only ever gets a handle scoped
to its own prefix (``setlist.core.storage``). Credentials are ``SecretStr`` so the UI, the
API and logs show them masked.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class LocalStorageConfig(Block):
    """A directory on the local disk: the embedded default of the local stack."""

    _block_type_name = "Setlist Local Storage"
    _block_type_slug = "setlist-local-storage"
    _description = "Tenant object storage in a local directory (embedded stack, tests)."

    root: str = Field(description="absolute path of the storage root")


class S3StorageConfig(Block):
    """An S3 bucket (AWS, MinIO, moto — anything boto3 can reach with an endpoint)."""

    _block_type_name = "Setlist S3 Storage"
    _block_type_slug = "setlist-s3-storage"
    _description = "Tenant object storage in an S3-compatible bucket."

    bucket: str
    prefix: str = Field(default="", description="key prefix under which tenants' prefixes live")
    endpoint_url: str | None = Field(default=None, description="e.g. http://minio:9000")
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    iam_endpoint_url: str | None = Field(
        default=None,
        description=(
            "IAM API for per-tenant credentials; empty: endpoint_url when set (moto, "
            "LocalStack serve IAM there), else AWS's global IAM endpoint"
        ),
    )


STORAGE_BLOCK_TYPES: tuple[type[Block], ...] = (LocalStorageConfig, S3StorageConfig)
