"""Security scan: a tenant's Kubernetes posture, curated data and platform config, scored.

Checks and their mapping to PCI DSS, SOX, GDPR, HIPAA and ISO 27001 live in
``setlist.security``; what is read lives in ``setlist.security.sources``, the report and
its forms in ``setlist.security.report``. The run publishes a table and a markdown
report as artifacts, writes the report (JSON, markdown and a SARIF 2.1.0 log) under the
tenant's ``security/`` prefix, and emits a ``setlist.security.finding`` event per
critical or high finding, the tenant and the severity on its resource (the alert
automation listens for critical ones).

``scan_tenants`` runs this flow once per tenant, in this process (``scan_each``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from pydantic import Field

from blocks.tenant import TenantProfile
from setlist.core.storage import TenantStorage
from setlist.core.tenancy import tenant_namespace
from setlist.security.checks import CheckId, Finding
from setlist.security.platform_config import CONFIG_CHECKS, config_findings
from setlist.security.posture import posture_findings
from setlist.security.privacy import PRIVACY_CHECKS
from setlist.security.report import (
    EVENT_SEVERITIES,
    LATEST_KEY,
    ScanReport,
    _utc_now,
    finding_event,
    markdown_report,
    sarif_report,
    scan_each,
    sealed_report,
    table_rows,
)
from setlist.security.scoring import score, sort_findings
from setlist.security.sources import (
    CURATED_TABLE,
    PostureSource,
    live_objects,
    platform_config,
    rendered_objects,
    resolve_source,
    scan_curated,
    tenant_deployments,
)
from setlist.tenants.runtime import JOB_FLOW, enter_tenant

__all__ = ["ScanReport", "scan_tenants", "security_scan"]


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
async def scan_posture(
    profile: TenantProfile, source: PostureSource
) -> tuple[list[Finding], set[CheckId], int]:
    """Kubernetes posture of the tenant's namespace: live objects, or what it renders."""
    async with get_client() as client:
        if source is PostureSource.cluster:
            objects = live_objects(profile.tenant_id)
        else:
            objects = await rendered_objects(
                client, profile, await tenant_deployments(client, profile.tenant_id)
            )
    findings, evaluated = posture_findings(
        profile.tenant_id, tenant_namespace(profile.tenant_id), objects
    )
    return findings, evaluated, len(objects)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def scan_privacy(storage: TenantStorage, sample_rate: float) -> tuple[list[Finding], Any]:
    """Personal data in the tenant's curated events, sampled per partition file."""
    result = scan_curated(storage, sample_rate)
    return result.findings(storage.tenant_id, CURATED_TABLE), result


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
async def scan_config(profile: TenantProfile) -> list[Finding]:
    """Secrets outside Secret fields, unsigned webhook sources, an unenforced quota."""
    async with get_client() as client:
        deployments = await tenant_deployments(client, profile.tenant_id)
        plain, webhooks, quota = await platform_config(client, profile, deployments)
    return config_findings(profile.tenant_id, plain, webhooks, quota)


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
async def publish(report: ScanReport, storage: TenantStorage) -> ScanReport:
    """Report in the tenant's storage, artifacts for the UI, events for the alerts."""
    stamp = report.scanned_at.replace(":", "").replace("-", "")
    prefix = f"security/scans/{stamp}/report"
    report = report.model_copy(
        update={"report_key": f"{prefix}.json", "sarif_key": f"{prefix}.sarif"}
    )
    storage.put_bytes(report.report_key, sealed_report(report, report.report_key))
    markdown = markdown_report(report)
    storage.put_text(f"{prefix}.md", markdown)
    storage.put_text(report.sarif_key, json.dumps(sarif_report(report, storage), indent=2))
    storage.put_bytes(LATEST_KEY, sealed_report(report, LATEST_KEY))
    key = f"security-scan-{report.tenant_id}"
    await acreate_table_artifact(
        key=key,
        table=table_rows(report),
        description=f"Security findings of {report.tenant_id}: score {report.score:.1%}; "
        f"SARIF 2.1.0 in the tenant's storage at {report.sarif_key}",
    )
    await acreate_markdown_artifact(
        key=f"{key}-report", markdown=markdown, description="Security and compliance report"
    )
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    events = [finding_event(f, run_id) for f in report.findings if f.severity in EVENT_SEVERITIES]
    if events:
        async with get_client() as client:
            response = await client.request(
                "POST",
                "/events",
                json=[e.model_dump(mode="json") for e in events],  # type: ignore[arg-type]
            )
            response.raise_for_status()
    return report


@flow(name="security-scan", log_prints=True, persist_result=True, **JOB_FLOW)
async def security_scan(
    tenant_id: str,
    sample_rate: Annotated[
        float, Field(gt=0, le=1, description="share of curated rows scanned for personal data")
    ] = 0.1,
    posture_source: PostureSource = PostureSource.auto,
) -> ScanReport:
    """Scan one tenant's Kubernetes posture, curated data and platform config.

    Args:
        tenant_id: the tenant to scan
        sample_rate: share of each curated partition's rows scanned for e-mail
            addresses, phone numbers, card numbers and IBANs (1 = every row)
        posture_source: rendered (the manifests the platform renders for the tenant),
            cluster (the live namespace through the Kubernetes API) or auto (cluster
            when SETLIST_KUBE_APPLY is set, else rendered)
    """
    started_at = _utc_now()
    tenant = await enter_tenant(tenant_id)
    logger = get_run_logger()
    source = resolve_source(posture_source)
    posture, posture_checks, objects = await scan_posture(tenant.profile, source)
    privacy, scanned = scan_privacy(tenant.storage, sample_rate)
    config = await scan_config(tenant.profile)
    findings = sort_findings([*posture, *privacy, *config])
    evaluated = posture_checks | PRIVACY_CHECKS | CONFIG_CHECKS
    report = ScanReport(
        tenant_id=tenant_id,
        scanned_at=_utc_now(),
        started_at=started_at,
        posture_source=source.value,
        sample_rate=sample_rate,
        rows_scanned=scanned.rows,
        rows_sampled=scanned.sampled,
        columns_scanned=sorted(scanned.columns),
        objects_checked=objects,
        checks_evaluated=sorted(c.value for c in evaluated),
        scores=score(findings, evaluated),
        findings=findings,
    )
    report = await publish(report, tenant.storage)
    logger.info(
        "tenant %s scored %.1f%% with %s finding(s) %s",
        tenant_id,
        100 * report.score,
        len(findings),
        json.dumps(report.counts()),
    )
    return report


async def scan_tenants(
    tenant_ids: list[str], parallel: int = 4, sample_rate: float = 0.1
) -> dict[str, ScanReport | BaseException]:
    """One scan flow run per tenant, at most ``parallel`` at once (``scan_each``)."""
    return await scan_each(security_scan, tenant_ids, parallel, sample_rate=sample_rate)
