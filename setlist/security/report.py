"""A tenant's security scan report and the forms it is read in: the ``ScanReport`` model,
its markdown and SARIF 2.1.0 renderings, the ``setlist.security.finding`` event of a
finding (the alert automation listens for critical ones), and the latest report kept in
the tenant's storage.

Here, not in the ``security-scan`` flow, so that the CLI reads and renders reports
without importing the flows that run on the platform.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from uuid import NAMESPACE_URL, uuid4, uuid5

from prefect.events import Event
from pydantic import BaseModel, Field

from setlist.core import audit
from setlist.core.storage import TenantStorage
from setlist.core.tenancy import SetlistError
from setlist.security.checks import Finding, Framework, Severity
from setlist.security.sarif import sarif_log

FINDING_EVENT = "setlist.security.finding"
EVENT_SEVERITIES = (Severity.critical, Severity.high)
TARGET_SCORE = 0.95
LATEST_KEY = "security/latest.json"


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ScanReport(BaseModel):
    tenant_id: str
    scanned_at: str
    started_at: str = ""
    posture_source: str
    sample_rate: float
    rows_scanned: int = 0
    rows_sampled: int = 0
    columns_scanned: list[str] = Field(default_factory=list)
    objects_checked: int = 0
    checks_evaluated: list[str] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict)
    findings: list[Finding] = Field(default_factory=list)
    report_key: str = ""
    sarif_key: str = ""

    @property
    def score(self) -> float:
        return self.scores.get("overall", 0.0)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(f.severity is s for f in self.findings) for s in Severity}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_report(report: ScanReport) -> str:
    verdict = "meets" if report.score >= TARGET_SCORE else "is below"
    lines = [
        f"# Security scan of {report.tenant_id}",
        "",
        f"Score **{report.score:.1%}** ({verdict} the {TARGET_SCORE:.0%} target), "
        f"{len(report.findings)} finding(s): "
        + ", ".join(f"{n} {s}" for s, n in report.counts().items()),
        "",
        f"Scanned {report.scanned_at}: {report.objects_checked} Kubernetes objects "
        f"({report.posture_source}); {report.rows_sampled} of {report.rows_scanned} curated "
        f"rows sampled (rate {report.sample_rate:g}) across columns "
        f"{', '.join(report.columns_scanned) or 'none'}; platform config.",
        "",
        f"Files in the tenant's storage: `{report.report_key}` (JSON), "
        f"`{report.sarif_key}` (SARIF 2.1.0).",
        "",
        "| framework | score |",
        "|---|---|",
        *(f"| {f.value} | {report.scores[f.value]:.1%} |" for f in Framework),
        "",
    ]
    if report.findings:
        lines += [
            "| id | severity | check | resource | evidence | controls | remediation |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in report.findings:
            controls = "; ".join(f"{k}: {v}" for k, v in f.controls.items())
            lines.append(
                f"| {f.id} | {f.severity.value} | {_cell(f.title)} | {_cell(f.resource)} | "
                f"{_cell('; '.join(f.evidence))} | {_cell(controls)} | {_cell(f.remediation)} |"
            )
    else:
        lines.append("No findings.")
    return "\n".join(lines) + "\n"


def table_rows(report: ScanReport) -> list[dict[str, str]]:
    return [
        {
            "id": f.id,
            "severity": f.severity.value,
            "check": f"{f.check.value} {f.title}",
            "resource": f.resource,
            "evidence": "; ".join(f.evidence),
            **{fw.value: f.controls.get(fw.value, "") for fw in Framework},
        }
        for f in report.findings
    ]


def sarif_report(report: ScanReport, storage: TenantStorage) -> dict[str, Any]:
    """The scan as a SARIF 2.1.0 log (one run, a rule per check, a result per finding)."""
    return sarif_log(
        report.findings,
        tenant_id=report.tenant_id,
        started_at=report.started_at or report.scanned_at,
        finished_at=report.scanned_at,
        storage=storage.describe(),
        properties={
            "postureSource": report.posture_source,
            "sampleRate": report.sample_rate,
            "rowsScanned": report.rows_scanned,
            "rowsSampled": report.rows_sampled,
            "objectsChecked": report.objects_checked,
            "checksEvaluated": report.checks_evaluated,
            "scores": report.scores,
        },
    )


def finding_event(finding: Finding, flow_run_id: str | None) -> Event:
    """``setlist.security.finding`` on the tenant's resource, its severity on the resource."""
    actor = audit.current_actor()
    related = [
        {
            "prefect.resource.id": f"setlist.actor.{actor}",
            "prefect.resource.role": "actor",
            "prefect.resource.name": actor,
        }
    ]
    if flow_run_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.role": "flow-run",
            }
        )
    # One id per finding and run: a retried scan re-emits the same events, which the
    # control plane's intake drops as already stored, so no finding is reported twice.
    event_id = (
        uuid5(NAMESPACE_URL, f"setlist-finding:{flow_run_id}:{finding.id}")
        if flow_run_id
        else uuid4()
    )
    return Event(
        id=event_id,
        occurred=datetime.now(UTC),
        event=FINDING_EVENT,
        resource={
            "prefect.resource.id": audit.tenant_resource_id(finding.tenant_id),
            "prefect.resource.name": finding.tenant_id,
            "setlist.tenant": finding.tenant_id,
            "setlist.severity": finding.severity.value,
        },
        related=related,
        payload={"actor": actor, **finding.model_dump(mode="json")},
    )


def sealed_report(report: ScanReport, key: str) -> bytes:
    """The report as stored at ``key``, with the platform's seal (``core.records``)."""
    from setlist.core import records

    return records.dumps(report.tenant_id, key, report.model_dump(mode="json"))


class UnreadableReport(SetlistError):
    """A stored report that is not a scan report of this tenant (damaged, or planted)."""


def latest_report(storage: TenantStorage) -> ScanReport | None:
    """The tenant's most recent scan report, if it was ever scanned. A file there that the
    platform did not seal for this very tenant is ``UnreadableReport``, never a pass."""
    from pydantic import ValidationError

    from setlist.core import records
    from setlist.core.storage import ObjectNotFound

    try:
        report = ScanReport.model_validate(records.read_record(storage, LATEST_KEY))
    except ObjectNotFound:
        return None
    except records.UnsealedRecord as exc:
        raise UnreadableReport(str(exc)) from None
    except (ValidationError, ValueError):
        raise UnreadableReport(f"{LATEST_KEY} is not a scan report") from None
    if report.tenant_id != storage.tenant_id:
        raise UnreadableReport(f"{LATEST_KEY} is a report of tenant {report.tenant_id!r}")
    return report


async def scan_each(
    scan: Callable[..., Awaitable[ScanReport]],
    tenant_ids: list[str],
    parallel: int = 4,
    sample_rate: float = 0.1,
) -> dict[str, ScanReport | BaseException]:
    """``scan`` (the security-scan flow) once per tenant, at most ``parallel`` at once; a
    failed scan is returned as its exception and does not stop the others."""
    import anyio

    limiter = anyio.Semaphore(max(1, parallel))
    results: dict[str, ScanReport | BaseException] = {}

    async def one(tenant_id: str) -> None:
        async with limiter:
            try:
                results[tenant_id] = await scan(tenant_id, sample_rate=sample_rate)
            except Exception as exc:  # noqa: BLE001 - reported per tenant
                results[tenant_id] = exc

    async with anyio.create_task_group() as tg:
        for tenant_id in tenant_ids:
            tg.start_soon(one, tenant_id)
    return {t: results[t] for t in tenant_ids}
