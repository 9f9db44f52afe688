"""The benchmarks of ``bench/`` as one performance test: ``setlist bench run``
(``make performance-test``).

Each benchmark runs as a child process, in quick mode with small sizes (``QUICK``) or
with its own defaults (full mode), each in a session of its own with a time limit: a
benchmark that overruns it is interrupted (SIGINT, so its test server and workers are
stopped by its own cleanup), then killed with everything it started. Its figures are the
last line of its output, one JSON object (every script of ``bench/`` ends that way).
Children get a fresh ``SETLIST_HOME`` and no ``PREFECT_API_*`` of the caller: benchmarks
start their own servers and never touch the operator's stack.

Quick figures are for "does every benchmark still run, and roughly how does it do" —
small sizes are dominated by fixed costs, so their ratios are not the README's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from setlist.core.settings import REPO_ROOT
from setlist.core.tenancy import SetlistError

BENCH_DIR = REPO_ROOT / "bench"
HELPERS = {"servers"}  # modules of bench/ that other benchmarks import
# Small sizes, cheapest first: each takes seconds to about a minute on 2 cores.
QUICK: dict[str, list[str]] = {
    "billing": ["--records", "20000", "--tenants", "5", "--repeat", "1"],
    "backup": ["--gb", "0.02", "--rounds", "1"],
    "security": ["--tenants", "3"],
    "metrics": ["--tenants", "20", "--runs", "200"],
    "dispatch": ["--tenants", "20", "--waiting", "1", "--limit", "10", "--rounds", "3"],
    "etl": ["--events", "20000", "--files", "2", "--rounds", "1"],
    "ml": [
        "--events",
        "20000",
        "--users",
        "500",
        "--tracks",
        "300",
        "--factors",
        "8",
        "--iterations",
        "2",
        "--rounds",
        "1",
        "--device",
        "cpu",
    ],  # fmt: skip
    "gateway": [
        "--webhooks",
        "10",
        "--concurrency",
        "4",
        "--tenants",
        "2",
        "--paced",
        "4",
        "--rate",
        "4",
    ],  # fmt: skip
    "job_api": ["--runs", "1", "--calls", "10"],
    # the store faults only: a killed worker's run takes minutes to be declared dead
    "chaos": ["--only", "store-faults", "scratch-full", "--events", "4000", "--files", "2"],
    # PostgreSQL's two shapes only: SQLite's onboarding alone takes minutes here.
    "ha": [
        "--only",
        "one_replica,two_replicas",
        "--webhooks",
        "20",
        "--concurrency",
        "4",
        "--tenants",
        "2",
        "--contention-runs",
        "4",
        "--kill-webhooks",
        "20",
    ],  # fmt: skip
    "stream": ["--events", "20000", "--rate", "5000", "--tenants", "2", "--database", "sqlite"],
    # a check that the mixed load runs end to end; the soak's figures need ≥ 500 runs
    "soak": ["--runs", "12", "--drain-s", "300"],
}
QUICK_TIMEOUT_S = 300.0
# The gateway bench waits for the Prefect server to go idle between its phases (up to
# 120 s each, longer on a loaded machine).
QUICK_TIMEOUTS_S = {"gateway": 600.0, "ha": 600.0, "soak": 900.0}
FULL_TIMEOUT_S = 3600.0
GRACE_S = 15.0  # after SIGINT, before SIGKILL
STRIPPED_ENV = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")


@dataclass
class BenchResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    command: list[str] = field(default_factory=list)
    figures: dict[str, Any] | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def available(bench_dir: Path = BENCH_DIR) -> list[str]:
    """The benchmarks: quick-sized ones first, in ``QUICK``'s order, then the rest."""
    names = {
        p.stem
        for p in bench_dir.glob("*.py")
        if not p.stem.startswith("_") and p.stem not in HELPERS
    }
    order = list(QUICK)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def select(only: list[str] | None, bench_dir: Path = BENCH_DIR) -> list[str]:
    names = available(bench_dir)
    if not only:
        return names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SetlistError(
            f"unknown benchmark {', '.join(map(repr, unknown))}; known: {', '.join(names)}"
        )
    return [n for n in names if n in only]


def last_json(output: str) -> dict[str, Any] | None:
    """The last non-empty line of a benchmark's output, when it is one JSON object."""
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _tail(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-400:]


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the benchmark's process group (its cleanup stops its servers), then
    SIGKILL to whatever is left of the group."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader
    except ProcessLookupError:
        pass
    proc.wait()


def run_one(name: str, args: list[str], timeout: float, bench_dir: Path = BENCH_DIR) -> BenchResult:
    """Run one benchmark script to its end or its time limit; never raises for its sake."""
    command = [sys.executable, str(bench_dir / f"{name}.py"), *args]
    home = Path(tempfile.mkdtemp(prefix=f"setlist-bench-{name}-"))
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.update(SETLIST_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            out, err = proc.communicate()
            return BenchResult(
                name,
                "timeout",
                round(time.monotonic() - start, 1),
                command,
                reason=f"stopped after its limit of {timeout:.0f} s; last output: {_tail(err)}",
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    seconds = round(time.monotonic() - start, 1)
    figures = last_json(out)
    if proc.returncode != 0:
        why = f"exit status {proc.returncode}: {_tail(err) or _tail(out)}"
        return BenchResult(name, "failed", seconds, command, figures, why)
    if figures is None:
        why = f"its last line is not a JSON object: {_tail(out, 1)!r}"
        return BenchResult(name, "failed", seconds, command, None, why)
    return BenchResult(name, "ok", seconds, command, figures)


def run(
    names: list[str],
    *,
    quick: bool = True,
    timeout: float | None = None,
    bench_dir: Path = BENCH_DIR,
    on_start=None,
    on_done=None,
) -> list[BenchResult]:
    """Each named benchmark in turn; ``on_start(name)``/``on_done(result)`` report progress."""
    results = []
    for name in names:
        if quick and name not in QUICK:
            why = "no quick sizes known for it (setlist.observability.benchmarks.QUICK)"
            result = BenchResult(name, "skipped", 0.0, reason=why)
        else:
            if on_start:
                on_start(name)
            limit = timeout or (
                QUICK_TIMEOUTS_S.get(name, QUICK_TIMEOUT_S) if quick else FULL_TIMEOUT_S
            )
            result = run_one(name, QUICK[name] if quick else [], limit, bench_dir)
        results.append(result)
        if on_done:
            on_done(result)
    return results


def headline(figures: dict[str, Any] | None, limit: int = 6) -> str:
    """The figures worth a table cell: ratios first, then other numbers, ``key=value``."""
    if not figures:
        return ""
    numbers = {
        k: v for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    keys = sorted(numbers, key=lambda k: ("ratio" not in k, list(figures).index(k)))
    flags = [f"{k}={v}" for k, v in figures.items() if isinstance(v, bool)]
    return ", ".join([f"{k}={numbers[k]}" for k in keys[:limit]] + flags[:2])


def report(results: list[BenchResult], *, quick: bool) -> dict[str, Any]:
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "ok": all(r.status in ("ok", "skipped") for r in results),
        "benchmarks": [r.as_dict() for r in results],
    }


def write_report(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def default_report_path(home: Path) -> Path:
    return home / "reports" / f"performance-test-{datetime.now():%Y%m%d-%H%M%S}.json"
