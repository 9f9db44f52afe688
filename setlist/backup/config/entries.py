"""What a configuration archive holds: its format, and one model per kind of object.

Each entry (pool, queue, limit, variable, block type and schema, block, deployment,
automation) keeps what recreating the object needs, plus its id on the old server, so
that the references objects hold of one another can be mapped onto the new server's ids.
The models forbid unknown fields, so an import refuses a malformed object before it
writes anything. ``FORMAT_VERSION`` and the member names are the archive's contract with
the exports already made.
"""

from __future__ import annotations

import json
import re
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from setlist.core.tenancy import SetlistError

FORMAT = "setlist-config"
FORMAT_VERSION = 2  # 2: sealed (seal.json); an unsealed archive can't be trusted
MANIFEST = "manifest.json"
SEAL_MEMBER = "seal.json"
SECRETS_MEMBER = "secrets.enc.json"
# Every member an archive may hold; anything else (a path, another name) is refused.
KIND_MEMBERS = {
    "block_types.json": ("block_types", "block_schemas"),
    "blocks.json": "blocks",
    "work_pools.json": "work_pools",
    "work_queues.json": "work_queues",
    "concurrency_limits.json": "concurrency_limits",
    "variables.json": "variables",
    "deployments.json": "deployments",
    "automations.json": "automations",
}
ALLOWED_MEMBERS = frozenset({MANIFEST, SEAL_MEMBER, SECRETS_MEMBER, *KIND_MEMBERS})

PAGE = 200

MASK = "********"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSPHRASE = 8

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class ConfigBackupError(SetlistError):
    pass


class ArchiveRejected(ConfigBackupError):
    """The archive is unsafe or damaged; nothing was written."""


class PassphraseRequired(ConfigBackupError):
    pass


class WrongPassphrase(ConfigBackupError):
    pass


class ConfigClash(ConfigBackupError):
    """The server already holds objects of the archive; ``clashes`` names every one."""

    def __init__(self, message: str, clashes: list[str] | None = None):
        super().__init__(message)
        self.clashes = list(clashes or [])


class ImportFailed(ConfigBackupError):
    pass


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlockTypeEntry(_Entry):
    slug: str
    name: str
    logo_url: str | None = None
    documentation_url: str | None = None
    description: str | None = None
    code_example: str | None = None


class BlockSchemaEntry(_Entry):
    checksum: str
    version: str | None = None
    block_type_slug: str
    fields: dict[str, Any]
    capabilities: list[str] = Field(default_factory=list)


class BlockEntry(_Entry):
    id: UUID
    name: str | None = None
    is_anonymous: bool = False
    block_type_slug: str
    block_schema_checksum: str
    block_schema_version: str | None = None
    data: dict[str, Any]
    # field name → id of the block document nested there (exported too)
    references: dict[str, UUID] = Field(default_factory=dict)
    # paths in ``data`` of secret values that were set (masked in ``data``)
    secret_paths: list[list[str]] = Field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.block_type_slug}/{self.name or self.id}"


class PoolEntry(_Entry):
    id: UUID
    name: str
    type: str
    description: str | None = None
    base_job_template: dict[str, Any] = Field(default_factory=dict)
    concurrency_limit: int | None = None
    is_paused: bool = False
    storage_configuration: dict[str, Any] | None = None


class QueueEntry(_Entry):
    id: UUID
    pool: str
    name: str
    description: str | None = None
    priority: int
    concurrency_limit: int | None = None
    is_paused: bool = False

    @property
    def label(self) -> str:
        return f"{self.pool}/{self.name}"


class LimitEntry(_Entry):
    id: UUID
    name: str
    limit: int
    active: bool = True
    slot_decay_per_second: float | None = None


class VariableEntry(_Entry):
    id: UUID
    name: str
    value: Any = None
    tags: list[str] = Field(default_factory=list)


class ScheduleEntry(_Entry):
    schedule: dict[str, Any]
    active: bool = True
    max_scheduled_runs: int | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    slug: str | None = None


class DeploymentEntry(_Entry):
    id: UUID
    flow_id: UUID
    flow_name: str
    name: str
    version: str | None = None
    description: str | None = None
    paused: bool = False
    parameters: dict[str, Any] = Field(default_factory=dict)
    parameter_openapi_schema: dict[str, Any] | None = None
    enforce_parameter_schema: bool = True
    tags: list[str] = Field(default_factory=list)
    labels: dict[str, Any] = Field(default_factory=dict)
    work_pool_name: str | None = None
    work_queue_name: str | None = None
    path: str | None = None
    entrypoint: str | None = None
    pull_steps: list[dict[str, Any]] | None = None
    job_variables: dict[str, Any] = Field(default_factory=dict)
    storage_document_id: UUID | None = None
    infrastructure_document_id: UUID | None = None
    concurrency_options: dict[str, Any] | None = None
    schedules: list[ScheduleEntry] = Field(default_factory=list)
    # the deployment's own limit (Prefect names it ``deployment:<id>``) …
    concurrency_limit: int | None = None
    # … or the name of a shared global concurrency limit (a tenant quota)
    global_concurrency_limit: str | None = None

    @property
    def label(self) -> str:
        return f"{self.flow_name}/{self.name}"


class AutomationEntry(_Entry):
    id: UUID
    name: str
    description: str = ""
    enabled: bool = True
    tags: list[str] = Field(default_factory=list)
    trigger: dict[str, Any]
    actions: list[dict[str, Any]] = Field(default_factory=list)
    actions_on_trigger: list[dict[str, Any]] = Field(default_factory=list)
    actions_on_resolve: list[dict[str, Any]] = Field(default_factory=list)
    # the deployment whose trigger this automation is (it goes when the deployment goes)
    owner_deployment_id: UUID | None = None


class Snapshot(BaseModel):
    """The platform's configuration as exported; secret values only in ``secrets``."""

    block_types: list[BlockTypeEntry] = Field(default_factory=list)
    block_schemas: list[BlockSchemaEntry] = Field(default_factory=list)
    blocks: list[BlockEntry] = Field(default_factory=list)
    work_pools: list[PoolEntry] = Field(default_factory=list)
    work_queues: list[QueueEntry] = Field(default_factory=list)
    concurrency_limits: list[LimitEntry] = Field(default_factory=list)
    variables: list[VariableEntry] = Field(default_factory=list)
    deployments: list[DeploymentEntry] = Field(default_factory=list)
    automations: list[AutomationEntry] = Field(default_factory=list)
    # block id → [(path, value)]; None: not read, or not included in the archive
    secrets: dict[str, list[tuple[list[str], Any]]] | None = Field(default=None, repr=False)

    def counts(self) -> dict[str, int]:
        return {
            "block_types": len(self.block_types),
            "block_schemas": len(self.block_schemas),
            "blocks": len(self.blocks),
            "work_pools": len(self.work_pools),
            "work_queues": len(self.work_queues),
            "concurrency_limits": len(self.concurrency_limits),
            "variables": len(self.variables),
            "deployments": len(self.deployments),
            "automations": len(self.automations),
        }

    def blocks_needing_secret(self) -> list[str]:
        have = self.secrets or {}
        return [b.label for b in self.blocks if b.secret_paths and str(b.id) not in have]


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
