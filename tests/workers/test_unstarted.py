"""A job that died before its flow run started gives the run back; one that started does not."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.schemas.objects import StateType
from prefect.states import Pending, Running
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from setlist.workers.process import SetlistProcessWorker
from setlist.workers.unstarted import GIVEBACK_MESSAGE, MAX_GIVEBACKS, give_back_unstarted

from .test_job_credentials import WORKER_ENV


@flow(name="unstarted-probe")
def probe() -> None:
    """Never runs: the tests only move its runs' states."""


async def _pending_run(client, tags=()):
    run = await client.create_flow_run(probe, tags=list(tags))
    await client.set_flow_run_state(run.id, Pending())
    return await client.read_flow_run(run.id)


async def test_a_run_whose_job_never_started_is_scheduled_again(client):
    run = await _pending_run(client)
    pending_state = run.state_id
    assert await give_back_unstarted(client, run.id, 1)
    back = await client.read_flow_run(run.id)
    assert back.state.type == StateType.SCHEDULED and back.state.name == "AwaitingRetry"
    assert back.state_id != pending_state  # a new state: the dispatcher must grant it again
    assert back.state.message.startswith(GIVEBACK_MESSAGE)
    assert back.run_count == 0


async def test_the_give_back_is_bounded_then_the_crash_stands(client):
    run = await _pending_run(client)
    for _ in range(MAX_GIVEBACKS):
        assert await give_back_unstarted(client, run.id, 1)
        await client.set_flow_run_state(run.id, Pending())
    assert not await give_back_unstarted(client, run.id, 1)
    assert (await client.read_flow_run(run.id)).state.type == StateType.PENDING


async def test_a_run_that_started_or_exited_cleanly_is_left_alone(client):
    run = await _pending_run(client)
    assert not await give_back_unstarted(client, run.id, 0)
    await client.set_flow_run_state(run.id, Running())
    assert not await give_back_unstarted(client, run.id, 1)
    after = await client.read_flow_run(run.id)
    assert after.state.type == StateType.RUNNING and after.run_count == 1


@pytest.mark.parametrize("exit_code", [1, 0])
async def test_the_process_worker_reports_a_given_back_run_as_no_crash(
    client, monkeypatch, exit_code
):
    """What Prefect's worker sees: exit 0 for a run given back (so it proposes no Crashed),
    the job's own status otherwise."""

    async def job_exits(self, flow_run, configuration, task_status=None):
        return ProcessWorkerResult(status_code=exit_code, identifier="4242")

    monkeypatch.setattr(ProcessWorker, "run", job_exits)
    run = await _pending_run(client, tags=["tenant:acme"])
    run.work_queue_name = "acme.normal"
    async with SetlistProcessWorker(work_pool_name="setlist-local") as worker:
        result = await worker.run(run, ProcessJobConfiguration(env=dict(WORKER_ENV)))
    assert result.status_code == 0
    state = (await client.read_flow_run(run.id)).state
    assert state.type == (StateType.SCHEDULED if exit_code else StateType.PENDING)
