"""Data ETL: a tenant's new raw event files → validated, deduplicated, date-partitioned Parquet.

Incremental (the table's manifest lists every raw file loaded), streaming (one raw file
at a time, in batches, staged on local scratch disk), all-or-nothing (one manifest write
publishes the load), and repeatable: the same raw files always give the same bytes.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from pydantic import BaseModel, Field

from setlist import audit
from setlist.curated import (
    Manifest,
    PartitionFile,
    canonical,
    publish,
    read_manifest,
    read_partition,
    split_by_date,
    write_partition,
)
from setlist.dispatch import tenant_lock
from setlist.raw_events import BatchValidator, read_batches
from setlist.runtime import USAGE_HOOKS, enter_tenant
from setlist.storage import TenantStorage
from setlist.tenancy import SetlistError

RAW_PREFIX = "raw/"
QUARANTINE_PREFIX = "quarantine/events/"


class TooManyBadRows(SetlistError):
    """More of the input is bad than the run may accept; nothing was published."""


@dataclass
class FileStats:
    key: str
    bytes: int
    lines: int = 0
    valid: int = 0
    rejects: Counter = field(default_factory=Counter)
    dates: set[str] = field(default_factory=set)


class EtlReport(BaseModel):
    tenant_id: str
    files: int = 0
    lines: int = 0
    valid_rows: int = 0
    loaded_rows: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects_by_reason: dict[str, int] = Field(default_factory=dict)
    partitions: list[str] = Field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0
    table_version: int = 0
    table_rows: int = 0


def _quarantine_key(raw_key: str) -> str:
    return QUARANTINE_PREFIX + raw_key.removeprefix(RAW_PREFIX) + ".rejects.jsonl"


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def find_new_raw_files(storage: TenantStorage, manifest: Manifest) -> list[tuple[str, int]]:
    """Raw files not in the table's manifest (a re-uploaded file of another size is new)."""
    return [
        (key, size)
        for key, size in storage.iter_objects(RAW_PREFIX)
        if manifest.loaded.get(key, {}).get("bytes") != size
    ]


def _write_scratch(path: Path, table: pa.Table) -> None:
    """Staged rows as an uncompressed Arrow IPC file: local, read once, right away."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_scratch(path: Path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_file(source).read_all()


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def stage_file(
    storage: TenantStorage,
    key: str,
    size: int,
    file_no: int,
    staging: Path,
    validator: BatchValidator,
    batch_rows: int,
) -> FileStats:
    """Parse one raw file in batches; valid rows go to scratch Parquet by date, rejects to
    the tenant's quarantine file for that raw file."""
    stats = FileStats(key=key, bytes=size)
    rejects_path = staging / f"rejects-{file_no:06d}.jsonl"
    with storage.open_read(key) as stream, open(rejects_path, "wb") as rejects_out:
        for batch_no, batch in enumerate(read_batches(stream, key, validator, batch_rows)):
            stats.lines += batch.lines
            for reject in batch.rejects:
                stats.rejects[reject.reason.value] += 1
                rejects_out.write(reject.as_json() + b"\n")
            if not batch.rows:
                continue
            stats.valid += batch.rows
            for date, part in split_by_date(batch.table):
                out = staging / f"date={date}" / f"{file_no:06d}-{batch_no:06d}.arrow"
                out.parent.mkdir(parents=True, exist_ok=True)
                _write_scratch(out, part)
                stats.dates.add(date)
    quarantine = rejects_path.read_bytes()
    if quarantine:
        storage.put_bytes(_quarantine_key(key), quarantine)
    return stats


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def merge_partition(
    storage: TenantStorage, date: str, current: PartitionFile | None, staged_dir: Path
) -> tuple[PartitionFile, int, int]:
    """Published rows of the date + staged rows → one canonical file. (file, added, dups)."""
    staged = [_read_scratch(p) for p in sorted(staged_dir.glob("*.arrow"))]
    old = read_partition(storage, current) if current else None
    parts = ([old] if old is not None else []) + staged
    merged, duplicates = canonical(pa.concat_tables(parts))
    added = merged.num_rows - (old.num_rows if old is not None else 0)
    return write_partition(storage, date, merged), added, duplicates


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


def load_new_files(
    storage: TenantStorage,
    tenant_id: str,
    *,
    max_bad_share: float = 0.05,
    batch_rows: int = 100_000,
    now: datetime | None = None,
    scratch: str | None = None,
) -> EtlReport:
    """The whole load (the flow wraps it with the tenant check, lock and reporting)."""
    t0 = time.perf_counter()
    report = EtlReport(tenant_id=tenant_id)
    manifest = read_manifest(storage)
    new = find_new_raw_files(storage, manifest)
    report.table_version, report.table_rows = manifest.version, manifest.rows
    if not new:
        return report
    validator = BatchValidator(tenant_id, now or datetime.now(UTC))
    if scratch:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="setlist-etl-", dir=scratch) as tmp:
        staging = Path(tmp)
        stats = [
            stage_file(storage, key, size, n, staging, validator, batch_rows)
            for n, (key, size) in enumerate(new)
        ]
        rejects = sum((s.rejects for s in stats), Counter())
        report.files = len(stats)
        report.lines = sum(s.lines for s in stats)
        report.valid_rows = sum(s.valid for s in stats)
        report.rejected = sum(rejects.values())
        report.rejects_by_reason = dict(sorted(rejects.items()))
        report.bytes_in = sum(s.bytes for s in stats)
        if report.lines and report.rejected / report.lines > max_bad_share:
            raise TooManyBadRows(
                f"{report.rejected} of {report.lines} lines are bad "
                f"({report.rejected / report.lines:.1%} > {max_bad_share:.1%} allowed): "
                f"{report.rejects_by_reason}; see {QUARANTINE_PREFIX}; nothing was loaded"
            )
        updated = Manifest(partitions=dict(manifest.partitions), loaded=dict(manifest.loaded))
        for date in sorted(set().union(*(s.dates for s in stats))):
            part, added, dups = merge_partition(
                storage, date, manifest.partitions.get(date), staging / f"date={date}"
            )
            updated.partitions[date] = part
            report.loaded_rows += added
            report.duplicates += dups
            report.bytes_out += part.bytes
            report.partitions.append(date)
        for s in stats:
            updated.loaded[s.key] = {
                "bytes": s.bytes,
                "lines": s.lines,
                "valid": s.valid,
                "rejected": sum(s.rejects.values()),
            }
    published = publish(storage, manifest, updated)
    report.table_version, report.table_rows = published.version, published.rows
    report.seconds = round(time.perf_counter() - t0, 3)
    report.events_per_s = round(report.lines / report.seconds, 1) if report.seconds else 0.0
    return report


@flow(name="data-etl", log_prints=True, persist_result=True, **USAGE_HOOKS)
async def data_etl(
    tenant_id: str,
    max_bad_share: Annotated[
        float, Field(ge=0, le=1, description="fail (load nothing) above this share of bad lines")
    ] = 0.05,
    batch_rows: Annotated[int, Field(ge=1000, le=2_000_000)] = 100_000,
) -> EtlReport:
    """Load the tenant's new raw event files into its curated events table."""
    tenant = await enter_tenant(tenant_id)
    logger = get_run_logger()
    async with tenant_lock(tenant_id, "etl"):
        report = load_new_files(
            tenant.storage,
            tenant_id,
            max_bad_share=max_bad_share,
            batch_rows=batch_rows,
            scratch=os.environ.get("SETLIST_SCRATCH"),
        )
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
