"""Stream ingest: a tenant's listening events from its broker stream into its curated
table within seconds, exactly once, with live analytics updated by every micro-batch.

One long-running run per tenant (the ``stream`` lock: a second run finds it held and
ends at once). It runs for ``run_minutes``, then ends and emits
``setlist.stream.ended``, which the deployment's trigger answers with the next run, so
a new version of the code or the tenant's tier takes over within the hour; a second
trigger starts a new run when one of the deployment's runs crashed. An operator starts
the first (``setlist submit stream-ingest``); a tenant that has never sent an event
has no stream, and its run ends at once without asking for a next one.

The run's work is ``setlist.stream.job``; the append path ``setlist.etl.appends``. When
the appended files pile up, the run emits ``setlist.stream.compaction-due`` (at most
every ten minutes), which starts the tenant's data-etl to compact them.
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from pydantic import Field

from setlist.core import audit
from setlist.dispatch.locks import tenant_lock
from setlist.etl.curated import read_manifest
from setlist.stream.ingest import IngestReport, IngestSettings, Outcome
from setlist.stream.job import consume
from setlist.tenants.runtime import JOB_FLOW, enter_tenant
from setlist.tenants.stream_access import tenant_broker
from setlist.tenants.usage import ensure_within_storage_quota

LOCK_WAIT_S = 5


async def _emit(tenant_id: str, name: str, payload: dict) -> None:
    async with get_client() as client:
        await audit.emit(client, name, tenant_id, payload=payload)


# Retries are safe: a batch is in the table once whatever ran before (its position is
# committed with it). They cover a broker or store that went away for a while.
@flow(
    name="stream-ingest",
    log_prints=True,
    persist_result=True,
    retries=2,
    retry_delay_seconds=30,
    **JOB_FLOW,
)
async def stream_ingest(
    tenant_id: str,
    run_minutes: Annotated[
        float, Field(gt=0, le=23 * 60, description="end after this long; the next run takes over")
    ] = 60,
    max_batch_events: Annotated[
        int, Field(ge=1, le=200_000, description="most events committed in one micro-batch")
    ] = 20_000,
    max_batch_seconds: Annotated[
        float, Field(gt=0, le=30, description="longest wait before a micro-batch is committed")
    ] = 1.0,
) -> IngestReport:
    """Consume the tenant's event stream into its curated table, micro-batch by micro-batch."""
    tenant = await enter_tenant(tenant_id)
    logger = get_run_logger()
    await ensure_within_storage_quota(tenant, "stream-ingest")
    config = await tenant_broker(tenant_id)
    stream = config.kind.value
    settings = IngestSettings(
        max_batch_events=max_batch_events, max_batch_seconds=max_batch_seconds
    )

    @asynccontextmanager
    async def table_lock():
        async with tenant_lock(tenant_id, "table", timeout_seconds=120):
            yield

    async with config.open() as broker:
        manifest = read_manifest(tenant.storage)
        if stream not in manifest.streams and not await broker.stream_length(tenant_id):
            logger.info("%s has sent no event to its %s stream: nothing to do", tenant_id, stream)
            return IngestReport(tenant_id=tenant_id, stream=stream, outcome=Outcome.nothing_sent)
        held = False
        try:
            async with tenant_lock(tenant_id, "stream", timeout_seconds=LOCK_WAIT_S):
                held = True
                report = await consume(
                    tenant.storage,
                    broker,
                    stream,
                    table_lock,
                    settings,
                    seconds=run_minutes * 60,
                    compaction_due=functools.partial(
                        _emit, tenant_id, "setlist.stream.compaction-due"
                    ),
                )
        except TimeoutError:
            if held:
                raise
            logger.info("another stream-ingest run of %s holds its stream: ending", tenant_id)
            return IngestReport(tenant_id=tenant_id, stream=stream, outcome=Outcome.held_elsewhere)
    logger.info(
        "%s messages in %s micro-batches: %s rows committed, %s rejected, %s replayed; table v%s",
        report.messages,
        report.batches,
        report.rows,
        report.rejected,
        report.replayed_messages,
        report.table_version,
    )
    await _emit(tenant_id, "setlist.stream.ended", report.model_dump())
    return report
