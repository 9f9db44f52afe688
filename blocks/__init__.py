"""Prefect block types of the platform; ``register_all`` puts them on the server."""

from __future__ import annotations

from blocks.billing import PricePlanBlock
from blocks.smtp_email import SmtpEmail, SmtpSecurity
from blocks.storage import STORAGE_BLOCK_TYPES, LocalStorageConfig, S3StorageConfig
from blocks.stream import StreamBrokerConfig
from blocks.tenant import TenantProfile, TenantStatus
from blocks.webhook import WebhookSource

ALL_BLOCK_TYPES = (
    TenantProfile,
    *STORAGE_BLOCK_TYPES,
    PricePlanBlock,
    WebhookSource,
    StreamBrokerConfig,
    SmtpEmail,
)


async def register_all() -> None:
    """Register (or update) every Setlist block type and schema with the server."""
    for block_type in ALL_BLOCK_TYPES:
        await block_type.aregister_type_and_schema()


__all__ = [
    "ALL_BLOCK_TYPES",
    "LocalStorageConfig",
    "PricePlanBlock",
    "S3StorageConfig",
    "SmtpEmail",
    "SmtpSecurity",
    "StreamBrokerConfig",
    "TenantProfile",
    "TenantStatus",
    "WebhookSource",
    "register_all",
]
