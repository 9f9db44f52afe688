"""What the backup flows take and return: the retention policy and the results of a
backup, restore (or migration) and prune.

Pydantic models, apart from the flows, so that the CLI builds a flow's parameters and
reads its results without importing the flows; they are the flows' persisted results,
so renaming a field breaks reading a stored one.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from setlist.backup.snapshots import Retention

SNAPSHOT_DOC = "a snapshot id (like 20261201T020000Z-a1b2c3) or 'latest'"


class RetentionPolicy(BaseModel):
    """How many snapshots survive a prune: the newest of each of the last N days, M ISO
    weeks and K months (the newest snapshot of all always does)."""

    daily: Annotated[int, Field(ge=0, le=3650)] = 7
    weekly: Annotated[int, Field(ge=0, le=520)] = 4
    monthly: Annotated[int, Field(ge=0, le=240)] = 12

    def policy(self) -> Retention:
        return Retention(daily=self.daily, weekly=self.weekly, monthly=self.monthly)


class BackupResult(BaseModel):
    tenant_id: str
    snapshot_id: str
    files: int
    bytes: int
    files_read: int
    new_chunks: int
    new_bytes: int
    reused_chunks: int
    skipped: int
    dedup_ratio: float
    pruned: list[str] = Field(default_factory=list)
    chunks_deleted: int = 0


class RestoreResult(BaseModel):
    tenant_id: str
    snapshot_id: str
    files: int
    bytes: int
    removed: int
    kept: int
    config: list[str] = Field(default_factory=list)
    source_tenant_id: str = ""
    bytes_read: int = 0  # from the repository by this run: less when it resumed a restore
    files_resumed: int = 0  # found staged and verified by an earlier try


class PruneResult(BaseModel):
    tenant_id: str
    kept: list[str]
    removed: list[str]
    chunks_deleted: int
    chunks_kept: int
