"""An archive's configuration recreated on a Prefect server.

``import_archive`` recreates the objects of a checked archive in dependency order (block
types and schemas before blocks, pools before queues and deployments, deployments before
the automations that act on them) and maps the ids that objects hold of one another
(automation actions, block references, limits) onto the new server's ids.

An object of the same name on the target server is a clash: the import refuses and
names them all, unless ``replace`` (then they are overwritten in place; objects that
are not in the archive are left alone).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from setlist.backup.config.api import _call, _http_reason, _paged, _q
from setlist.backup.config.archive import Archive, load_archive
from setlist.backup.config.entries import (
    _UUID,
    AutomationEntry,
    BlockEntry,
    BlockSchemaEntry,
    ConfigClash,
    DeploymentEntry,
    ImportFailed,
    Snapshot,
)
from setlist.backup.config.secrets import _set_path
from setlist.core import audit


@dataclass
class ImportReport:
    created: dict[str, list[str]] = field(default_factory=dict)
    replaced: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # kind, name, reason

    def add(self, kind: str, name: str, replaced: bool) -> None:
        (self.replaced if replaced else self.created).setdefault(kind, []).append(name)

    def done(self) -> str:
        parts = [f"{len(v)} {k}" for k, v in self.created.items()]
        parts += [f"{len(v)} {k} replaced" for k, v in self.replaced.items()]
        return "done so far: " + (", ".join(parts) or "nothing")


@dataclass
class _Target:
    """What the target server already holds, by name."""

    pools: dict[str, dict] = field(default_factory=dict)
    queues: dict[tuple[str, str], str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    blocks: dict[tuple[str, str], str] = field(default_factory=dict)
    deployments: dict[str, dict] = field(default_factory=dict)
    automations: dict[str, list[str]] = field(default_factory=dict)


async def _read_target(client: Any, snapshot: Snapshot) -> _Target:
    target = _Target()
    wanted_pools = {p.name for p in snapshot.work_pools}
    for pool in await _paged(client, "/work_pools/filter"):
        target.pools[pool["name"]] = pool
        if pool["name"] in wanted_pools:
            for q in await _paged(client, f"/work_pools/{_q(pool['name'])}/queues/filter"):
                target.queues[(pool["name"], q["name"])] = str(q["id"])
    for lim in await _paged(client, "/v2/concurrency_limits/filter"):
        target.limits[lim["name"]] = str(lim["id"])
    for var in await _paged(client, "/variables/filter"):
        target.variables[var["name"]] = str(var["id"])
    for doc in await _paged(
        client,
        "/block_documents/filter",
        {"include_secrets": False, "block_documents": {"is_anonymous": {"eq_": False}}},
    ):
        target.blocks[(doc["block_type"]["slug"], doc["name"])] = str(doc["id"])
    flows: dict[str, str] = {}
    for dep in await _paged(client, "/deployments/filter"):
        fid = str(dep["flow_id"])
        if fid not in flows:
            flows[fid] = (await _call(client, "GET", f"/flows/{fid}"))["name"]
        target.deployments[f"{flows[fid]}/{dep['name']}"] = dep
    for automation in await _paged(client, "/automations/filter"):
        target.automations.setdefault(automation["name"], []).append(str(automation["id"]))
    return target


def _clashes(snapshot: Snapshot, target: _Target) -> list[str]:
    found = [f"work pool {p.name}" for p in snapshot.work_pools if p.name in target.pools]
    found += [f"queue {q.label}" for q in snapshot.work_queues if (q.pool, q.name) in target.queues]
    found += [
        f"concurrency limit {c.name}"
        for c in snapshot.concurrency_limits
        if c.name in target.limits
    ]
    found += [f"variable {v.name}" for v in snapshot.variables if v.name in target.variables]
    found += [
        f"block {b.label}"
        for b in snapshot.blocks
        if not b.is_anonymous and (b.block_type_slug, b.name) in target.blocks
    ]
    found += [
        f"deployment {d.label}" for d in snapshot.deployments if d.label in target.deployments
    ]
    found += [f"automation {a.name}" for a in snapshot.automations if a.name in target.automations]
    return found


def _remap(value: Any, ids: dict[str, str]) -> Any:
    """``value`` with every old object id (wherever it appears in a string) replaced."""
    if isinstance(value, dict):
        return {k: _remap(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_remap(v, ids) for v in value]
    if isinstance(value, str) and _UUID.search(value):
        return _UUID.sub(lambda m: ids.get(m.group(0), m.group(0)), value)
    return value


def _mentions(value: Any, old_ids: dict[str, str]) -> str | None:
    """The label of the first skipped object whose id ``value`` mentions."""
    text = json.dumps(value)
    for old, label in old_ids.items():
        if old in text:
            return label
    return None


class _Importer:
    def __init__(self, client: Any, archive: Archive, target: _Target, replace: bool):
        self.client = client
        self.snapshot = archive.snapshot
        self.target = target
        self.replace = replace
        self.report = ImportReport()
        self.ids: dict[str, str] = {}  # old id → new id, every kind
        self.skipped_ids: dict[str, str] = {}  # old id → "kind name" of what was skipped
        self.type_ids: dict[str, str] = {}  # block type slug → id
        self.schema_ids: dict[tuple[str, str | None], str] = {}  # (checksum, version) → id
        self.limit_ids: dict[str, str] = {}  # concurrency limit name → id
        self.skipped_pools: set[str] = set()
        self.deployment_ids: dict[str, str] = {}  # old deployment id → new

    async def call(
        self, what: str, method: str, path: str, *, sensitive: bool = False, **kwargs: Any
    ) -> Any:
        try:
            return await _call(self.client, method, path, **kwargs)
        except (httpx.HTTPStatusError, httpx.TransportError) as exc:
            raise ImportFailed(
                f"import stopped at {what}: {_http_reason(exc, sensitive=sensitive)}; "
                f"{self.report.done()}; fix the cause and re-run with --replace to complete it"
            ) from None

    def skip(self, kind: str, name: str, reason: str, old_id: Any = None) -> None:
        self.report.skipped.append((kind, name, reason))
        if old_id is not None:
            self.skipped_ids[str(old_id)] = f"{kind} {name}"

    async def run(self) -> ImportReport:
        await self.block_types()
        await self.blocks()
        await self.pools()
        await self.queues()
        await self.limits()
        await self.variables()
        await self.deployments()
        await self.automations()
        return self.report

    async def block_types(self) -> None:
        for entry in self.snapshot.block_types:
            existing = await self.call(
                f"block type {entry.slug}",
                "GET",
                f"/block_types/slug/{_q(entry.slug)}",
                missing_ok=True,
            )
            if existing is None:
                existing = await self.call(
                    f"block type {entry.slug}",
                    "POST",
                    "/block_types/",
                    json_body=entry.model_dump(mode="json"),
                )
                self.report.add("block types", entry.slug, False)
            self.type_ids[entry.slug] = str(existing["id"])
        # Nested schemas first: a schema that refers to another needs it registered.
        remaining = list(self.snapshot.block_schemas)
        while remaining:
            progressed = False
            for entry in list(remaining):
                refs = _schema_refs(entry)
                if any(r in {s.checksum for s in remaining if s is not entry} for r in refs):
                    continue
                await self.ensure_schema(entry)
                remaining.remove(entry)
                progressed = True
            if not progressed:  # a cycle: let the server sort it out
                for entry in remaining:
                    await self.ensure_schema(entry)
                break

    async def ensure_schema(self, entry: BlockSchemaEntry) -> None:
        what = f"block schema of {entry.block_type_slug}"
        params = {"version": entry.version} if entry.version else None
        existing = await self.call(
            what,
            "GET",
            f"/block_schemas/checksum/{_q(entry.checksum)}",
            params=params,
            missing_ok=True,
        )
        if existing is None:
            existing = await self.call(
                what,
                "POST",
                "/block_schemas/",
                json_body={
                    "fields": entry.fields,
                    "block_type_id": self.type_ids[entry.block_type_slug],
                    "capabilities": entry.capabilities,
                    "version": entry.version,
                },
            )
            self.report.add("block schemas", entry.block_type_slug, False)
        self.schema_ids[(entry.checksum, entry.version)] = str(existing["id"])

    async def blocks(self) -> None:
        secrets = self.snapshot.secrets or {}
        by_id = {str(b.id): b for b in self.snapshot.blocks}
        done: set[str] = set()

        async def place(block: BlockEntry, depth: int = 0) -> None:
            key = str(block.id)
            if key in done or depth > 50:
                return
            done.add(key)
            for child in block.references.values():
                await place(by_id[str(child)], depth + 1)
            if block.secret_paths and key not in secrets:
                self.skip("block", block.label, "needs secret", block.id)
                return
            for child in block.references.values():
                if str(child) in self.skipped_ids:
                    self.skip(
                        "block", block.label, f"needs {self.skipped_ids[str(child)]}", block.id
                    )
                    return
            data = copy.deepcopy(block.data)
            for path, value in secrets.get(key, []):
                _set_path(data, path, value)
            for name, child in block.references.items():
                data[name] = {"$ref": {"block_document_id": self.ids[str(child)]}}
            schema_id = self.schema_ids[(block.block_schema_checksum, block.block_schema_version)]
            what = f"block {block.label}"
            existing = (
                None
                if block.is_anonymous
                else self.target.blocks.get((block.block_type_slug, block.name or ""))
            )
            if existing is not None:
                await self.call(
                    what,
                    "PATCH",
                    f"/block_documents/{existing}",
                    sensitive=True,
                    json_body={
                        "block_schema_id": schema_id,
                        "data": data,
                        "merge_existing_data": False,
                    },
                )
                self.ids[key] = existing
            else:
                created = await self.call(
                    what,
                    "POST",
                    "/block_documents/",
                    sensitive=True,
                    json_body={
                        "name": block.name,
                        "data": data,
                        "block_schema_id": schema_id,
                        "block_type_id": self.type_ids[block.block_type_slug],
                        "is_anonymous": block.is_anonymous,
                    },
                )
                self.ids[key] = str(created["id"])
            del data
            if not block.is_anonymous:
                self.report.add("blocks", block.label, existing is not None)

        for block in self.snapshot.blocks:
            await place(block)

    async def pools(self) -> None:
        for pool in self.snapshot.work_pools:
            needs = _mentions(pool.model_dump(mode="json"), self.skipped_ids)
            if needs:
                self.skipped_pools.add(pool.name)
                self.skip("work pool", pool.name, f"needs {needs}", pool.id)
                continue
            body = {
                "description": pool.description,
                "is_paused": pool.is_paused,
                "concurrency_limit": pool.concurrency_limit,
                **_remap(
                    {
                        "base_job_template": pool.base_job_template,
                        "storage_configuration": pool.storage_configuration,
                    },
                    self.ids,
                ),
            }
            if body["storage_configuration"] is None:
                del body["storage_configuration"]
            what = f"work pool {pool.name}"
            existing = self.target.pools.get(pool.name)
            if existing is not None:
                await self.call(what, "PATCH", f"/work_pools/{_q(pool.name)}", json_body=body)
                self.ids[str(pool.id)] = str(existing["id"])
            else:
                created = await self.call(
                    what,
                    "POST",
                    "/work_pools/",
                    json_body={"name": pool.name, "type": pool.type, **body},
                )
                self.ids[str(pool.id)] = str(created["id"])
            self.report.add("work pools", pool.name, existing is not None)

    async def queues(self) -> None:
        # In priority order: each insertion shifts only queues not placed yet, so every
        # queue ends at its exported priority.
        for queue in sorted(self.snapshot.work_queues, key=lambda q: (q.pool, q.priority)):
            if queue.pool in self.skipped_pools:
                self.skip("queue", queue.label, f"needs work pool {queue.pool}", queue.id)
                continue
            what = f"queue {queue.label}"
            body = {
                "description": queue.description,
                "is_paused": queue.is_paused,
                "concurrency_limit": queue.concurrency_limit,
                "priority": queue.priority,
            }
            existing = self.target.queues.get((queue.pool, queue.name))
            if existing is None and queue.name == "default":
                # A pool created just now comes with its own "default" queue.
                found = await self.call(
                    what,
                    "GET",
                    f"/work_pools/{_q(queue.pool)}/queues/{_q(queue.name)}",
                    missing_ok=True,
                )
                existing = str(found["id"]) if found else None
                clash = False
            else:
                clash = existing is not None
            if existing is not None:
                await self.call(what, "PATCH", f"/work_queues/{existing}", json_body=body)
                self.ids[str(queue.id)] = existing
            else:
                created = await self.call(
                    what,
                    "POST",
                    f"/work_pools/{_q(queue.pool)}/queues",
                    json_body={"name": queue.name, **body},
                )
                self.ids[str(queue.id)] = str(created["id"])
            self.report.add("queues", queue.label, clash)

    async def limits(self) -> None:
        for lim in self.snapshot.concurrency_limits:
            what = f"concurrency limit {lim.name}"
            body = {
                "limit": lim.limit,
                "active": lim.active,
                "slot_decay_per_second": lim.slot_decay_per_second or 0.0,
            }
            existing = self.target.limits.get(lim.name)
            if existing is not None:
                await self.call(
                    what, "PATCH", f"/v2/concurrency_limits/{_q(lim.name)}", json_body=body
                )
                self.ids[str(lim.id)] = existing
            else:
                created = await self.call(
                    what, "POST", "/v2/concurrency_limits/", json_body={"name": lim.name, **body}
                )
                self.ids[str(lim.id)] = str(created["id"])
            self.limit_ids[lim.name] = self.ids[str(lim.id)]
            self.report.add("concurrency limits", lim.name, existing is not None)

    async def variables(self) -> None:
        for var in self.snapshot.variables:
            what = f"variable {var.name}"
            existing = self.target.variables.get(var.name)
            body = {"value": var.value, "tags": var.tags}
            if existing is not None:
                await self.call(what, "PATCH", f"/variables/name/{_q(var.name)}", json_body=body)
                self.ids[str(var.id)] = existing
            else:
                created = await self.call(
                    what, "POST", "/variables/", json_body={"name": var.name, **body}
                )
                self.ids[str(var.id)] = str(created["id"])
            self.report.add("variables", var.name, existing is not None)

    async def deployments(self) -> None:
        for dep in self.snapshot.deployments:
            needs = None
            if dep.work_pool_name in self.skipped_pools:
                needs = f"work pool {dep.work_pool_name}"
            needs = needs or _mentions(dep.model_dump(mode="json"), self.skipped_ids)
            if needs:
                self.skip("deployment", dep.label, f"needs {needs}", dep.id)
                continue
            shared = dep.global_concurrency_limit
            if shared and shared not in self.limit_ids:
                found = await self.call(
                    f"deployment {dep.label}",
                    "GET",
                    f"/v2/concurrency_limits/{_q(shared)}",
                    missing_ok=True,
                )
                if found is None:
                    self.skip("deployment", dep.label, f"needs concurrency limit {shared}", dep.id)
                    continue
                self.limit_ids[shared] = str(found["id"])
            await self.deployment(dep)

    async def deployment(self, dep: DeploymentEntry) -> None:
        what = f"deployment {dep.label}"
        flow = await self.call(what, "POST", "/flows/", json_body={"name": dep.flow_name})
        self.ids[str(dep.flow_id)] = str(flow["id"])
        # Ids are mapped where they refer to objects: block references in parameters,
        # job variables and pull steps, and the storage/infrastructure documents.
        refs = _remap(
            {
                "parameters": dep.parameters,
                "pull_steps": dep.pull_steps,
                "job_variables": dep.job_variables,
                "storage_document_id": dep.storage_document_id and str(dep.storage_document_id),
                "infrastructure_document_id": dep.infrastructure_document_id
                and str(dep.infrastructure_document_id),
            },
            self.ids,
        )
        fields = {
            "version": dep.version,
            "description": dep.description,
            "paused": dep.paused,
            "parameter_openapi_schema": dep.parameter_openapi_schema,
            "enforce_parameter_schema": dep.enforce_parameter_schema,
            "tags": dep.tags,
            "work_pool_name": dep.work_pool_name,
            "work_queue_name": dep.work_queue_name,
            "path": dep.path,
            "entrypoint": dep.entrypoint,
            "concurrency_options": dep.concurrency_options,
            **refs,
        }
        shared_id = (
            self.limit_ids[dep.global_concurrency_limit] if dep.global_concurrency_limit else None
        )
        existing = self.target.deployments.get(dep.label)
        if existing is None:
            body = {
                "name": dep.name,
                "flow_id": str(flow["id"]),
                "labels": dep.labels,
                "schedules": [s.model_dump(mode="json") for s in dep.schedules],
                **fields,
            }
            if dep.concurrency_limit is not None:
                body["concurrency_limit"] = dep.concurrency_limit
            elif shared_id:
                body["global_concurrency_limit_id"] = shared_id
            created = await self.call(what, "POST", "/deployments/", json_body=body)
            new_id = str(created["id"])
        else:
            new_id = str(existing["id"])
            for patch in _limit_patches(existing, dep, shared_id):
                await self.call(what, "PATCH", f"/deployments/{new_id}", json_body=patch)
            await self.call(
                what,
                "PATCH",
                f"/deployments/{new_id}",
                json_body={
                    **fields,
                    "schedules": [
                        s.model_dump(mode="json", exclude={"max_scheduled_runs"})
                        for s in dep.schedules
                    ],
                },
            )
        self.ids[str(dep.id)] = new_id
        self.deployment_ids[str(dep.id)] = new_id
        self.report.add("deployments", dep.label, existing is not None)

    async def automations(self) -> None:
        created: dict[str, AutomationEntry] = {}
        removed: set[str] = set()
        for automation in self.snapshot.automations:
            needs = _mentions(
                [
                    automation.trigger,
                    automation.actions,
                    automation.actions_on_trigger,
                    automation.actions_on_resolve,
                ],
                self.skipped_ids,
            )
            if needs:
                self.skip("automation", automation.name, f"needs {needs}", automation.id)
                continue
            what = f"automation {automation.name}"
            clash = automation.name in self.target.automations
            if clash and automation.name not in removed:
                for old in self.target.automations[automation.name]:
                    await self.call(what, "DELETE", f"/automations/{old}", missing_ok=True)
                removed.add(automation.name)
            body = self._automation_body(automation)
            new = await self.call(what, "POST", "/automations/", json_body=body)
            self.ids[str(automation.id)] = str(new["id"])
            created[str(new["id"])] = automation
            self.report.add("automations", automation.name, clash)
        # Actions may name other automations (pause/resume one): point them at the new ids.
        old_ids = {str(a.id) for a in self.snapshot.automations}
        for new_id, automation in created.items():
            actions = [
                automation.actions,
                automation.actions_on_trigger,
                automation.actions_on_resolve,
            ]
            if any(old in json.dumps(actions) for old in old_ids):
                await self.call(
                    f"automation {automation.name}",
                    "PUT",
                    f"/automations/{new_id}",
                    json_body=self._automation_body(automation, owner=False),
                )

    def _automation_body(self, automation: AutomationEntry, owner: bool = True) -> dict:
        body: dict[str, Any] = {
            "name": automation.name,
            "description": automation.description,
            "enabled": automation.enabled,
            "tags": automation.tags,
            # Ids in the trigger (resources it matches) and actions (deployments, blocks,
            # pools, queues, automations) are mapped to the new server's.
            **_remap(
                {
                    "trigger": automation.trigger,
                    "actions": automation.actions,
                    "actions_on_trigger": automation.actions_on_trigger,
                    "actions_on_resolve": automation.actions_on_resolve,
                },
                self.ids,
            ),
        }
        owner_id = automation.owner_deployment_id and self.deployment_ids.get(
            str(automation.owner_deployment_id)
        )
        if owner and owner_id:
            body["owner_resource"] = f"prefect.deployment.{owner_id}"
        return body


def _schema_refs(entry: BlockSchemaEntry) -> set[str]:
    refs = entry.fields.get("block_schema_references") or {}
    out: set[str] = set()
    for value in refs.values():
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, dict) and ref.get("block_schema_checksum"):
                out.add(ref["block_schema_checksum"])
    return out


def _limit_patches(
    existing: dict[str, Any], dep: DeploymentEntry, shared_id: str | None
) -> list[dict[str, Any]]:
    """PATCHes that move an existing deployment to the archive's limit, never deleting a
    shared limit: Prefect deletes whatever limit is attached when the deployment's
    ``concurrency_limit`` is set to null, so a shared one is detached first."""
    current = existing.get("global_concurrency_limit") or None
    own_name = f"deployment:{existing['id']}"
    patches: list[dict[str, Any]] = []
    if current is not None and current.get("name") == own_name:
        patches.append({"concurrency_limit": dep.concurrency_limit})
        if dep.concurrency_limit is None and shared_id:
            patches.append({"global_concurrency_limit_id": shared_id})
        return patches
    if current is not None:
        patches.append({"global_concurrency_limit_id": None})
    if dep.concurrency_limit is not None:
        patches.append({"concurrency_limit": dep.concurrency_limit})
    elif shared_id:
        patches.append({"global_concurrency_limit_id": shared_id})
    return patches


async def import_archive(
    client: Any,
    archive: Archive,
    *,
    replace: bool = False,
    confirm: Callable[[list[str]], bool] | None = None,
) -> ImportReport:
    """Recreate an archive's objects on the server ``client`` talks to.

    Refuses, before writing anything, when the server already holds objects of the same
    names, unless ``replace``; then ``confirm`` (when given) sees what would be
    overwritten and may still refuse. Blocks whose secrets the archive lacks are skipped
    (and so is whatever needs them), listed in the report as ``needs secret``.
    """
    try:
        target = await _read_target(client, archive.snapshot)
    except (httpx.HTTPStatusError, httpx.TransportError) as exc:
        raise ImportFailed(
            f"could not read what the server holds: {_http_reason(exc, sensitive=False)}; "
            "nothing was written"
        ) from None
    clashes = _clashes(archive.snapshot, target)
    if clashes and not replace:
        shown = "; ".join(clashes[:20]) + (
            f"; and {len(clashes) - 20} more" if len(clashes) > 20 else ""
        )
        raise ConfigClash(
            f"the server already holds {len(clashes)} object(s) of the archive: {shown}. "
            "Import into an empty server, or pass --replace to overwrite them; nothing was "
            "written",
            clashes,
        )
    if clashes and confirm is not None and not confirm(clashes):
        raise ConfigClash(
            f"not confirmed: {len(clashes)} object(s) would have been overwritten; nothing "
            "was written",
            clashes,
        )
    report = await _Importer(client, archive, target, replace).run()
    await audit.emit(
        client,
        "setlist.config.imported",
        None,
        payload={
            "replace": replace,
            "created": {kind: len(names) for kind, names in report.created.items()},
            "replaced": {kind: len(names) for kind, names in report.replaced.items()},
            "skipped": len(report.skipped),
        },
    )
    return report


async def import_config(
    client: Any, source: Path | bytes, *, passphrase: str | None = None, replace: bool = False
) -> ImportReport:
    """``load_archive`` then ``import_archive``: nothing is written unless the whole
    archive checks out."""
    archive = load_archive(source, passphrase)
    return await import_archive(client, archive, replace=replace)
