"""The seed's make targets call the CLI commands the tests drive (``make -n`` prints a
target's commands without running them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not shutil.which("make"), reason="needs make")


def _command(*args: str, env: dict | None = None) -> str:
    """The last command ``make -n`` prints for the target (after any install step)."""
    run = subprocess.run(
        ["make", "-n", "--no-print-directory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    return " ".join(run.stdout.strip().splitlines()[-1].split())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["check-cluster"], ".venv/bin/setlist cluster check"),
        (
            ["check-cluster", "KUBE_CONTEXT=prod"],
            ".venv/bin/setlist cluster check --kube-context prod",
        ),
        (["performance-test"], ".venv/bin/setlist bench run --quick"),
        (
            ["performance-test", "ONLY=billing backup", "REPORT=out.json"],
            ".venv/bin/setlist bench run --quick --only billing --only backup --out out.json",
        ),
        (["monitor-performance"], ".venv/bin/setlist monitor --no-health"),
        (["monitor-all"], ".venv/bin/setlist monitor --health"),
        (
            ["monitor-all", "TENANT_ID=acme", "INTERVAL=2"],
            ".venv/bin/setlist monitor --health --interval 2 --tenant acme",
        ),
    ],
)
def test_target_runs_its_command(args, expected):
    assert _command(*args) == expected
