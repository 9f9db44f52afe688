"""What a killed and restarted control plane must still know: the leases of the slots
taken before (a tenant lock, a tenant's run quota), so their holders can renew and
release them, and the server can take back those of holders that died."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import anyio
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import temporary_settings

from setlist.controlplane.local import start_local_server
from setlist.core.credentials import client_settings


async def _take(name: str) -> str:
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=1)
        )
        response = await client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=60
        )
        return response.json()["lease_id"]


async def _renew_and_release(name: str, lease_id: str) -> tuple[int, int]:
    """→ the slots taken after the renewal, and after the release."""
    async with get_client() as client:
        await client.renew_concurrency_lease(uuid.UUID(lease_id), lease_duration=60)
        held = (await client.read_global_concurrency_limit_by_name(name)).active_slots
        await client.release_concurrency_slots_with_lease(uuid.UUID(lease_id))
        return held, (await client.read_global_concurrency_limit_by_name(name)).active_slots


@pytest.mark.server  # its own server, started twice: about a minute
def test_a_slot_taken_before_a_restart_is_renewed_and_released_after_it(setlist_home):
    operator = os.environ["PREFECT_API_AUTH_STRING"]  # the session's, set by conftest
    home = Path(tempfile.mkdtemp(prefix="restart-", dir=setlist_home))
    name = f"lease-{uuid.uuid4().hex[:8]}"
    proc, api = start_local_server(home, operator)
    try:
        with temporary_settings(updates=client_settings(api, operator)):
            lease_id = anyio.run(_take, name)
    finally:
        proc.kill()  # as a crash: nothing is written on the way out
        proc.wait(timeout=30)
    proc, api = start_local_server(home, operator)  # the same database and home
    try:
        with temporary_settings(updates=client_settings(api, operator)):
            held, after = anyio.run(_renew_and_release, name, lease_id)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (held, after) == (1, 0)
