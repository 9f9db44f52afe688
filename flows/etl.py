"""Data ETL: a tenant's new raw event files → validated, deduplicated, date-partitioned Parquet.

Incremental (the table's manifest lists every raw file loaded), streaming (each raw file
read in batches and staged on local scratch disk; a few files at once, in worker
processes), all-or-nothing (one manifest write publishes the load), and repeatable: the
same raw files always give the same bytes, whatever the batch size or number of workers.

The load is ``setlist.etl.load``; this flow adds the tenant check, the locks, the
artifacts and the audit event. A load also compacts the rows a stream-ingest job
appended into each date's canonical file. Stored results of runs made before the load moved there
name ``flows.etl.EtlReport``: the names in ``__all__`` stay importable from here.
"""

from __future__ import annotations

import os
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.client.orchestration import get_client
from pydantic import Field

from setlist.core import audit
from setlist.dispatch.locks import tenant_lock
from setlist.etl.curated import QUARANTINE_PREFIX
from setlist.etl.load import (
    EtlReport,
    TooManyBadRows,
    prepare_load,
    publish_load,
)
from setlist.tenants.runtime import JOB_FLOW, enter_tenant
from setlist.tenants.usage import ensure_within_storage_quota

__all__ = [
    "EtlReport",
    "TooManyBadRows",
    "data_etl",
]


async def _report(report: EtlReport) -> None:
    rows = [
        {"metric": k, "value": v}
        for k, v in report.model_dump().items()
        if k not in ("rejects_by_reason", "partitions")
    ] + [
        {"metric": f"rejected: {r}", "value": n}
        for r, n in sorted(report.rejects_by_reason.items())
    ]
    await acreate_table_artifact(
        key=f"etl-{report.tenant_id}", table=rows, description="data-etl load summary"
    )
    reasons = (
        "\n".join(f"| {r} | {n} |" for r, n in sorted(report.rejects_by_reason.items()))
        or "| – | 0 |"
    )
    await acreate_markdown_artifact(
        key=f"etl-quality-{report.tenant_id}",
        markdown=(
            f"# Data quality: `{report.tenant_id}`\n\n"
            f"| | |\n|---|---|\n| raw files | {report.files} |\n| lines in | {report.lines} |\n"
            f"| valid rows | {report.valid_rows} |\n| duplicates dropped | {report.duplicates} |\n"
            f"| rows loaded | {report.loaded_rows} |\n| rejected | {report.rejected} |\n"
            f"| partitions touched | {len(report.partitions)} |\n"
            f"| bytes in / out | {report.bytes_in} / {report.bytes_out} |\n"
            f"| throughput | {report.events_per_s:,.0f} lines/s |\n"
            f"| table | version {report.table_version}, {report.table_rows} rows |\n\n"
            f"## Rejects by reason\n\n| reason | rows |\n|---|---|\n{reasons}\n\n"
            f"Rejected rows are in `{QUARANTINE_PREFIX}` with their reason.\n"
        ),
        description="data-etl data-quality report",
    )


@flow(name="data-etl", log_prints=True, persist_result=True, **JOB_FLOW)
async def data_etl(
    tenant_id: str,
    max_bad_share: Annotated[
        float, Field(ge=0, le=1, description="fail (load nothing) above this share of bad lines")
    ] = 0.05,
    batch_rows: Annotated[int, Field(ge=1000, le=2_000_000)] = 100_000,
    workers: Annotated[
        int | None,
        Field(ge=1, le=64, description="raw files staged at once (default: one per CPU)"),
    ] = None,
) -> EtlReport:
    """Load the tenant's new raw event files into its curated events table."""
    tenant = await enter_tenant(tenant_id)
    logger = get_run_logger()
    usage = await ensure_within_storage_quota(tenant, "data-etl")
    logger.info("storage: %s used", usage.describe())
    async with tenant_lock(tenant_id, "etl"):
        prepared = prepare_load(
            tenant.storage,
            tenant_id,
            max_bad_share=max_bad_share,
            batch_rows=batch_rows,
            scratch=os.environ.get("SETLIST_SCRATCH"),
            workers=workers,
            storage_config=tenant.storage_config,
        )
        # The publish re-reads the table under the lock a stream's micro-batches take,
        # so rows appended meanwhile are kept (see setlist.etl.appends).
        async with tenant_lock(tenant_id, "table"):
            report = publish_load(tenant.storage, prepared)
    logger.info(
        "loaded %s rows from %s files (%s duplicates, %s rejected); table v%s has %s rows",
        report.loaded_rows,
        report.files,
        report.duplicates,
        report.rejected,
        report.table_version,
        report.table_rows,
    )
    await _report(report)
    async with get_client() as client:
        await audit.emit(
            client,
            "setlist.etl.completed",
            tenant_id,
            obj=(f"setlist.dataset.{tenant_id}.events", "dataset"),
            payload=report.model_dump(),
        )
    return report
