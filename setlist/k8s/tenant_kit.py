"""The Kubernetes kit of one tenant: where its isolation and quotas become real.

Namespace with Pod Security "restricted" (enforce, audit, warn), ResourceQuota and
LimitRange from the tenant's quotas, NetworkPolicy default-deny with egress only to DNS,
the Prefect API and object storage, the jobs' ServiceAccount (no token), the worker's
RoleBinding (the worker may touch Jobs only in namespaces that carry one), and a Kueue
LocalQueue per tier. Building is pure (``build_kit`` returns dicts, so the kit is tested
and rendered without a cluster); only ``apply_kit`` talks to the Kubernetes API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from blocks.tenant import TenantProfile
from setlist.core.tenancy import (
    TIERS,
    ResourceTier,
    cpu_to_millicpu,
    memory_to_mib,
    tenant_namespace,
)
from setlist.k8s.client import load_api_client

SYSTEM_NAMESPACE = "setlist-system"
WORKER_SERVICE_ACCOUNT = "setlist-worker"
WORKER_CLUSTER_ROLE = "setlist-worker-jobs"
JOB_SERVICE_ACCOUNT = "setlist-job"
PSS_VERSION = "v1.31"
# Object storage is reached over HTTPS outside the cluster; private ranges and the cloud
# metadata endpoint stay closed.
STORAGE_EGRESS_EXCEPT = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"]


def _labels(tenant_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": "setlist", "setlist.io/tenant": tenant_id}


def _meta(name: str, tenant_id: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(tenant_id)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def allowed_tiers(profile: TenantProfile) -> list[ResourceTier]:
    return [t for t in ResourceTier if profile.quota.admits(t)]


def build_kit(profile: TenantProfile) -> list[dict[str, Any]]:
    tid = profile.tenant_id
    ns = tenant_namespace(tid)
    quota = profile.quota
    tiers = allowed_tiers(profile)
    biggest = TIERS[tiers[-1]] if tiers else TIERS[ResourceTier.micro]
    hard: dict[str, Any] = {
        "requests.cpu": f"{cpu_to_millicpu(quota.cpu)}m",
        "limits.cpu": f"{cpu_to_millicpu(quota.cpu)}m",
        "requests.memory": f"{memory_to_mib(quota.memory)}Mi",
        "limits.memory": f"{memory_to_mib(quota.memory)}Mi",
        "requests.nvidia.com/gpu": str(quota.gpu),
        "requests.storage": f"{quota.storage_gb}Gi",
        "pods": str(quota.concurrent_jobs),
        "count/jobs.batch": str(max(50, quota.concurrent_jobs * 10)),
        "services.loadbalancers": "0",
        "services.nodeports": "0",
    }
    pss = {
        f"pod-security.kubernetes.io/{mode}{suffix}": value
        for mode in ("enforce", "audit", "warn")
        for suffix, value in (("", "restricted"), ("-version", PSS_VERSION))
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {**_labels(tid), **pss}},
        },
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": _meta("setlist-quota", tid, ns),
            "spec": {"hard": hard},
        },
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": _meta("setlist-limits", tid, ns),
            "spec": {
                "limits": [
                    {
                        "type": "Container",
                        "default": {
                            "cpu": TIERS[ResourceTier.micro].cpu,
                            "memory": TIERS[ResourceTier.micro].memory,
                        },
                        "defaultRequest": {
                            "cpu": TIERS[ResourceTier.micro].cpu,
                            "memory": TIERS[ResourceTier.micro].memory,
                        },
                        "max": {"cpu": biggest.cpu, "memory": biggest.memory},
                    }
                ]
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("default-deny", tid, ns),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("allow-platform-egress", tid, ns),
            "spec": {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                                },
                                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                            }
                        ],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                    },
                    {
                        "to": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": SYSTEM_NAMESPACE}
                                },
                                "podSelector": {
                                    "matchLabels": {"app.kubernetes.io/name": "prefect-server"}
                                },
                            }
                        ],
                        "ports": [{"protocol": "TCP", "port": 4200}],
                    },
                    {
                        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": STORAGE_EGRESS_EXCEPT}}],
                        "ports": [{"protocol": "TCP", "port": 443}],
                    },
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(JOB_SERVICE_ACCOUNT, tid, ns),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta("setlist-worker", tid, ns),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": WORKER_CLUSTER_ROLE,
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": WORKER_SERVICE_ACCOUNT,
                    "namespace": SYSTEM_NAMESPACE,
                }
            ],
        },
        *(
            {
                "apiVersion": "kueue.x-k8s.io/v1beta1",
                "kind": "LocalQueue",
                "metadata": _meta(f"tier-{tier.value}", tid, ns),
                "spec": {"clusterQueue": f"setlist-{tier.value}"},
            }
            for tier in tiers
        ),
    ]


def kit_yaml(profile: TenantProfile) -> str:
    return yaml.safe_dump_all(build_kit(profile), sort_keys=False)


def write_kit(profile: TenantProfile, directory: Path) -> Path:
    """Write the kit as one multi-document YAML file per tenant; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{profile.tenant_id}.yaml"
    path.write_text(kit_yaml(profile))
    return path


def apply_kit(profile: TenantProfile, api_client=None) -> list[str]:
    """Server-side apply of the kit (idempotent); returns 'Kind/namespace/name' applied.

    Uses the kubeconfig (or the in-cluster service account) unless a client is given.
    """
    from kubernetes.dynamic import DynamicClient

    if api_client is None:
        api_client = load_api_client()
    dyn = DynamicClient(api_client)
    applied = []
    for obj in build_kit(profile):
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        meta = obj["metadata"]
        resource.server_side_apply(
            body=obj,
            name=meta["name"],
            namespace=meta.get("namespace"),
            field_manager="setlist",
            force_conflicts=True,
        )
        applied.append(f"{obj['kind']}/{meta.get('namespace', '')}/{meta['name']}")
    return applied
