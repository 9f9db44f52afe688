"""The dispatcher: its policy (pure) and its gate on a real server, without a worker.

The contention test with a real worker is tests/e2e/test_dispatch_contention.py.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from setlist.core.tenancy import Priority
from setlist.dispatch.grants import GRANTED_TAG
from setlist.dispatch.plan import Candidate, plan_grants
from tests.helpers import wait_for_events


def _c(tenant, band="normal", waiting=10, pool="p", oldest=0.0):
    return Candidate(pool, f"{tenant}.{band}", tenant, Priority(band), waiting, oldest)


def _plan(cands, *, free=None, pool_free=4, usage=None, weight=None, quantum=10.0):
    tenants = {c.tenant for c in cands}
    return plan_grants(
        cands,
        tenant_free=free or dict.fromkeys(tenants, 100),
        pool_free={"p": pool_free, "q": pool_free},
        usage=usage or {},
        weight=weight or dict.fromkeys(tenants, 1.0),
        quantum=quantum,
    )


def test_higher_band_first_across_tenants():
    grants = _plan([_c("a", "batch"), _c("b", "critical", waiting=2), _c("c", "high")])
    assert grants == {("p", "b.critical"): 2, ("p", "c.high"): 2}


def test_quota_caps_a_tenant_across_its_bands_and_frees_nothing_for_lower_bands():
    grants = _plan(
        [_c("a", "critical"), _c("a", "low"), _c("b", "normal")],
        free={"a": 1, "b": 5},
    )
    assert grants == {("p", "a.critical"): 1, ("p", "b.normal"): 3}


def test_pool_limit_holds_per_pool():
    grants = _plan([_c("a", pool="p"), _c("b", pool="q")], pool_free=2)
    assert grants == {("p", "a.normal"): 2, ("q", "b.normal"): 2}
    assert _plan([_c("a")], pool_free=0) == {}


def test_lowest_weighted_usage_goes_first():
    grants = _plan(
        [_c("a"), _c("b"), _c("c")],
        pool_free=1,
        usage={"a": 100.0, "b": 150.0, "c": 90.0},
        weight={"a": 1.0, "b": 2.0, "c": 1.0},
    )
    assert grants == {("p", "b.normal"): 1}  # 150/2 = 75 < 90 < 100


def test_slots_follow_weights_under_contention():
    weights = {"w1": 1.0, "w2": 2.0, "w4": 4.0}
    grants = _plan([_c(t, waiting=100) for t in weights], pool_free=70, weight=weights)
    assert grants == {("p", "w1.normal"): 10, ("p", "w2.normal"): 20, ("p", "w4.normal"): 40}


def test_ties_prefer_weight_then_the_oldest_run():
    grants = _plan(
        [_c("a", oldest=5.0), _c("b", oldest=1.0), _c("c", oldest=9.0)],
        pool_free=2,
        weight={"a": 1.0, "b": 1.0, "c": 3.0},
    )
    assert grants == {("p", "c.normal"): 1, ("p", "b.normal"): 1}


def test_never_more_than_waits():
    grants = _plan([_c("a", waiting=1), _c("b", waiting=0)], pool_free=10)
    assert grants == {("p", "a.normal"): 1}


def test_unknown_or_exhausted_tenants_get_nothing():
    assert (
        plan_grants(
            [_c("ghost")], tenant_free={}, pool_free={"p": 5}, usage={}, weight={}, quantum=1
        )
        == {}
    )
    assert _plan([_c("a")], free={"a": 0}) == {}


# ----------------------------------------------------------------------------- grants

_KEY = b"k" * 32


def _ids():
    return str(uuid.uuid4()), str(uuid.uuid4())


def test_a_signed_grant_is_accepted_for_its_run_and_state():
    from setlist.dispatch.grants import GRANT_TAG_PREFIX, is_granted, with_grant

    run, state = _ids()
    tags = with_grant(["setlist", "tenant:a"], run, state, key=_KEY)
    assert tags[:2] == ["setlist", "tenant:a"]
    assert GRANTED_TAG in tags
    (grant,) = [t for t in tags if t.startswith(GRANT_TAG_PREFIX)]
    assert grant.startswith(f"{GRANT_TAG_PREFIX}{state}:")
    assert is_granted(tags, run, state, key=_KEY)
    assert is_granted(tags, uuid.UUID(run), uuid.UUID(state), key=_KEY)  # as the worker reads
    assert not is_granted(tags, run, None, key=_KEY)
    assert not is_granted(tags, None, state, key=_KEY)


def test_a_grant_signed_with_the_platform_key_by_default():
    from setlist.dispatch.grants import grant_tag, is_granted, with_grant

    run, state = _ids()
    assert is_granted(with_grant([], run, state), run, state)
    assert not is_granted([grant_tag(run, state, key=_KEY)], run, state)


def test_an_unsigned_grant_is_refused():
    from setlist.dispatch.grants import GRANT_TAG_PREFIX, is_granted

    run, state = _ids()
    assert not is_granted([GRANTED_TAG, f"{GRANT_TAG_PREFIX}{state}"], run, state, key=_KEY)


def test_a_grant_with_a_wrong_mac_is_refused():
    from setlist.dispatch.grants import GRANT_TAG_PREFIX, grant_tag, is_granted

    run, state = _ids()
    good = grant_tag(run, state, key=_KEY)
    bad_mac = good[:-1] + ("0" if good[-1] != "0" else "1")
    for tag in (bad_mac, f"{GRANT_TAG_PREFIX}{state}:{'0' * 32}", good + "0", good[:-1]):
        assert not is_granted([GRANTED_TAG, tag], run, state, key=_KEY), tag


def test_a_grant_copied_from_another_run_is_refused():
    from setlist.dispatch.grants import is_granted, with_grant

    run_x, state = _ids()
    run_y = str(uuid.uuid4())
    tags = with_grant([], run_x, state, key=_KEY)
    assert not is_granted(tags, run_y, state, key=_KEY)


def test_a_grant_for_an_earlier_state_is_refused():
    from setlist.dispatch.grants import is_granted, with_grant

    run, earlier = _ids()
    later = str(uuid.uuid4())
    tags = with_grant([], run, earlier, key=_KEY)
    assert not is_granted(tags, run, later, key=_KEY)
    # Granted again for the new state: the earlier grant makes way for it.
    regranted = with_grant(tags, run, later, key=_KEY)
    assert is_granted(regranted, run, later, key=_KEY)
    assert not is_granted(regranted, run, earlier, key=_KEY)
    assert regranted.count(GRANTED_TAG) == 1


def test_a_grant_made_with_another_key_is_refused():
    from setlist.dispatch.grants import is_granted, with_grant

    run, state = _ids()
    tags = with_grant([], run, state, key=b"another key")
    assert not is_granted(tags, run, state, key=_KEY)


# ----------------------------------------------------------------------------- server


@pytest.fixture
async def pool(client):
    """A pool of its own (nothing else in the session runs there), limit 3, with a
    deployment whose runs go to any queue of it."""
    from prefect.client.schemas.actions import WorkPoolCreate

    name = f"dispatch-{uuid.uuid4().hex[:6]}"
    await client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=3))
    flow_id = await client.create_flow_from_name("dispatch-probe")
    dep = await client.create_deployment(flow_id=flow_id, name=name, work_pool_name=name)
    yield name, dep
    await client.delete_work_pool(name)


async def _tenant(client, pool, tenant, *, quota=4, weight=1.0):
    from blocks.tenant import TenantProfile
    from setlist.core.tenancy import TenantQuota, profile_block_name
    from setlist.dispatch.queues import ensure_tenant_queues

    profile = TenantProfile(
        tenant_id=tenant, quota=TenantQuota(concurrent_jobs=quota, weight=weight)
    )
    await profile.asave(profile_block_name(tenant), overwrite=True)
    await ensure_tenant_queues(client, pool, tenant)


async def _submit(client, dep, tenant, band, n=1):
    return [
        (
            await client.create_flow_run_from_deployment(
                dep,
                work_queue_name=f"{tenant}.{band}",
                tags=["setlist", f"tenant:{tenant}", f"band:{band}"],
            )
        ).id
        for _ in range(n)
    ]


async def _queues(client, pool):
    from setlist.dispatch.queues import read_pool_queues

    return {q.name: q for q in await read_pool_queues(client, pool) if q.name != "default"}


def _held(q) -> bool:
    """No run can leave the queue, whatever finishes: paused, or a limit of 0."""
    return q.is_paused or q.concurrency_limit == 0


@pytest.mark.server
async def test_a_cycle_grants_exactly_the_chosen_runs_and_holds_every_queue(
    client, pool, tenant_id
):
    from prefect.states import Running

    from setlist.dispatch.dispatcher import Dispatcher

    name, dep = pool
    a, b, c = (f"{tenant_id}-{x}" for x in "abc")
    await _tenant(client, name, a, quota=1)
    await _tenant(client, name, b, quota=2, weight=2)
    await _tenant(client, name, c, quota=3)
    await _submit(client, dep, a, "critical")
    await _submit(client, dep, a, "normal", 2)
    busy_b = await _submit(client, dep, b, "normal")
    await client.set_flow_run_state(busy_b[0], Running(), force=True)
    await _submit(client, dep, b, "normal", 3)
    await _submit(client, dep, c, "batch", 4)

    dispatcher = Dispatcher([name], interval=0.2, prefetch_s=0)
    dispatcher._background = lambda *_: None  # no refreshes beside the cycles here
    try:
        report = await dispatcher.cycle(client)
        assert report.leading
        # pool 3, one Running → 2 slots: a's critical (a at quota 1 after it), then
        # b.normal (b has 1 of 2 busy); nothing for a's normal or c's batch.
        assert {k[1]: v for k, v in report.grants.items() if v} == {
            f"{a}.critical": 1,
            f"{b}.normal": 1,
        }
        # Taking over paused every queue; granting opens none.
        assert all(q.is_paused for q in (await _queues(client, name)).values())

        # Each grant is written on the run it chose: the queue's oldest waiting run,
        # tagged with the Scheduled state it was chosen in.
        granted = await _granted(client, name)
        oldest_b = min(
            (r for r in await _scheduled(client, name) if r.work_queue_name == f"{b}.normal"),
            key=lambda r: (r.next_scheduled_start_time, str(r.id)),
        )
        assert sorted(r.work_queue_name for r in granted) == [f"{a}.critical", f"{b}.normal"]
        assert oldest_b.id in {r.id for r in granted}
        assert all(GRANTED_TAG in r.tags for r in granted)
        # A second cycle before the worker comes grants nothing more and writes nothing:
        # the granted runs hold their slots.
        report = await dispatcher.cycle(client)
        assert not any(report.grants.values()) and report.writes == 0
        assert {r.id for r in await _granted(client, name)} == {r.id for r in granted}

        # The worker takes the granted runs (simulated by moving them to Running): the
        # pool is full, nothing more is granted.
        for run in granted:
            await client.set_flow_run_state(run.id, Running(), force=True)
        report = await dispatcher.cycle(client)
        assert not any(report.grants.values()) and report.writes == 0
        # A queue opened behind the dispatcher's back is held again at the next cycle.
        queue = (await _queues(client, name))[f"{c}.batch"]
        await client.update_work_queue(queue.id, is_paused=False)
        dispatcher.book.loaded_at = float("-inf")
        await dispatcher.book.load(client)
        assert (await dispatcher.cycle(client)).writes == 1
        assert (await _queues(client, name))[f"{c}.batch"].is_paused

        # A second dispatcher stands by while the first leads.
        standby = Dispatcher([name], interval=0.2, prefetch_s=0)
        assert not (await standby.cycle(client)).leading
        await dispatcher.leadership.release(client)
        assert (await standby.cycle(client)).leading
        await standby.leadership.release(client)
    finally:
        await dispatcher.leadership.release(client)


@pytest.mark.server
async def test_a_run_visible_long_after_its_scheduled_time_is_granted_at_the_next_cycle(
    client, pool, tenant_id
):
    """A run can turn up with a scheduled time long past (its creation retried behind a
    busy database, or created so on purpose). While few runs wait, the next cycle sees
    it anyway: no waiting for the periodic full read."""
    from prefect.states import Scheduled

    from setlist.dispatch.dispatcher import Dispatcher

    name, dep = pool
    await _tenant(client, name, tenant_id, quota=2)
    dispatcher = Dispatcher([name], interval=0.2, prefetch_s=0)
    dispatcher._background = lambda *_: None  # no periodic full read beside the cycles
    try:
        assert (await dispatcher.cycle(client)).leading
        run = await client.create_flow_run_from_deployment(
            dep,
            work_queue_name=f"{tenant_id}.critical",
            tags=["setlist", f"tenant:{tenant_id}", "band:critical"],
            state=Scheduled(scheduled_time=datetime.now(UTC) - timedelta(minutes=5)),
        )
        report = await dispatcher.cycle(client)
        assert {k[1]: v for k, v in report.grants.items() if v} == {f"{tenant_id}.critical": 1}
        assert [r.id for r in await _granted(client, name)] == [run.id]
    finally:
        await dispatcher.leadership.release(client)


@pytest.mark.server
async def test_a_run_taken_between_the_cycles_reads_keeps_holding_its_slot(client, pool, tenant_id):
    """A granted run that the worker takes while a cycle reads must be counted, as
    waiting or as busy. Read at once, the read of busy runs could miss it (still
    Scheduled) and the read of waiting runs miss it too (Pending by then): its slot
    looked free and was granted again, past the tenant's quota and the pool's limit."""
    from prefect.states import Pending

    from setlist.dispatch.dispatcher import Dispatcher

    name, dep = pool
    await _tenant(client, name, tenant_id, quota=1)
    dispatcher = Dispatcher([name], interval=0.2, prefetch_s=0)
    dispatcher._background = lambda *_: None

    def create():
        return client.create_flow_run_from_deployment(
            dep,
            work_queue_name=f"{tenant_id}.normal",
            tags=["setlist", f"tenant:{tenant_id}", "band:normal"],
        )

    try:
        assert (await dispatcher.cycle(client)).leading
        first = await create()
        assert sum((await dispatcher.cycle(client)).grants.values()) == 1
        second = await create()

        reads = dispatcher.runs._runs
        calls = 0

        async def taken_during_the_reads(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 2:  # the worker takes the granted run between two reads
                await client.set_flow_run_state(first.id, Pending(), force=True)
            return await reads(*args, **kwargs)

        dispatcher.runs._runs = taken_during_the_reads
        report = await dispatcher.cycle(client)
        assert calls >= 2
        assert sum(report.grants.values()) == 0
        assert str(first.id) in dispatcher.runs.busy
        assert [r.id for r in await _granted(client, name)] == []
        assert second.id in {r.id for r in await _scheduled(client, name)}
    finally:
        await dispatcher.leadership.release(client)


async def _scheduled(client, pool):
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
    )


async def _granted(client, pool):
    """The pool's waiting runs that carry a grant for their current state."""
    from setlist.dispatch.grants import is_granted

    return [r for r in await _scheduled(client, pool) if is_granted(r.tags, r.id, r.state_id)]


@pytest.mark.server
async def test_the_worker_takes_only_granted_runs_while_a_dispatcher_leads(client, pool, tenant_id):
    """Tenant queues stay paused while a dispatcher leads; Setlist's worker reads the
    granted runs of its pool and takes a tenant run only with the grant for its current
    state — also from a queue someone opened, where Prefect's poll returns the others.
    A grant written by hand (anyone with API access can write tags) grants nothing."""
    import math

    from prefect.states import Scheduled

    from setlist.dispatch.grants import GRANT_TAG_PREFIX, grant_tag, read_granted, with_grant
    from setlist.dispatch.leadership import Leadership
    from setlist.workers.process import SetlistProcessWorker

    name, dep = pool
    await _tenant(client, name, tenant_id, quota=4)
    runs = await _submit(client, dep, tenant_id, "normal", 3)
    queue = (await _queues(client, name))[f"{tenant_id}.normal"]
    await client.update_work_queue(queue.id, is_paused=True)
    chosen = await client.read_flow_run(runs[1])
    await client.update_flow_run(runs[1], tags=with_grant(chosen.tags, runs[1], chosen.state_id))
    # Forged on runs[0]: the old unsigned tag, a made-up MAC, and one signed with a key
    # other than the platform's.
    forged = await client.read_flow_run(runs[0])
    forged_tags = [
        *forged.tags,
        GRANTED_TAG,
        f"{GRANT_TAG_PREFIX}{forged.state_id}",
        f"{GRANT_TAG_PREFIX}{forged.state_id}:{'0' * 32}",
        grant_tag(runs[0], forged.state_id, key=b"not the platform key"),
    ]
    await client.update_flow_run(runs[0], tags=forged_tags)

    leader = Leadership()
    assert await leader.hold(client)
    try:
        async with SetlistProcessWorker(work_pool_name=name, prefetch_seconds=5) as worker:
            # Held queue: the granted run, by the full poll and by the poll that names
            # only the queues it needs.
            for _ in range(2):
                polled = await worker._get_scheduled_flow_runs()
                assert [r.flow_run.id for r in polled] == [runs[1]]
            assert worker._full_polled > -math.inf
            # Open for all three, as an operator could leave it: still only the grant.
            await client.update_work_queue(queue.id, is_paused=False, concurrency_limit=3)
            for full in (False, True):
                if full:
                    worker._full_polled = -math.inf
                polled = await worker._get_scheduled_flow_runs()
                assert [r.flow_run.id for r in polled] == [runs[1]]
            # A grant names a state: rescheduled, the run needs a new one.
            an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
            await client.set_flow_run_state(
                runs[1], Scheduled(scheduled_time=an_hour_ago), force=True
            )
            assert await worker._get_scheduled_flow_runs() == []
            # That stale grant, first in the pool's order, hides no valid one behind it.
            later = await client.read_flow_run(runs[2])
            await client.update_flow_run(
                runs[2], tags=with_grant(later.tags, runs[2], later.state_id)
            )
            soon = datetime.now(UTC) + timedelta(seconds=5)
            assert [r.id for r in await read_granted(client, name, soon, page=1)] == [runs[2]]
            polled = await worker._get_scheduled_flow_runs()
            assert [r.flow_run.id for r in polled] == [runs[2]]

            # No dispatcher leads: plain Prefect dispatch (after `setlist queue release`).
            await leader.release(client)
            worker._gate = None
            polled = await worker._get_scheduled_flow_runs()
            assert sorted(r.flow_run.id for r in polled) == sorted(runs)
    finally:
        await leader.release(client)


@pytest.mark.server
async def test_the_worker_lists_granted_runs_highest_band_first(client, pool, tenant_id):
    """Should the worker's own limit cut its list short, the higher band goes first."""
    from setlist.dispatch.grants import with_grant
    from setlist.dispatch.leadership import Leadership
    from setlist.workers.process import SetlistProcessWorker

    name, dep = pool
    await _tenant(client, name, tenant_id, quota=4)
    batch = await _submit(client, dep, tenant_id, "batch")
    critical = await _submit(client, dep, tenant_id, "critical")  # due after the batch run
    for run_id in (*batch, *critical):
        run = await client.read_flow_run(run_id)
        await client.update_flow_run(run_id, tags=with_grant(run.tags, run_id, run.state_id))
    for queue in (await _queues(client, name)).values():  # held, as the dispatcher holds them
        await client.update_work_queue(queue.id, is_paused=True)
    leader = Leadership()
    assert await leader.hold(client)
    try:
        async with SetlistProcessWorker(work_pool_name=name, prefetch_seconds=5) as worker:
            worker._full_polled = time.monotonic()  # the named poll
            polled = await worker._get_scheduled_flow_runs()
            assert [r.flow_run.id for r in polled] == [*critical, *batch]
    finally:
        await leader.release(client)


@pytest.mark.server
async def test_new_queues_are_held_while_a_dispatcher_leads_and_release_opens_them(
    client, pool, tenant_id
):
    from setlist.dispatch.dispatcher import release_queues
    from setlist.dispatch.leadership import Leadership, dispatcher_active

    name, _ = pool
    leader = Leadership()
    assert await leader.hold(client)
    try:
        assert await dispatcher_active(client)
        await _tenant(client, name, tenant_id)
        queues = await _queues(client, name)
        assert all(queues[f"{tenant_id}.{b.value}"].is_paused for b in Priority)
    finally:
        await leader.release(client)
    assert not await dispatcher_active(client)
    assert await release_queues(client, [name]) == 5
    released = await wait_for_events(client, None, "setlist.queues.released")
    assert {"pools": [name], "opened": 5} in [
        {k: e.payload.get(k) for k in ("pools", "opened")} for e in released
    ]
    queues = await _queues(client, name)
    assert not any(_held(q) or q.concurrency_limit is not None for q in queues.values())
    await _tenant(client, name, f"{tenant_id}-late")
    queues = await _queues(client, name)
    assert not queues[f"{tenant_id}-late.normal"].is_paused


@pytest.mark.server
async def test_a_dead_leader_is_replaced_after_its_heartbeat_goes_stale(client, monkeypatch):
    from setlist.dispatch import leadership

    first, second = (
        leadership.Leadership("first", beat_s=0),
        leadership.Leadership("second", beat_s=0),
    )
    assert await first.hold(client)
    assert not await second.hold(client)
    # ``first`` dies without stepping down; its heartbeat ages past the TTL.
    monkeypatch.setattr(leadership, "HEARTBEAT_TTL", 0.0)
    assert await second.hold(client)
    monkeypatch.setattr(leadership, "HEARTBEAT_TTL", 15.0)
    assert not await first.hold(client)  # it comes back: the heartbeat names another
    await second.release(client)


def test_usage_decays_and_counts_runs_under_way_at_least_the_quantum():
    from setlist.dispatch.state import Run, RunBook

    book = RunBook(["p"], window=timedelta(hours=24))
    now = 1_000_000.0
    book.finished = {"x": ("a", now - 6 * 3600 - 100, now - 6 * 3600), "y": ("b", now - 50, now)}
    book.busy = {
        "r": Run("r", "p", "a.normal", "a", Priority.normal, "RUNNING", None, now - 500, None),
        "s": Run("s", "p", "b.normal", "b", Priority.normal, "PENDING", None, None, None),
    }
    usage = book.usage(now, 6 * 3600, 30.0, {"r": "a", "s": "b"})
    assert usage["a"] == pytest.approx(50 + 500)
    assert usage["b"] == pytest.approx(50 + 30)
    assert book.quantum() == pytest.approx(100)  # median of 100 s and 50 s (upper)
