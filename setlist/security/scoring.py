"""A scan's scores: the share of evaluated checks passed, weighted by severity.

Weighted so that one critical failure costs more than several low ones; computed overall,
per compliance framework (the checks mapped to one of its controls) and per category.
Only evaluated checks count: a check the scan did not run neither helps nor hurts.
"""

from __future__ import annotations

from collections.abc import Iterable

from setlist.security.checks import CHECKS, Category, CheckId, Finding, Framework, Severity


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
