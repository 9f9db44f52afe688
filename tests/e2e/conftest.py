"""A real process worker on the session's server, for the few end-to-end paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


def _cancel_leftover_runs() -> None:
    """Other test modules leave runs behind on purpose: Scheduled ones the worker must not
    run, and Pending or Running ones set by hand (no process behind them) that would hold
    slots of the pool's concurrency limit for ever."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    async def cancel_all():
        async with get_client() as client:
            left = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
            scheduled = FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=left))
            )
            # A read returns one page (200 runs) and the suite leaves more than that:
            # read again until none is left, so no foreign run takes a slot of the pool.
            for _ in range(100):
                runs = await client.read_flow_runs(flow_run_filter=scheduled, limit=200)
                if not runs:
                    return
                for run in runs:
                    await client.set_flow_run_state(run.id, Cancelled(), force=True)
            raise RuntimeError("Scheduled runs keep appearing; cannot start from a quiet pool")

    anyio.run(cancel_all)


def _wait_online(name: str, timeout: float = 90) -> None:
    """Until the worker has polled the server once (it is then listed as online)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus

    async def online() -> bool:
        async with get_client() as client:
            workers = await client.read_workers_for_work_pool("setlist-local")
        return any(w.name == name and w.status == WorkerStatus.ONLINE for w in workers)

    deadline = time.monotonic() + timeout
    while not anyio.run(online):
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {name} not online after {timeout:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def worker(prefect_server, worker_api_url, setlist_home):
    _cancel_leftover_runs()
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=worker_api_url,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
    )
    log = open(setlist_home / "e2e-worker.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            "setlist-local",
            "--type",
            "setlist-process",
            "--limit",
            "8",
            "--name",
            "e2e-worker",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait_online("e2e-worker")
    yield proc
    for _ in range(2):  # the worker ignores the first signal
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


async def wait_final(client, run_ids, timeout: float = 180.0, on_poll=None):
    """Poll until every run is final; ``on_poll(runs)`` sees each snapshot."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        runs = [await client.read_flow_run(r) for r in run_ids]
        if on_poll:
            on_poll(runs)
        if all(r.state and r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            states = {str(r.id): r.state.name if r.state else None for r in runs}
            raise AssertionError(f"runs not final after {timeout}s: {states}")
        await asyncio.sleep(0.25)


async def setlist_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed ``setlist`` command against the session's server."""
    import asyncio
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    exe = Path(sys.executable).with_name("setlist")
    return await asyncio.to_thread(
        subprocess.run,
        [str(exe), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
