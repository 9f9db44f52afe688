"""What the ``billing-report`` flow returns: the summary of the period it billed.

Apart from the flow, so that the CLI and other code read it without importing the
flows; it is the flow's persisted result, so renaming a field breaks reading a stored
one.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class BillingSummary(BaseModel):
    tenant_id: str
    period: str
    status: str
    currency: str
    total: str
    totals: dict[str, str]
    lines: int
    manifest: str
    reports: list[str] = Field(default_factory=list, description="every period published")
    anomalies: list[dict] = Field(default_factory=list)
