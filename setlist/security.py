"""Security and compliance checks of one tenant: Kubernetes posture, data privacy, config.

Pure: every check takes what was already read (manifests as dicts, Arrow tables, block
data) and returns findings, so the same rules run on the manifests the platform renders,
on live objects read from a cluster and on hand-made fixtures. Reading those inputs is
the flow's business (``flows/security_scan.py``).

``CHECKS`` is the one table of the scan: per check id its title, category, severity,
remediation and the controls it maps to in PCI DSS v4.0, SOX ITGC, GDPR, HIPAA (45 CFR
§164) and ISO/IEC 27001:2022 Annex A. A finding carries its check's controls; scores are
the share of checks passed, weighted by severity, overall and per framework.

Evidence never holds a secret or a personal-data value: secrets are reduced to their
length, personal data to a masked shape (an e-mail's first letter and top-level domain,
the last digits of a number), always with the column and count where it was found.

``sarif_log`` writes a scan's findings as a SARIF 2.1.0 log: a rule per check (its
controls and ``security-severity`` in the rule's properties), a result per finding
(the finding's id as its partial fingerprint), evidence scrubbed once more on the way out.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from setlist.pod_security import pod_spec_of, restricted_violations


class Severity(StrEnum):
    critical = "critical"
    high = "high"
    medium = "medium"
    low = "low"

    @property
    def weight(self) -> int:
        return SEVERITY_WEIGHT[self]


SEVERITY_WEIGHT = {Severity.critical: 10, Severity.high: 5, Severity.medium: 3, Severity.low: 1}


class Category(StrEnum):
    posture = "posture"
    privacy = "privacy"
    config = "config"


class Framework(StrEnum):
    pci_dss = "PCI DSS"
    sox = "SOX"
    gdpr = "GDPR"
    hipaa = "HIPAA"
    iso27001 = "ISO 27001"


class CheckId(StrEnum):
    """Stable check ids: never renumber, only add."""

    privileged = "K8S-001"
    privilege_escalation = "K8S-002"
    run_as_root = "K8S-003"
    capabilities = "K8S-004"
    seccomp = "K8S-005"
    host_namespaces = "K8S-006"
    host_volumes = "K8S-007"
    host_ports = "K8S-008"
    writable_root_fs = "K8S-009"
    no_default_deny = "K8S-010"
    no_resource_quota = "K8S-011"
    no_limit_range = "K8S-012"
    token_automount = "K8S-013"
    rbac_wildcard = "K8S-014"
    rbac_secrets = "K8S-015"
    image_not_pinned = "K8S-016"
    secret_literal_env = "K8S-017"
    no_resource_limits = "K8S-018"
    namespace_not_restricted = "K8S-019"
    pii_email = "PII-001"
    pii_phone = "PII-002"
    pii_card = "PII-003"
    pii_iban = "PII-004"
    plaintext_secret = "CFG-001"
    webhook_unsigned = "CFG-002"
    no_quota = "CFG-003"


@dataclass(frozen=True)
class Check:
    title: str
    category: Category
    severity: Severity
    remediation: str
    controls: dict[Framework, str]


def _controls(pci: str, sox: str, gdpr: str, hipaa: str, iso: str) -> dict[Framework, str]:
    return {
        Framework.pci_dss: pci,
        Framework.sox: sox,
        Framework.gdpr: gdpr,
        Framework.hipaa: hipaa,
        Framework.iso27001: iso,
    }


# SOX has no numbered catalogue of its own; ITGC domains as auditors name them.
_SOX_ACCESS = "ITGC Access to programs and data: privileged access"
_SOX_CONFIG = "ITGC Program changes: configuration baseline"
_SOX_OPS = "ITGC Computer operations: capacity and job processing"
_SOX_DATA = "ITGC Access to programs and data: data access"
_HARDENING = _controls(
    "2.2.1 configuration standards; 2.2.5 insecure services",
    _SOX_CONFIG,
    "Art. 32(1)(b) security of processing",
    "§164.312(a)(1) access control",
    "A.8.9 configuration management",
)

CHECKS: dict[CheckId, Check] = {
    CheckId.privileged: Check(
        "privileged container",
        Category.posture,
        Severity.critical,
        "set securityContext.privileged: false (or remove it) on every container",
        _controls(
            "2.2.1 configuration standards; 7.2.2 least privilege",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(a)(1) access control",
            "A.8.2 privileged access rights",
        ),
    ),
    CheckId.privilege_escalation: Check(
        "privilege escalation allowed",
        Category.posture,
        Severity.high,
        "set securityContext.allowPrivilegeEscalation: false on every container",
        _controls(
            "2.2.1 configuration standards; 7.2.2 least privilege",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(a)(1) access control",
            "A.8.2 privileged access rights",
        ),
    ),
    CheckId.run_as_root: Check(
        "container may run as root",
        Category.posture,
        Severity.high,
        "set runAsNonRoot: true and a non-zero runAsUser on the pod or container",
        _controls(
            "2.2.1 configuration standards; 7.2.2 least privilege",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(a)(1) access control",
            "A.8.2 privileged access rights",
        ),
    ),
    CheckId.capabilities: Check(
        "Linux capabilities not dropped",
        Category.posture,
        Severity.high,
        "capabilities: drop [ALL]; add nothing but NET_BIND_SERVICE",
        _HARDENING,
    ),
    CheckId.seccomp: Check(
        "no seccomp profile",
        Category.posture,
        Severity.medium,
        "seccompProfile.type: RuntimeDefault on the pod (or Localhost)",
        _HARDENING,
    ),
    CheckId.host_namespaces: Check(
        "host namespaces shared",
        Category.posture,
        Severity.critical,
        "remove hostNetwork, hostPID and hostIPC from the pod spec",
        _controls(
            "1.3.1 restrict inbound traffic; 2.2.1 configuration standards",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(a)(1) access control",
            "A.8.22 segregation of networks",
        ),
    ),
    CheckId.host_volumes: Check(
        "host or disallowed volume type",
        Category.posture,
        Severity.critical,
        "use emptyDir, configMap, secret, projected, PVC or CSI volumes; never hostPath",
        _controls(
            "2.2.1 configuration standards; 7.2.2 least privilege",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(c)(1) integrity",
            "A.8.3 information access restriction",
        ),
    ),
    CheckId.host_ports: Check(
        "host port opened",
        Category.posture,
        Severity.high,
        "remove hostPort; expose through a Service if anything must be reached",
        _controls(
            "1.3.1 restrict inbound traffic",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(e)(1) transmission security",
            "A.8.20 networks security",
        ),
    ),
    CheckId.writable_root_fs: Check(
        "root filesystem writable",
        Category.posture,
        Severity.medium,
        "readOnlyRootFilesystem: true; mount an emptyDir where the job must write",
        _controls(
            "2.2.1 configuration standards; 11.5.2 change detection",
            _SOX_CONFIG,
            "Art. 32(1)(b) security of processing",
            "§164.312(c)(1) integrity",
            "A.8.9 configuration management",
        ),
    ),
    CheckId.no_default_deny: Check(
        "no default-deny NetworkPolicy",
        Category.posture,
        Severity.high,
        "add a NetworkPolicy with podSelector {} and policyTypes [Ingress, Egress] and no "
        "rules; allow needed egress in separate policies (setlist tenant kit)",
        _controls(
            "1.2.1 network security controls; 1.3.1 inbound; 1.3.2 outbound",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(e)(1) transmission security",
            "A.8.22 segregation of networks",
        ),
    ),
    CheckId.no_resource_quota: Check(
        "no ResourceQuota",
        Category.posture,
        Severity.medium,
        "apply the tenant kit's ResourceQuota (setlist tenant kit TENANT)",
        _controls(
            "2.2.1 configuration standards",
            _SOX_OPS,
            "Art. 32(1)(b) availability and resilience",
            "§164.308(a)(7) contingency plan",
            "A.8.6 capacity management",
        ),
    ),
    CheckId.no_limit_range: Check(
        "no LimitRange",
        Category.posture,
        Severity.low,
        "apply the tenant kit's LimitRange (container defaults and maxima)",
        _controls(
            "2.2.1 configuration standards",
            _SOX_OPS,
            "Art. 32(1)(b) availability and resilience",
            "§164.308(a)(7) contingency plan",
            "A.8.6 capacity management",
        ),
    ),
    CheckId.token_automount: Check(
        "service account token mounted",
        Category.posture,
        Severity.medium,
        "automountServiceAccountToken: false on the ServiceAccount and the pod template",
        _controls(
            "7.2.2 least privilege; 8.6.1 system account management",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(d) person or entity authentication",
            "A.5.17 authentication information",
        ),
    ),
    CheckId.rbac_wildcard: Check(
        "RBAC rule with wildcards",
        Category.posture,
        Severity.critical,
        "name the apiGroups, resources and verbs a role needs; never '*' or cluster-admin",
        _controls(
            "7.2.1 access control model; 7.2.2 least privilege",
            _SOX_ACCESS,
            "Art. 25 data protection by design and by default",
            "§164.308(a)(4) information access management",
            "A.5.15 access control; A.8.2 privileged access rights",
        ),
    ),
    CheckId.rbac_secrets: Check(
        "RBAC grants access to Secrets",
        Category.posture,
        Severity.high,
        "remove secrets from the role's resources; mount the one Secret a pod needs",
        _controls(
            "7.2.2 least privilege; 8.3.2 protect authentication factors",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.308(a)(4) information access management",
            "A.5.18 access rights; A.8.3 information access restriction",
        ),
    ),
    CheckId.image_not_pinned: Check(
        "image not pinned",
        Category.posture,
        Severity.medium,
        "pin images to a release tag other than latest, or better to an @sha256 digest",
        _controls(
            "6.3.2 software inventory; 2.2.1 configuration standards",
            "ITGC Program changes: authorised and tested releases",
            "Art. 32(1)(b) security of processing",
            "§164.312(c)(1) integrity",
            "A.8.19 installation of software on operational systems; A.8.32 change management",
        ),
    ),
    CheckId.secret_literal_env: Check(
        "secret as a literal environment value",
        Category.posture,
        Severity.critical,
        "move the value into a Kubernetes Secret and reference it with valueFrom.secretKeyRef",
        _controls(
            "8.3.2 protect authentication factors; 8.6.2 no hard-coded passwords",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(d) person or entity authentication",
            "A.5.17 authentication information",
        ),
    ),
    CheckId.no_resource_limits: Check(
        "container without cpu/memory limits",
        Category.posture,
        Severity.medium,
        "set resources.limits.cpu and .memory (Setlist tiers set requests = limits)",
        _controls(
            "2.2.1 configuration standards",
            _SOX_OPS,
            "Art. 32(1)(b) availability and resilience",
            "§164.308(a)(7) contingency plan",
            "A.8.6 capacity management",
        ),
    ),
    CheckId.namespace_not_restricted: Check(
        "namespace does not enforce Pod Security restricted",
        Category.posture,
        Severity.high,
        "label the namespace pod-security.kubernetes.io/enforce: restricted (tenant kit)",
        _HARDENING,
    ),
    CheckId.pii_email: Check(
        "e-mail addresses in curated data",
        Category.privacy,
        Severity.high,
        "drop or pseudonymise the column in the ETL; curated events need no contact data",
        _controls(
            "12.5.2 data inventory and scope",
            _SOX_DATA,
            "Art. 5(1)(c) data minimisation; Art. 25 data protection by design",
            "§164.514(b) de-identification",
            "A.5.34 privacy and protection of PII; A.8.11 data masking",
        ),
    ),
    CheckId.pii_phone: Check(
        "phone numbers in curated data",
        Category.privacy,
        Severity.medium,
        "drop or pseudonymise the column in the ETL; curated events need no contact data",
        _controls(
            "12.5.2 data inventory and scope",
            _SOX_DATA,
            "Art. 5(1)(c) data minimisation; Art. 25 data protection by design",
            "§164.514(b) de-identification",
            "A.5.34 privacy and protection of PII; A.8.11 data masking",
        ),
    ),
    CheckId.pii_card: Check(
        "payment card numbers in curated data",
        Category.privacy,
        Severity.critical,
        "purge the rows and the raw files they came from; PAN must never reach the "
        "platform (PCI DSS scope); find and fix the source",
        _controls(
            "3.2.1 minimise stored account data; 3.5.1 PAN unreadable",
            _SOX_DATA,
            "Art. 5(1)(c) data minimisation; Art. 32(1)(a) pseudonymisation and encryption",
            "§164.312(a)(2)(iv) encryption and decryption",
            "A.5.34 privacy and protection of PII; A.8.12 data leakage prevention",
        ),
    ),
    CheckId.pii_iban: Check(
        "bank account numbers (IBAN) in curated data",
        Category.privacy,
        Severity.high,
        "purge the rows and the raw files they came from; keep financial data out of events",
        _controls(
            "3.2.1 minimise stored account data",
            _SOX_DATA,
            "Art. 5(1)(c) data minimisation; Art. 32(1)(a) pseudonymisation and encryption",
            "§164.312(a)(2)(iv) encryption and decryption",
            "A.5.34 privacy and protection of PII; A.8.12 data leakage prevention",
        ),
    ),
    CheckId.plaintext_secret: Check(
        "secret held outside a Secret field or block",
        Category.config,
        Severity.critical,
        "keep credentials in SecretStr block fields or Prefect Secret blocks, never in "
        "plain fields, labels, parameters or job variables; rotate the exposed one",
        _controls(
            "8.3.2 protect authentication factors; 8.6.2 no hard-coded passwords",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(d) person or entity authentication",
            "A.5.17 authentication information; A.8.24 use of cryptography",
        ),
    ),
    CheckId.webhook_unsigned: Check(
        "webhook source without a signing secret",
        Category.config,
        Severity.critical,
        "setlist webhook set SOURCE --secret-env VAR (a Secret block of 16+ characters)",
        _controls(
            "6.4.1 protect public-facing applications; 8.3.1 authenticate access",
            _SOX_ACCESS,
            "Art. 32(1)(b) security of processing",
            "§164.312(c)(1) integrity; §164.312(d) person or entity authentication",
            "A.8.5 secure authentication; A.8.20 networks security",
        ),
    ),
    CheckId.no_quota: Check(
        "tenant without an enforced quota",
        Category.config,
        Severity.high,
        "setlist tenant update TENANT restores the tenant's concurrency limit and binds "
        "its deployments to it",
        _controls(
            "2.2.1 configuration standards",
            _SOX_OPS,
            "Art. 32(1)(b) availability and resilience",
            "§164.308(a)(7) contingency plan",
            "A.8.6 capacity management",
        ),
    ),
}


class Finding(BaseModel):
    """One failed check on one resource. ``id`` is stable across scans of the same state."""

    model_config = ConfigDict(frozen=True)

    id: str
    check: CheckId
    title: str
    category: Category
    severity: Severity
    tenant_id: str
    resource: str
    evidence: list[str] = Field(default_factory=list)
    remediation: str
    controls: dict[str, str]
    # Tenant-relative storage keys of the files the evidence was read from (data checks).
    artifacts: list[str] = Field(default_factory=list)


def finding(
    check: CheckId,
    tenant_id: str,
    resource: str,
    evidence: Iterable[str],
    artifacts: Iterable[str] = (),
) -> Finding:
    row = CHECKS[check]
    digest = hashlib.sha256(f"{tenant_id}\0{check.value}\0{resource}".encode()).hexdigest()
    return Finding(
        id=f"{check.value}-{digest[:10]}",
        check=check,
        title=row.title,
        category=row.category,
        severity=row.severity,
        tenant_id=tenant_id,
        resource=resource,
        evidence=sorted(set(evidence)),
        remediation=row.remediation,
        controls={f.value: c for f, c in row.controls.items()},
        artifacts=sorted(set(artifacts)),
    )


class _Collector:
    """Findings grouped by (check, resource), evidence merged."""

    def __init__(self, tenant_id: str):
        self.tenant_id = tenant_id
        self._evidence: dict[tuple[CheckId, str], list[str]] = defaultdict(list)
        self._artifacts: dict[tuple[CheckId, str], set[str]] = defaultdict(set)

    def add(
        self, check: CheckId, resource: str, evidence: str, artifacts: Iterable[str] = ()
    ) -> None:
        self._evidence[(check, resource)].append(evidence)
        self._artifacts[(check, resource)].update(artifacts)

    def findings(self) -> list[Finding]:
        return [
            finding(check, self.tenant_id, resource, ev, self._artifacts[(check, resource)])
            for (check, resource), ev in sorted(self._evidence.items())
        ]


# ------------------------------------------------------------------------- redaction

_SECRET_NAME = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api[-_]?key|private[-_]?key|credential|"
    r"access[-_]?key|auth(orization|[-_]?string|[-_]?token)|dsn|signing[-_]?key|client[-_]?secret|webhook[-_]?url)",
    re.IGNORECASE,
)
# Names that match the words above but hold no secret.
_NOT_SECRET_NAME = re.compile(
    r"(_(id|ids|name|names|file|path|block|url_template|secret_block|key_id)$|"
    r"^(token_)?automount|service_account|_ttl$|^secret_block$)",
    re.IGNORECASE,
)
_SECRET_VALUE = re.compile(
    r"(-----BEGIN [A-Z ]*PRIVATE KEY-----|\bxox[abposr]-[0-9A-Za-z-]{10,}|"
    r"\bgh[pousr]_[0-9A-Za-z]{30,}|"
    r"\bsk_(live|test)_[0-9A-Za-z]{16,}|\bpnu_[0-9A-Za-z]{30,}|hooks\.slack\.com/services/|"
    r"://[^/\s:@]+:[^/\s@]{3,}@)"
)
_MASKED = re.compile(r"^\**$")


def redact_secret(value: object) -> str:
    """What a finding may say about a secret: that there is one, and its length."""
    return f"<redacted, {len(str(value))} chars>"


def looks_like_secret(name: str, value: object) -> bool:
    """A plain (non-Secret) name/value pair that holds a credential."""
    if value is None or isinstance(value, bool | int | float):
        return False
    text = str(value)
    if not text or _MASKED.match(text):
        return False
    if _SECRET_VALUE.search(text):
        return True
    return bool(_SECRET_NAME.search(name)) and not _NOT_SECRET_NAME.search(name)


# --------------------------------------------------------------- Kubernetes posture

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
            if "value" in env and looks_like_secret(env.get("name", ""), env.get("value")):
                out.add(
                    CheckId.secret_literal_env,
                    resource_name(obj),
                    f"{c.get('name', '?')}: env {env.get('name')} = "
                    f"{redact_secret(env.get('value'))}",
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


# ---------------------------------------------------------------------- data privacy

_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# International (+CC …) or North-American ((NNN) NNN-NNNN / NNN-NNN-NNNN) forms: a bare
# run of digits is an id, not a phone number.
_PHONE = (
    r"\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{3}\) ?\d{3}-\d{4}|\b\d{3}-\d{3}-\d{4}\b"
)
_CARD = r"\b(?:\d[ -]?){12,18}\d\b"
_IBAN = r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"
_PATTERNS: dict[CheckId, re.Pattern[str]] = {
    CheckId.pii_email: re.compile(_EMAIL),
    CheckId.pii_phone: re.compile(_PHONE),
    CheckId.pii_card: re.compile(_CARD),
    CheckId.pii_iban: re.compile(_IBAN),
}
# Issuer prefixes of the card schemes (Visa, Mastercard, Amex, Discover, JCB, Diners,
# UnionPay, Maestro): with Luhn this keeps random digit runs from passing as cards.
_CARD_IIN = re.compile(r"^(4|5[1-5]|2[2-7]|3[47]|6011|65|64[4-9]|35|30[0-5]|36|38|62|50|5[6-8]|6)")


def luhn_valid(digits: str) -> bool:
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return (
        13 <= len(digits) <= 19
        and len(set(digits)) > 1
        and bool(_CARD_IIN.match(digits))
        and luhn_valid(digits)
    )


def iban_valid(text: str) -> bool:
    """ISO 13616: 15–34 characters, check digits by ISO 7064 mod 97-10."""
    iban = text.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def is_phone_number(text: str) -> bool:
    return 8 <= sum(ch.isdigit() for ch in text) <= 15


_VALIDATORS = {
    CheckId.pii_email: lambda s: True,
    CheckId.pii_phone: is_phone_number,
    CheckId.pii_card: is_card_number,
    CheckId.pii_iban: iban_valid,
}


def mask(check: CheckId, value: str) -> str:
    """A shape that identifies the kind of value and never the value."""
    if check is CheckId.pii_email:
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@***.{domain.rsplit('.', 1)[-1]}"
    if check is CheckId.pii_iban:
        compact = value.replace(" ", "")
        return f"{compact[:2]}**{'*' * (len(compact) - 6)}{compact[-2:]}"
    digits = re.sub(r"\D", "", value)
    keep = 4 if check is CheckId.pii_card else 2
    return "*" * (len(digits) - keep) + digits[-keep:]


@dataclass
class ColumnHits:
    count: int = 0
    examples: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)


@dataclass
class PrivacyScan:
    """What the scan read: rows, rows sampled, per (check, column) hits (masked)."""

    sample_rate: float
    rows: int = 0
    sampled: int = 0
    partitions: int = 0
    columns: set[str] = field(default_factory=set)
    hits: dict[tuple[CheckId, str], ColumnHits] = field(default_factory=dict)

    def scan(self, table: pa.Table, seed: int, source: str | None = None) -> None:
        """Sample ``table``'s rows at the stated rate and look for personal data in every
        text column (of the file's own schema, so an unexpected column is scanned too).

        ``source``: the tenant-relative key of the file ``table`` was read from; the
        findings name the files their hits came from.
        """
        n = table.num_rows
        self.rows += n
        self.partitions += 1
        if n == 0:
            return
        if self.sample_rate < 1.0:
            keep = np.random.default_rng(seed).random(n) < self.sample_rate
            table = table.filter(pa.array(keep))
        self.sampled += table.num_rows
        for name in table.column_names:
            column = table[name]
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                if pa.types.is_dictionary(column.type) and pa.types.is_string(
                    column.type.value_type
                ):
                    column = column.cast(pa.string())
                else:
                    continue
            self.columns.add(name)
            for check, pattern in _PATTERNS.items():
                candidates = column.filter(pc.match_substring_regex(column, pattern.pattern))
                for text in candidates.to_pylist():
                    for match in pattern.finditer(text):
                        value = match.group(0)
                        if not _VALIDATORS[check](value):
                            continue
                        hit = self.hits.setdefault((check, name), ColumnHits())
                        hit.count += 1
                        if source:
                            hit.sources.add(source)
                        shape = mask(check, value)
                        if len(hit.examples) < 3 and shape not in hit.examples:
                            hit.examples.append(shape)

    def findings(self, tenant_id: str, table: str) -> list[Finding]:
        out = _Collector(tenant_id)
        for (check, column), hit in sorted(self.hits.items()):
            out.add(
                check,
                f"{table}#{column}",
                f"{hit.count} value(s) in {self.sampled} sampled of {self.rows} rows "
                f"(sample rate {self.sample_rate:g}), e.g. {', '.join(hit.examples)}",
                hit.sources,
            )
        return out.findings()


PRIVACY_CHECKS = {c for c, row in CHECKS.items() if row.category is Category.privacy}


# ------------------------------------------------------------------- platform config


def secret_fields(
    tenant_id: str, resource: str, data: Any, out: _Collector, path: str = ""
) -> None:
    """Plain fields of a block/deployment whose name or value says it holds a secret.

    Read the data without secrets (``include_secrets=False``): SecretStr fields then come
    back masked and pass; a credential in a plain field comes back as it is and fails.
    """
    if isinstance(data, dict):
        for key, value in data.items():
            secret_fields(tenant_id, resource, value, out, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            secret_fields(tenant_id, resource, value, out, f"{path}[{i}]")
    elif looks_like_secret(path.rsplit(".", 1)[-1], data):
        out.add(CheckId.plaintext_secret, resource, f"{path} = {redact_secret(data)}")


@dataclass
class WebhookState:
    """A webhook source block and what its signing-secret block holds (length only)."""

    source: str
    secret_block: str
    secret_length: int | None  # None: the Secret block does not exist


@dataclass
class QuotaState:
    """The tenant's concurrency limit and which of its deployments are bound to it."""

    concurrent_jobs: int
    limit_name: str
    limit: int | None  # None: no such global concurrency limit
    unbound_deployments: list[str] = field(default_factory=list)


MIN_SIGNING_SECRET = 16


def config_findings(
    tenant_id: str,
    plain_data: dict[str, Any],
    webhooks: list[WebhookState],
    quota: QuotaState,
) -> list[Finding]:
    """``plain_data``: resource name → its data as read without secrets."""
    out = _Collector(tenant_id)
    for resource, data in sorted(plain_data.items()):
        secret_fields(tenant_id, resource, data, out)
    for hook in webhooks:
        res = f"webhook-source/{hook.source}"
        if hook.secret_length is None:
            out.add(CheckId.webhook_unsigned, res, f"Secret block {hook.secret_block!r} is missing")
        elif hook.secret_length < MIN_SIGNING_SECRET:
            out.add(
                CheckId.webhook_unsigned,
                res,
                f"signing secret has {hook.secret_length} characters; at least "
                f"{MIN_SIGNING_SECRET} needed",
            )
    res = f"tenant/{tenant_id}"
    if quota.limit is None:
        out.add(CheckId.no_quota, res, f"no concurrency limit {quota.limit_name}")
    elif quota.limit != quota.concurrent_jobs:
        out.add(
            CheckId.no_quota,
            res,
            f"concurrency limit {quota.limit_name} is {quota.limit}, the profile's quota "
            f"is {quota.concurrent_jobs}",
        )
    for name in quota.unbound_deployments:
        out.add(CheckId.no_quota, res, f"deployment {name} is not bound to {quota.limit_name}")
    return out.findings()


CONFIG_CHECKS = {c for c, row in CHECKS.items() if row.category is Category.config}


# --------------------------------------------------------------------------- scoring


def score(findings: list[Finding], evaluated: set[CheckId]) -> dict[str, float]:
    """Share of evaluated checks passed, weighted by severity: overall and per framework.

    A check passes when it has no finding on any resource; 1.0 when nothing applies.
    """
    failed = {f.check for f in findings}

    def share(checks: Iterable[CheckId]) -> float:
        checks = list(checks)
        total = sum(CHECKS[c].severity.weight for c in checks)
        passed = sum(CHECKS[c].severity.weight for c in checks if c not in failed)
        return round(passed / total, 4) if total else 1.0

    scores = {"overall": share(evaluated)}
    for framework in Framework:
        scores[framework.value] = share(c for c in evaluated if CHECKS[c].controls.get(framework))
    for category in Category:
        scores[category.value] = share(c for c in evaluated if CHECKS[c].category is category)
    return scores


SEVERITY_ORDER = {s: i for i, s in enumerate(Severity)}


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.check, f.resource))


# ------------------------------------------------------------------------ SARIF 2.1.0

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)
SARIF_TOOL = "setlist-security-scan"
SARIF_LEVEL = {
    Severity.critical: "error",
    Severity.high: "error",
    Severity.medium: "warning",
    Severity.low: "note",
}
# A rule's ``security-severity`` property as code-scanning tools read it (0.1–10):
# 9.0 and up critical, 7.0 high, 4.0 medium, below that low.
SECURITY_SEVERITY = {
    Severity.critical: "9.5",
    Severity.high: "8.0",
    Severity.medium: "5.5",
    Severity.low: "2.0",
}
# partialFingerprints key of a result: the finding's stable id, the same across scans.
SARIF_FINGERPRINT = "setlistFindingId/v1"
# uriBaseId of data-file locations: their uri is the key inside the tenant's storage.
SARIF_STORAGE_BASE = "TENANT_STORAGE"


def scrub(text: str) -> str:
    """``text`` with every personal-data value masked and every secret-shaped value
    redacted: the last guard on what leaves the platform (evidence is already redacted
    when a finding is made, so this changes nothing unless a check forgot to)."""
    for check, pattern in _PATTERNS.items():
        text = pattern.sub(
            lambda m, c=check: mask(c, m.group(0)) if _VALIDATORS[c](m.group(0)) else m.group(0),
            text,
        )
    return _SECRET_VALUE.sub(lambda m: redact_secret(m.group(0)), text)


def _rule_name(check: CheckId) -> str:
    return "".join(part.capitalize() for part in check.name.split("_"))


def sarif_rules() -> list[dict[str, Any]]:
    """One reportingDescriptor per check of the catalogue, in ``CHECKS`` order."""
    return [
        {
            "id": check.value,
            "name": _rule_name(check),
            "shortDescription": {"text": row.title},
            "fullDescription": {"text": row.remediation},
            "help": {"text": row.remediation},
            "defaultConfiguration": {"level": SARIF_LEVEL[row.severity]},
            "properties": {
                "security-severity": SECURITY_SEVERITY[row.severity],
                "severity": row.severity.value,
                "category": row.category.value,
                "controls": {f.value: c for f, c in row.controls.items()},
                "tags": ["security", row.category.value, *(f.value for f in row.controls)],
            },
        }
        for check, row in CHECKS.items()
    ]


def _logical(name: str, fully_qualified: str, kind: str) -> dict[str, str]:
    return {"name": scrub(name), "fullyQualifiedName": scrub(fully_qualified), "kind": kind}


def sarif_locations(f: Finding) -> list[dict[str, Any]]:
    """Data findings: the stored files (tenant-relative keys, else the table's prefix)
    and the column; Kubernetes objects and config items: a logical location each."""
    if f.category is Category.privacy:
        table, _, column = f.resource.partition("#")
        column_location = _logical(column or table, f.resource, "member")
        return [
            {
                "physicalLocation": {
                    "artifactLocation": {"uri": key, "uriBaseId": SARIF_STORAGE_BASE}
                },
                "logicalLocations": [column_location],
            }
            for key in f.artifacts or [f"{table.rstrip('/')}/"]
        ]
    name = f.resource.rsplit("/", 1)[-1]
    kind = "namespace" if f.resource.startswith("Namespace/") else "resource"
    return [{"logicalLocations": [_logical(name, f.resource, kind)]}]


def sarif_result(f: Finding, rule_index: int) -> dict[str, Any]:
    return {
        "ruleId": f.check.value,
        "ruleIndex": rule_index,
        "kind": "fail",
        "level": SARIF_LEVEL[f.severity],
        "message": {"text": scrub("; ".join(f.evidence) or f.title)},
        "locations": sarif_locations(f),
        "partialFingerprints": {SARIF_FINGERPRINT: f.id},
        "properties": {
            "findingId": f.id,
            "tenant": f.tenant_id,
            "severity": f.severity.value,
            "category": f.category.value,
        },
    }


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("setlist")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def sarif_log(
    findings: list[Finding],
    *,
    tenant_id: str,
    started_at: str,
    finished_at: str,
    storage: str,
    succeeded: bool = True,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A SARIF 2.1.0 log of one scan: one run, a rule per check, a result per finding.

    ``started_at``/``finished_at``: UTC date-times (RFC 3339); ``storage``: where the
    tenant's storage is (``TenantStorage.describe()``), the base of data-file locations.
    """
    index = {check: i for i, check in enumerate(CHECKS)}
    return {
        "$schema": SARIF_SCHEMA_URI,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": SARIF_TOOL,
                        "version": tool_version(),
                        "rules": sarif_rules(),
                    }
                },
                "automationDetails": {"id": f"{SARIF_TOOL}/{tenant_id}/{started_at}"},
                "invocations": [
                    {
                        "executionSuccessful": succeeded,
                        "startTimeUtc": started_at,
                        "endTimeUtc": finished_at,
                    }
                ],
                "originalUriBaseIds": {
                    SARIF_STORAGE_BASE: {
                        "description": {"text": f"the storage of tenant {tenant_id}: {storage}"}
                    }
                },
                "results": [sarif_result(f, index[f.check]) for f in findings],
                "properties": {"tenant": tenant_id, **(properties or {})},
            }
        ],
    }
