"""The platform's domain rules: tenants, priority bands, resource tiers, quotas.

Pure: nothing here touches the network or the disk, so every rule can be unit-tested
in microseconds and shared by the CLI, the flows and the onboarding code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A tenant id's rules live in a module without pydantic, for what needs only them (a
# storage handle in an ETL worker process); their names stay importable from here.
from setlist.core.tenant_ids import (  # noqa: F401 - re-exported
    TENANT_ID_MAX,
    InvalidTenantId,
    SetlistError,
    validate_tenant_id,
)

TenantId = Annotated[str, Field(min_length=1, max_length=TENANT_ID_MAX)]


class Priority(StrEnum):
    """Priority bands, highest first. The declaration order *is* the dispatch order."""

    critical = "critical"
    high = "high"
    normal = "normal"
    low = "low"
    batch = "batch"

    @property
    def rank(self) -> int:
        """0 for critical … 4 for batch."""
        return list(Priority).index(self)


class ResourceTier(StrEnum):
    micro = "micro"
    small = "small"
    medium = "medium"
    large = "large"
    xlarge = "xlarge"
    enterprise = "enterprise"


class TierResources(BaseModel):
    """What a job of a tier gets. Requests equal limits (Guaranteed QoS) on every tier."""

    model_config = ConfigDict(frozen=True)

    cpu: str
    memory: str
    millicpu: int
    memory_mib: int


TIERS: dict[ResourceTier, TierResources] = {
    ResourceTier.micro: TierResources(cpu="100m", memory="128Mi", millicpu=100, memory_mib=128),
    ResourceTier.small: TierResources(cpu="250m", memory="512Mi", millicpu=250, memory_mib=512),
    ResourceTier.medium: TierResources(cpu="500m", memory="1Gi", millicpu=500, memory_mib=1024),
    ResourceTier.large: TierResources(cpu="2000m", memory="4Gi", millicpu=2000, memory_mib=4096),
    ResourceTier.xlarge: TierResources(cpu="8000m", memory="16Gi", millicpu=8000, memory_mib=16384),
    ResourceTier.enterprise: TierResources(
        cpu="16000m", memory="32Gi", millicpu=16000, memory_mib=32768
    ),
}


class JobType(StrEnum):
    """Every kind of job the platform runs; the value is the Prefect flow name."""

    ml_training = "ml-training"
    data_etl = "data-etl"
    tenant_backup = "tenant-backup"
    security_scan = "security-scan"
    billing_report = "billing-report"
    canary = "canary"
    stream_ingest = "stream-ingest"


DEFAULT_TIER: dict[JobType, ResourceTier] = {
    JobType.ml_training: ResourceTier.xlarge,
    JobType.data_etl: ResourceTier.large,
    JobType.tenant_backup: ResourceTier.large,
    JobType.security_scan: ResourceTier.medium,
    JobType.billing_report: ResourceTier.medium,
    JobType.canary: ResourceTier.small,
    JobType.stream_ingest: ResourceTier.medium,
}
# A flow run's process needs this much at least: the canary, the smallest job, peaks at
# 124 MiB in the runtime image (Python, Prefect's engine and client, boto3), and a pod's
# /tmp counts against the same limit. `micro` (128Mi) is below it: a job there is
# OOM-killed, so no job is given it.
FLOW_MEMORY_FLOOR_MIB = 256


def _parse_enum(enum: type[StrEnum], value: str | StrEnum, what: str) -> StrEnum:
    if isinstance(value, enum):
        return value
    try:
        return enum(str(value).strip().lower())
    except ValueError:
        accepted = ", ".join(m.value for m in enum)
        raise SetlistError(f"unknown {what} {value!r}; accepted: {accepted}") from None


def parse_priority(value: str | Priority) -> Priority:
    return _parse_enum(Priority, value, "priority")  # type: ignore[return-value]


def parse_tier(value: str | ResourceTier) -> ResourceTier:
    return _parse_enum(ResourceTier, value, "resource tier")  # type: ignore[return-value]


def parse_job_type(value: str | JobType) -> JobType:
    return _parse_enum(JobType, value, "job type")  # type: ignore[return-value]


_QUANTITY_CPU = re.compile(r"^(\d+)(m?)$")
_QUANTITY_MEM = re.compile(r"^(\d+)(Mi|Gi|Ti)$")


def cpu_to_millicpu(value: str) -> int:
    """'500m' → 500, '2' → 2000; refuses anything else with the accepted forms."""
    m = _QUANTITY_CPU.match(str(value).strip())
    if not m:
        raise SetlistError(f"cpu quantity {value!r} not understood; use e.g. '500m' or '4'")
    n = int(m.group(1))
    return n if m.group(2) else n * 1000


def memory_to_mib(value: str) -> int:
    """'512Mi' → 512, '4Gi' → 4096; binary suffixes only, as Kubernetes quotas use them."""
    m = _QUANTITY_MEM.match(str(value).strip())
    if not m:
        raise SetlistError(f"memory quantity {value!r} not understood; use e.g. '512Mi' or '4Gi'")
    return int(m.group(1)) * {"Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}[m.group(2)]


class TenantQuota(BaseModel):
    """What one tenant may hold at once. The concurrent-jobs count is enforced by Prefect."""

    model_config = ConfigDict(extra="forbid")

    concurrent_jobs: int = Field(default=4, ge=1, le=1000, description="runs Pending+Running")
    cpu: str = Field(default="32", description="total cpu of the tenant's running jobs")
    memory: str = Field(default="64Gi", description="total memory of the tenant's running jobs")
    gpu: int = Field(default=1, ge=0, le=64, description="GPUs the tenant may hold at once")
    storage_gb: int = Field(default=100, ge=1, description="object storage the tenant may use")
    weight: float = Field(
        default=1.0, gt=0, le=100, description="fair-share weight among tenants of one band"
    )

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        cpu_to_millicpu(v)
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        memory_to_mib(v)
        return v

    def admits(self, tier: ResourceTier) -> bool:
        """Whether one job of ``tier`` fits inside the tenant's cpu/memory quota at all."""
        res = TIERS[tier]
        return res.millicpu <= cpu_to_millicpu(self.cpu) and res.memory_mib <= memory_to_mib(
            self.memory
        )


def check_tier_allowed(quota: TenantQuota, tier: ResourceTier) -> None:
    res = TIERS[tier]
    if res.memory_mib < FLOW_MEMORY_FLOOR_MIB:
        raise SetlistError(
            f"tier {tier.value} ({res.memory}) is too small for a job: a flow run's "
            f"process needs {FLOW_MEMORY_FLOOR_MIB} MiB or more; pick small or larger"
        )
    if not quota.admits(tier):
        raise SetlistError(
            f"tier {tier.value} ({res.cpu} cpu, {res.memory}) exceeds the tenant quota "
            f"({quota.cpu} cpu, {quota.memory}); pick a smaller tier or raise the quota"
        )


def queue_name(tenant_id: str, band: Priority) -> str:
    """The work queue of (tenant, band). A dot never occurs in a tenant id, so it parses back."""
    return f"{tenant_id}.{band.value}"


def parse_queue_name(name: str) -> tuple[str, Priority] | None:
    """(tenant, band) for a Setlist queue name, ``None`` for any other queue."""
    tenant, dot, band = name.rpartition(".")
    if not dot:
        return None
    try:
        return validate_tenant_id(tenant), Priority(band)
    except (SetlistError, ValueError):
        return None


PLATFORM_VARIABLE_OWNER = "setlist"  # setlist_dispatcher and the like: no tenant's


def variable_owner(name: str, tags: list[str] | tuple[str, ...] = ()) -> str | None:
    """The tenant a Prefect variable belongs to, or ``None`` for a platform variable.

    A ``tenant:<id>`` tag says so; otherwise the name's part before its first ``_``, when
    that is a tenant id (``acme_threshold``). Tenant ids hold no ``_``, so the owner is
    exact: ``acme-eu_x`` is acme-eu's, never acme's, where a prefix match would say both.
    """
    for tag in tags:
        if tag.startswith("tenant:"):
            return tag.removeprefix("tenant:")
    owner, sep, _ = name.partition("_")
    if not sep or owner == PLATFORM_VARIABLE_OWNER:
        return None
    try:
        return validate_tenant_id(owner)
    except SetlistError:
        return None


def concurrency_limit_name(tenant_id: str) -> str:
    """The Prefect global concurrency limit that holds the tenant's concurrent-jobs quota."""
    return f"setlist-tenant-{tenant_id}"


def profile_block_name(tenant_id: str) -> str:
    return f"tenant-{tenant_id}"


def backup_key_block_name(tenant_id: str) -> str:
    """The Secret block holding the key that encrypts the tenant's backups."""
    return f"setlist-backup-key-{validate_tenant_id(tenant_id)}"


def identity_block_name(tenant_id: str) -> str:
    """The S3 storage block holding the tenant's own data-store credential (its prefix only)."""
    return f"setlist-storage-identity-{validate_tenant_id(tenant_id)}"


def stream_block_name(tenant_id: str) -> str:
    """The stream broker block of the tenant's stream-ingest job: its own broker user
    where the broker has per-user permissions (``setlist.brokers.identity``)."""
    return f"setlist-stream-{validate_tenant_id(tenant_id)}"


def backup_identity_block_name(tenant_id: str) -> str:
    """The S3 storage block holding the tenant's own backup-store credential."""
    return f"setlist-backup-identity-{validate_tenant_id(tenant_id)}"


def run_tenant(tags: Iterable[str], queue_name: str | None) -> str | None:
    """The tenant a run belongs to: its ``tenant:`` tag, else its queue's tenant."""
    for tag in tags:
        if tag.startswith("tenant:"):
            return tag.split(":", 1)[1]
    parsed = parse_queue_name(queue_name or "")
    return parsed[0] if parsed else None


def run_tags(tenant_id: str, job_type: JobType, band: Priority, tier: ResourceTier) -> list[str]:
    """Tags put on every run so lists and metrics can filter by tenant, type, band and tier."""
    return [
        "setlist",
        f"tenant:{tenant_id}",
        f"job:{job_type.value}",
        f"band:{band.value}",
        f"tier:{tier.value}",
    ]


def tenant_namespace(tenant_id: str) -> str:
    """The Kubernetes namespace of a tenant's jobs."""
    return f"tenant-{validate_tenant_id(tenant_id)}"


def tier_for(
    job_type: JobType, overrides: dict[JobType, ResourceTier] | None = None
) -> ResourceTier:
    """The tier a tenant's job runs on unless the submission names one."""
    return (overrides or {}).get(job_type, DEFAULT_TIER[job_type])


# Upper end of each job type's typical run time (SEED): a Job past it is stopped.
JOB_DEADLINE_SECONDS: dict[JobType, int] = {
    JobType.ml_training: 8 * 3600,
    JobType.data_etl: 3 * 3600,
    JobType.tenant_backup: 6 * 3600,
    JobType.security_scan: 2 * 3600,
    JobType.billing_report: 90 * 60,
    JobType.canary: 10 * 60,
    # a run ends after its run_minutes (at most 23 h), then the next takes over; a day is
    # the most a job template allows
    JobType.stream_ingest: 24 * 3600,
}


# GPUs a job type asks for unless told otherwise (never more than the tenant's quota).
DEFAULT_GPUS: dict[JobType, int] = {JobType.ml_training: 1}


def default_gpus(job_type: JobType, gpu_quota: int) -> int:
    return min(DEFAULT_GPUS.get(job_type, 0), gpu_quota)


def job_variables(
    tenant_id: str, job_type: JobType, band: Priority, tier: ResourceTier, gpu: int = 0
) -> dict[str, object]:
    """A run's job variables, identical on the process and Kubernetes pools.

    The Kubernetes templates derive namespace, labels, PriorityClass, Kueue queue and
    resources from these; the process pool records them. ``gpu`` > 0 only on a GPU pool.
    """
    res = TIERS[tier]
    variables: dict[str, object] = {
        "tenant": validate_tenant_id(tenant_id),
        "job_type": job_type.value,
        "band": band.value,
        "tier": tier.value,
        "cpu": res.cpu,
        "memory": res.memory,
        "active_deadline_seconds": JOB_DEADLINE_SECONDS[job_type],
    }
    if gpu:
        variables["gpu"] = gpu
    return variables
