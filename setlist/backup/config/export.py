"""The platform's configuration, read from the Prefect API and written as one archive.

``export_config`` reads, through the Prefect API, everything that makes up the
platform's setup — work pools with their base job templates, their queues, global
concurrency limits (the tenant quotas), variables, block documents with their block
types and schemas, deployments (schedules, parameters, job variables, limits) and
automations — into a ``Snapshot`` (``read_snapshot``), then writes it with
``setlist.backup.config.archive``. What an object refers to (a block nested in a block,
the type and schemas of a block) is exported with it, so an archive is whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from setlist.backup.config.api import _call, _http_reason, _paged, _q
from setlist.backup.config.archive import build_archive
from setlist.backup.config.entries import (
    MIN_PASSPHRASE,
    AutomationEntry,
    BlockEntry,
    BlockSchemaEntry,
    BlockTypeEntry,
    ConfigBackupError,
    DeploymentEntry,
    LimitEntry,
    PoolEntry,
    QueueEntry,
    ScheduleEntry,
    Snapshot,
    VariableEntry,
)
from setlist.backup.config.secrets import split_secrets


def _strip_trigger_ids(trigger: dict[str, Any]) -> dict[str, Any]:
    trigger = {k: v for k, v in trigger.items() if k != "id"}
    if isinstance(trigger.get("triggers"), list):
        trigger["triggers"] = [_strip_trigger_ids(t) for t in trigger["triggers"]]
    return trigger


def _walk_refs(value: Any) -> Iterable[str]:
    """Block document ids referenced as ``{"$ref": {"block_document_id": …}}``."""
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, dict) and ref.get("block_document_id"):
            yield str(ref["block_document_id"])
        for v in value.values():
            yield from _walk_refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_refs(v)


def _owner_deployment(automation: dict[str, Any]) -> str | None:
    """The deployment whose trigger an automation is: its only actions run that deployment.

    Prefect's API does not say which automations a deployment owns; deployment triggers
    (``prefect deploy``, Setlist's onboarding) are exactly this shape.
    """
    actions = automation.get("actions") or []
    if automation.get("actions_on_trigger") or automation.get("actions_on_resolve"):
        return None
    targets = {
        str(a["deployment_id"])
        for a in actions
        if a.get("type") == "run-deployment"
        and a.get("source") == "selected"
        and a.get("deployment_id")
    }
    if len(targets) == 1 and all(a.get("type") == "run-deployment" for a in actions):
        return targets.pop()
    return None


async def read_snapshot(client: Any, *, include_secrets: bool = False) -> Snapshot:
    """Everything the archive holds, read from the server ``client`` talks to.

    Block documents are read with their secret values so that the export knows which
    secret fields are set; unless ``include_secrets``, the values are dropped here and
    only their paths are kept.
    """
    pools_raw = await _paged(client, "/work_pools/filter")
    queues: list[QueueEntry] = []
    for pool in pools_raw:
        for q in await _paged(client, f"/work_pools/{_q(pool['name'])}/queues/filter"):
            queues.append(
                QueueEntry(
                    id=q["id"],
                    pool=pool["name"],
                    name=q["name"],
                    description=q.get("description"),
                    priority=q["priority"],
                    concurrency_limit=q.get("concurrency_limit"),
                    is_paused=bool(q.get("is_paused")),
                )
            )

    deployments_raw = await _paged(client, "/deployments/filter")
    flow_names: dict[str, str] = {}
    for dep in deployments_raw:
        fid = str(dep["flow_id"])
        if fid not in flow_names:
            flow_names[fid] = (await _call(client, "GET", f"/flows/{fid}"))["name"]
    own_limits = {f"deployment:{d['id']}" for d in deployments_raw}
    limits_raw = [
        lim
        for lim in await _paged(client, "/v2/concurrency_limits/filter")
        if lim["name"] not in own_limits
    ]
    variables_raw = await _paged(client, "/variables/filter")
    automations_raw = await _paged(client, "/automations/filter")

    # Block documents: every named one, plus anonymous ones something refers to.
    docs: dict[str, dict] = {
        str(d["id"]): d
        for d in await _paged(
            client,
            "/block_documents/filter",
            {"include_secrets": True, "block_documents": {"is_anonymous": {"eq_": False}}},
        )
    }
    wanted: set[str] = set()
    for doc in docs.values():
        wanted |= _doc_references(doc)
    for obj in (*pools_raw, *deployments_raw, *automations_raw):
        wanted |= set(_walk_refs(obj))
    for dep in deployments_raw:
        for key in ("storage_document_id", "infrastructure_document_id"):
            if dep.get(key):
                wanted.add(str(dep[key]))
    for automation in automations_raw:
        for action in _all_actions(automation):
            if action.get("block_document_id"):
                wanted.add(str(action["block_document_id"]))
    pending = sorted(wanted - set(docs))
    while pending:
        doc_id = pending.pop()
        doc = await _call(
            client,
            "GET",
            f"/block_documents/{doc_id}",
            params={"include_secrets": "true"},
            missing_ok=True,
        )
        if doc is None or str(doc["id"]) in docs:
            continue
        docs[str(doc["id"])] = doc
        pending += sorted(_doc_references(doc) - set(docs))

    block_types: dict[str, BlockTypeEntry] = {}
    block_schemas: dict[tuple[str, str | None], BlockSchemaEntry] = {}
    blocks: list[BlockEntry] = []
    secrets: dict[str, list[tuple[list[str], Any]]] = {}
    for doc in docs.values():
        await _collect_schema(
            client, doc["block_schema"], doc["block_type"], block_types, block_schemas
        )
        refs = {
            name: ref["block_document"]["id"]
            for name, ref in (doc.get("block_document_references") or {}).items()
        }
        data = {k: v for k, v in (doc.get("data") or {}).items() if k not in refs}
        secret_fields = (doc["block_schema"].get("fields") or {}).get("secret_fields") or []
        masked, found = split_secrets(data, secret_fields, skip=refs)
        blocks.append(
            BlockEntry(
                id=doc["id"],
                name=doc.get("name"),
                is_anonymous=bool(doc.get("is_anonymous")),
                block_type_slug=doc["block_type"]["slug"],
                block_schema_checksum=doc["block_schema"]["checksum"],
                block_schema_version=doc["block_schema"].get("version"),
                data=masked,
                references=refs,
                secret_paths=[path for path, _ in found],
            )
        )
        if found and include_secrets:
            secrets[str(doc["id"])] = found

    snapshot = Snapshot(
        block_types=sorted(block_types.values(), key=lambda t: t.slug),
        block_schemas=sorted(
            block_schemas.values(),
            key=lambda s: (s.block_type_slug, s.checksum, s.version or ""),
        ),
        blocks=sorted(
            blocks, key=lambda b: (b.block_type_slug, b.is_anonymous, b.name or "", str(b.id))
        ),
        work_pools=sorted(
            (
                PoolEntry(
                    id=p["id"],
                    name=p["name"],
                    type=p["type"],
                    description=p.get("description"),
                    base_job_template=p.get("base_job_template") or {},
                    concurrency_limit=p.get("concurrency_limit"),
                    is_paused=bool(p.get("is_paused")),
                    storage_configuration=p.get("storage_configuration"),
                )
                for p in pools_raw
            ),
            key=lambda p: p.name,
        ),
        work_queues=sorted(queues, key=lambda q: (q.pool, q.priority, q.name)),
        concurrency_limits=sorted(
            (
                LimitEntry(
                    id=lim["id"],
                    name=lim["name"],
                    limit=lim["limit"],
                    active=bool(lim.get("active", True)),
                    slot_decay_per_second=lim.get("slot_decay_per_second"),
                )
                for lim in limits_raw
            ),
            key=lambda lim: lim.name,
        ),
        variables=sorted(
            (
                VariableEntry(
                    id=v["id"], name=v["name"], value=v.get("value"), tags=v.get("tags") or []
                )
                for v in variables_raw
            ),
            key=lambda v: v.name,
        ),
        deployments=sorted(
            (_deployment_entry(d, flow_names[str(d["flow_id"])]) for d in deployments_raw),
            key=lambda d: (d.flow_name, d.name),
        ),
        automations=sorted(
            (
                AutomationEntry(
                    id=a["id"],
                    name=a["name"],
                    description=a.get("description") or "",
                    enabled=bool(a.get("enabled", True)),
                    tags=a.get("tags") or [],
                    trigger=_strip_trigger_ids(a["trigger"]),
                    actions=a.get("actions") or [],
                    actions_on_trigger=a.get("actions_on_trigger") or [],
                    actions_on_resolve=a.get("actions_on_resolve") or [],
                    owner_deployment_id=_owner_deployment(a),
                )
                for a in automations_raw
            ),
            key=lambda a: (a.name, str(a.id)),
        ),
        secrets=secrets if include_secrets else None,
    )
    return snapshot


def _doc_references(doc: dict[str, Any]) -> set[str]:
    return {
        str(ref["block_document"]["id"])
        for ref in (doc.get("block_document_references") or {}).values()
    }


def _all_actions(automation: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *(automation.get("actions") or []),
        *(automation.get("actions_on_trigger") or []),
        *(automation.get("actions_on_resolve") or []),
    ]


async def _collect_schema(
    client: Any,
    schema: dict[str, Any],
    block_type: dict[str, Any] | None,
    types: dict[str, BlockTypeEntry],
    schemas: dict[tuple[str, str | None], BlockSchemaEntry],
) -> None:
    """A block schema, its block type and, recursively, the schemas nested in it."""
    block_type = block_type or schema.get("block_type")
    if block_type is None:
        block_type = await _call(client, "GET", f"/block_types/{schema['block_type_id']}")
    slug = block_type["slug"]
    if slug not in types:
        types[slug] = BlockTypeEntry(
            slug=slug,
            name=block_type["name"],
            logo_url=block_type.get("logo_url"),
            documentation_url=block_type.get("documentation_url"),
            description=block_type.get("description"),
            code_example=block_type.get("code_example"),
        )
    key = (schema["checksum"], schema.get("version"))
    if key in schemas:
        return
    schemas[key] = BlockSchemaEntry(
        checksum=schema["checksum"],
        version=schema.get("version"),
        block_type_slug=slug,
        fields=schema.get("fields") or {},
        capabilities=sorted(schema.get("capabilities") or []),
    )
    references = (schema.get("fields") or {}).get("block_schema_references") or {}
    for entries in references.values():
        for ref in entries if isinstance(entries, list) else [entries]:
            checksum = ref.get("block_schema_checksum")
            if not checksum or any(c == checksum for c, _ in schemas):
                continue
            nested = await _call(
                client, "GET", f"/block_schemas/checksum/{_q(checksum)}", missing_ok=True
            )
            if nested is not None:
                await _collect_schema(client, nested, None, types, schemas)


def _deployment_entry(dep: dict[str, Any], flow_name: str) -> DeploymentEntry:
    gcl = dep.get("global_concurrency_limit") or None
    own = gcl is not None and gcl.get("name") == f"deployment:{dep['id']}"
    schedules = sorted(
        (
            ScheduleEntry(
                schedule=s["schedule"],
                active=bool(s.get("active", True)),
                max_scheduled_runs=s.get("max_scheduled_runs"),
                parameters=s.get("parameters") or {},
                slug=s.get("slug"),
            )
            for s in dep.get("schedules") or []
        ),
        key=lambda s: (s.slug or "", json.dumps(s.schedule, sort_keys=True)),
    )
    return DeploymentEntry(
        id=dep["id"],
        flow_id=dep["flow_id"],
        flow_name=flow_name,
        name=dep["name"],
        version=dep.get("version"),
        description=dep.get("description"),
        paused=bool(dep.get("paused")),
        parameters=dep.get("parameters") or {},
        parameter_openapi_schema=dep.get("parameter_openapi_schema"),
        enforce_parameter_schema=bool(dep.get("enforce_parameter_schema", True)),
        tags=dep.get("tags") or [],
        labels={k: v for k, v in (dep.get("labels") or {}).items() if not k.startswith("prefect.")},
        work_pool_name=dep.get("work_pool_name"),
        work_queue_name=dep.get("work_queue_name"),
        path=dep.get("path"),
        entrypoint=dep.get("entrypoint"),
        pull_steps=dep.get("pull_steps"),
        job_variables=dep.get("job_variables") or {},
        storage_document_id=dep.get("storage_document_id"),
        infrastructure_document_id=dep.get("infrastructure_document_id"),
        concurrency_options=dep.get("concurrency_options"),
        schedules=schedules,
        concurrency_limit=gcl["limit"] if own and gcl else None,
        global_concurrency_limit=gcl["name"] if gcl and not own else None,
    )


@dataclass
class ExportReport:
    path: Path
    counts: dict[str, int]
    secrets_included: bool
    needs_secret: list[str]
    size: int


async def export_config(
    client: Any,
    path: Path,
    *,
    include_secrets: bool = False,
    passphrase: str | None = None,
    overwrite: bool = False,
    exported_at: datetime | None = None,
) -> ExportReport:
    """Write the platform's configuration to ``path`` (a ``.tar.gz``, mode 0600)."""
    path = Path(path)
    if include_secrets and (not passphrase or len(passphrase) < MIN_PASSPHRASE):
        raise ConfigBackupError(
            f"--include-secrets needs a passphrase of at least {MIN_PASSPHRASE} characters "
            "(--passphrase, SETLIST_CONFIG_PASSPHRASE, or the prompt)"
        )
    if path.exists() and not overwrite:
        raise ConfigBackupError(f"{path} exists; choose another file or pass --force")
    try:
        snapshot = await read_snapshot(client, include_secrets=include_secrets)
    except (httpx.HTTPStatusError, httpx.TransportError) as exc:
        raise ConfigBackupError(
            f"export failed: {_http_reason(exc, sensitive=True)}; nothing was written"
        ) from None
    body = build_archive(snapshot, passphrase=passphrase, exported_at=exported_at)
    snapshot.secrets = None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(
        path=path,
        counts=snapshot.counts(),
        secrets_included=include_secrets,
        needs_secret=[] if include_secrets else snapshot.blocks_needing_secret(),
        size=len(body),
    )
