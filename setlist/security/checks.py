"""The security scan's one table of checks, and the findings they make.

Pure, as every check module of this package: a check takes what was already read
(manifests as dicts, Arrow tables, block data) and returns findings, so the same rules
run on the manifests the platform renders, on live objects read from a cluster and on
hand-made fixtures. Reading those inputs is ``setlist.security.sources``'s business.

``CHECKS`` is the one table of the scan: per check id its title, category, severity,
remediation and the controls it maps to in PCI DSS v4.0, SOX ITGC, GDPR, HIPAA (45 CFR
§164) and ISO/IEC 27001:2022 Annex A. A finding carries its check's controls; scores
(``setlist.security.scoring``) are the share of checks passed, weighted by severity,
overall and per framework. Check ids are a stable contract: reports, SARIF rules and
past findings name them, so they are never renumbered, only added.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


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
