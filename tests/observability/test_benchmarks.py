"""`setlist bench run` (`make performance-test`): benchmarks as child processes, their
last-line JSON collected into a table and a report file."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest
from typer.testing import CliRunner

from setlist.cli import app
from setlist.observability import benchmarks


def test_quick_billing_writes_its_figures(tmp_path):
    """The cheapest real benchmark, end to end through the command."""
    out = tmp_path / "reports" / "perf.json"
    result = CliRunner().invoke(
        app, ["bench", "run", "--quick", "--only", "billing", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and report["ok"] is True
    [bench] = report["benchmarks"]
    assert bench["name"] == "billing" and bench["status"] == "ok"
    assert bench["command"][-6:] == benchmarks.QUICK["billing"]
    figures = bench["figures"]
    assert figures["records"] == 20000 and figures["tenants"] == 5
    assert figures["totals_match"] is True and figures["ratio"] > 0
    assert "billing" in result.output and "ratio=" in result.output and str(out) in result.output


def test_unknown_benchmark_is_refused_with_the_known_ones():
    result = CliRunner().invoke(app, ["bench", "run", "--only", "nope"])
    assert result.exit_code == 2
    assert "unknown benchmark 'nope'" in result.output and "billing" in result.output


def test_every_benchmark_has_quick_sizes():
    assert benchmarks.available() == list(benchmarks.QUICK)
    listed = CliRunner().invoke(app, ["bench", "list"])
    assert listed.exit_code == 0 and "--records 20000" in listed.output


@pytest.fixture
def bench_dir(tmp_path):
    """Stand-in benchmarks: one fine, one failing, one without JSON, one that hangs
    with a child of its own."""
    scripts = {
        "fine": textwrap.dedent(
            """
            import json, os
            print("warming up")
            env = {"api": os.environ.get("PREFECT_API_URL"), "home": os.environ["SETLIST_HOME"]}
            print(json.dumps({"ratio": 1.5, "n": 3, **env}))
            """
        ),
        "broken": 'import sys\nprint("bad input", file=sys.stderr)\nsys.exit(3)',
        "mute": 'print("done, no figures")',
        "hangs": textwrap.dedent(
            """
            import pathlib, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            pathlib.Path(sys.argv[1]).write_text(str(child.pid))
            time.sleep(600)
            """
        ),
    }
    for name, code in scripts.items():
        (tmp_path / f"{name}.py").write_text(code)
    return tmp_path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_outcomes_of_a_benchmark(bench_dir, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://operator-stack.invalid/api")
    fine = benchmarks.run_one("fine", [], timeout=60, bench_dir=bench_dir)
    assert fine.status == "ok" and fine.figures["ratio"] == 1.5 and fine.figures["n"] == 3
    # its own servers, never the operator's stack; a home of its own, removed after
    assert fine.figures["api"] is None
    assert fine.figures["home"] != os.environ["SETLIST_HOME"]
    assert not os.path.exists(fine.figures["home"])
    broken = benchmarks.run_one("broken", [], timeout=60, bench_dir=bench_dir)
    assert broken.status == "failed" and "exit status 3: bad input" in broken.reason
    mute = benchmarks.run_one("mute", [], timeout=60, bench_dir=bench_dir)
    assert mute.status == "failed" and "not a JSON object" in mute.reason
    assert benchmarks.headline(fine.figures) == "ratio=1.5, n=3"


def test_an_overrunning_benchmark_is_stopped_with_its_children(bench_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "GRACE_S", 1.0)
    pid_file = tmp_path / "child.pid"
    result = benchmarks.run_one("hangs", [str(pid_file)], timeout=3, bench_dir=bench_dir)
    assert result.status == "timeout" and "limit of 3 s" in result.reason
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
