"""Kubernetes posture checks over a tenant namespace's objects.

Every pod spec is held to Pod Security "restricted" and resource limits
(``setlist.security.pod_security``), each violation classified into its check; beside the
pods come default-deny network policies, RBAC that grants wildcards or reads Secrets,
unpinned images and credentials written as literal environment values. The objects are
the rendered manifests or the live ones, and the checks can't tell them apart.
"""

from __future__ import annotations

import re
from typing import Any

from setlist.core.runtokens import RUN_USER
from setlist.security.checks import CHECKS, Category, CheckId, Finding, _Collector
from setlist.security.pod_security import pod_spec_of, restricted_violations
from setlist.security.redaction import looks_like_secret, redact_secret

_VIOLATION_CHECKS: list[tuple[re.Pattern[str], CheckId]] = [
    (re.compile(r": privileged$"), CheckId.privileged),
    (re.compile(r"allowPrivilegeEscalation"), CheckId.privilege_escalation),
    (re.compile(r"runAsNonRoot|runAsUser is 0"), CheckId.run_as_root),
    (re.compile(r"capabilities"), CheckId.capabilities),
    (re.compile(r"seccompProfile"), CheckId.seccomp),
    (re.compile(r"^host(Network|PID|IPC) is true$"), CheckId.host_namespaces),
    (re.compile(r"^volume .* uses "), CheckId.host_volumes),
    (re.compile(r": hostPort "), CheckId.host_ports),
    (re.compile(r"root filesystem is writable"), CheckId.writable_root_fs),
    (re.compile(r"no cpu/memory limits"), CheckId.no_resource_limits),
]


def classify_violation(message: str) -> CheckId:
    """The check a ``pod_security.restricted_violations`` message belongs to."""
    for pattern, check in _VIOLATION_CHECKS:
        if pattern.search(message):
            return check
    raise ValueError(f"pod security violation {message!r} maps to no check; add it")


def resource_name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or "?"
    ns = meta.get("namespace")
    return f"{obj.get('kind', '?')}/{ns}/{name}" if ns else f"{obj.get('kind', '?')}/{name}"


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *(spec.get("initContainers") or []),
        *(spec.get("containers") or []),
        *(spec.get("ephemeralContainers") or []),
    ]


def image_pinned(image: str) -> bool:
    """A digest, or a tag other than ``latest`` (the job templates' own rule)."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


def _is_default_deny(policy: dict[str, Any], direction: str) -> bool:
    """Selects every pod of the namespace and allows nothing in ``direction``."""
    spec = policy.get("spec") or {}
    selector = spec.get("podSelector")
    if selector is None or selector.get("matchLabels") or selector.get("matchExpressions"):
        return False
    types = spec.get("policyTypes") or (["Ingress"] if direction == "Ingress" else [])
    return direction in types and not spec.get(direction.lower())


# Built-in roles a tenant namespace should never bind.
_BUILTIN_WILDCARD_ROLES = {"cluster-admin", "admin", "edit"}
_SECRET_READ_VERBS = {"get", "list", "watch", "*"}


def _rbac(objs: list[dict[str, Any]], namespace: str, out: _Collector) -> None:
    roles = {
        (o["kind"], (o.get("metadata") or {}).get("name")): o
        for o in objs
        if o.get("kind") in ("Role", "ClusterRole")
    }
    bound: list[dict[str, Any]] = [o for o in objs if o.get("kind") == "Role"]
    for binding in (o for o in objs if o.get("kind") in ("RoleBinding", "ClusterRoleBinding")):
        ref = binding.get("roleRef") or {}
        if ref.get("kind") == "ClusterRole" and ref.get("name") in _BUILTIN_WILDCARD_ROLES:
            out.add(
                CheckId.rbac_wildcard,
                resource_name(binding),
                f"binds built-in ClusterRole {ref['name']}",
            )
            continue
        role = roles.get((ref.get("kind"), ref.get("name")))
        if role is not None and role.get("kind") == "ClusterRole":
            bound.append(role)
    seen: set[str] = set()
    for role in bound:
        name = resource_name(role)
        if name in seen:
            continue
        seen.add(name)
        for i, rule in enumerate(role.get("rules") or []):
            wild = [
                key for key in ("apiGroups", "resources", "verbs") if "*" in (rule.get(key) or [])
            ]
            if wild:
                out.add(CheckId.rbac_wildcard, name, f"rule {i}: '*' in {', '.join(wild)}")
            resources = set(rule.get("resources") or [])
            verbs = set(rule.get("verbs") or [])
            if "secrets" in resources and verbs & _SECRET_READ_VERBS:
                out.add(CheckId.rbac_secrets, name, f"rule {i}: {sorted(verbs)} on secrets")


def _env_literals(obj: dict[str, Any], spec: dict[str, Any], out: _Collector) -> None:
    for c in _containers(spec):
        for env in c.get("env") or []:
            if _run_token(env):
                continue  # the job's own run token: scoped to its run, by design
            if "value" in env and looks_like_secret(env.get("name", ""), env.get("value")):
                out.add(
                    CheckId.secret_literal_env,
                    resource_name(obj),
                    f"{c.get('name', '?')}: env {env.get('name')} = "
                    f"{redact_secret(env.get('value'))}",
                )


RUN_TOKEN_ENV = re.compile(rf"^{RUN_USER}:([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+|<issued at submission>)$")


def _run_token(env: dict[str, Any]) -> bool:
    """The job's credential as Setlist's workers write it: a run token (or, in a
    render, its placeholder), not a secret pasted into the manifest."""
    return env.get("name") == "PREFECT_API_AUTH_STRING" and bool(
        RUN_TOKEN_ENV.match(str(env.get("value", "")))
    )


def posture_findings(
    tenant_id: str, namespace: str, objects: list[dict[str, Any]]
) -> tuple[list[Finding], set[CheckId]]:
    """Findings over the tenant namespace's objects (plus the ClusterRoles its bindings
    reference), and the posture checks that were evaluated."""
    out = _Collector(tenant_id)
    ns_obj = next(
        (
            o
            for o in objects
            if o.get("kind") == "Namespace" and (o.get("metadata") or {}).get("name") == namespace
        ),
        None,
    )
    ns_resource = f"Namespace/{namespace}"
    labels = ((ns_obj or {}).get("metadata") or {}).get("labels") or {}
    if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        out.add(
            CheckId.namespace_not_restricted,
            ns_resource,
            "no namespace object"
            if ns_obj is None
            else f"enforce = {labels.get('pod-security.kubernetes.io/enforce', 'unset')}",
        )
    in_ns = [o for o in objects if (o.get("metadata") or {}).get("namespace") == namespace]
    policies = [o for o in in_ns if o.get("kind") == "NetworkPolicy"]
    for direction in ("Ingress", "Egress"):
        if not any(_is_default_deny(p, direction) for p in policies):
            out.add(
                CheckId.no_default_deny,
                ns_resource,
                f"no policy selects every pod and denies all {direction.lower()}",
            )
    if not any(o.get("kind") == "ResourceQuota" for o in in_ns):
        out.add(CheckId.no_resource_quota, ns_resource, "no ResourceQuota in the namespace")
    if not any(o.get("kind") == "LimitRange" for o in in_ns):
        out.add(CheckId.no_limit_range, ns_resource, "no LimitRange in the namespace")
    accounts = {
        (o.get("metadata") or {}).get("name"): o for o in in_ns if o.get("kind") == "ServiceAccount"
    }
    for account in accounts.values():
        if account.get("automountServiceAccountToken") is not False:
            out.add(
                CheckId.token_automount,
                resource_name(account),
                "automountServiceAccountToken is not false",
            )
    for obj in in_ns:
        spec = pod_spec_of(obj)
        if spec is None:
            continue
        res = resource_name(obj)
        for message in restricted_violations(obj):
            out.add(classify_violation(message), res, message)
        account = accounts.get(spec.get("serviceAccountName") or "default") or {}
        automount = spec.get("automountServiceAccountToken")
        if automount is True or (
            automount is None and account.get("automountServiceAccountToken") is not False
        ):
            out.add(CheckId.token_automount, res, "pod template mounts the service account token")
        for c in _containers(spec):
            image = str(c.get("image") or "")
            if not image_pinned(image):
                out.add(
                    CheckId.image_not_pinned, res, f"{c.get('name', '?')}: {image or 'no image'}"
                )
        _env_literals(obj, spec, out)
    _rbac(objects, namespace, out)
    evaluated = {c for c, row in CHECKS.items() if row.category is Category.posture}
    return out.findings(), evaluated
