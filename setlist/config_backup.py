"""Back up and restore the platform's configuration as one archive.

``export_config`` reads, through the Prefect API, everything that makes up the
platform's setup — work pools with their base job templates, their queues, global
concurrency limits (the tenant quotas), variables, block documents with their block
types and schemas, deployments (schedules, parameters, job variables, limits) and
automations — and writes one deterministic ``.tar.gz``: ``manifest.json`` (format
version, time of export, counts, the SHA-256 of every other member) and one JSON file
per kind of object.

Secret values of blocks (fields Prefect marks secret: ``SecretStr``, ``SecretDict``,
the ``Secret`` block's value) are never written in clear. Without a passphrase they
are left out and their blocks are flagged ``needs secret``; with ``include_secrets``
they go into ``secrets.enc.json``, encrypted with AES-256-GCM under a key derived from
the passphrase with scrypt.

``load_archive`` checks an archive entirely in memory before anything is written:
member names from a fixed list (no paths, so no ``../`` and no absolute names), regular
files only (no links, devices or FIFOs), bounded size and count read through a capped
decompressor (a gzip or tar bomb is refused without being inflated), every SHA-256
matching the manifest, every object well-formed, the secrets decrypting. Then
``import_archive`` recreates the objects in dependency order and maps the ids that
objects hold of one another (automation actions, block references, limits) onto the
new server's ids.

An object of the same name on the target server is a clash: the import refuses and
names them all, unless ``replace`` (then they are overwritten in place; objects that
are not in the archive are left alone).
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import io
import json
import os
import re
import secrets as _random
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from setlist.tenancy import SetlistError

FORMAT = "setlist-config"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
ALLOWED_MEMBERS = frozenset({MANIFEST, SECRETS_MEMBER, *KIND_MEMBERS})

MAX_ARCHIVE_BYTES = 64 * 1024 * 1024  # compressed size of the file
MAX_UNCOMPRESSED_BYTES = 64 * 1024 * 1024  # the whole tar stream, headers included
MAX_MEMBERS = 32
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


# --------------------------------------------------------------------------- entries


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


# --------------------------------------------------------------------------- API helpers


async def _call(
    client: Any,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    params: dict[str, Any] | None = None,
    missing_ok: bool = False,
) -> Any:
    try:
        response = await client.request(method, path, json=json_body, params=params)
    except httpx.HTTPStatusError as exc:
        if missing_ok and exc.response.status_code == 404:
            return None
        raise
    return response.json() if response.content else None


async def _paged(client: Any, path: str, body: dict[str, Any] | None = None) -> list[dict]:
    items: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = await _call(
            client, "POST", path, json_body={**(body or {}), "limit": PAGE, "offset": offset}
        )
        for item in page:
            key = str(item.get("id", len(items)))
            if key not in seen:
                seen.add(key)
                items.append(item)
        if len(page) < PAGE:
            return items
        offset += PAGE


def _q(name: str) -> str:
    return quote(name, safe="")


# --------------------------------------------------------------------------- secrets in data


def _expand(data: Any, spec: list[str], prefix: list[str]) -> Iterable[list[str]]:
    """Concrete paths in ``data`` matching a secret-field spec (``*`` matches any key)."""
    if not spec:
        yield prefix
        return
    if not isinstance(data, dict):
        if data is not None and prefix:
            yield prefix  # a secret dict that is not a dict: the whole value is secret
        return
    head, rest = spec[0], spec[1:]
    keys = sorted(data) if head == "*" else ([head] if head in data else [])
    for key in keys:
        yield from _expand(data[key], rest, [*prefix, key])


def _get_path(data: Any, path: list[str]) -> Any:
    for key in path:
        data = data[key]
    return data


def _set_path(data: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def split_secrets(
    data: dict[str, Any], secret_fields: Iterable[str], skip: Iterable[str] = ()
) -> tuple[dict[str, Any], list[tuple[list[str], Any]]]:
    """``data`` with every set secret value masked, and those values by path."""
    masked = copy.deepcopy(data)
    skipped = set(skip)
    found: dict[tuple[str, ...], Any] = {}
    for spec in dict.fromkeys(secret_fields):
        for path in _expand(masked, spec.split("."), []):
            if path[0] in skipped or tuple(path) in found:
                continue
            value = _get_path(masked, path)
            if value is None or value == {} or value == MASK:
                continue
            found[tuple(path)] = value
    for path in found:
        _set_path(masked, list(path), MASK)
    return masked, [(list(p), v) for p, v in sorted(found.items())]


# --------------------------------------------------------------------------- export


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


# --------------------------------------------------------------------------- archive


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def _derive_key(passphrase: str, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase.encode()
    )


def _aad(blocks_sha256: str) -> bytes:
    # Binds the secrets to the block list they belong to: they can't be moved to another.
    return f"{FORMAT}/{FORMAT_VERSION}/{blocks_sha256}".encode()


def _encrypt(payload: bytes, passphrase: str, aad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = _random.token_bytes(16), _random.token_bytes(12)
    sealed = AESGCM(_derive_key(passphrase, salt)).encrypt(nonce, payload, aad)
    return _dumps(
        {
            "cipher": "AES-256-GCM",
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(sealed).decode(),
        }
    )


def _decrypt(member: bytes, passphrase: str, aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        sealed = json.loads(member)
        if (sealed["cipher"], sealed["kdf"]) != ("AES-256-GCM", "scrypt") or (
            sealed["n"],
            sealed["r"],
            sealed["p"],
        ) != (SCRYPT_N, SCRYPT_R, SCRYPT_P):
            raise ArchiveRejected(
                f"{SECRETS_MEMBER}: unsupported cipher or key derivation; expected "
                f"AES-256-GCM with scrypt n={SCRYPT_N} r={SCRYPT_R} p={SCRYPT_P}"
            )
        salt = base64.b64decode(sealed["salt"], validate=True)
        nonce = base64.b64decode(sealed["nonce"], validate=True)
        ciphertext = base64.b64decode(sealed["ciphertext"], validate=True)
    except ArchiveRejected:
        raise
    except (ValueError, KeyError, TypeError):
        raise ArchiveRejected(f"{SECRETS_MEMBER} is not a sealed secrets file") from None
    if len(salt) != 16 or len(nonce) != 12:
        raise ArchiveRejected(f"{SECRETS_MEMBER}: bad salt or nonce length")
    try:
        return AESGCM(_derive_key(passphrase, salt)).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise WrongPassphrase(
            "wrong passphrase: the archive's secrets do not decrypt with it (or they were "
            "altered); nothing was imported"
        ) from None


def _snapshot_members(snapshot: Snapshot) -> dict[str, bytes]:
    data = snapshot.model_dump(mode="json", exclude={"secrets"})
    members: dict[str, bytes] = {}
    for member, kind in KIND_MEMBERS.items():
        if isinstance(kind, tuple):
            members[member] = _dumps({k: data[k] for k in kind})
        else:
            members[member] = _dumps(data[kind])
    return members


def build_archive(
    snapshot: Snapshot, *, passphrase: str | None = None, exported_at: datetime | None = None
) -> bytes:
    """The archive's bytes: the same snapshot and time give the same bytes (the sealed
    secrets aside, which carry a random salt and nonce)."""
    exported_at = (exported_at or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    members = _snapshot_members(snapshot)
    if snapshot.secrets is not None:
        if not passphrase or len(passphrase) < MIN_PASSPHRASE:
            raise ConfigBackupError(
                f"secrets need a passphrase of at least {MIN_PASSPHRASE} characters "
                "(--passphrase or SETLIST_CONFIG_PASSPHRASE)"
            )
        payload = _dumps({"blocks": snapshot.secrets})
        aad = _aad(hashlib.sha256(members["blocks.json"]).hexdigest())
        members[SECRETS_MEMBER] = _encrypt(payload, passphrase, aad)
        del payload
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "exported_at": exported_at.isoformat().replace("+00:00", "Z"),
        "counts": snapshot.counts(),
        "secrets_included": snapshot.secrets is not None,
        "needs_secret": snapshot.blocks_needing_secret(),
        "members": {
            name: {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
            for name, body in sorted(members.items())
        },
    }
    ordered = [(MANIFEST, _dumps(manifest)), *sorted(members.items())]
    mtime = int(exported_at.timestamp())
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in ordered:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mtime = mtime
            info.mode = 0o600
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(body))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=mtime, compresslevel=9) as gz:
        gz.write(tar_bytes.getvalue())
    return out.getvalue()


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


class _CappedReader:
    """Reads a decompressing stream, refusing it once it yields more than ``cap`` bytes."""

    def __init__(self, raw: Any, cap: int) -> None:
        self._raw = raw
        self._left = cap

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        chunk = self._raw.read(want)
        if len(chunk) > self._left:
            raise ArchiveRejected(
                f"archive inflates beyond {MAX_UNCOMPRESSED_BYTES // (1024 * 1024)} MiB; "
                "refused as a decompression bomb"
            )
        self._left -= len(chunk)
        return chunk


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if member.isdir():
        return "a directory"
    return f"of tar type {member.type!r}"


def _check_name(name: str) -> None:
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or name.startswith("\\"):
        raise ArchiveRejected(f"archive member {name!r} has an absolute path; refused")
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        raise ArchiveRejected(f"archive member {name!r} climbs out with '..'; refused")
    if name not in ALLOWED_MEMBERS:
        raise ArchiveRejected(
            f"archive member {name!r} is not part of a Setlist config archive; expected "
            f"only: {', '.join(sorted(ALLOWED_MEMBERS))}"
        )


def read_members(source: Path | bytes) -> dict[str, bytes]:
    """The archive's members, checked one by one while reading, all in memory."""
    if isinstance(source, bytes):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ArchiveRejected(f"{path} is not a regular file")
        if path.stat().st_size > MAX_ARCHIVE_BYTES:
            raise ArchiveRejected(
                f"{path} is larger than {MAX_ARCHIVE_BYTES // (1024 * 1024)} MiB; refused"
            )
        chunks, total = [], 0
        with path.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                total += len(chunk)
                if total > MAX_ARCHIVE_BYTES:
                    raise ArchiveRejected(f"{path} grew beyond the size limit while being read")
                chunks.append(chunk)
        raw = b"".join(chunks)
    members: dict[str, bytes] = {}
    try:
        stream = _CappedReader(
            gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb"), MAX_UNCOMPRESSED_BYTES
        )
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ArchiveRejected(f"archive has more than {MAX_MEMBERS} members")
                _check_name(member.name)
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise ArchiveRejected(
                        f"archive member {member.name!r} is {_member_kind(member)}; only "
                        "regular files are accepted"
                    )
                if member.name in members:
                    raise ArchiveRejected(f"archive member {member.name!r} appears twice")
                if member.size > MAX_UNCOMPRESSED_BYTES:
                    raise ArchiveRejected(
                        f"archive member {member.name!r} declares {member.size} bytes; at most "
                        f"{MAX_UNCOMPRESSED_BYTES} accepted (a decompression bomb?)"
                    )
                handle = tar.extractfile(member)
                body = handle.read() if handle is not None else b""
                if len(body) != member.size:
                    raise ArchiveRejected(f"archive member {member.name!r} is truncated")
                members[member.name] = body
    except ArchiveRejected:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveRejected(
            f"not a readable .tar.gz config archive ({type(exc).__name__})"
        ) from None
    return members


@dataclass
class Archive:
    manifest: dict[str, Any]
    snapshot: Snapshot

    @property
    def secrets_included(self) -> bool:
        return bool(self.manifest.get("secrets_included"))


def _load_json(name: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ArchiveRejected(f"archive member {name!r} is not valid JSON") from None


def _check_manifest(members: dict[str, bytes]) -> dict[str, Any]:
    if MANIFEST not in members:
        raise ArchiveRejected(f"archive has no {MANIFEST}; not a Setlist config archive")
    manifest = _load_json(MANIFEST, members[MANIFEST])
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArchiveRejected(f"{MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ArchiveRejected(
            f"archive format version {manifest.get('version')!r}; this Setlist reads "
            f"version {FORMAT_VERSION}"
        )
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise ArchiveRejected(f"{MANIFEST} lists no members")
    present = set(members) - {MANIFEST}
    expected = set(KIND_MEMBERS) | ({SECRETS_MEMBER} if manifest.get("secrets_included") else set())
    if set(listed) != expected or present != expected:
        missing = sorted(expected - present) or sorted(expected - set(listed))
        extra = sorted((present | set(listed)) - expected)
        raise ArchiveRejected(
            f"archive members do not match its manifest (missing: {missing or 'none'}, "
            f"unexpected: {extra or 'none'})"
        )
    for name in sorted(expected):
        entry = listed[name]
        digest = hashlib.sha256(members[name]).hexdigest()
        if not isinstance(entry, dict) or entry.get("sha256") != digest:
            raise ArchiveRejected(
                f"archive member {name!r} does not match the SHA-256 in {MANIFEST}: it was "
                "altered or damaged"
            )
    return manifest


def _parse_snapshot(members: dict[str, bytes]) -> Snapshot:
    data: dict[str, Any] = {}
    for member, kind in KIND_MEMBERS.items():
        value = _load_json(member, members[member])
        if isinstance(kind, tuple):
            if not isinstance(value, dict):
                raise ArchiveRejected(f"{member} is not a JSON object")
            for k in kind:
                data[k] = value.get(k, [])
        else:
            data[kind] = value
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArchiveRejected(
            f"archive holds a malformed object at {where}: {first['msg']}"
        ) from None


def _parse_secrets(plain: bytes, snapshot: Snapshot) -> dict[str, list[tuple[list[str], Any]]]:
    try:
        blocks = json.loads(plain)["blocks"]
        secrets = {
            str(UUID(k)): [(list(map(str, path)), value) for path, value in v]
            for k, v in blocks.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ArchiveRejected(f"{SECRETS_MEMBER} does not hold block secrets") from None
    known = {str(b.id): b for b in snapshot.blocks}
    for block_id, values in secrets.items():
        block = known.get(block_id)
        if block is None or sorted(p for p, _ in values) != sorted(block.secret_paths):
            raise ArchiveRejected(f"{SECRETS_MEMBER} holds secrets of a block not in the archive")
    return secrets


def _check_consistency(snapshot: Snapshot) -> None:
    block_ids = {str(b.id) for b in snapshot.blocks}
    for block in snapshot.blocks:
        for name, ref in block.references.items():
            if str(ref) not in block_ids:
                raise ArchiveRejected(
                    f"block {block.label} refers to block {ref} in {name!r}, which is not in "
                    "the archive"
                )
    pools = {p.name for p in snapshot.work_pools}
    for queue in snapshot.work_queues:
        if queue.pool not in pools:
            raise ArchiveRejected(f"queue {queue.label} belongs to no pool in the archive")
    types = {t.slug for t in snapshot.block_types}
    schemas = {(s.checksum, s.version) for s in snapshot.block_schemas}
    for block in snapshot.blocks:
        if block.block_type_slug not in types or (
            (block.block_schema_checksum, block.block_schema_version) not in schemas
        ):
            raise ArchiveRejected(f"block {block.label} has no block type or schema in the archive")
    for kind, names in (
        ("work pool", [p.name for p in snapshot.work_pools]),
        ("queue", [q.label for q in snapshot.work_queues]),
        ("concurrency limit", [c.name for c in snapshot.concurrency_limits]),
        ("variable", [v.name for v in snapshot.variables]),
        ("block", [b.label for b in snapshot.blocks if not b.is_anonymous]),
        ("deployment", [d.label for d in snapshot.deployments]),
    ):
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ArchiveRejected(f"archive holds {kind} {dupes[0]!r} twice")


def load_archive(source: Path | bytes, passphrase: str | None = None) -> Archive:
    """Read and check an archive completely, in memory; nothing touches a server.

    Raises ``ArchiveRejected`` for anything unsafe or damaged, ``PassphraseRequired``
    when it holds secrets and no passphrase was given, ``WrongPassphrase``.
    """
    members = read_members(source)
    manifest = _check_manifest(members)
    snapshot = _parse_snapshot(members)
    _check_consistency(snapshot)
    if manifest.get("secrets_included"):
        if not passphrase:
            raise PassphraseRequired(
                "this archive holds encrypted secrets: give its passphrase "
                "(--passphrase or SETLIST_CONFIG_PASSPHRASE)"
            )
        aad = _aad(hashlib.sha256(members["blocks.json"]).hexdigest())
        snapshot.secrets = _parse_secrets(
            _decrypt(members[SECRETS_MEMBER], passphrase, aad), snapshot
        )
    return Archive(manifest=manifest, snapshot=snapshot)


# --------------------------------------------------------------------------- import


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


def _http_reason(exc: Exception, *, sensitive: bool) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        reason = f"the server answered {exc.response.status_code}"
        if not sensitive:
            try:
                detail = exc.response.json().get("detail")
            except (ValueError, AttributeError):
                detail = None
            if detail:
                reason += f": {str(detail)[:300]}"
        return reason
    return f"the server could not be reached ({type(exc).__name__})"


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


async def import_archive(client: Any, archive: Archive, *, replace: bool = False) -> ImportReport:
    """Recreate an archive's objects on the server ``client`` talks to.

    Refuses, before writing anything, when the server already holds objects of the same
    names, unless ``replace``. Blocks whose secrets the archive lacks are skipped (and so
    is whatever needs them), listed in the report as ``needs secret``.
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
    return await _Importer(client, archive, target, replace).run()


async def import_config(
    client: Any, source: Path | bytes, *, passphrase: str | None = None, replace: bool = False
) -> ImportReport:
    """``load_archive`` then ``import_archive``: nothing is written unless the whole
    archive checks out."""
    archive = load_archive(source, passphrase)
    return await import_archive(client, archive, replace=replace)
