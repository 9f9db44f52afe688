"""A tenant's configuration in its snapshots: exactly its own variables, never a
neighbour's whose id starts with its own."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.server


async def test_a_snapshot_holds_and_restores_only_the_tenants_own_variables(client, tenant_id):
    from prefect.client.schemas.actions import VariableCreate

    from setlist.backup.platform import apply_config, capture_config
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    neighbour = f"{tenant_id}-eu"  # a valid id that starts with this tenant's and a dash
    await create_tenant(client, TenantSpec(tenant_id=tenant_id))
    mine = {f"{tenant_id}_threshold": ([], 1), f"{tenant_id}-tagged": ([f"tenant:{tenant_id}"], 2)}
    theirs = {
        f"{neighbour}_threshold": ([], 3),
        f"{neighbour}-tagged": ([f"tenant:{neighbour}"], 4),
    }
    for name, (tags, value) in {**mine, **theirs}.items():
        await client.create_variable(VariableCreate(name=name, value=value, tags=tags))

    config = await capture_config(client, tenant_id)
    assert {v["name"]: v["value"] for v in config["variables"]} == {
        n: value for n, (_, value) in mine.items()
    }

    # A snapshot from before ownership was exact may hold the neighbour's: not written back.
    planted = {"name": f"{neighbour}-tagged", "value": 99, "tags": [f"tenant:{neighbour}"]}
    config["variables"].append(planted)
    done = await apply_config(client, tenant_id, config)
    assert (await client.read_variable_by_name(f"{neighbour}-tagged")).value == 4
    assert not [line for line in done if neighbour in line]
