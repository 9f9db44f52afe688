"""Job run names as operators know them: ``<job-type>-<tenant>-<YYYYMMDD-HHMMSS>``.

The time is the run's expected start (UTC), which Prefect fixes when the run is first
scheduled, so whoever computes the name (``submit`` when it creates the run, the flow
itself when it starts, the gate checking the flow's rename) gets the same one, whatever
started the run: the CLI, the UI, a schedule or a trigger. Names are for people; two
runs of one job for one tenant in the same second share one, and a lookup by name then
lists both ids (``setlist.tenants.submit.read_run``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID


def run_name(job_type: str, tenant_id: str, at: datetime | str) -> str:
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return f"{job_type}-{tenant_id}-{at.astimezone(UTC):%Y%m%d-%H%M%S}"


def is_run_id(value: str) -> bool:
    """Whether ``value`` is a flow run id (a UUID) rather than a name."""
    try:
        UUID(str(value))
    except ValueError:
        return False
    return True


def name_this_run() -> str:
    """``flow_run_name`` of every job flow: the run's own name, from Prefect's runtime
    (flow name, tenant, expected start). The tenant is the one of the run's
    ``tenant:`` tag, which its deployment gave it and its run token names, not the
    ``tenant_id`` parameter a run form can change: a run whose parameter names another
    tenant keeps its own tenant's name, and fails on that mismatch with the reason
    (``setlist.tenants.runtime``). A run without the tag (one the operator's CLI runs in
    its own process) is named for its ``tenant_id`` parameter, a migration's target."""
    from prefect.runtime import flow_run

    tagged = [t.removeprefix("tenant:") for t in flow_run.tags or () if t.startswith("tenant:")]
    params = flow_run.parameters or {}
    tenant = (
        tagged[0]
        if len(tagged) == 1
        else params.get("tenant_id") or params.get("target_tenant_id") or "platform"
    )
    return run_name(flow_run.flow_name, str(tenant), flow_run.scheduled_start_time)
