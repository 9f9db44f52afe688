"""A scan's findings as a SARIF 2.1.0 log, for code-scanning tools.

A rule per check (its controls and ``security-severity`` in the rule's properties), a
result per finding (the finding's id as its partial fingerprint, so a tool tracks one
finding across scans), and the evidence scrubbed once more on the way out: a SARIF log
leaves the platform, so personal-data values are masked and secret-shaped values redacted
again, whatever the checks already did.
"""

from __future__ import annotations

from typing import Any

from setlist.security.checks import CHECKS, Category, CheckId, Finding, Severity
from setlist.security.privacy import _PATTERNS, _VALIDATORS, mask
from setlist.security.redaction import _SECRET_VALUE, redact_secret

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
