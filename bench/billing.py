"""Billing benchmark: usage records → priced invoice lines, Setlist's code against DuckDB.

    .venv/bin/python bench/billing.py [--records 10000000] [--tenants 100] [--repeat 3]

Generates N usage records in memory (Arrow, the usage schema's columns; the key columns
dictionary-encoded, as Arrow holds low-cardinality strings): a month of runs of T
tenants — cpu and memory records per run, GPU records for training runs, rows per ETL
load, one storage record per tenant and day — with quantities in exact base units. Then
aggregates them into invoice lines per tenant, in this process, on the same table:

  - setlist: ``setlist.billing.pricing.aggregate_usage`` then ``price`` for every tenant (what the
    billing-report flow runs), amounts as Decimal rounded once per line;
  - duckdb: the same grouping in SQL and the same pricing in exact integer arithmetic
    (HUGEINT, half-up rounding to the cent), on the dictionary-encoded table and on a
    plain-string copy; the faster of the two is the baseline.

Each side's time is the best of ``--repeat`` runs. Prints one JSON object as its last
line: records, setlist_s, duckdb_s, ratio (setlist_s / duckdb_s), records_per_s and
totals_match (every tenant's total, and the grand total, equal to the cent).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from setlist.billing.pricing import UNITS, Metric, PricePlan, aggregate_usage, price  # noqa: E402
from setlist.core.tenancy import TIERS, JobType  # noqa: E402

RUN_JOBS = [j.value for j in JobType]
# Each job type's share of the runs metered, in RUN_JOBS' order (stream-ingest: a run an
# hour per streaming tenant).
SHARES = {"ml-training": 0.08, "data-etl": 0.3, "tenant-backup": 0.14, "security-scan": 0.16}
SHARES |= {"billing-report": 0.12, "canary": 0.17, "stream-ingest": 0.03}
JOB_SHARES = [SHARES[j] for j in RUN_JOBS]


def generate(records: int, tenants: int, seed: int) -> pa.Table:
    """A month of usage of ``tenants`` tenants, ``records`` rows, reproducible by seed."""
    rng = np.random.default_rng(seed)
    storage_rows = min(tenants * 30, records)
    n = records - storage_rows
    # per run: cpu + memory always, rows for ETL loads, GPU for training runs
    metric = rng.choice([0, 1, 2, 4], size=n, p=[0.44, 0.44, 0.04, 0.08]).astype(np.int32)
    job = rng.choice(len(RUN_JOBS), size=n, p=JOB_SHARES).astype(np.int32)
    job[metric == 2] = RUN_JOBS.index(JobType.ml_training.value)
    job[metric == 4] = RUN_JOBS.index(JobType.data_etl.value)
    millicpu = np.array([t.millicpu for t in TIERS.values()])
    mib = np.array([t.memory_mib for t in TIERS.values()])
    tier = rng.integers(0, len(TIERS), n)
    running_ms = rng.lognormal(14.5, 1.2, n).astype(np.int64)  # median ≈ 33 min
    quantity = np.where(
        metric == 0,
        millicpu[tier] * running_ms,
        np.where(
            metric == 1,
            mib[tier] * running_ms,
            np.where(metric == 2, running_ms, rng.integers(1, 5_000_000, n)),
        ),
    )
    storage_bytes = rng.integers(10**6, 2 * 10**12, storage_rows)
    tenant_names = pa.array([f"tenant-{i:05d}" for i in range(tenants)])
    tenant = np.concatenate(
        [rng.integers(0, tenants, n), np.arange(storage_rows) % tenants]
    ).astype(np.int32)
    jobs = pa.array([*RUN_JOBS, ""])
    metrics = pa.array([m.value for m in Metric])
    job_all = np.concatenate([job, np.full(storage_rows, len(RUN_JOBS), np.int32)])
    metric_all = np.concatenate([metric, np.full(storage_rows, 3, np.int32)])
    quantity_all = np.concatenate([quantity, storage_bytes * 86_400]).astype(np.int64)
    return pa.table(
        {
            "tenant_id": pa.DictionaryArray.from_arrays(pa.array(tenant), tenant_names),
            "job_type": pa.DictionaryArray.from_arrays(pa.array(job_all), jobs),
            "metric": pa.DictionaryArray.from_arrays(pa.array(metric_all), metrics),
            "quantity": pa.array(quantity_all, pa.int64()),
        }
    )


def run_setlist(table: pa.Table, plan: PricePlan) -> dict[str, tuple[int, Decimal]]:
    """tenant → (lines, total): the billing flow's aggregation and pricing."""
    by_tenant: dict[str, list] = {}
    for total in aggregate_usage(table):
        by_tenant.setdefault(total.tenant_id, []).append(total)
    out = {}
    for tenant, totals in by_tenant.items():
        invoice = price(tenant, totals, plan, monthly_terms=False)
        out[tenant] = (len(invoice.lines), invoice.total)
    return out


def _prices_sql(plan: PricePlan) -> str:
    rows = []
    for metric in Metric:
        sign, digits, exponent = plan.rate(metric).as_tuple()
        num = int("".join(map(str, digits)) or "0") * (10 ** max(exponent, 0))
        den = UNITS[metric].per_unit * 10 ** max(-exponent, 0)
        rows.append(f"('{metric.value}', {num}::HUGEINT, '{den}'::HUGEINT)")
    return "VALUES " + ", ".join(rows)


DUCKDB_SQL = """
WITH prices(metric, num, den) AS ({prices}),
g AS (
  SELECT tenant_id, job_type, metric, sum(quantity) AS q FROM usage GROUP BY ALL
),
lines AS (
  SELECT g.tenant_id, (2 * g.q * p.num * 100 + p.den) // (2 * p.den) AS cents
  FROM g JOIN prices p ON g.metric = p.metric WHERE g.q > 0
)
SELECT tenant_id, count(*) AS lines, sum(cents) AS cents FROM lines GROUP BY tenant_id
"""


def run_duckdb(con, plan: PricePlan) -> dict[str, tuple[int, Decimal]]:
    rows = con.sql(DUCKDB_SQL.format(prices=_prices_sql(plan))).fetchall()
    return {t: (int(n), Decimal(int(c)) / 100) for t, n, c in rows}


def best(fn, repeat: int):
    seconds, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        seconds = min(seconds, time.perf_counter() - t0)
    return seconds, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    import duckdb

    t0 = time.perf_counter()
    table = generate(args.records, args.tenants, args.seed)
    plain = table.cast(
        pa.schema(
            [
                (f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                for f in table.schema
            ]
        )
    )
    print(
        f"generated {table.num_rows} records in {time.perf_counter() - t0:.1f} s", file=sys.stderr
    )
    plan = PricePlan()

    setlist_s, ours = best(lambda: run_setlist(table, plan), args.repeat)
    con = duckdb.connect()
    con.register("usage", table)
    duck_dict_s, theirs = best(lambda: run_duckdb(con, plan), args.repeat)
    con.unregister("usage")
    con.register("usage", plain)
    duck_plain_s, theirs_plain = best(lambda: run_duckdb(con, plan), args.repeat)
    duckdb_s = min(duck_dict_s, duck_plain_s)
    total = sum((t for _, t in ours.values()), Decimal("0.00"))
    match = (
        ours == theirs == theirs_plain
        and total == sum((t for _, t in theirs.values()), Decimal("0.00"))
        and len(ours) == args.tenants
    )
    print(
        f"setlist {setlist_s:.3f} s; duckdb {duck_dict_s:.3f} s (dictionary), "
        f"{duck_plain_s:.3f} s (plain strings)",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "records": table.num_rows,
                "tenants": args.tenants,
                "setlist_s": round(setlist_s, 4),
                "duckdb_s": round(duckdb_s, 4),
                "ratio": round(setlist_s / duckdb_s, 3),
                "records_per_s": round(table.num_rows / setlist_s),
                "totals_match": match,
                "lines": sum(n for n, _ in ours.values()),
                "total": str(total),
                "duckdb_dictionary_s": round(duck_dict_s, 4),
                "duckdb_plain_s": round(duck_plain_s, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
