"""What a run token may do: exactly what a flow run of its tenant needs, nothing else.

Each rule names a method and a path of Prefect's API (without ``/api``) and decides from
the caller's claims (run id and tenant, signed into the token), the request, and reads
the gate makes with the operator credential (``Reader``). A decision may also rewrite the
request (a run-history filter gets the tenant's tag ANDed in), keep only the tenant's
items of a list it returns, or require the object it returns to be the tenant's. Any
route no rule names is refused: a new Prefect endpoint is closed until a rule opens it.

Ownership is read from what only the platform writes: a run's and a deployment's
``tenant:<id>`` tag (a run token can't change tags), a queue's name, a lock's name, a
tenant block's name, a variable's tag or name prefix (``variable_owner``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from setlist.core.run_names import run_name
from setlist.core.runtokens import RunToken
from setlist.core.tenancy import (
    backup_identity_block_name,
    backup_key_block_name,
    concurrency_limit_name,
    identity_block_name,
    parse_queue_name,
    profile_block_name,
    stream_block_name,
    variable_owner,
)
from setlist.dispatch.locks import LOCK_NAMES, lock_name

UUID_RE = r"[0-9a-fA-F-]{36}"

# Result events each job may emit about its own tenant. Everything else named
# ``setlist.*`` (tenant lifecycle, submissions, cancels, configuration, alerts) is the
# platform's audit trail and comes only from platform processes.
JOB_EVENTS: dict[str, tuple[str, ...]] = {
    "data-etl": ("setlist.etl.",),
    "ml-training": ("setlist.ml.",),
    "billing-report": ("setlist.billing.",),
    "tenant-backup": ("setlist.backup.",),
    "tenant-restore": ("setlist.backup.",),
    "tenant-migrate": ("setlist.backup.",),
    "backup-prune": ("setlist.backup.",),
    "security-scan": ("setlist.security.finding",),
    # its own end (the trigger of its next run) and a call for its tenant's compaction
    "stream-ingest": ("setlist.stream.",),
}
# Jobs that put a tenant's own configuration back (its queues' and deployments' paused
# flags and its variables), from a snapshot of that very tenant.
RESTORING_JOBS = frozenset({"tenant-restore", "tenant-migrate"})
# Platform records (``setlist.core.records``) a job writes in its tenant's storage, which
# the gate seals on its behalf: each job type only under its own prefixes.
RECORD_WRITERS: dict[str, tuple[str, ...]] = {
    "data-etl": ("curated/",),
    "stream-ingest": ("curated/",),  # the table's manifest, with each micro-batch
    "ml-training": ("models/",),
    "billing-report": ("billing/",),
    "security-scan": ("security/",),
}
# The job that reads the platform's configuration to judge the tenant's posture.
SCANNING_JOBS = frozenset({"security-scan"})
# Artifact keys a job may write: ``<kind>-<tenant>`` and ``<kind>-<tenant>-report``.
ARTIFACT_KINDS = (
    "billing",
    "canary",
    "etl",
    "etl-quality",
    "ml-training",
    "model-card",
    "security-scan",
    "backup",
    "restore",
    "migrate",
    "prune",
)
USAGE_LABEL_PREFIX = "setlist.usage."
# What Prefect's engine writes on its own run as it starts; never tags, job variables
# or parameters (the platform's record of what the run is and where it may go).
RUN_FIELDS = frozenset({"flow_version", "empirical_policy", "infrastructure_pid"})


class Reader(Protocol):
    """Reads of the server with the operator credential (None where not found)."""

    async def get(self, path: str, params: dict[str, Any] | None = None) -> Any: ...

    async def post(self, path: str, body: Any) -> Any: ...


@dataclass
class Caller:
    token: RunToken
    run: dict[str, Any]  # the flow run, as the server has it
    flow_name: str

    @property
    def tenant(self) -> str:
        return self.token.tenant_id

    @property
    def run_id(self) -> str:
        return str(self.token.run_id)

    @property
    def tag(self) -> str:
        return f"tenant:{self.tenant}"


@dataclass
class Request:
    method: str
    path: str  # below /api
    query: dict[str, str]
    body: Any  # parsed JSON, or None


@dataclass
class Decision:
    allowed: bool
    reason: str = ""
    body: Any = field(default=None)  # a replacement JSON body
    keep: Callable[[Any], bool] | None = None  # a list response keeps only these items
    check: Callable[[Any], bool] | None = None  # an object response must pass, else 403

    @property
    def rewrites(self) -> bool:
        return self.body is not None


ALLOW = Decision(True)


def deny(reason: str) -> Decision:
    return Decision(False, reason)


Handler = Callable[[Caller, re.Match[str], Request, Reader], Awaitable[Decision]]
_RULES: list[tuple[str, re.Pattern[str], Handler]] = []


def rule(method: str, pattern: str):
    def register(fn: Handler) -> Handler:
        _RULES.append((method, re.compile(f"^{pattern}/?$"), fn))
        return fn

    return register


async def decide(caller: Caller, req: Request, reader: Reader) -> Decision:
    for method, pattern, handler in _RULES:
        if req.method == method and (m := pattern.match(req.path)):
            return await handler(caller, m, req, reader)
    return deny(f"{req.method} {req.path} is not open to a job's run token")


# ---------------------------------------------------------------------------- ownership


def tenant_of_block(name: str | None) -> str | None:
    """The tenant a block belongs to by its name, or None for a platform block."""
    for make in (
        profile_block_name,
        backup_key_block_name,
        identity_block_name,
        backup_identity_block_name,
        stream_block_name,
    ):
        prefix = make("x")[:-1]
        if name and name.startswith(prefix):
            return name[len(prefix) :]
    return None


def own_run(caller: Caller, run: Any) -> bool:
    return isinstance(run, dict) and caller.tag in (run.get("tags") or [])


def own_deployment(caller: Caller, dep: Any) -> bool:
    return isinstance(dep, dict) and caller.tag in (dep.get("tags") or [])


def own_lock(caller: Caller, name: str) -> bool:
    return name in {lock_name(caller.tenant, n) for n in LOCK_NAMES}


def own_limit(caller: Caller, name: str) -> bool:
    return own_lock(caller, name) or name == concurrency_limit_name(caller.tenant)


def own_variable(caller: Caller, var: Any) -> bool:
    return (
        isinstance(var, dict)
        and variable_owner(str(var.get("name", "")), tuple(var.get("tags") or ())) == caller.tenant
    )


def own_queue(caller: Caller, queue: Any) -> bool:
    parsed = parse_queue_name(str((queue or {}).get("name", "")))
    return parsed is not None and parsed[0] == caller.tenant


def readable_block(caller: Caller, doc: Any, with_secrets: bool) -> bool:
    """The tenant's own blocks, with secrets; the platform's only where they hold none."""
    if not isinstance(doc, dict):
        return False
    owner = tenant_of_block(doc.get("name"))
    if owner is not None:
        return owner == caller.tenant
    if not with_secrets:
        return True
    schema = doc.get("block_schema") or {}
    return not (schema.get("fields") or {}).get("secret_fields")


def own_artifact_key(caller: Caller, key: str | None) -> bool:
    if key is None:
        return True
    own = {f"{k}-{caller.tenant}" for k in ARTIFACT_KINDS}
    return key in own or key.removesuffix("-report") in own


def record_denied(caller: Caller, key: str) -> str | None:
    """Why the gate must not seal ``key`` for this job (None: it may)."""
    prefixes = RECORD_WRITERS.get(caller.flow_name, ())
    if not prefixes:
        return f"a {caller.flow_name or 'job'} job writes no platform records"
    if ".." in key or not key.startswith(prefixes):
        return f"a {caller.flow_name} job seals records under {', '.join(prefixes)} only"
    return None


async def own_task_run(caller: Caller, task_run_id: Any, reader: Reader, new_ok: bool) -> bool:
    """A task run of the caller's own flow run (one not recorded yet, where ``new_ok``:
    task runs reach the server as events, after their first logs)."""
    if task_run_id is None:
        return True
    task_run = await reader.get(f"/task_runs/{task_run_id}")
    if task_run is None:
        return new_ok
    return str(task_run.get("flow_run_id")) == caller.run_id


# -------------------------------------------------------------------------------- events


def event_denied(caller: Caller, event: Any) -> str | None:
    """Why a job may not emit ``event``, or None when it may."""
    if not isinstance(event, dict):
        return "an event must be an object"
    name = str(event.get("event", ""))
    resource = event.get("resource") or {}
    rid = str(resource.get("prefect.resource.id", ""))
    related = event.get("related") or []
    if not isinstance(related, list) or not all(isinstance(r, dict) for r in related):
        return "related resources must be a list of objects"
    if name.startswith("prefect.task-run."):
        return _task_run_event_denied(caller, rid, related, event.get("payload") or {})
    if name.startswith("prefect.flow-run."):
        return _flow_run_event_denied(caller, name, rid, related)
    if name.startswith("prefect."):
        return _client_event_denied(caller, name, rid, resource, related)
    allowed = JOB_EVENTS.get(caller.flow_name, ())
    if not any(name == p or (p.endswith(".") and name.startswith(p)) for p in allowed):
        return f"event {name!r} is not one a {caller.flow_name} job emits"
    label = resource.get("setlist.tenant", caller.tenant)
    if rid != f"setlist.tenant.{caller.tenant}" or label != caller.tenant:
        return "a job's events are about its own tenant"
    for r in related:
        denied = _foreign_resource(caller, str(r.get("prefect.resource.id", "")))
        if denied:
            return denied
    return None


def _task_run_event_denied(
    caller: Caller, rid: str, related: list[dict], payload: Any
) -> str | None:
    if not rid.startswith("prefect.task-run."):
        return "a task-run event is about a task run"
    flow_runs = [
        str(r.get("prefect.resource.id", ""))
        for r in related
        if str(r.get("prefect.resource.id", "")).startswith("prefect.flow-run.")
        or r.get("prefect.resource.role") == "flow-run"
    ]
    if flow_runs != [f"prefect.flow-run.{caller.run_id}"]:
        return "a task-run event names the job's own flow run, once"
    task_run = payload.get("task_run") if isinstance(payload, dict) else None
    if isinstance(task_run, dict):
        if "flow_run_id" in task_run and str(task_run["flow_run_id"]) != caller.run_id:
            return "a task run belongs to the job's own flow run"
        if "id" in task_run and f"prefect.task-run.{task_run['id']}" != rid:
            return "a task run's id is its resource's"
    for r in related:
        denied = _foreign_resource(caller, str(r.get("prefect.resource.id", "")))
        if denied:
            return denied
    return None


def _flow_run_event_denied(caller: Caller, name: str, rid: str, related: list[dict]) -> str | None:
    """The engine's own events about its run (``pull-step.executed``…). State events
    (``prefect.flow-run.Completed``…) come only from the server."""
    if rid != f"prefect.flow-run.{caller.run_id}":
        return "a flow-run event is about the job's own flow run"
    suffix = name.removeprefix("prefect.flow-run.")
    if not suffix or not suffix[0].islower():
        return f"event {name!r} is the server's to emit"
    for r in related:
        if denied := _foreign_resource(caller, str(r.get("prefect.resource.id", ""))):
            return denied
    return None


def _client_event_denied(
    caller: Caller, name: str, rid: str, resource: dict, related: list[dict]
) -> str | None:
    """Prefect's client-side notes (an artifact made, a lock taken, a block loaded),
    about the job's own run and what it may touch. Events of automations, pools,
    queues, deployments and workers come only from the server and the platform."""
    kind = name.split(".")[1] if name.count(".") >= 2 else ""
    label = str(resource.get("prefect.resource.name", ""))
    if kind == "artifact":
        ok = rid.startswith("prefect.artifact.")
    elif kind == "concurrency-limit":
        ok = rid.startswith("prefect.concurrency-limit.") and own_limit(caller, label)
    elif kind == "block" and name.endswith(".loaded"):
        ok = rid.startswith("prefect.block-document.") and tenant_of_block(label) in (
            None,
            caller.tenant,
        )
    else:
        return f"event {name!r} is not one a job emits"
    if not ok:
        return f"event {name!r} names something not the job's ({rid} {label!r})"
    for r in related:
        if denied := _foreign_resource(caller, str(r.get("prefect.resource.id", ""))):
            return denied
    return None


def _foreign_resource(caller: Caller, rid: str) -> str | None:
    if rid.startswith("prefect.flow-run.") and rid != f"prefect.flow-run.{caller.run_id}":
        return "an event may name no flow run but the job's own"
    if rid.startswith("setlist.") and not rid.startswith("setlist.actor."):
        parts = rid.split(".")
        if len(parts) < 3 or parts[2] != caller.tenant:
            return f"an event may name no other tenant's resource ({rid})"
    return None


def events_decision(caller: Caller, events: Any) -> Decision:
    if not isinstance(events, list):
        return deny("events come as a list")
    for event in events:
        if reason := event_denied(caller, event):
            return deny(reason)
    return ALLOW


# --------------------------------------------------------------------------------- rules


def _with_tenant_runs(caller: Caller, body: Any) -> Any:
    """``body`` (a filter request) with the caller's tenant tag ANDed into its runs."""
    body = dict(body or {})
    runs = dict(body.get("flow_runs") or {})
    runs["operator"] = "and_"
    tags = dict(runs.get("tags") or {})
    tags["operator"] = "and_"
    tags["all_"] = [*(tags.get("all_") or []), caller.tag]
    tags.pop("is_null_", None)
    runs["tags"] = tags
    body["flow_runs"] = runs
    return body


@rule("GET", "/(admin/version|admin/storage|version|csrf-token|health|ready|hello)")
async def _harmless(caller, m, req, reader):
    return ALLOW


@rule("GET", rf"/flow_runs/(?P<id>{UUID_RE})")
async def _read_run(caller, m, req, reader):
    if m["id"] == caller.run_id:
        return ALLOW
    return Decision(True, check=lambda run: own_run(caller, run))


@rule("POST", rf"/flow_runs/(?P<id>{UUID_RE})/set_state")
async def _set_own_state(caller, m, req, reader):
    if m["id"] != caller.run_id:
        return deny("a job sets the state of its own flow run only")
    return ALLOW


@rule("PATCH", rf"/flow_runs/(?P<id>{UUID_RE})")
async def _update_own_run(caller, m, req, reader):
    if m["id"] != caller.run_id:
        return deny("a job updates its own flow run only")
    fields = set(req.body) if isinstance(req.body, dict) else {"?"}
    if "name" in fields:
        # Its seed-style name only (``run_names``): a job cannot pass for another
        # tenant's run, or another job, in the run list.
        expected = caller.run.get("expected_start_time")
        own = run_name(caller.flow_name, caller.tenant, expected) if expected else None
        if own is None or req.body["name"] != own:
            return deny(f"a job may rename its run to {own!r} only")
        fields.discard("name")
    if fields - RUN_FIELDS:
        return deny(f"a job may not change its run's {', '.join(sorted(fields - RUN_FIELDS))}")
    return ALLOW


@rule("PATCH", rf"/flow_runs/(?P<id>{UUID_RE})/labels")
async def _own_labels(caller, m, req, reader):
    if m["id"] != caller.run_id:
        return deny("a job labels its own flow run only")
    if not isinstance(req.body, dict) or any(
        not str(k).startswith(USAGE_LABEL_PREFIX) for k in req.body
    ):
        return deny(f"a job writes only {USAGE_LABEL_PREFIX}* labels")
    return ALLOW


@rule("POST", "/flow_runs/(filter|count|paginate)")
async def _run_history(caller, m, req, reader):
    return Decision(True, body=_with_tenant_runs(caller, req.body))


@rule("GET", "/flow_run_states")
async def _run_states(caller, m, req, reader):
    run_id = req.query.get("flow_run_id", "")
    if run_id == caller.run_id or own_run(caller, await reader.get(f"/flow_runs/{run_id}")):
        return ALLOW
    return deny("a job reads the states of its own tenant's runs only")


@rule("GET", rf"/flows/(?P<id>{UUID_RE})")
async def _read_flow(caller, m, req, reader):
    return ALLOW  # a flow is a job type's name: the same for every tenant


@rule("GET", rf"/deployments/(?P<id>{UUID_RE})")
async def _read_deployment(caller, m, req, reader):
    return Decision(True, check=lambda dep: own_deployment(caller, dep))


@rule("GET", r"/deployments/name/(?P<flow>[^/]+)/(?P<name>[^/]+)")
async def _read_deployment_by_name(caller, m, req, reader):
    return Decision(True, check=lambda dep: own_deployment(caller, dep))


@rule("POST", "/deployments/(filter|count|paginate)")
async def _list_deployments(caller, m, req, reader):
    return Decision(True, keep=lambda dep: own_deployment(caller, dep))


@rule("POST", rf"/deployments/(?P<id>{UUID_RE})/(?P<verb>pause_deployment|resume_deployment)")
async def _pause_deployment(caller, m, req, reader):
    if caller.flow_name not in RESTORING_JOBS:
        return deny("only a restore pauses or resumes deployments")
    if not own_deployment(caller, await reader.get(f"/deployments/{m['id']}")):
        return deny("a restore pauses or resumes its own tenant's deployments only")
    return ALLOW


@rule("POST", "/task_runs")
async def _create_task_run(caller, m, req, reader):
    if str((req.body or {}).get("flow_run_id")) != caller.run_id:
        return deny("a job creates task runs in its own flow run only")
    return ALLOW


@rule("GET", rf"/task_runs/(?P<id>{UUID_RE})")
async def _read_task_run(caller, m, req, reader):
    return Decision(True, check=lambda tr: str(tr.get("flow_run_id")) == caller.run_id)


@rule("POST", rf"/task_runs/(?P<id>{UUID_RE})/set_state")
async def _set_task_state(caller, m, req, reader):
    if not await own_task_run(caller, m["id"], reader, new_ok=False):
        return deny("a job sets the state of its own task runs only")
    return ALLOW


@rule("POST", "/logs")
async def _write_logs(caller, m, req, reader):
    if not isinstance(req.body, list):
        return deny("logs come as a list")
    task_runs = set()
    for log in req.body:
        if not isinstance(log, dict) or str(log.get("flow_run_id")) != caller.run_id:
            return deny("a job writes logs of its own flow run only")
        if log.get("task_run_id"):
            task_runs.add(str(log["task_run_id"]))
    for task_run_id in task_runs:
        if not await own_task_run(caller, task_run_id, reader, new_ok=True):
            return deny("a job writes logs of its own task runs only")
    return ALLOW


@rule("POST", "/artifacts")
async def _write_artifact(caller, m, req, reader):
    body = req.body if isinstance(req.body, dict) else {}
    if str(body.get("flow_run_id")) != caller.run_id:
        return deny("a job writes artifacts of its own flow run only")
    if not await own_task_run(caller, body.get("task_run_id"), reader, new_ok=True):
        return deny("a job writes artifacts of its own task runs only")
    if not own_artifact_key(caller, body.get("key")):
        return deny(f"artifact key {body.get('key')!r} is not one of its tenant's")
    return ALLOW


@rule("POST", "/artifacts/(filter|count)")
async def _read_artifacts(caller, m, req, reader):
    return Decision(True, body=_with_tenant_runs(caller, req.body))


@rule("POST", "/events")
async def _emit_events(caller, m, req, reader):
    return events_decision(caller, req.body)


@rule("GET", r"/block_types/slug/(?P<slug>[^/]+)/block_documents/name/(?P<name>[^/]+)")
async def _read_block(caller, m, req, reader):
    secrets = req.query.get("include_secrets", "false").lower() == "true"
    owner = tenant_of_block(m["name"])
    if owner is not None and owner != caller.tenant:
        return deny("a job reads its own tenant's blocks only")
    return Decision(True, check=lambda doc: readable_block(caller, doc, secrets))


@rule("GET", rf"/block_documents/(?P<id>{UUID_RE})")
async def _read_block_by_id(caller, m, req, reader):
    secrets = req.query.get("include_secrets", "false").lower() == "true"
    return Decision(True, check=lambda doc: readable_block(caller, doc, secrets))


@rule("POST", "/block_documents")
async def _create_own_block(caller, m, req, reader):
    # A tenant's first backup creates its own key; nothing else is a job's to create.
    name = (req.body or {}).get("name") if isinstance(req.body, dict) else None
    if tenant_of_block(name) != caller.tenant:
        return deny("a job creates no block but its own tenant's")
    return ALLOW


@rule("GET", r"/block_types/slug/(?P<slug>[^/]+)/block_documents")
async def _list_blocks_of_type(caller, m, req, reader):
    if caller.flow_name not in SCANNING_JOBS:
        return deny("only the security scan lists blocks")
    if req.query.get("include_secrets", "false").lower() == "true":
        return deny("a listing of blocks never carries their secrets to a job")
    return Decision(True, keep=lambda doc: readable_block(caller, doc, False))


@rule("GET", r"/block_(types|schemas)/.*")
async def _block_types(caller, m, req, reader):
    return ALLOW  # block types and schemas are code, the same for every tenant


@rule("POST", r"/block_(types|schemas)/filter")
async def _block_type_lists(caller, m, req, reader):
    return ALLOW


@rule("GET", r"/variables/name/(?P<name>[^/]+)")
async def _read_variable(caller, m, req, reader):
    return Decision(True, check=lambda var: own_variable(caller, var))


@rule("POST", "/variables/(filter|count)")
async def _list_variables(caller, m, req, reader):
    if m.group(1) == "count":
        return deny("a job counts no variables")
    return Decision(True, keep=lambda var: own_variable(caller, var))


@rule("POST", "/variables")
async def _create_variable(caller, m, req, reader):
    if caller.flow_name not in RESTORING_JOBS or not own_variable(caller, req.body):
        return deny("a job creates no variable but a restore its tenant's own")
    return ALLOW


@rule("PATCH", r"/variables/name/(?P<name>[^/]+)")
async def _update_variable(caller, m, req, reader):
    existing = await reader.get(f"/variables/name/{m['name']}")
    body = dict(req.body or {})
    after = {
        "name": body.get("name", m["name"]),
        "tags": body.get("tags", (existing or {}).get("tags")),
    }
    if (
        caller.flow_name not in RESTORING_JOBS
        or not own_variable(caller, existing)
        or not own_variable(caller, after)
    ):
        return deny("a job updates no variable but a restore its tenant's own")
    return ALLOW


@rule("GET", r"/v2/concurrency_limits/(?P<name>[^/]+)")
async def _read_limit(caller, m, req, reader):
    if not own_limit(caller, m["name"]):
        return deny("a job reads its own tenant's concurrency limits only")
    return ALLOW


@rule("POST", "/v2/concurrency_limits")
async def _create_lock(caller, m, req, reader):
    body = req.body if isinstance(req.body, dict) else {}
    if not own_lock(caller, str(body.get("name"))) or body.get("limit") != 1:
        return deny("a job creates only its own tenant's locks, each of one slot")
    return ALLOW


@rule("POST", "/v2/concurrency_limits/(increment|increment-with-lease|decrement)")
async def _take_lock(caller, m, req, reader):
    names = (req.body or {}).get("names") if isinstance(req.body, dict) else None
    if not isinstance(names, list) or not names or not all(own_lock(caller, str(n)) for n in names):
        return deny("a job takes its own tenant's locks only")
    return ALLOW


@rule("POST", "/v2/concurrency_limits/decrement-with-lease")
async def _release_lease(caller, m, req, reader):
    return ALLOW  # a lease id is known only to whoever took the lease


@rule("POST", r"/v2/concurrency_limits/leases/(?P<id>[^/]+)/renew")
async def _renew_lease(caller, m, req, reader):
    return ALLOW


@rule("GET", r"/work_pools/(?P<pool>[^/]+)/queues/(?P<name>[^/]+)")
async def _read_queue(caller, m, req, reader):
    if not own_queue(caller, {"name": m["name"]}):
        return deny("a job reads its own tenant's queues only")
    return ALLOW


@rule("POST", r"/work_pools/(?P<pool>[^/]+)/queues/filter")
async def _list_queues(caller, m, req, reader):
    return Decision(True, keep=lambda queue: own_queue(caller, queue))


@rule("PATCH", rf"/work_queues/(?P<id>{UUID_RE})")
async def _pause_queue(caller, m, req, reader):
    if caller.flow_name not in RESTORING_JOBS:
        return deny("only a restore pauses or opens a queue")
    if not isinstance(req.body, dict) or set(req.body) - {"is_paused"}:
        return deny("a restore sets only a queue's paused flag")
    if not own_queue(caller, await reader.get(f"/work_queues/{m['id']}")):
        return deny("a restore touches its own tenant's queues only")
    return ALLOW


@rule("GET", rf"/work_queues/(?P<id>{UUID_RE})")
async def _read_own_queue(caller, m, req, reader):
    # Prefect names the run's queue and pool on every event the run emits.
    if m["id"] == str(caller.run.get("work_queue_id")):
        return ALLOW
    return Decision(True, check=lambda queue: own_queue(caller, queue))


@rule("GET", r"/work_pools/(?P<pool>[^/]+)")
async def _read_pool(caller, m, req, reader):
    if m["pool"] != caller.run.get("work_pool_name") and caller.flow_name not in SCANNING_JOBS:
        return deny("a job reads its own run's work pool only")
    return ALLOW


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
