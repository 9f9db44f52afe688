"""The plan grants a cycle's slots in one pass: deep queues, band order, fair share.

``plan_grants`` hands out a band's slots in weighted-fair-queueing order, but a tenant's
turn takes every slot it would win in a row at once. These tests pin what a single call
(one cycle) grants when a tenant has hundreds of waiting runs, and check it against the
one-slot-at-a-time reference on random inputs: the same grants, and never past a limit.
"""

from __future__ import annotations

import heapq
import random

from setlist.core.tenancy import Priority
from setlist.dispatch.plan import Candidate, plan_grants

BANDS = list(Priority)


def _c(tenant, band="normal", waiting=10, pool="p", oldest=0.0):
    return Candidate(pool, f"{tenant}.{band}", tenant, Priority(band), waiting, oldest)


def _plan(cands, *, free, pool_free, usage=None, weight=None, quantum=10.0):
    tenants = {c.tenant for c in cands}
    return plan_grants(
        cands,
        tenant_free=free,
        pool_free=pool_free,
        usage=usage or {},
        weight=weight or dict.fromkeys(tenants, 1.0),
        quantum=quantum,
    )


def reference(candidates, *, tenant_free, pool_free, usage, weight, quantum):
    """The policy one slot at a time (the dispatcher's plan before batching)."""
    tenant_free = dict(tenant_free)
    pool_free = dict(pool_free)
    share = {t: usage.get(t, 0.0) / weight[t] for t in weight}
    by_band: dict = {}
    for c in candidates:
        if c.waiting > 0 and c.tenant in weight:
            by_band.setdefault(c.band, []).append(c)
    grants: dict = {}
    for band in Priority:
        left = {(c.pool, c.queue): c.waiting for c in by_band.get(band, [])}
        heap = [
            (share[c.tenant], -weight[c.tenant], c.oldest, c.tenant, c.pool, c.queue)
            for c in by_band.get(band, [])
        ]
        heapq.heapify(heap)
        while heap:
            key_share, neg_w, oldest, tenant, pool, queue = heapq.heappop(heap)
            if tenant_free.get(tenant, 0) <= 0 or pool_free.get(pool, 0) <= 0:
                continue
            if key_share != share[tenant]:
                heapq.heappush(heap, (share[tenant], neg_w, oldest, tenant, pool, queue))
                continue
            grants[(pool, queue)] = grants.get((pool, queue), 0) + 1
            tenant_free[tenant] -= 1
            pool_free[pool] -= 1
            left[(pool, queue)] -= 1
            share[tenant] += quantum / weight[tenant]
            if left[(pool, queue)] > 0:
                heapq.heappush(heap, (share[tenant], neg_w, oldest, tenant, pool, queue))
    return grants


def test_a_deep_queue_gets_every_free_slot_in_one_cycle():
    # 600 waiting, quota room 150, pool room 120: the pool binds
    grants = _plan([_c("deep", waiting=600)], free={"deep": 150}, pool_free={"p": 120})
    assert grants == {("p", "deep.normal"): 120}
    # the quota binds
    grants = _plan([_c("deep", waiting=600)], free={"deep": 100}, pool_free={"p": 500})
    assert grants == {("p", "deep.normal"): 100}
    # the queue runs dry first
    grants = _plan([_c("deep", waiting=40)], free={"deep": 100}, pool_free={"p": 500})
    assert grants == {("p", "deep.normal"): 40}
    # no pool limit at all
    grants = _plan([_c("deep", waiting=600)], free={"deep": 300}, pool_free={"p": float("inf")})
    assert grants == {("p", "deep.normal"): 300}


def test_a_deep_queue_takes_what_the_shallow_tenants_leave_in_the_same_cycle():
    shallow = [_c(f"s{i}", waiting=2) for i in range(30)]
    deep = _c("deep", waiting=600)
    free = {**{f"s{i}": 3 for i in range(30)}, "deep": 200}
    # the deep tenant has run a lot: every shallow run goes first, it takes the rest
    grants = _plan([deep, *shallow], free=free, pool_free={"p": 150}, usage={"deep": 5000.0})
    assert all(grants[("p", f"s{i}.normal")] == 2 for i in range(30))
    assert grants[("p", "deep.normal")] == 150 - 60
    # fewer slots than shallow runs: the deep tenant (charged most) gets none
    grants = _plan([deep, *shallow], free=free, pool_free={"p": 45}, usage={"deep": 5000.0})
    assert ("p", "deep.normal") not in grants
    assert sum(grants.values()) == 45


def test_band_order_holds_inside_one_pass():
    cands = [
        _c("deep", "batch", waiting=500),
        _c("deep", "low", waiting=500),
        _c("a", "critical", waiting=30),
        _c("b", "high", waiting=50),
    ]
    free = {"deep": 1000, "a": 100, "b": 100}
    grants = _plan(cands, free=free, pool_free={"p": 100})
    assert grants == {("p", "a.critical"): 30, ("p", "b.high"): 50, ("p", "deep.low"): 20}
    grants = _plan(cands, free=free, pool_free={"p": 600})
    assert grants == {
        ("p", "a.critical"): 30,
        ("p", "b.high"): 50,
        ("p", "deep.low"): 500,
        ("p", "deep.batch"): 20,
    }


def test_fair_share_by_weight_between_deep_queues_in_one_pass():
    weights = {"w1": 1.0, "w3": 3.0, "w4": 4.0}
    grants = _plan(
        [_c(t, waiting=1000) for t in weights],
        free=dict.fromkeys(weights, 1000),
        pool_free={"p": 400},
        weight=weights,
    )
    assert grants == {("p", "w1.normal"): 50, ("p", "w3.normal"): 150, ("p", "w4.normal"): 200}
    # a tenant behind in usage catches up first, then the weights hold
    grants = _plan(
        [_c("a", waiting=1000), _c("b", waiting=1000)],
        free={"a": 1000, "b": 1000},
        pool_free={"p": 300},
        usage={"a": 1000.0},  # 100 slots' worth at quantum 10
    )
    assert grants == {("p", "a.normal"): 100, ("p", "b.normal"): 200}


def test_quota_across_bands_and_pools_in_one_pass():
    cands = [
        _c("deep", "high", waiting=300, pool="p"),
        _c("deep", "high", waiting=300, pool="q", oldest=1.0),
        _c("deep", "normal", waiting=300, pool="q"),
        _c("x", "normal", waiting=300, pool="q"),
    ]
    grants = _plan(cands, free={"deep": 250, "x": 20}, pool_free={"p": 200, "q": 200})
    # deep's quota (250) spans both pools and bands; p's limit caps its share there
    assert grants[("p", "deep.high")] == 200
    assert grants[("q", "deep.high")] == 50
    assert ("q", "deep.normal") not in grants
    assert grants[("q", "x.normal")] == 20


def _random_case(rng: random.Random):
    pools = ["p", "q", "r"][: rng.randint(1, 3)]
    tenants = [f"t{i}" for i in range(rng.randint(1, 12))]
    weight = {t: rng.choice([0.5, 1.0, 2.0, 4.0]) for t in tenants}
    usage = {t: float(rng.choice([0, 0, 10, 40, 80, 320])) for t in tenants}
    cands = []
    for t in tenants:
        for _ in range(rng.randint(1, 4)):
            waiting = rng.choice([0, 1, 2, 5, 50, 600])
            band = rng.choice(BANDS)
            pool = rng.choice(pools)
            cands.append(Candidate(pool, f"{t}.{band.value}", t, band, waiting, rng.randint(0, 3)))
    # one candidate per (pool, queue), as the dispatcher builds them
    cands = list({(c.pool, c.queue): c for c in cands}.values())
    tenant_free = {t: rng.choice([0, 1, 3, 20, 200, 700]) for t in tenants}
    pool_free = {p: rng.choice([0, 1, 7, 100, 300, float("inf")]) for p in pools}
    return cands, tenant_free, pool_free, usage, weight


def test_one_pass_equals_one_slot_at_a_time_and_never_passes_a_limit():
    rng = random.Random(20240611)
    for _ in range(600):
        cands, tenant_free, pool_free, usage, weight = _random_case(rng)
        kw = dict(
            tenant_free=tenant_free, pool_free=pool_free, usage=usage, weight=weight, quantum=8.0
        )
        grants = plan_grants(cands, **kw)
        assert grants == reference(cands, **kw)
        by_queue = {(c.pool, c.queue): c for c in cands}
        per_tenant: dict[str, int] = {}
        per_pool: dict[str, int] = {}
        for key, n in grants.items():
            c = by_queue[key]
            assert 0 < n <= c.waiting
            per_tenant[c.tenant] = per_tenant.get(c.tenant, 0) + n
            per_pool[c.pool] = per_pool.get(c.pool, 0) + n
        assert all(n <= tenant_free[t] for t, n in per_tenant.items())
        assert all(n <= pool_free[p] for p, n in per_pool.items())
        # a lower band gets a slot only if no higher-band candidate could have used it
        for key in grants:
            c = by_queue[key]
            for h in cands:
                if h.band.rank < c.band.rank and h.pool == c.pool:
                    got = grants.get((h.pool, h.queue), 0)
                    assert got == h.waiting or per_tenant.get(h.tenant, 0) >= tenant_free.get(
                        h.tenant, 0
                    ), (c, h)


def test_ten_thousand_tenants_plan_in_turns_not_slots():
    """With 10,000 tenants and one deep queue the plan still finishes in one call, and a
    deep tenant alone in its band costs one step whatever it is granted."""
    cands = [_c(f"t{i:05d}", waiting=2, oldest=float(i)) for i in range(10_000)]
    cands.append(_c("deep", "high", waiting=5000))
    free = {c.tenant: 4 for c in cands}
    free["deep"] = 3000
    grants = _plan(cands, free=free, pool_free={"p": 3100})
    assert grants[("p", "deep.high")] == 3000
    assert sum(grants.values()) == 3100
