"""The broker block of the stream-ingest job: where tenants' event streams live.

One block names the broker (Redis Streams or NATS JetStream) and a credential; ``open``
gives the connection (``setlist.brokers.base``). Where the broker has per-user
permissions, a tenant's job gets a block holding the tenant's own user
(``setlist.brokers.identity``), never the platform's. The password is a ``SecretStr`` so
the UI, the API and logs show it masked: keep it out of ``url``.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from setlist.brokers.base import DEFAULT_MAX_PENDING, Broker, BrokerKind, check_url, open_broker


class StreamBrokerConfig(Block):
    """A Redis or NATS JetStream server holding tenants' event streams."""

    _block_type_name = "Setlist Stream Broker"
    _block_type_slug = "setlist-stream-broker"
    _description = "The message broker tenants' real-time events stream through."

    kind: BrokerKind = Field(description="redis (Redis Streams) or nats (NATS JetStream)")
    url: str = Field(description="e.g. redis://redis:6379/0 or nats://nats:4222, no password")
    username: str | None = None
    password: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _url_fits_kind(cls, url: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        return check_url(kind, url) if kind else url

    def open(self, max_pending: int = DEFAULT_MAX_PENDING) -> Broker:
        """A broker connection, not yet open (``async with block.open() as broker``)."""
        password = self.password.get_secret_value() if self.password else None
        return open_broker(self.kind, self.url, self.username, password, max_pending=max_pending)
