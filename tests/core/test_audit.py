"""The audit trail of runs however made and cancels however asked for: who made a run
(pure, from what Prefect records), the start a worker records, the cancels read back
from Prefect's own record, and what a job's run token may not write."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.schemas.objects import CreatedBy, FlowRun
from prefect.events import Event

from setlist.controlplane import policy
from setlist.core import audit, runtokens

TENANT = "acme"


def _run(**fields) -> FlowRun:
    return FlowRun(
        id=uuid.uuid4(),
        name="happy-otter",
        flow_id=uuid.uuid4(),
        deployment_id=uuid.uuid4(),
        state_id=uuid.uuid4(),
        work_queue_name=f"{TENANT}.normal",
        tags=["setlist", f"tenant:{TENANT}", "job:canary"],
        **fields,
    )


@pytest.mark.parametrize(
    ("fields", "trigger", "kind", "actor"),
    [
        ({}, False, "api", audit.OPERATOR),
        ({"labels": {audit.SUBMITTED_BY: "alice"}}, False, "cli", "alice"),
        (
            {
                "auto_scheduled": True,
                "created_by": CreatedBy(id=uuid.uuid4(), type="SCHEDULE", display_value="daily"),
            },
            False,
            "schedule",
            "schedule:daily",
        ),
        ({"auto_scheduled": True}, False, "schedule", "schedule:deployment schedule"),
        (
            {"created_by": CreatedBy(id=uuid.uuid4(), type="AUTOMATION", display_value="nightly")},
            False,
            "automation",
            "automation:nightly",
        ),
        (
            {"created_by": CreatedBy(id=uuid.uuid4(), type="AUTOMATION", display_value="x: y")},
            True,
            "trigger",
            "trigger:x: y",
        ),
        (
            {"created_by": CreatedBy(id=uuid.uuid4(), type="USER", display_value="bob")},
            False,
            "user",
            "user:bob",
        ),
        # Prefect's record wins over a label anyone with the operator credential can write
        (
            {
                "labels": {audit.SUBMITTED_BY: "mallory"},
                "created_by": CreatedBy(id=uuid.uuid4(), type="AUTOMATION", display_value="a"),
            },
            False,
            "automation",
            "automation:a",
        ),
    ],
)
def test_who_made_a_run(fields, trigger, kind, actor):
    assert audit.run_origin(_run(**fields), trigger=trigger) == audit.Origin(kind, actor)


def test_a_start_names_the_tenant_the_run_and_its_deployment_once_per_taking():
    run = _run(labels={audit.SUBMITTED_BY: "alice"})
    event = audit.started_event(run, audit.run_origin(run), worker="w1")
    assert event.event == audit.STARTED and event.resource.id == f"setlist.tenant.{TENANT}"
    assert [(r.role, r.id) for r in event.related] == [
        ("actor", "setlist.actor.alice"),
        ("flow-run", f"prefect.flow-run.{run.id}"),
        ("deployment", f"prefect.deployment.{run.deployment_id}"),
    ]
    assert event.payload["actor"] == "alice" and event.payload["actor_kind"] == "cli"
    # the same taking is the same event; taken again from a new Scheduled state, another
    again = audit.started_event(run, audit.run_origin(run))
    assert again.id == event.id
    rescheduled = run.model_copy(update={"state_id": uuid.uuid4()})
    assert audit.started_event(rescheduled, audit.run_origin(rescheduled)).id != event.id


def _state_event(run_id, name: str, from_: str, message: str = "", at: int = 0) -> Event:
    return Event(
        id=uuid.uuid4(),
        occurred=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=at),
        event=f"prefect.flow-run.{name}",
        resource={
            "prefect.resource.id": f"prefect.flow-run.{run_id}",
            "prefect.resource.name": "happy-otter",
            "prefect.state-message": message,
        },
        related=[
            {"prefect.resource.id": "prefect.tag.setlist", "prefect.resource.role": "tag"},
            {"prefect.resource.id": f"prefect.tag.tenant:{TENANT}", "prefect.resource.role": "tag"},
        ],
        payload={"intended": {"from": from_, "to": name.upper()}},
    )


def test_cancels_on_prefects_record_count_once_and_never_twice_with_the_clis():
    ui, scheduled, cli, by_automation = (uuid.uuid4() for _ in range(4))
    automation = uuid.uuid4()
    robot = f"Cancelled by Automation {automation}"
    states = [  # newest first, as read
        _state_event(ui, "Cancelled", "CANCELLING", at=9),
        _state_event(cli, "Cancelled", "SCHEDULED", "cancelled by operator", at=8),
        _state_event(by_automation, "Cancelling", "RUNNING", robot, at=7),
        _state_event(ui, "Cancelling", "RUNNING", at=5),
        _state_event(ui, "Cancelling", "CANCELLING", at=4),  # a second click
        _state_event(scheduled, "Cancelled", "SCHEDULED", at=3),
    ]  # fmt: skip
    trail = [
        audit.build_event(audit.CANCELLED, TENANT, obj=(f"prefect.flow-run.{cli}", "flow-run"))
    ]
    cancels = audit.cancel_requests(states, trail, {str(automation): "stop stuck runs"})
    by_run = {next(r.id for r in e.related if r.role == "flow-run"): e for e in cancels}
    assert set(by_run) == {f"prefect.flow-run.{r}" for r in (ui, scheduled, by_automation)}
    assert all(
        e.event == audit.CANCELLED and e.resource.id == "setlist.tenant.acme" for e in cancels
    )
    assert by_run[f"prefect.flow-run.{ui}"].occurred.second == 4  # the first request
    assert by_run[f"prefect.flow-run.{scheduled}"].payload["actor"] == audit.OPERATOR
    assert by_run[f"prefect.flow-run.{by_automation}"].payload["actor"] == (
        "automation:stop stuck runs"
    )


@pytest.mark.parametrize("name", [audit.STARTED, audit.CANCELLED, "setlist.job.submitted"])
def test_a_jobs_run_token_may_not_write_the_trail_of_its_own_runs(name):
    run = _run()
    caller = policy.Caller(runtokens.RunToken(run.id, TENANT, 2**40), {}, "canary")
    event = audit.started_event(run, audit.Origin("cli", "alice")).model_dump(mode="json")
    event["event"] = name
    assert "is not one a canary job emits" in (policy.event_denied(caller, event) or "")
    # what a data-etl job emits about its own tenant still passes
    etl = policy.Caller(runtokens.RunToken(run.id, TENANT, 2**40), {}, "data-etl")
    ok = audit.build_event("setlist.etl.completed", TENANT).model_dump(mode="json")
    assert policy.event_denied(etl, ok) is None


# ---------------------------------------------------------------- against the server


@pytest.fixture
async def tenant(client, tenant_id):
    from setlist.core.tenancy import TenantQuota
    from setlist.tenants.onboarding import TenantSpec, create_tenant

    # room for every run a test takes: a taken run holds a slot of the tenant's quota
    await create_tenant(
        client, TenantSpec(tenant_id=tenant_id, quota=TenantQuota(concurrent_jobs=8))
    )
    return tenant_id


@pytest.fixture
def take(client):
    """Takes a run as a Setlist worker does (its Pending proposal, the moment the run is
    the worker's), without starting a process for it."""
    from setlist.workers.process import SetlistProcessWorker

    worker = SetlistProcessWorker(work_pool_name="setlist-local", name="audit-test")
    worker._client = client

    async def take(run_id) -> bool:
        return await worker._propose_pending_state(await client.read_flow_run(run_id))

    return take


async def _trail(client, tenant, name, run_id, count=1, settle: str | None = None):
    """The tenant's ``name`` entries about ``run_id``, once ``count`` are there; with
    ``settle``, only after Prefect's own ``settle`` event of the run is stored too, so
    that an entry it would wrongly add is there to be counted."""
    deadline = time.monotonic() + 30
    object_id = f"prefect.flow-run.{run_id}"
    while True:
        trail = await audit.read_trail(client, tenant, since=timedelta(hours=1))
        found = [e for e in trail if e.event == name and object_id in {r.id for r in e.related}]
        settled = settle is None or await _stored(client, run_id, settle)
        if (len(found) >= count and settled) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def _stored(client, run_id, name: str) -> bool:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    page = await client.read_events(
        filter=EventFilter(
            event=EventNameFilter(name=[name]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
        ),
        limit=5,
    )
    return bool(page.events)


async def _run_made_by(client, deployment_id, timeout: float = 20):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])
            ),
            limit=5,
        )
        made = [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"]
        if made:
            return made[0]
        await asyncio.sleep(0.25)
    raise AssertionError("no run made by an automation")


async def _started(client, tenant, take, run_id) -> dict:
    """Takes the run as a worker, and again as a second one; → the one start entry."""
    assert await take(run_id)
    assert not await take(run_id)  # Pending now: no other worker takes it, no entry
    (started,) = await _trail(client, tenant, audit.STARTED, run_id)
    return started.payload


@pytest.mark.server
async def test_every_run_a_worker_takes_is_started_once_with_its_maker(client, tenant, take):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from setlist.tenants import submit as submitting

    # the UI's Run button: the API with the operator credential, nothing more recorded
    canary = await client.read_deployment_by_name(f"canary/{tenant}")
    run = await client.create_flow_run_from_deployment(canary.id)
    started = await _started(client, tenant, take, run.id)
    assert (started["actor"], started["actor_kind"]) == (audit.OPERATOR, "api")
    (entry,) = await _trail(client, tenant, audit.STARTED, run.id)
    assert entry.resource.get("setlist.tenant") == tenant
    assert f"prefect.deployment.{canary.id}" in {r.id for r in entry.related}

    # the CLI: its submitter
    sub = await submitting.submit(client, "canary", tenant)
    started = await _started(client, tenant, take, sub.flow_run_id)
    assert (started["actor"], started["actor_kind"]) == ("pytest", "cli")

    # a schedule: its slug
    billing = await client.read_deployment_by_name(f"billing-report/{tenant}")
    made = await client.request("POST", f"/deployments/{billing.id}/schedule", json={"max_runs": 1})
    made.raise_for_status()
    (run,) = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[billing.id])),
        limit=1,
    )
    assert run.auto_scheduled and run.created_by.type == "SCHEDULE"
    slug = next(s.slug for s in billing.schedules if s.id == run.created_by.id)
    started = await _started(client, tenant, take, run.id)
    assert slug and (started["actor"], started["actor_kind"]) == (f"schedule:{slug}", "schedule")

    # the tenant's own deployment trigger: new data for it starts its ETL
    etl = await client.read_deployment_by_name(f"data-etl/{tenant}")
    await audit.emit(client, "setlist.tenant.data.arrived", tenant)
    run = await _run_made_by(client, etl.id)
    started = await _started(client, tenant, take, run.id)
    assert (started["actor"], started["actor_kind"]) == (
        f"trigger:data-etl/{tenant}: data arrived",
        "trigger",
    )

    # an operator's own automation that runs the tenant's canary
    name = f"audit test {tenant}"
    signal = f"setlist.test.{uuid.uuid4().hex[:8]}"
    automation_id = await client.create_automation(
        AutomationCore(
            name=name,
            trigger=EventTrigger(
                expect={signal}, posture=Posture.Reactive, threshold=1, within=timedelta(0)
            ),
            actions=[RunDeployment(source="selected", deployment_id=canary.id)],
        )
    )
    try:
        run = None
        for _ in range(20):  # until the triggers service has loaded the new automation
            await audit.emit(client, signal, tenant)
            with contextlib.suppress(AssertionError):
                run = await _run_made_by(client, canary.id, timeout=1)
                break
        assert run is not None, "the automation made no run"
        started = await _started(client, tenant, take, run.id)
        assert (started["actor"], started["actor_kind"]) == (f"automation:{name}", "automation")
    finally:
        await client.delete_automation(automation_id)


@pytest.mark.server
async def test_every_cancel_shows_once_with_who_asked(client, tenant, take):
    from prefect.states import Cancelled, Cancelling

    from setlist.tenants import submit as submitting

    canary = await client.read_deployment_by_name(f"canary/{tenant}")
    # from the UI, a run under way: Cancelling, then Cancelled as its worker ends it
    running = await client.create_flow_run_from_deployment(canary.id)
    assert await take(running.id)
    await client.set_flow_run_state(running.id, Cancelling())
    await client.set_flow_run_state(running.id, Cancelled())
    # from the UI, a waiting run: the server cancels it at once (nothing to stop)
    waiting = await client.create_flow_run_from_deployment(canary.id)
    await client.set_flow_run_state(waiting.id, Cancelling())
    # from the CLI: its own entry, with its actor, and no second one from the server's
    sub = await submitting.submit(client, "canary", tenant)
    await submitting.cancel(client, sub.flow_run_id, tenant)

    settled = "prefect.flow-run.Cancelled"
    cancels = {
        run_id: [
            (c.payload["actor"], c.payload.get("source"))
            for c in await _trail(client, tenant, audit.CANCELLED, run_id, settle=settled)
        ]
        for run_id in (running.id, waiting.id, sub.flow_run_id)
    }
    assert cancels == {
        running.id: [(audit.OPERATOR, "prefect.flow-run.Cancelling")],
        waiting.id: [(audit.OPERATOR, "prefect.flow-run.Cancelled")],
        sub.flow_run_id: [("pytest", None)],
    }
