"""The dispatcher's policy, pure: which queue gets how many slots this cycle.

Everything the policy decides is in ``plan_grants``, with its inputs passed in (free
slots per tenant and pool, decayed usage, weights), so fairness is tested in
microseconds without a server (``tests/dispatch/test_fairness.py``, and
``tests/dispatch/test_plan_batch.py`` for deep queues) and the loop around it only reads
and writes. One call plans the whole cycle: every band, and in each band as many slots
as the quotas, the pools and fair share allow, not one grant per cycle. Its result is
the order weighted fair queueing would hand out slots one by one, but a tenant's turn
takes at once every slot it would win in a row before the next tenant's turn, so a deep
queue (one tenant, hundreds of waiting runs, free slots) costs one step, not hundreds.
``decay_factor`` is how past usage fades: by half every half-life, so a busy morning
weighs on a tenant's share for hours, not for ever.
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

    Band by band, highest first; inside a band, slots go in weighted-fair-queueing order:
    each to the candidate whose tenant has the lowest ``usage / weight`` (ties: higher
    weight, older run, tenant id), charging ``quantum / weight`` per slot granted. Never
    more than a tenant's free quota, a pool's free slots or a queue's waiting runs.

    One pass per band over a heap of the candidates: a candidate popped takes, in one
    step, every slot it would win in a row before the next candidate's key (``_run_of``),
    so the work grows with the turns taken, not with the slots granted.
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
            entry = heapq.heappop(heap)
            key_share, neg_w, oldest, tenant, pool, queue = entry
            free_pool = pool_free.get(pool, 0)
            if tenant_free.get(tenant, 0) <= 0 or free_pool <= 0:
                continue
            if key_share != share[tenant]:  # the tenant was charged since: re-queue
                heapq.heappush(heap, (share[tenant], *entry[1:]))
                continue
            room = min(tenant_free[tenant], left[(pool, queue)])
            if free_pool < room:
                room = int(free_pool)
            step = quantum / weight[tenant]
            n = _run_of(entry, step, room, heap[0] if heap else None)
            grants[(pool, queue)] = grants.get((pool, queue), 0) + n
            tenant_free[tenant] -= n
            pool_free[pool] -= n
            left[(pool, queue)] -= n
            share[tenant] = key_share + n * step
            if left[(pool, queue)] > 0:
                heapq.heappush(heap, (share[tenant], *entry[1:]))
    return grants


def _run_of(entry: tuple, step: float, room: int, nxt: tuple | None) -> int:
    """How many slots in a row (1..``room``) the candidate ``entry`` wins before ``nxt``,
    the next in the heap: slot ``j`` is keyed ``share + j * step``, and it comes first
    while its key (then weight, oldest run, tenant, pool, queue) sorts before ``nxt``."""
    if nxt is None or room <= 1:
        return max(room, 0)
    share, rest = entry[0], entry[1:]

    def before(j: int) -> bool:
        return (share + j * step, *rest) < nxt

    gap = nxt[0] - share  # below zero when nxt is stale (its tenant charged since)
    j = room - 1 if step <= 0 or gap / step >= room else max(int(gap // step), 0)
    while j > 0 and not before(j):
        j -= 1
    while j + 1 < room and before(j + 1):
        j += 1
    return j + 1


def decay_factor(age_s: float, half_life_s: float) -> float:
    return 0.5 ** (max(age_s, 0.0) / half_life_s)
