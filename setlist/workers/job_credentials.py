"""What a tenant job starts with: its run token, never the platform's credentials, and
never a command or environment a run form chose; and the platform's liveness rhythm.

Both of Setlist's workers copy their own environment into the job (the process worker
its whole ``os.environ``, prefect-kubernetes every Prefect setting it has), which
would hand the operator credential to tenant code. So the job's environment is
scrubbed of every platform credential and gets one thing instead: a run token for
exactly this flow run and its tenant (``setlist.core.runtokens``).

Every job also beats at the platform's rhythm (``liveness_environment``), whatever the
worker's own environment says: the automation that marks silent runs Crashed waits
``SETLIST_UNRESPONSIVE_SECONDS`` for the next heartbeat, so a job beating at Prefect's
default, or not at all, would be taken for dead or never noticed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from setlist.core.runtokens import issue
from setlist.core.settings import get_settings
from setlist.core.tenancy import SetlistError, parse_queue_name

# Never reaches a job: the operator credential in each of its spellings, the platform key.
PLATFORM_SECRETS = frozenset(
    {
        "PREFECT_API_KEY",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_SERVER_API_AUTH_STRING",
        "SETLIST_PLATFORM_KEY",
    }
)
# Nor does the server's database: a URL (with its password) in any spelling Prefect reads.
SERVER_DATABASE_PREFIXES = ("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")
# Set by the platform on a tenant's deployments and pools only, never by a run.
FIXED_BY_PLATFORM = ("command", "env", "image", "working_dir")
TOKEN_PLACEHOLDER = "run:<issued at submission>"


def run_tenant(flow_run: Any) -> str:
    """The tenant whose queue the run came from; a tenant tag must not disagree."""
    queue = getattr(flow_run, "work_queue_name", None) or ""
    parsed = parse_queue_name(queue)
    if parsed is None:
        raise SetlistError(
            f"flow run {flow_run.id} is not a tenant run (queue {queue!r}); "
            "Setlist's workers run tenant jobs only"
        )
    tagged = {
        t.removeprefix("tenant:")
        for t in getattr(flow_run, "tags", None) or ()
        if t.startswith("tenant:")
    }
    if tagged - {parsed[0]}:
        raise SetlistError(
            f"flow run {flow_run.id} came from {queue!r} but is tagged for {sorted(tagged)}"
        )
    return parsed[0]


def check_run_overrides(flow_run: Any) -> None:
    """Refuse a run whose own job variables set what only the platform may."""
    variables = getattr(flow_run, "job_variables", None) or {}
    overrides = sorted(k for k in variables if k in FIXED_BY_PLATFORM)
    if overrides:
        raise SetlistError(
            f"flow run {flow_run.id} sets {', '.join(overrides)} in its job variables; "
            "a tenant job runs the platform's image and command with the platform's "
            "environment only"
        )


def job_environment(
    env: Mapping[str, str | None], flow_run: Any, mint: bool = True
) -> dict[str, str | None]:
    """``env`` without platform credentials or the server's database settings, with the
    run's token as its API credential."""
    tenant = run_tenant(flow_run)
    out = {
        k: v
        for k, v in env.items()
        if k not in PLATFORM_SECRETS and not k.startswith(SERVER_DATABASE_PREFIXES)
    }
    out["PREFECT_API_AUTH_STRING"] = (
        issue(flow_run.id, tenant).auth_string() if mint else TOKEN_PLACEHOLDER
    )
    out.update(liveness_environment())
    return out


def liveness_environment() -> dict[str, str]:
    """How often the job beats, and how long a silence its tenant locks outlive (their
    lease; ``setlist.dispatch.locks``), from the worker's settings: a Kubernetes job
    does not inherit the worker's ``SETLIST_*`` variables."""
    settings = get_settings()
    return {
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.heartbeat_seconds),
        # both or neither: the job's settings check the one against the other
        "SETLIST_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "SETLIST_UNRESPONSIVE_SECONDS": str(settings.unresponsive_seconds),
    }
