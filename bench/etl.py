"""ETL benchmark: Setlist's transform-and-load core against DuckDB on the same input.

    .venv/bin/python bench/etl.py [--events 5000000] [--files 8] [--defects 0.01]
                                  [--workers N] [--rounds 1] [--no-baseline] [--per-line]
                                  [--outside-flow]

Generates gzipped JSON-lines raw files (realistic events, a share of planted defects),
then runs, each in a fresh child process, ``--rounds`` times in alternation (DuckDB first):
  - setlist: ``setlist.etl.load.load_new_files`` (parse, validate, quarantine, dedupe, write
    date-partitioned Parquet, publish) against a local Prefect test server, staging with
    ``--workers`` (default: one per CPU; its worker processes are part of what is measured),
    inside a flow run, as the ``data-etl`` flow runs it: Prefect then records its task runs
    (a listing, one a raw file, one a date) as events, where outside a flow each task run
    makes its own API calls (~11 ms of the load's CPU and ~27 ms of the server's each,
    measured here; ~3 and ~3 ms in a flow run). Only the load is timed, not the flow run's
    start;
  - duckdb: the same validation, dedupe by event id and date-partitioned Parquet write;
  - with ``--per-line``, setlist-per-line: the load with its columnar fast path off
    (``SETLIST_ETL_FAST_JSON=0``: every JSON line decoded by orjson, as before the fast
    path), a baseline of Setlist's own under the same conditions;
  - with ``--outside-flow``, setlist-outside-flow: the load called outside any flow run,
    as this benchmark ran it before (``outside_flow_s``, ``outside_flow_cpu_s``).

Memory is measured from outside, over each side's process tree (the load's process, its
fork server, resource tracker and worker processes; not the Prefect test server the
harness starts before the load): every 50 ms this process reads each one's current and
peak RSS (VmRSS, VmHWM) from /proc. ``peak_rss_mb`` is the largest sum of current RSS seen
in one sample; ``peak_rss_upper_mb`` adds up each process's own peak, as if all peaked at
once (they don't: workers exit before the merge, where the load's process peaks), an upper
bound. Both count pages shared between processes (the modules a worker shares with the
fork server) once per process. CPU seconds are the load's process's own over the load, plus
what its descendants used.

Prints one JSON object as its last line: events, setlist_s, duckdb_s, ratio (best round of
each side), cpu_ratio (Setlist's CPU seconds over DuckDB's, in those rounds), events_per_s,
peak_rss_mb and peak_rss_upper_mb (Setlist's, the largest of its
rounds), duckdb_peak_rss_mb, each side's CPU seconds in its best round, the rows each
loaded, every round's times, and the load average after generating the input and at the
end (the machine may be shared: compare rounds, and CPU seconds).
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TENANT = "bench-tenant"


def generate(raw_dir: Path, events: int, files: int, defects: float) -> None:
    from setlist.etl.demo import iter_raw_lines

    per_file = -(-events // files)
    lines = iter_raw_lines(TENANT, events=events, defect_share=defects, seed=11)
    for n in range(files):
        with gzip.open(raw_dir / f"events-{n:03d}.jsonl.gz", "wb", compresslevel=1) as out:
            for _ in range(per_file):
                line = next(lines, None)
                if line is None:
                    break
                out.write(line[0] + b"\n")


def run_setlist(root: Path, workers: int | None, in_flow: bool = True) -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from blocks.storage import LocalStorageConfig
    from setlist.core.storage import tenant_storage
    from setlist.etl.load import load_new_files

    storage = tenant_storage(TENANT, LocalStorageConfig(root=str(root)))
    with prefect_test_harness(server_startup_timeout=120):
        # what runs now (the test server) is no part of the load's process tree
        skip = root.parent / "not-measured.json"
        skip.with_suffix(".tmp").write_text(json.dumps(_children(os.getpid())))
        skip.with_suffix(".tmp").rename(skip)

        def load() -> tuple:
            t0, cpu0 = time.perf_counter(), time.process_time()
            report = load_new_files(
                storage, TENANT, max_bad_share=0.5, scratch=str(root / "scratch"), workers=workers
            )
            return report, time.perf_counter() - t0, time.process_time() - cpu0

        # in a flow run, as the data-etl flow runs it: Prefect then records the task runs'
        # states as events, not with API calls of their own (see the module's docstring)
        report, seconds, cpu = flow(name="bench-etl-load")(load)() if in_flow else load()
    return {
        "seconds": seconds,
        "self_cpu_s": cpu,
        "rows": report.table_rows,
        "rejected": report.rejected,
    }


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
    t0, cpu0 = time.perf_counter(), time.process_time()
    con.execute(DUCKDB_SQL.format(glob=f"{raw_dir}/*.jsonl.gz", tenant=TENANT, out=out))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet')").fetchone()[0]
    return {"seconds": seconds, "self_cpu_s": cpu, "rows": rows}


def child(kind: str, workdir: Path, workers: int | None) -> None:
    if kind == "setlist-per-line":
        os.environ["SETLIST_ETL_FAST_JSON"] = "0"
    if kind.startswith("setlist"):
        result = run_setlist(workdir / "store", workers, in_flow=kind != "setlist-outside-flow")
    else:
        (workdir / "not-measured.json").write_text("[]")
        result = run_duckdb(workdir / "store" / "tenants" / TENANT / "raw", workdir / "duck")
    result["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


_TICK = os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _rss_kb(pid: int) -> tuple[int, int]:
    """(current, peak) RSS of a process in KiB; (0, 0) once it is gone."""
    now = peak = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    except OSError:
        pass
    return now, peak


class TreeSampler:
    """Samples the RSS of a process and its descendants (see the module's docstring), and
    the CPU time of the descendants (the process measures its own)."""

    def __init__(self, pid: int, skip_file: Path, every: float = 0.05):
        self.pid, self.skip_file, self.every = pid, skip_file, every
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.sampled = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        skip = None
        while not self.stop.wait(self.every):
            if skip is None:  # the child has not started its timed part yet
                if not self.skip_file.exists():
                    continue
                skip = set(json.loads(self.skip_file.read_text()))
            # a child still running the measured process's command line has not exec'd
            # yet: for that moment it shows the parent's memory, which is counted already
            own = _cmdline(self.pid)
            tree, todo = [], [self.pid]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo += [
                    k
                    for k in _children(pid)
                    if k not in skip and (pid != self.pid or _cmdline(k) != own)
                ]
            total = 0
            for pid in tree:
                now, peak = _rss_kb(pid)
                total += now
                if peak:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), peak)
                if pid != self.pid:
                    self.cpu[pid] = max(self.cpu.get(pid, 0.0), _cpu_s(pid))
            self.sampled = max(self.sampled, total)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {
            "peak_rss_mb": self.sampled / 1024,
            "peak_rss_upper_mb": sum(self.peaks.values()) / 1024,
            "processes": len(self.peaks),
            "children_cpu_s": sum(self.cpu.values()),
            "peak_rss_mb_by_process": sorted(
                (round(kb / 1024) for kb in self.peaks.values()), reverse=True
            ),
        }


def run_child(kind: str, workdir: Path, workers: int | None) -> dict:
    skip_file = workdir / "not-measured.json"
    skip_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, "--workdir", str(workdir)]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    sampler = TreeSampler(proc.pid, skip_file)
    out, _ = proc.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    result.update(sampler.finish())
    result["cpu_s"] = result["self_cpu_s"] + result["children_cpu_s"]
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out)
    return result


def reset(workdir: Path) -> None:
    """Remove what a round wrote, keeping the raw files."""
    tenant = workdir / "store" / "tenants" / TENANT
    for path in (tenant / "curated", tenant / "quarantine", workdir / "store" / "scratch"):
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(workdir / "duck", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--defects", type=float, default=0.01)
    ap.add_argument(
        "--workers", type=int, default=None, help="Setlist's staging workers (default: CPUs)"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate the sides this many times; best of each"
    )
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip DuckDB (for a memory run at sizes where DuckDB itself needs many GB)",
    )
    ap.add_argument(
        "--per-line",
        action="store_true",
        help="also run the load with its columnar fast path off (SETLIST_ETL_FAST_JSON=0)",
    )
    ap.add_argument(
        "--outside-flow",
        action="store_true",
        help="also run the load outside any flow run (each task run its own API calls)",
    )
    ap.add_argument(
        "--child", choices=["setlist", "duckdb", "setlist-per-line", "setlist-outside-flow"]
    )
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.workdir, args.workers)
        return

    workdir = Path(tempfile.mkdtemp(prefix="setlist-bench-etl-"))
    kinds = ("setlist",) if args.no_baseline else ("duckdb", "setlist")
    if args.per_line:
        kinds += ("setlist-per-line",)
    if args.outside_flow:
        kinds += ("setlist-outside-flow",)
    rounds: dict[str, list[dict]] = {kind: [] for kind in kinds}
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        raw_dir = workdir / "store" / "tenants" / TENANT / "raw"
        raw_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        generate(raw_dir, args.events, args.files, args.defects)
        print(
            f"generated {args.events} events in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
        load = [round(x, 2) for x in os.getloadavg()]
        for _ in range(args.rounds):
            for kind in kinds:
                reset(workdir)
                rounds[kind].append(run_child(kind, workdir, args.workers))
                print(f"{kind}: {rounds[kind][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def best(kind: str) -> dict | None:
        return min(rounds[kind], key=lambda r: r["seconds"]) if kind in rounds else None

    s, d = best("setlist"), best("duckdb")
    p, o = best("setlist-per-line"), best("setlist-outside-flow")
    print(
        json.dumps(
            {
                "events": args.events,
                "setlist_s": round(s["seconds"], 2),
                "duckdb_s": round(d["seconds"], 2) if d else None,
                "ratio": round(s["seconds"] / d["seconds"], 2) if d else None,
                "cpu_ratio": round(s["cpu_s"] / d["cpu_s"], 2) if d else None,
                "events_per_s": round(args.events / s["seconds"]),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rounds["setlist"])),
                "peak_rss_upper_mb": round(max(r["peak_rss_upper_mb"] for r in rounds["setlist"])),
                "setlist_parent_peak_rss_mb": round(
                    max(r["self_peak_rss_mb"] for r in rounds["setlist"])
                ),
                "setlist_processes": s["processes"],
                "duckdb_peak_rss_mb": round(max(r["peak_rss_mb"] for r in rounds["duckdb"]))
                if d
                else None,
                "setlist_rows": s["rows"],
                "duckdb_rows": d["rows"] if d else None,
                "workers": args.workers,
                "setlist_cpu_s": round(s["cpu_s"], 2),
                "duckdb_cpu_s": round(d["cpu_s"], 2) if d else None,
                "per_line_s": round(p["seconds"], 2) if p else None,
                "per_line_cpu_s": round(p["cpu_s"], 2) if p else None,
                "per_line_peak_rss_mb": round(p["peak_rss_mb"]) if p else None,
                "outside_flow_s": round(o["seconds"], 2) if o else None,
                "outside_flow_cpu_s": round(o["cpu_s"], 2) if o else None,
                "rounds_s": {k: [round(r["seconds"], 2) for r in v] for k, v in rounds.items()},
                "loadavg_before_after": [load[0], round(os.getloadavg()[0], 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
