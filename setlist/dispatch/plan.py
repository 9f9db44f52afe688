"""The dispatcher's policy, pure: which queue gets how many slots this cycle.

Everything the policy decides is in ``plan_grants``, with its inputs passed in (free
slots per tenant and pool, decayed usage, weights), so fairness is tested in
microseconds without a server (``tests/dispatch/test_fairness.py``) and the loop around
it only reads and writes. ``decay_factor`` is how past usage fades: by half every
half-life, so a busy morning weighs on a tenant's share for hours, not for ever.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from setlist.core.tenancy import Priority


@dataclass(frozen=True)
class Candidate:
    """Runs of one (tenant, band) queue in one pool that are due and not yet taken."""

    pool: str
    queue: str
    tenant: str
    band: Priority
    waiting: int
    oldest: float  # POSIX time of the earliest due run, for ties


def plan_grants(
    candidates: Iterable[Candidate],
    *,
    tenant_free: dict[str, int],
    pool_free: dict[str, float],
    usage: dict[str, float],
    weight: dict[str, float],
    quantum: float,
) -> dict[tuple[str, str], int]:
    """Slots per (pool, queue) for this cycle. Pure: the whole policy is here.

    Band by band, highest first; inside a band, one slot at a time to the candidate whose
    tenant has the lowest ``usage / weight`` (ties: higher weight, older run, tenant id),
    charging ``quantum / weight`` per slot granted. Never more than a tenant's free quota
    or a pool's free slots.
    """
    tenant_free = dict(tenant_free)
    pool_free = dict(pool_free)
    share = {t: usage.get(t, 0.0) / weight[t] for t in weight}
    by_band: dict[Priority, list[Candidate]] = {}
    for c in candidates:
        if c.waiting > 0 and c.tenant in weight:
            by_band.setdefault(c.band, []).append(c)
    grants: dict[tuple[str, str], int] = {}
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
            if key_share != share[tenant]:  # the tenant was charged since: re-queue
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


def decay_factor(age_s: float, half_life_s: float) -> float:
    return 0.5 ** (max(age_s, 0.0) / half_life_s)
