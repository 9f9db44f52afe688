"""Small waits shared by server tests: the server records some things asynchronously."""

from __future__ import annotations

import asyncio
import time

from setlist.core import audit


def fresh_s3_store(endpoint: str, prefix: str = "platform"):
    """An S3 store on a new bucket of moto's server at ``endpoint`` (the platform's
    bucket-wide test key)."""
    import os

    import boto3

    from blocks.storage import S3StorageConfig

    bucket = f"setlist-{os.urandom(4).hex()}"
    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
        Bucket=bucket
    )
    return S3StorageConfig(
        bucket=bucket, prefix=prefix, endpoint_url=endpoint, region_name="us-east-1", **creds
    )


async def wait_for_events(client, tenant_id: str, name: str, count: int = 1, timeout: float = 20):
    """Events are persisted by a server service a moment after they are accepted."""
    deadline = time.monotonic() + timeout
    while True:
        events = [e for e in await audit.read_trail(client, tenant_id) if e.event == name]
        if len(events) >= count or time.monotonic() > deadline:
            assert len(events) >= count, f"expected {count} {name} events, got {len(events)}"
            return events
        await asyncio.sleep(0.5)
