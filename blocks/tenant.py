"""The TenantProfile block: everything the platform knows about one tenant.

Kept as a Prefect block so the server is the system of record and operators can read
(and, carefully, edit) a tenant in the UI. Secrets never live here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from setlist.core.tenancy import JobType, Priority, ResourceTier, TenantQuota, validate_tenant_id


class TenantStatus(StrEnum):
    active = "active"
    suspended = "suspended"


class TrainingPolicy(StrEnum):
    """When the tenant's recommender is retrained without anyone asking."""

    manual = "manual"  # only when submitted (UI, CLI, schedule)
    after_etl = "after-etl"  # also after every completed ETL load


class TenantProfile(Block):
    """A tenant of the platform: identity, quotas, defaults and where its data lives."""

    _block_type_name = "Setlist Tenant Profile"
    _block_type_slug = "setlist-tenant-profile"
    _description = "A Setlist tenant: quotas, default priority and tiers, storage, namespace."

    tenant_id: str = Field(description="DNS-1123 label; also namespace suffix and storage prefix")
    display_name: str = ""
    status: TenantStatus = TenantStatus.active
    quota: TenantQuota = Field(default_factory=TenantQuota)
    default_priority: Priority = Priority.normal
    tier_overrides: dict[JobType, ResourceTier] = Field(
        default_factory=dict, description="job type → tier, where the platform default won't do"
    )
    namespace: str = Field(default="", description="Kubernetes namespace of the tenant's jobs")
    storage_block: str = Field(
        default="setlist-storage", description="name of the storage config block to use"
    )
    labels: dict[str, str] = Field(default_factory=dict)
    training_policy: TrainingPolicy = Field(
        default=TrainingPolicy.manual,
        description="after-etl: ml-training runs after each completed data-etl load",
    )
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, v: str) -> str:
        return validate_tenant_id(v)
