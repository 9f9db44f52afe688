"""Runtime settings: one pydantic settings class, read from the environment.

The operator's variables of the old tool (TENANT_ID, PRIORITY, RESOURCE_TIER, DRY_RUN,
PARALLEL_JOBS, ENVIRONMENT) are honoured under their plain names; everything
Setlist-specific lives under the ``SETLIST_`` prefix. The old tool's NAMESPACE (one
namespace for every job) has no meaning here: each tenant's jobs run in the tenant's own
namespace, ``tenant-<id>``, and the platform in ``setlist-system``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
# Kubernetes work pool → job template kind (k8s/job-templates/<kind>.json).
KUBERNETES_POOLS = {"setlist-k8s": "cpu", "setlist-k8s-gpu": "gpu"}
# The job templates' rule for an image: a tag, a digest or both (and never `latest`).
PINNED_IMAGE = re.compile(
    r"[^:@\s]+(?::[A-Za-z0-9_.-]+(?:@sha256:[a-f0-9]{64})?|@sha256:[a-f0-9]{64})"
)

HEARTBEAT_SLACK_S = 10  # how late a heartbeat may be before its run is presumed dead


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SETLIST_", extra="ignore")

    home: Path = Field(default=REPO_ROOT / ".setlist", description="state of the local stack")
    code_dir: Path = Field(default=REPO_ROOT, description="where workers find the flow code")
    catalog: Path = Field(
        default=REPO_ROOT / "deployments" / "prefect.yaml", description="the job catalogue"
    )
    work_pool: str = "setlist-local"
    gpu_work_pool: str = Field(default="", description="pool for GPU jobs; empty: work_pool")
    storage_block: str = "setlist-storage"
    backup_block: str = Field(
        default="setlist-backups",
        description="storage block of the backup repository (never the data store)",
    )
    actor: str = Field(default="", description="who is acting, for the audit trail")
    kubernetes_pools: bool = Field(
        default=False,
        description="also keep the Kubernetes pools and their tenant queues",
    )
    image: str = Field(
        default="ghcr.io/setlist/runtime:0.1.0",
        description="image of the Kubernetes pools' CPU jobs (a tag other than latest, or a "
        "digest); `make image` builds it",
    )
    gpu_image: str = Field(
        default="ghcr.io/setlist/runtime-gpu:0.1.0",
        description="image of the GPU pool's jobs (CuPy on a CUDA runtime base)",
    )
    kube_apply: bool = Field(
        default=False, description="apply tenant kits to the cluster (kubeconfig or in-cluster)"
    )
    # A job whose node or process dies (SIGKILL, node loss) reports nothing: its run would
    # stay Running for ever. Every job Setlist starts beats this often (Prefect's flow-run
    # heartbeat, at least 30 s), and a run silent for `unresponsive_seconds` is presumed
    # dead: the platform's automation marks it Crashed, and the tenant locks it held
    # expire (their lease is as long), so the next run of the tenant can take them.
    heartbeat_seconds: int = Field(
        default=60, ge=30, description="how often a job reports that it is alive"
    )
    unresponsive_seconds: int = Field(
        # 300 also spares runs that beat at Prefect's own default of 180 s (a flow that
        # an operator runs in-process), which the one automation watches too. At least
        # 60: Prefect grants no shorter lease on a lock.
        default=300,
        ge=60,
        description="a job silent this long is marked Crashed and its tenant locks freed",
    )
    # How often the metrics exporter sends the warnings' digest, when a digest route is set
    # (`setlist automations apply --digest-…`); 0: never (`setlist automations digest`).
    alert_digest_minutes: int = Field(
        default=60, ge=0, le=7 * 24 * 60, description="period of the warnings' digest"
    )
    # Where tenants' events stream for the stream-ingest job: redis://… (each tenant gets
    # a Redis user of its own) or nats://…; empty: no tenant streams. It may carry the
    # broker's admin credential: never printed, never given to a job.
    stream_broker_url: str = Field(
        default="", description="the stream broker (redis:// or nats://); empty: none"
    )

    tenant_id: str = Field(
        default="enterprise-client-001", validation_alias=AliasChoices("TENANT_ID")
    )
    priority: str = Field(default="normal", validation_alias=AliasChoices("PRIORITY"))
    resource_tier: str = Field(default="", validation_alias=AliasChoices("RESOURCE_TIER"))
    dry_run: bool = Field(default=False, validation_alias=AliasChoices("DRY_RUN"))
    parallel_jobs: int = Field(default=4, ge=1, validation_alias=AliasChoices("PARALLEL_JOBS"))
    # The tag ``env:<environment>`` on every deployment, hence on every run.
    environment: str = Field(
        default="development",
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        validation_alias=AliasChoices("ENVIRONMENT"),
    )

    @field_validator("image", "gpu_image")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not PINNED_IMAGE.fullmatch(value) or value.endswith(":latest"):
            raise ValueError(
                f"{value!r} is not a pinned image: name it by a tag other than latest "
                "(registry/name:1.2.3) or by digest (registry/name@sha256:<64 hex>)"
            )
        return value

    @model_validator(mode="after")
    def _a_late_beat_is_no_death(self) -> Settings:
        # A heartbeat is an event; under load it may arrive some seconds late.
        if self.unresponsive_seconds < self.heartbeat_seconds + HEARTBEAT_SLACK_S:
            raise ValueError(
                f"SETLIST_UNRESPONSIVE_SECONDS={self.unresponsive_seconds} leaves a job "
                f"beating every {self.heartbeat_seconds} s no room for a late heartbeat; "
                f"give at least heartbeat + {HEARTBEAT_SLACK_S} s "
                f"({self.heartbeat_seconds + HEARTBEAT_SLACK_S})"
            )
        return self

    @property
    def pools(self) -> list[str]:
        """Every pool in which tenants get queues."""
        names = [self.work_pool, self.gpu_work_pool]
        if self.kubernetes_pools:
            names += list(KUBERNETES_POOLS)
        return list(dict.fromkeys(p for p in names if p))


@lru_cache
def get_settings() -> Settings:
    return Settings()
