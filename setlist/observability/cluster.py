"""Is the cluster ready for Setlist? ``setlist cluster check`` (``make check-cluster``).

The Prefect side is ``health.run_checks``: the server and its database, every pool with a
worker online, no held tenant queue, the blocks and the object store. With a Kubernetes
context (one named with ``--kube-context``, the in-cluster service account, or the
kubeconfig's current context) one check per part of the cluster follows:

- ``k8s:api``: the API answers (its version);
- ``k8s:kinds`` and ``k8s:crds:<group/version>``: every kind the manifests use is served,
  Kubernetes' own and those of CRDs such as Kueue's;
- ``k8s:namespaces``, ``k8s:priority-classes``, ``k8s:rbac``, ``k8s:kueue``,
  ``k8s:workloads`` (each Deployment with a replica available), ``k8s:config``: the
  objects of ``k8s/base``, read from its manifests, so the checks follow what is deployed;
- ``k8s:tenant-kits``: every tenant's namespace kit (``k8s.tenant_kit.build_kit``).

Objects are listed, one call per kind (namespaced base objects in their namespace, kit
objects by their tenant label), never one call per object or per tenant. Without any
context the Kubernetes checks are one skipped line saying why, unless the platform is
configured for a cluster (``SETLIST_KUBE_APPLY``, ``SETLIST_KUBERNETES_POOLS``), when
that is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from setlist.core.settings import KUBERNETES_POOLS, REPO_ROOT, get_settings
from setlist.k8s.client import kubeconfig_path, load_api_client
from setlist.observability.health import Check, run_checks

BASE = REPO_ROOT / "k8s" / "base"
TIMEOUT = 10  # seconds per Kubernetes API call
TENANT_LABEL = "setlist.io/tenant"

# check name → the kinds of k8s/base it covers; Kueue's group is its own check, and the
# kinds not named here fall to ``config``.
CATEGORIES = {
    "namespaces": {"Namespace"},
    "priority-classes": {"PriorityClass"},
    "rbac": {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"},
    "kueue": set(),
    "workloads": {"Deployment", "StatefulSet"},
    "config": set(),
}
KUEUE_GROUP = "kueue.x-k8s.io"


def base_objects(directory: Path = BASE) -> list[dict[str, Any]]:
    """The objects of the files a kustomization lists, as written (the base's
    kustomization only adds labels)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    found = []
    for name in kustomization.get("resources") or []:
        path = directory / name
        if path.is_file():
            found += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind")]
    return found


def _category(obj: dict[str, Any]) -> str:
    if obj["apiVersion"].split("/")[0] == KUEUE_GROUP:
        return "kueue"
    return next((name for name, kinds in CATEGORIES.items() if obj["kind"] in kinds), "config")


def _builtin(api_version: str) -> bool:
    """Served by Kubernetes itself (core, apps, batch, *.k8s.io), not by a CRD."""
    group = api_version.rpartition("/")[0]
    return "." not in group or (group.endswith(".k8s.io") and not group.endswith(".x-k8s.io"))


def _ref(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj['kind']}/{where}{meta['name']}"


def _listed(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


def _why(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    detail = getattr(exc, "reason", None) or str(exc).splitlines()[0][:160]
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {detail}"


def no_context_reason(context: str | None) -> str | None:
    """None when a Kubernetes API is configured for this process, else why it isn't."""
    if context or os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    paths = [Path(p).expanduser() for p in kubeconfig_path().split(os.pathsep) if p]
    if not any(p.is_file() for p in paths):
        shown = os.pathsep.join(str(p) for p in paths)
        return f"no kube context: not in a cluster and no kubeconfig at {shown}"
    from kubernetes.config import ConfigException

    try:
        load_api_client()
    except ConfigException as exc:
        return f"no kube context: {str(exc).splitlines()[0][:160]}"
    return None


class _Inventory:
    """What the cluster holds of some kinds, listed once per (kind, namespace)."""

    def __init__(self, api_client):
        from kubernetes.dynamic import DynamicClient

        # A discovery of its own: the client's default cache, shared in /tmp between
        # runs, could still list a CRD removed since.
        self._cache = tempfile.TemporaryDirectory(prefix="setlist-discovery-")
        cache_file = os.path.join(self._cache.name, "discovery.json")
        self.dyn = DynamicClient(api_client, cache_file=cache_file)
        self._resources: dict[tuple[str, str], Any] = {}
        self._lists: dict[tuple, dict[tuple[str | None, str], dict]] = {}

    def resource(self, api_version: str, kind: str):
        """The API resource of a kind, or None when the API does not serve it."""
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        key = (api_version, kind)
        if key not in self._resources:
            try:
                self._resources[key] = self.dyn.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                self._resources[key] = None
        return self._resources[key]

    def listing(self, api_version: str, kind: str, namespace: str | None, selector: str = ""):
        """(namespace, name) → object of a kind: in one namespace, or everywhere."""
        key = (api_version, kind, namespace, selector)
        if key not in self._lists:
            resource = self.resource(api_version, kind)
            ns = namespace if resource.namespaced else None
            response = resource.get(
                namespace=ns,
                label_selector=selector or None,
                serialize=False,  # plain JSON: the items are read as the manifests are
                _request_timeout=TIMEOUT,
            )
            items = json.loads(response.data)["items"] or []
            self._lists[key] = {
                (i["metadata"].get("namespace"), i["metadata"]["name"]): i for i in items
            }
        return self._lists[key]

    def close(self) -> None:
        self._cache.cleanup()

    def find(self, obj: dict[str, Any], selector: str = "") -> dict | None:
        meta = obj["metadata"]
        where = None if selector else meta.get("namespace")
        found = self.listing(obj["apiVersion"], obj["kind"], where, selector)
        resource = self.resource(obj["apiVersion"], obj["kind"])
        return found.get((meta.get("namespace") if resource.namespaced else None, meta["name"]))


def _problem(obj: dict[str, Any], live: dict[str, Any] | None) -> str | None:
    """What is wrong with the live copy of a manifest's object, or None."""
    if live is None:
        return f"{_ref(obj)} missing"
    if obj["kind"] == "PriorityClass" and live.get("value") != obj.get("value"):
        return f"{_ref(obj)} has value {live.get('value')}, not {obj.get('value')}"
    if obj["kind"] in ("Deployment", "StatefulSet"):
        status = live.get("status") or {}
        available = status.get("availableReplicas") or status.get("readyReplicas") or 0
        if not available:
            wanted = (live.get("spec") or {}).get("replicas", 1)
            return f"{_ref(obj)}: 0 of {wanted} replicas available"
    return None


def _kind_checks(inv: _Inventory, objects: list[dict[str, Any]]) -> list[Check]:
    by_version: dict[str, set[str]] = defaultdict(set)
    for obj in objects:
        by_version[obj["apiVersion"]].add(obj["kind"])
    builtin_missing, builtin_n, checks = [], 0, []
    for version in sorted(by_version):
        kinds = sorted(by_version[version])
        missing = [k for k in kinds if inv.resource(version, k) is None]
        if _builtin(version):
            builtin_n += len(kinds)
            builtin_missing += [f"{version} {k}" for k in missing]
            continue
        name = f"k8s:crds:{version}"
        if missing:
            why = f"not served: {', '.join(missing)} (are its CRDs installed?)"
            checks.append(Check(name, False, why))
        else:
            checks.append(Check(name, True, f"serves {', '.join(kinds)}"))
    if builtin_missing:
        kinds_check = Check("k8s:kinds", False, f"not served: {_listed(builtin_missing)}")
    else:
        kinds_check = Check("k8s:kinds", True, f"all {builtin_n} Kubernetes kinds served")
    return [kinds_check, *checks]


def _object_checks(inv: _Inventory, objects: list[dict[str, Any]]) -> list[Check]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for obj in objects:
        grouped[_category(obj)].append(obj)
    checks = []
    for category in CATEGORIES:
        mine = grouped.get(category)
        if not mine:
            continue
        name = f"k8s:{category}"
        unserved = sorted(
            {
                f"{o['apiVersion']} {o['kind']}"
                for o in mine
                if not inv.resource(o["apiVersion"], o["kind"])
            }
        )
        if unserved:
            why = f"skipped: not served: {', '.join(unserved)}"
            checks.append(Check(name, False, why, skipped=True))
            continue
        problems = [p for o in mine if (p := _problem(o, inv.find(o)))]
        if problems:
            checks.append(Check(name, False, _listed(problems, 5)))
        else:
            present = [o["metadata"]["name"] for o in mine]
            checks.append(Check(name, True, f"{len(mine)} present: {_listed(present)}"))
    return checks


def _kit_check(inv: _Inventory, kits: dict[str, list[dict[str, Any]]]) -> Check:
    name = "k8s:tenant-kits"
    if not kits:
        return Check(name, True, "no tenants yet")
    unserved = sorted(
        {
            f"{o['apiVersion']} {o['kind']}"
            for kit in kits.values()
            for o in kit
            if not inv.resource(o["apiVersion"], o["kind"])
        }
    )
    if unserved:
        return Check(name, False, f"not served: {', '.join(unserved)}")
    incomplete = []
    for tenant, kit in sorted(kits.items()):
        missing = [_ref(o) for o in kit if inv.find(o, TENANT_LABEL) is None]
        if missing:
            incomplete.append(f"{tenant} lacks {_listed(missing, 3)}")
    if incomplete:
        fix = "; apply with: setlist tenant kit ID | kubectl apply -f -"
        return Check(
            name,
            False,
            f"{len(incomplete)} of {len(kits)} incomplete: {_listed(incomplete, 3)}{fix}",
        )
    return Check(name, True, f"{len(kits)} tenant kit(s) complete")


def kubernetes_checks(
    api_client, objects: list[dict[str, Any]], kits: dict[str, list[dict[str, Any]]] | None
) -> list[Check]:
    """The cluster's checks (blocking calls); ``kits`` None when tenants can't be read."""
    from kubernetes import client as kube_client

    host = api_client.configuration.host
    try:
        version = kube_client.VersionApi(api_client).get_code(_request_timeout=TIMEOUT)
    except Exception as exc:  # any failure to reach the API is the finding
        from urllib3.exceptions import HTTPError

        what = "unreachable" if isinstance(exc, HTTPError) else "gave no version"
        why = "skipped: the Kubernetes API is unreachable"
        rest = ["k8s:kinds", *(f"k8s:{c}" for c in CATEGORIES), "k8s:tenant-kits"]
        return [
            Check("k8s:api", False, f"Kubernetes API at {host} {what}: {_why(exc)}"),
            *(Check(n, False, why, skipped=True) for n in rest),
        ]
    checks = [Check("k8s:api", True, f"Kubernetes {version.git_version} at {host}")]
    every = objects + [o for kit in (kits or {}).values() for o in kit]
    inv = None
    try:
        inv = _Inventory(api_client)
        checks += _kind_checks(inv, every)
        checks += _object_checks(inv, objects)
        if kits is None:
            why = "skipped: the tenants could not be read from the Prefect API"
            checks.append(Check("k8s:tenant-kits", False, why, skipped=True))
        else:
            checks.append(_kit_check(inv, kits))
    except Exception as exc:  # a listing refused (RBAC) or failed: name it, stop there
        checks.append(Check("k8s:read", False, f"reading the cluster failed: {_why(exc)}"))
    finally:
        if inv is not None:
            inv.close()
    return checks


async def _tenant_kits(api_url: str) -> dict[str, list[dict[str, Any]]]:
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    from setlist.core.credentials import client_settings
    from setlist.k8s.tenant_kit import build_kit
    from setlist.tenants.onboarding import list_profiles

    with temporary_settings(updates=client_settings(api_url)):
        async with get_client() as client:
            profiles = await list_profiles(client)
    return {p.tenant_id: build_kit(p) for p in profiles}


async def check_cluster(
    api_url: str,
    *,
    kube_context: str | None = None,
    pools: list[str] | None = None,
    manifests: Path = BASE,
) -> list[Check]:
    """The local stack's checks, then the cluster's (or one line saying why not)."""
    settings = get_settings()
    reason = no_context_reason(kube_context)
    if pools is None:
        pools = settings.pools
        if reason is None:  # a cluster is in play: its pools too
            pools = list(dict.fromkeys([*pools, *KUBERNETES_POOLS]))
    # health's own Kubernetes line is replaced by the finer ones below
    checks = [c for c in await run_checks(api_url, pools=pools) if c.name != "kubernetes"]
    if reason is not None:
        if settings.kube_apply or settings.kubernetes_pools:
            why = f"{reason}, yet SETLIST_KUBE_APPLY or SETLIST_KUBERNETES_POOLS is set"
            return [*checks, Check("k8s", False, why)]
        why = f"skipped: {reason} (give --kube-context or set KUBECONFIG)"
        return [*checks, Check("k8s", True, why, skipped=True)]
    from kubernetes.config import ConfigException

    try:
        api_client = load_api_client(kube_context)
    except ConfigException as exc:
        which = repr(kube_context) if kube_context else "(in-cluster or current)"
        return [*checks, Check("k8s:api", False, f"kube context {which}: {exc}")]
    kits = None
    if all(c.ok for c in checks if c.name in ("server", "database")):
        try:
            kits = await _tenant_kits(api_url)
        except Exception:  # the tenants' line says it could not be checked
            kits = None
    with api_client:
        return checks + await asyncio.to_thread(
            kubernetes_checks, api_client, base_objects(manifests), kits
        )
