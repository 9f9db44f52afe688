"""What the canary job proves and reports: a probe object written, read back and deleted
in the tenant's storage through a real queue, worker and flow run.

The report lives here rather than in ``flows/canary.py`` because Prefect pickles a flow's
result by its class's module: a worker loads a flow file as a script, so a class defined
there could not be found again by any other process reading the result.
"""

from __future__ import annotations

from pydantic import BaseModel

PROBE_PREFIX = "_canary"


class CanaryReport(BaseModel):
    tenant_id: str
    probe_key: str
    bytes: int
    sha256: str
    write_ms: float
    read_ms: float
    delete_ms: float
    round_trip_ms: float
    storage: str
