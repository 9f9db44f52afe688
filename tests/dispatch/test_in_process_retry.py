"""A flow retry waiting in its own process is not a run to grant; a run given back is."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.states import Failed, Pending, Running

from setlist.dispatch._api import _filter_runs
from setlist.dispatch.state import retrying_in_process
from setlist.workers.unstarted import give_back_unstarted


@flow(name="retrying-probe", retries=1)
def retrying_probe() -> None:
    """Never runs: the test moves its runs' states."""


async def _raw(client, run_id) -> dict:
    (raw,) = await _filter_runs(client, {"flow_runs": {"id": {"any_": [str(run_id)]}}})
    return raw


@pytest.mark.server
async def test_an_in_process_retry_is_told_apart_from_a_given_back_run(client):
    retrying = await client.create_flow_run(retrying_probe)
    await client.set_flow_run_state(retrying.id, Pending())
    await client.set_flow_run_state(retrying.id, Running())
    answer = await client.set_flow_run_state(retrying.id, Failed(message="store 503"))
    assert answer.state.name == "AwaitingRetry"  # Prefect's in-process flow retry
    assert retrying_in_process(await _raw(client, retrying.id))

    given_back = await client.create_flow_run(retrying_probe)
    await client.set_flow_run_state(given_back.id, Pending())
    assert await give_back_unstarted(client, given_back.id, 1)
    raw = await _raw(client, given_back.id)
    assert raw["state_name"] == "AwaitingRetry" and not retrying_in_process(raw)
