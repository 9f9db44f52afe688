"""The platform's own automations: a run whose process died ends Crashed, with or without
anyone to alert; and every job beats often enough for that to be safe."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.schemas.objects import StateType
from prefect.events.schemas.automations import Posture
from pydantic import ValidationError

from setlist.core.settings import Settings, get_settings
from setlist.observability import automations
from setlist.observability.automations import HEARTBEAT, UNRESPONSIVE, unresponsive_automation


def test_a_run_silent_while_running_is_crashed_and_nobody_needs_to_be_told():
    auto = unresponsive_automation()
    trigger = auto.trigger
    assert trigger.posture == Posture.Proactive and trigger.threshold == 1
    assert trigger.after == {HEARTBEAT}
    assert trigger.for_each == {"prefect.resource.id"}  # one window per run
    assert trigger.match.model_dump() == {"prefect.resource.id": "prefect.flow-run.*"}
    assert trigger.within == timedelta(seconds=get_settings().unresponsive_seconds)
    # Ending, or leaving Running for other hands (rescheduled after a preemption,
    # retrying, paused, cancelled), is no death; only silence while Running is.
    states = {e.removeprefix("prefect.flow-run.") for e in trigger.expect - {HEARTBEAT}}
    assert {"Completed", "Failed", "Crashed", "Cancelled", "Scheduled", "AwaitingRetry"} <= states
    assert {"Paused", "Suspended", "Cancelling"} <= states
    assert HEARTBEAT in trigger.expect and not {"Running", "Retrying"} & states
    (action,) = auto.actions
    assert action.type == "change-flow-run-state" and action.state == StateType.CRASHED
    assert not action.force  # a run that ended meanwhile keeps its end
    assert "no heartbeat" in action.message
    assert unresponsive_automation(timedelta(seconds=60)).trigger.within.total_seconds() == 60


def test_the_window_leaves_room_for_a_late_heartbeat():
    assert Settings(heartbeat_seconds=30, unresponsive_seconds=60).unresponsive_seconds == 60
    with pytest.raises(ValidationError, match="late heartbeat"):
        Settings(heartbeat_seconds=60, unresponsive_seconds=65)
    with pytest.raises(ValidationError):
        Settings(heartbeat_seconds=10)  # Prefect beats every 30 s at the most
    with pytest.raises(ValidationError):
        Settings(heartbeat_seconds=30, unresponsive_seconds=45)  # a lock's lease is >= 60 s


def test_every_job_beats_at_the_platforms_rhythm_whatever_the_workers_env(monkeypatch):
    """The job's own settings must agree with the automation's window, on a process
    worker (which hands down its whole environment) as on Kubernetes (which does not)."""
    from prefect.client.schemas.objects import FlowRun

    from setlist.workers.job_credentials import job_environment

    run = FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), work_queue_name="acme.normal")
    worker_env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "600", "PATH": "/usr/bin"}
    monkeypatch.setenv("SETLIST_HEARTBEAT_SECONDS", "30")
    monkeypatch.setenv("SETLIST_UNRESPONSIVE_SECONDS", "60")
    get_settings.cache_clear()
    try:
        env = job_environment(worker_env, run, mint=False)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert env["SETLIST_HEARTBEAT_SECONDS"] == "30"
    assert env["SETLIST_UNRESPONSIVE_SECONDS"] == "60"  # the job's lock leases
    assert env["PATH"] == "/usr/bin"


@pytest.mark.server
async def test_the_unresponsive_automation_is_applied_without_a_notification_block(client):
    from setlist.core.tenancy import SetlistError

    # the session's bootstrap (as `setlist up` and the benchmarks) applied it
    (applied,) = await client.read_automations_by_name(UNRESPONSIVE)
    assert applied.enabled and applied.trigger.after == {HEARTBEAT}
    with pytest.raises(SetlistError, match="no notification block"):
        await automations.apply(client, f"no-such-block-{uuid.uuid4().hex[:6]}")
    assert len(await client.read_automations_by_name(UNRESPONSIVE)) == 1
    assert await automations.apply_platform(client) == [(UNRESPONSIVE, "updated")]
    assert len(await client.read_automations_by_name(UNRESPONSIVE)) == 1


@pytest.mark.server
def test_cluster_init_applies_it_too(prefect_server):
    """A cluster's platform never runs ``setlist up``: its init must apply it."""
    import anyio
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from setlist.cli import app

    async def present() -> int:
        async with get_client() as c:
            return len(await c.read_automations_by_name(UNRESPONSIVE))

    async def delete() -> None:
        async with get_client() as c:
            for automation in await c.read_automations_by_name(UNRESPONSIVE):
                await c.delete_automation(automation.id)

    anyio.run(delete)
    assert anyio.run(present) == 0
    result = CliRunner().invoke(app, ["cluster", "init"])
    assert result.exit_code == 0, result.output
    assert "are marked Crashed" in result.output
    assert anyio.run(present) == 1


async def _heartbeat(client, run_id) -> None:
    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": HEARTBEAT,
        "resource": {"prefect.resource.id": f"prefect.flow-run.{run_id}"},
    }
    (await client.request("POST", "/events", json=[event])).raise_for_status()


@pytest.mark.server
async def test_a_run_whose_heartbeats_stop_is_marked_crashed_and_not_billed(client):
    """The real trigger and action services of the server, on the shortest window
    Prefect allows (10 s), narrowed to this test's runs: one falls silent, one keeps
    beating, one ends. (Real jobs beat every 30 s at the fastest: the chaos benchmark's
    worker-kill scenarios run that whole path.)"""
    from prefect import flow
    from prefect.states import Completed, Running

    from setlist.billing.metering import platform_failure

    @flow(name="heartbeat-probe")
    def probe() -> None:
        pass

    runs = [await client.create_flow_run(probe, state=Running()) for _ in range(3)]
    silent, beating, ended = (r.id for r in runs)
    auto = unresponsive_automation(timedelta(seconds=10))
    auto.name = f"{UNRESPONSIVE} (test {uuid.uuid4().hex[:6]})"
    auto.trigger.match = type(auto.trigger.match)(
        {"prefect.resource.id": [f"prefect.flow-run.{r}" for r in (silent, beating, ended)]}
    )
    automation_id = await client.create_automation(auto)
    try:
        await asyncio.sleep(2)  # the triggers service loads new automations
        for run_id in (silent, beating, ended):
            await _heartbeat(client, run_id)
        await client.set_flow_run_state(ended, Completed())
        deadline = time.monotonic() + 60
        while True:
            state = (await client.read_flow_run(silent)).state
            if state.type == StateType.CRASHED or time.monotonic() > deadline:
                break
            await _heartbeat(client, beating)
            await asyncio.sleep(2)
        assert state.type == StateType.CRASHED, state
        assert "no heartbeat for 10 s" in state.message
        assert platform_failure(state.type, state.message)  # the platform's: not billed
        assert (await client.read_flow_run(beating)).state.type == StateType.RUNNING
        assert (await client.read_flow_run(ended)).state.type == StateType.COMPLETED
    finally:
        await client.delete_automation(automation_id)
