"""ETL benchmark: Setlist's transform-and-load core against DuckDB on the same input.

    .venv/bin/python bench/etl.py [--events 5000000] [--files 8] [--defects 0.01]

Generates gzipped JSON-lines raw files (realistic events, a share of planted defects),
then runs, each in a fresh child process so peak RSS is its own:
  - setlist: ``flows.etl.load_new_files`` (parse, validate, quarantine, dedupe, write
    date-partitioned Parquet, publish) against a local Prefect test server;
  - duckdb: the same validation, dedupe by event id and date-partitioned Parquet write.
Prints one JSON object as its last line: events, setlist_s, duckdb_s, ratio, events_per_s,
peak_rss_mb (setlist), duckdb_peak_rss_mb, and the rows each loaded.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TENANT = "bench-tenant"


def generate(raw_dir: Path, events: int, files: int, defects: float) -> None:
    from setlist.demo import iter_raw_lines

    per_file = -(-events // files)
    lines = iter_raw_lines(TENANT, events=events, defect_share=defects, seed=11)
    for n in range(files):
        with gzip.open(raw_dir / f"events-{n:03d}.jsonl.gz", "wb", compresslevel=1) as out:
            for _ in range(per_file):
                line = next(lines, None)
                if line is None:
                    break
                out.write(line[0] + b"\n")


def run_setlist(root: Path) -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    from blocks.storage import LocalStorageConfig
    from flows.etl import load_new_files
    from setlist.storage import tenant_storage

    storage = tenant_storage(TENANT, LocalStorageConfig(root=str(root)))
    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        report = load_new_files(storage, TENANT, max_bad_share=0.5, scratch=str(root / "scratch"))
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": report.table_rows, "rejected": report.rejected}


DUCKDB_SQL = """
COPY (
  WITH raw AS (
    SELECT * FROM read_json('{glob}', format='newline_delimited', ignore_errors=true,
      columns={{event_id: 'VARCHAR', tenant_id: 'VARCHAR', user_id: 'VARCHAR',
               track_id: 'VARCHAR', artist_id: 'VARCHAR', ts: 'VARCHAR',
               ms_played: 'BIGINT', context: 'VARCHAR', device: 'VARCHAR',
               country: 'VARCHAR'}})
  ), typed AS (
    SELECT *, TRY_CAST(ts AS TIMESTAMPTZ) AS t FROM raw
  ), valid AS (
    SELECT event_id, '{tenant}' AS tenant_id, user_id, track_id, artist_id, t AS ts,
           ms_played, lower(trim(context)) AS context, lower(trim(device)) AS device,
           upper(trim(country)) AS country, strftime(t, '%Y-%m-%d') AS date
    FROM typed
    WHERE event_id IS NOT NULL AND user_id IS NOT NULL AND track_id IS NOT NULL
      AND artist_id IS NOT NULL AND t IS NOT NULL AND ms_played IS NOT NULL
      AND ms_played BETWEEN 0 AND 86400000
      AND (tenant_id IS NULL OR tenant_id = '{tenant}')
      AND t <= now() + INTERVAL 5 MINUTE AND t >= TIMESTAMPTZ '2000-01-01'
      AND (country IS NULL OR regexp_full_match(upper(trim(country)), '[A-Z]{{2}}'))
  )
  SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (PARTITION BY event_id ORDER BY ts) AS rn FROM valid
  ) WHERE rn = 1 ORDER BY ts, event_id
) TO '{out}' (FORMAT parquet, PARTITION_BY (date), COMPRESSION zstd, OVERWRITE_OR_IGNORE)
"""


def run_duckdb(raw_dir: Path, out: Path) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2; SET TimeZone = 'UTC'")
    t0 = time.perf_counter()
    con.execute(DUCKDB_SQL.format(glob=f"{raw_dir}/*.jsonl.gz", tenant=TENANT, out=out))
    seconds = time.perf_counter() - t0
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet')").fetchone()[0]
    return {"seconds": seconds, "rows": rows}


def child(kind: str, workdir: Path) -> None:
    if kind == "setlist":
        result = run_setlist(workdir / "store")
    else:
        result = run_duckdb(workdir / "store" / "tenants" / TENANT / "raw", workdir / "duck")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--defects", type=float, default=0.01)
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip DuckDB (for a memory run at sizes where DuckDB itself needs many GB)",
    )
    ap.add_argument("--child", choices=["setlist", "duckdb"])
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return

    workdir = Path(tempfile.mkdtemp(prefix="setlist-bench-etl-"))
    try:
        raw_dir = workdir / "store" / "tenants" / TENANT / "raw"
        raw_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        generate(raw_dir, args.events, args.files, args.defects)
        print(
            f"generated {args.events} events in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
        results = {}
        for kind in ("setlist",) if args.no_baseline else ("duckdb", "setlist"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--workdir", str(workdir)],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
                cwd=ROOT,
            )
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{kind}: {results[kind]}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    s, d = results["setlist"], results.get("duckdb")
    print(
        json.dumps(
            {
                "events": args.events,
                "setlist_s": round(s["seconds"], 2),
                "duckdb_s": round(d["seconds"], 2) if d else None,
                "ratio": round(s["seconds"] / d["seconds"], 2) if d else None,
                "events_per_s": round(args.events / s["seconds"]),
                "peak_rss_mb": round(s["peak_rss_mb"]),
                "duckdb_peak_rss_mb": round(d["peak_rss_mb"]) if d else None,
                "setlist_rows": s["rows"],
                "duckdb_rows": d["rows"] if d else None,
            }
        )
    )


if __name__ == "__main__":
    main()
