"""What a security scan reads about one tenant — and only that tenant.

- Kubernetes objects: rendered by the platform's own code (the tenant's namespace kit,
  the ClusterRoles its bindings reference from ``k8s/base``, and one Job per job type and
  pool kind rendered by prefect-kubernetes with the tenant's deployment job variables);
  or, when a cluster is configured (``SETLIST_KUBE_APPLY``), the live objects of the
  tenant's namespace read through the Kubernetes API. The Jobs are derived from one
  render per job variables and template revision (``setlist.security.render_cache``),
  which is exactly what rendering them anew would give; ``derive=False`` renders each.
- Curated data: the partition files the tenant's curated-table manifest publishes,
  through its tenant-scoped storage handle (another tenant's files can't be named).
- Platform config: the tenant's profile block, its storage config block, its
  deployments, the webhook sources and the tenant's concurrency limit, read from the
  Prefect API without secrets (Secret blocks only for the length of their value).
"""

from __future__ import annotations

import copy
import io
import zlib
from enum import StrEnum
from typing import Any

import pyarrow.parquet as pq
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from blocks.storage import STORAGE_BLOCK_TYPES
from blocks.tenant import TenantProfile
from setlist.core.catalog import load_catalog
from setlist.core.settings import REPO_ROOT, get_settings
from setlist.core.storage import TenantStorage
from setlist.core.tenancy import (
    JobType,
    concurrency_limit_name,
    default_gpus,
    job_variables,
    profile_block_name,
    tenant_namespace,
    tier_for,
)
from setlist.etl.curated import read_manifest
from setlist.k8s.client import load_api_client
from setlist.k8s.templates import PoolKind, load_template
from setlist.k8s.tenant_kit import build_kit
from setlist.security.platform_config import QuotaState, WebhookState
from setlist.security.privacy import PrivacyScan
from setlist.security.render_cache import JOB_RENDERS, JobRenderCache, template_revision

CURATED_TABLE = "curated/events"


class PostureSource(StrEnum):
    """``auto``: the live cluster when one is configured, else the rendered manifests."""

    auto = "auto"
    rendered = "rendered"
    cluster = "cluster"


def resolve_source(source: PostureSource) -> PostureSource:
    if source is PostureSource.auto:
        return PostureSource.cluster if get_settings().kube_apply else PostureSource.rendered
    return source


_parsed: dict[tuple[str, str], Any] = {}


def _parsed_once(key: str, text: str, parse) -> Any:
    """``parse(text)``, parsed again only when the text changes (one file version kept)."""
    for old in [k for k in _parsed if k[0] == key and k[1] != text]:
        del _parsed[old]
    if (key, text) not in _parsed:
        _parsed[(key, text)] = parse(text)
    return _parsed[(key, text)]


def base_cluster_roles() -> dict[str, dict[str, Any]]:
    """The platform's ClusterRoles (``k8s/base/rbac.yaml``), by name; fresh copies."""
    text = (REPO_ROOT / "k8s" / "base" / "rbac.yaml").read_text()

    def parse(text: str) -> dict[str, dict[str, Any]]:
        docs = yaml.safe_load_all(text)
        return {d["metadata"]["name"]: d for d in docs if d and d.get("kind") == "ClusterRole"}

    return copy.deepcopy(_parsed_once("rbac", text, parse))


def catalog_job_types() -> list[JobType]:
    """The catalogued job types, in catalog order (the catalog parsed once per version)."""
    settings = get_settings()
    text = settings.catalog.read_text()
    key = f"catalog:{settings.catalog}:{settings.code_dir}:{settings.work_pool}:"
    key += str(settings.gpu_work_pool)
    return list(_parsed_once(key, text, lambda _: list(load_catalog(settings))))


async def tenant_deployments(client: PrefectClient, tenant_id: str) -> dict[JobType, Any]:
    """The tenant's deployment of each catalogued job type that exists. By name, one
    read each: a tenant's job (a run token) may read its own deployments by name but not
    list flows or deployments (``controlplane.policy``)."""
    out = {}
    for job_type in catalog_job_types():
        try:
            out[job_type] = await client.read_deployment_by_name(f"{job_type.value}/{tenant_id}")
        except ObjectNotFound:
            continue
    return out


def job_cases(profile: TenantProfile) -> list[tuple[JobType, PoolKind]]:
    """One job manifest per catalogued job type and pool kind it can run on."""
    cases = []
    for job_type in catalog_job_types():
        cases.append((job_type, PoolKind.cpu))
        if default_gpus(job_type, profile.quota.gpu):
            cases.append((job_type, PoolKind.gpu))
    return cases


async def rendered_objects(
    client: PrefectClient,
    profile: TenantProfile,
    deployments: dict[JobType, Any],
    *,
    derive: bool = True,
    renders: JobRenderCache | None = None,
) -> list[dict[str, Any]]:
    """The tenant's namespace kit, the ClusterRoles it binds and its rendered Jobs.

    ``derive``: each Job derived from the render cache (``renders``, the process's
    ``JOB_RENDERS`` unless given), else rendered in full through prefect-kubernetes;
    the two give equal objects.
    """
    renders = JOB_RENDERS if renders is None else renders
    tid = profile.tenant_id
    objects = build_kit(profile)
    roles = base_cluster_roles()
    for obj in list(objects):
        ref = obj.get("roleRef") or {}
        if ref.get("kind") == "ClusterRole" and ref.get("name") in roles:
            objects.append(roles[ref["name"]])
    known: dict[PoolKind, set[str]] = {}
    revisions: dict[PoolKind, str | None] = {}
    for job_type, kind in job_cases(profile):
        if kind not in known:
            known[kind] = set(load_template(kind)["variables"]["properties"])
            revisions[kind] = template_revision(kind) if derive else None
        gpu = default_gpus(job_type, profile.quota.gpu) if kind is PoolKind.gpu else 0
        values = job_variables(
            tid,
            job_type,
            profile.default_priority,
            tier_for(job_type, profile.tier_overrides),
            gpu=gpu,
        )
        deployment = deployments.get(job_type)
        # What the worker would apply: the deployment's job variables over the defaults.
        for key, value in ((deployment.job_variables or {}) if deployment else {}).items():
            if key in known[kind] and not (key == "gpu" and kind is PoolKind.cpu):
                values[key] = value
        if kind is PoolKind.cpu:
            values.pop("gpu", None)
        if derive:
            manifest = await renders.render(client, values, kind, revision=revisions[kind])
        else:
            manifest = await renders.render_full(client, values, kind)
        meta = manifest["metadata"]
        meta.pop("generateName", None)
        meta["name"] = f"{job_type.value}-{kind.value}"
        objects.append(manifest)
    return objects


# Namespaced kinds a live scan reads (api version, kind); ClusterRoles come by reference.
LIVE_KINDS = [
    ("v1", "ResourceQuota"),
    ("v1", "LimitRange"),
    ("v1", "ServiceAccount"),
    ("v1", "Pod"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("batch/v1", "Job"),
    ("batch/v1", "CronJob"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "DaemonSet"),
]


def live_objects(tenant_id: str, api_client=None) -> list[dict[str, Any]]:  # pragma: no cover
    """The live objects of the tenant's namespace (kubeconfig or in-cluster credentials).

    Only exercised when a cluster is configured; the scan's tests use rendered manifests.
    Secrets are never read: ``secret`` volumes and ``secretKeyRef`` name them, and that is
    all a check needs.
    """
    from kubernetes.dynamic import DynamicClient

    if api_client is None:
        api_client = load_api_client()
    dyn = DynamicClient(api_client)
    namespace = tenant_namespace(tenant_id)

    def listed(api_version: str, kind: str, **kwargs) -> list[dict[str, Any]]:
        resource = dyn.resources.get(api_version=api_version, kind=kind)
        items = resource.get(**kwargs).to_dict().get("items") or []
        for item in items:  # list items carry no kind/apiVersion
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
        return items

    ns = dyn.resources.get(api_version="v1", kind="Namespace").get(name=namespace).to_dict()
    objects = [ns]
    for api_version, kind in LIVE_KINDS:
        objects += listed(api_version, kind, namespace=namespace)
    rbac = "rbac.authorization.k8s.io/v1"
    cluster_roles = dyn.resources.get(api_version=rbac, kind="ClusterRole")
    for binding in [o for o in objects if o.get("kind") == "RoleBinding"]:
        ref = binding.get("roleRef") or {}
        if ref.get("kind") == "ClusterRole":
            role = cluster_roles.get(name=ref["name"]).to_dict()
            role.setdefault("kind", "ClusterRole")
            objects.append(role)
    return objects


def scan_curated(storage: TenantStorage, sample_rate: float) -> PrivacyScan:
    """Sample every published file of the tenant's curated table for personal data: each
    date's canonical file and the files a stream appended since its last compaction.

    Each file is read with its own schema (a column the ETL should never have let in is
    scanned too); rows are sampled at ``sample_rate`` with a seed from the file's hash,
    so a rescan of the same data samples the same rows.
    """
    result = PrivacyScan(sample_rate=sample_rate)
    manifest = read_manifest(storage)
    for part in (p for date in manifest.dates for p in manifest.files(date)):
        table = pq.read_table(io.BytesIO(storage.get_bytes(part.key)))
        result.scan(table, seed=zlib.crc32(part.sha256.encode()), source=part.key)
    return result


async def _block_data(client: PrefectClient, name: str, slugs: list[str]) -> dict[str, Any] | None:
    for slug in slugs:
        try:
            doc = await client.read_block_document_by_name(
                name=name, block_type_slug=slug, include_secrets=False
            )
        except ObjectNotFound:
            continue
        return dict(doc.data)
    return None


async def platform_config(
    client: PrefectClient, profile: TenantProfile, deployments: dict[JobType, Any]
) -> tuple[dict[str, Any], list[WebhookState], QuotaState]:
    """Plain data to search for secrets, webhook sources, and the tenant's quota state."""
    from prefect.blocks.system import Secret

    tid = profile.tenant_id
    plain: dict[str, Any] = {}
    data = await _block_data(client, profile_block_name(tid), ["setlist-tenant-profile"])
    if data is not None:
        plain[f"block/{profile_block_name(tid)}"] = data
    storage_slugs = [t.get_block_type_slug() for t in STORAGE_BLOCK_TYPES]
    data = await _block_data(client, profile.storage_block, storage_slugs)
    if data is not None:
        plain[f"block/{profile.storage_block}"] = data
    for job_type, dep in deployments.items():
        plain[f"deployment/{job_type.value}/{tid}"] = {
            "parameters": dep.parameters or {},
            "job_variables": dep.job_variables or {},
        }

    webhooks = []
    try:
        docs = await client.read_block_documents_by_type(
            "setlist-webhook-source", include_secrets=False
        )
    except ObjectNotFound:  # the block type was never registered: no sources
        docs = []
    for doc in docs:
        if not doc.name:
            continue
        plain[f"block/{doc.name}"] = dict(doc.data)
        secret_name = str(doc.data.get("secret_block") or "")
        length: int | None = doc.data.get("secret_length")
        if length is None:  # a source saved before lengths were recorded
            try:
                length = len(str((await Secret.aload(secret_name)).get()))
            except (ValueError, ObjectNotFound, PrefectHTTPStatusError):
                length = None  # gone, or not this job's to read: judged as missing
        source = doc.name.removeprefix("setlist-webhook-")
        webhooks.append(WebhookState(source=source, secret_block=secret_name, secret_length=length))

    limit_name = concurrency_limit_name(tid)
    try:
        limit = (await client.read_global_concurrency_limit_by_name(limit_name)).limit
    except ObjectNotFound:
        limit = None
    unbound = sorted(
        f"{job_type.value}/{tid}"
        for job_type, dep in deployments.items()
        if dep.global_concurrency_limit is None or dep.global_concurrency_limit.name != limit_name
    )
    quota = QuotaState(
        concurrent_jobs=profile.quota.concurrent_jobs,
        limit_name=limit_name,
        limit=limit,
        unbound_deployments=unbound,
    )
    return plain, webhooks, quota
