"""Attacks a tenant job could try with its own run token, for tests and the benchmark.

Each probe is a call that a flow run of tenant A must never get through: B's secrets,
runs, logs, variables and locks, the platform's configuration, forged audit events. The
values (``{a}``, ``{run_b}``…) are filled in from a world with two tenants; a probe
passes when the gate answers 403 and nothing on the server changes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any


def event(name: str, tenant: str, related: list | None = None) -> dict:
    return {
        "id": str(uuid.uuid4()),
        "occurred": "2026-01-01T00:00:00Z",
        "event": name,
        "resource": {"prefect.resource.id": f"setlist.tenant.{tenant}", "setlist.tenant": tenant},
        "related": related or [],
        "payload": {},
    }


FORBIDDEN = [
    # B's blocks and the platform's secrets
    ("GET", "/block_types/slug/setlist-tenant-profile/block_documents/name/tenant-{b}", None),
    (
        "GET",
        "/block_types/slug/secret/block_documents/name/setlist-backup-key-{b}?include_secrets=true",
        None,
    ),
    (
        "GET",
        "/block_types/slug/secret/block_documents/name/setlist-webhook-{source}-secret"
        "?include_secrets=true",
        None,
    ),
    (
        "GET",
        "/block_types/slug/setlist-s3-storage/block_documents/name/setlist-storage-identity-{b}"
        "?include_secrets=true",
        None,
    ),
    ("POST", "/block_documents/filter", {"include_secrets": True}),
    ("POST", "/block_types/slug/secret/block_documents", {}),
    # B's runs, and runs at all
    ("GET", "/flow_runs/{run_b}", None),
    ("POST", "/flow_runs/{run_b}/set_state", {"state": {"type": "CANCELLING"}}),
    ("DELETE", "/flow_runs/{run_b}", None),
    ("PATCH", "/flow_runs/{run_b}", {"tags": ["setlist:granted"]}),
    ("POST", "/flow_runs/", {"flow_id": str(uuid.uuid4())}),
    ("POST", "/deployments/{dep_b}/create_flow_run", {}),
    ("GET", "/flow_run_states/?flow_run_id={run_b}", None),
    # its own run's record: tags (a grant!), job variables, parameters
    ("PATCH", "/flow_runs/{run_a}", {"tags": ["setlist:granted", "setlist:grant:x:y"]}),
    ("PATCH", "/flow_runs/{run_a}", {"job_variables": {"command": "sh -c id"}}),
    # ... and its name: only its own seed-style name, never another tenant's or job's
    ("PATCH", "/flow_runs/{run_a}", {"name": "canary-{b}-20260101-000000"}),
    ("PATCH", "/flow_runs/{run_a}", {"name": "billing-report-{a}-20260101-000000"}),
    ("PATCH", "/flow_runs/{run_a}/labels", {"setlist.tenant": "{b}"}),
    # B's logs and artifacts
    (
        "POST",
        "/logs/",
        [
            {
                "flow_run_id": "{run_b}",
                "name": "x",
                "level": 20,
                "message": "forged",
                "timestamp": "2026-01-01T00:00:00Z",
            }
        ],
    ),
    ("POST", "/logs/filter", {}),
    ("POST", "/artifacts/", {"flow_run_id": "{run_b}", "type": "markdown", "data": "x"}),
    (
        "POST",
        "/artifacts/",
        {"flow_run_id": "{run_a}", "key": "canary-{b}", "type": "markdown", "data": "x"},
    ),
    # B's variables
    ("GET", "/variables/name/{b}_api_token", None),
    ("PATCH", "/variables/name/{b}_api_token", {"value": "hijacked"}),
    ("DELETE", "/variables/name/{b}_api_token", None),
    # the platform's configuration
    ("PATCH", "/work_pools/setlist-local", {"base_job_template": {}}),
    ("PATCH", "/deployments/{dep_a}", {"job_variables": {"command": "sh -c id"}}),
    ("PATCH", "/work_queues/{queue_b}", {"is_paused": False}),
    ("POST", "/automations/", {"name": "x"}),
    ("POST", "/admin/database/clear", {}),
    ("GET", "/admin/settings", None),
    # audit and security events, events about B
    ("POST", "/events", [event("setlist.tenant.deleted", "{a}")]),
    ("POST", "/events", [event("setlist.security.alert", "{a}")]),
    ("POST", "/events", [event("setlist.job.cancelled", "{b}")]),
    # ... and the trail of its own runs: who started or cancelled them is the platform's
    (
        "POST",
        "/events",
        [
            event(
                "setlist.job.started",
                "{a}",
                [
                    {
                        "prefect.resource.id": "prefect.flow-run.{run_a}",
                        "prefect.resource.role": "flow-run",
                    }
                ],
            )
        ],
    ),
    ("POST", "/events", [event("setlist.job.cancelled", "{a}")]),
    (
        "POST",
        "/events",
        [
            {
                **event("prefect.flow-run.Completed", "{a}"),
                "resource": {"prefect.resource.id": "prefect.flow-run.{run_b}"},
            }
        ],
    ),
    # locks and quotas
    ("POST", "/v2/concurrency_limits/increment", {"names": ["setlist-lock-{b}-etl"], "slots": 1}),
    ("PATCH", "/v2/concurrency_limits/setlist-tenant-{a}", {"limit": 1000}),
    ("DELETE", "/v2/concurrency_limits/setlist-tenant-{a}", None),
    ("POST", "/v2/concurrency_limits/", {"name": "setlist-lock-{b}-etl", "limit": 1}),
    # a platform record's seal (a canary writes none; a billing run only under billing/)
    (
        "POST",
        "/setlist/records/seal",
        {"key": "billing/2026-01-01/_manifest.json", "sha256": "0" * 64},
    ),
]


def fill(value: Any, values: dict[str, Any]) -> Any:
    """``value`` with each ``{name}`` replaced by ``values[name]``."""
    text = json.dumps(value)
    for key, val in values.items():
        if isinstance(val, str):
            text = text.replace("{" + key + "}", val)
    return json.loads(text)


async def attack(http, values: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every probe through ``http`` (a client holding A's run token) → the ones not
    answered 403, as (method, path, status)."""
    allowed = []
    for method, path, body in FORBIDDEN:
        path = fill(path, values)
        response = await http.request(
            method, path, json=fill(body, values) if body is not None else None
        )
        if response.status_code != 403:
            allowed.append((method, path, response.status_code))
    return allowed
