"""A dispatch as it happened, read back from the Prefect server, and what it must have kept.

The dispatcher's promises are about instants and orders that no single read of the API
shows, and the dispatcher's own view is what is in question. So they are judged
afterwards, from what the server recorded of each run: its state transitions, when the
worker picked it up (the worker's "submitting" log line), the grant tags it carries, and
the decisions the dispatchers logged (``decision snapshot=… decided=…``; at DEBUG every
one is logged). The end-to-end contention test and the chaos scenario that kills the
leading dispatcher judge by these same rules, so a rule tightened here binds both:

0. grants: the worker took only runs granted for the Scheduled state it took them from;
1. quota: at no instant had a tenant more runs Pending + Running + Cancelling than its
   quota, and no run bounced off the tenant's concurrency limit
   (``AwaitingConcurrencySlot``): the gate, not Prefect's safety net, kept the quota;
2. bands: no run was picked up while a run of a higher band waited whose tenant was under
   quota — judged against the last decision written before the worker's poll: the
   waiting run must have existed when that decision's reads began, and its tenant must
   have stayed under quota from then until the pick-up;
4. the pool limit: at no instant more busy runs than the pool's limit;
and every run ran once: one pick-up, one Running state.

Fair share (3.) depends on the weights of a particular load; the contention test judges
it with the helpers here. Runs picked up in one worker poll (``SAME_POLL`` apart) count
as one step, and a state change counts as known to a decision only ``VISIBLE`` before
its reads began: the API's commit and the cycle's reads are not instantaneous.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prefect.client.orchestration import PrefectClient

from setlist.core.tenancy import Priority
from setlist.dispatch.grants import GRANT_TAG_PREFIX, is_granted

SAME_POLL = 0.3  # runs the worker picked up in one poll are logged this close together
POLL_LATENCY = 1.0  # a decision written this close before a pick-up may be too late for it
VISIBLE = 0.5  # a state change may reach the dispatcher's reads this long after its time
PICKED_UP = "submitting flow run"  # the worker's log line when it takes a run
DECISION = re.compile(
    r"decision snapshot=(\d+\.\d+) decided=(\d+\.\d+) cycle_ms=(\d+).*?grants=(\{.*\})"
)


class HistoryIncomplete(Exception):
    """The server holds too little of a run's history to judge it."""


@dataclass
class RunHistory:
    id: str
    tenant: str
    band: Priority
    created: float
    picked: float  # the worker's first "submitting" log line: right after its poll
    pending: float
    running: float
    end: float
    bounced: bool
    granted: bool  # it carried the grant for the Scheduled state the worker took it from
    trail: str = ""  # its states and grant tags, for the message when a check fails
    picks: int = 1  # how often a worker took it
    starts: int = 1  # how many Running states it went through


@dataclass(frozen=True)
class Decision:
    snapshot: float  # POSIX time its reads began
    decided: float  # POSIX time it was made, before its writes
    cycle_s: float
    grants: int  # runs it granted


async def read_history(
    client: PrefectClient, run_id, tenant: str, band: str | Priority, log_wait_s: float = 20.0
) -> RunHistory:
    """One run's history as the server recorded it. The worker ships its log lines in
    batches, so the pick-up line is awaited up to ``log_wait_s``."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    states = sorted(await client.read_flow_run_states(run_id), key=lambda s: s.timestamp)
    types = [s.type.value for s in states]
    if "PENDING" not in types or not any(s.is_final() for s in states):
        raise HistoryIncomplete(f"run {run_id} never started or never ended: {types}")
    first: dict[str, float] = {}
    for s in states:
        first.setdefault(s.type.value, s.timestamp.timestamp())
    picks: list[float] = []
    for _ in range(max(int(log_wait_s / 0.5), 1)):
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
            sort=LogSort.TIMESTAMP_ASC,
            limit=200,
        )
        picks = [lg.timestamp.timestamp() for lg in logs if PICKED_UP in lg.message]
        if picks:
            break
        await asyncio.sleep(0.5)
    if not picks:
        raise HistoryIncomplete(f"no worker pick-up logged for {run_id}")
    first_pending = types.index("PENDING")
    taken_from = states[first_pending - 1] if first_pending else None
    # Prefect's late-runs service renames a wait that passed its time (a new Scheduled
    # state, "Late") without asking anyone: between the worker's read of a granted run
    # and its Pending it may land (seen on two replicas, where the services run apart).
    # The grant read was then the one of the wait before it.
    read_in = [taken_from]
    if (
        taken_from is not None
        and taken_from.name == "Late"
        and first_pending >= 2
        and types[first_pending - 2] == "SCHEDULED"
        and picks[0] - taken_from.timestamp.timestamp() <= POLL_LATENCY + SAME_POLL
    ):
        read_in.append(states[first_pending - 2])
    tags = (await client.read_flow_run(run_id)).tags
    return RunHistory(
        id=str(run_id),
        tenant=tenant,
        band=Priority(band),
        created=states[0].timestamp.timestamp(),
        picked=picks[0],
        pending=first["PENDING"],
        running=first.get("RUNNING", first["PENDING"]),
        end=[s.timestamp.timestamp() for s in states if s.is_final()][-1],
        bounced=any(s.name == "AwaitingConcurrencySlot" for s in states),
        granted=taken_from is not None
        and taken_from.type.value == "SCHEDULED"
        and any(is_granted(tags, run_id, state.id) for state in read_in),
        trail=" ".join(f"{s.name}:{str(s.id)[:8]}@{s.timestamp.timestamp():.2f}" for s in states)
        + f" tags={[t for t in tags if t.startswith(GRANT_TAG_PREFIX)]}",
        picks=len(picks),
        starts=types.count("RUNNING"),
    )


def parse_decisions(*logs: str) -> list[Decision]:
    """Every decision logged by the dispatchers whose log texts are given, in order."""
    found = []
    for text in logs:
        for m in DECISION.finditer(text):
            granted = sum(json.loads(m[4]).values())
            found.append(Decision(float(m[1]), float(m[2]), float(m[3]) / 1000, granted))
    return sorted(found, key=lambda d: (d.snapshot, d.decided))


# ---------------------------------------------------------------- instants


def pending(r: RunHistory) -> float:
    return r.pending


def held(r: RunHistory) -> float:
    """From when a run holds its tenant's slot as the dispatcher sees it: its pick-up
    (a run picked in the same poll as another counts from that poll)."""
    return r.picked - SAME_POLL


def count(runs: Iterable[RunHistory], t: float, start: Callable[[RunHistory], float]) -> int:
    return sum(1 for r in runs if start(r) <= t < r.end)


def peak(runs: list[RunHistory], t0: float, t1: float, start: Callable[[RunHistory], float]) -> int:
    """Most runs busy at once in [t0, t1]; a run is busy from ``start(run)`` to its end."""
    points = [t0] + [x for r in runs for x in (start(r), r.end) if t0 <= x <= t1]
    return max(count(runs, t, start) for t in points)


def eligible(runs: list[RunHistory], quota: int, t0: float, t1: float) -> bool:
    """Under quota throughout [t0, t1]."""
    return peak(runs, t0, t1, held) < quota


def waits(r: RunHistory, seen: float, picked: float) -> bool:
    """Existed when a decision's reads began, and not picked up by ``picked`` (nor in
    the same poll)."""
    return r.created <= seen and r.picked > picked + SAME_POLL


def usage(runs: Iterable[RunHistory], t: float) -> float:
    """Run-seconds up to ``t`` (decay is negligible over minutes)."""
    return sum(max(min(r.end, t) - r.running, 0.0) for r in runs if r.running < t)


def decision_for(decisions: list[Decision], r: RunHistory) -> Decision:
    """The last decision written before r's poll: made ``POLL_LATENCY`` before the
    pick-up, or failing that (the very first grants) the last one made before it at all."""
    before = [d for d in decisions if d.decided <= r.picked - POLL_LATENCY]
    before = before or [d for d in decisions if d.decided <= r.picked]
    if not before:
        raise HistoryIncomplete(f"{r.tenant}/{r.band.value} picked up before any decision")
    return before[-1]


def seen_by(decisions: list[Decision], r: RunHistory) -> float:
    """What the decision behind r's pick-up could know: state changes up to then."""
    return decision_for(decisions, r).snapshot - VISIBLE


# ---------------------------------------------------------------- the rules


def ungranted(runs: Iterable[RunHistory]) -> list[str]:
    """0. Runs the worker took without the grant for the state it took them from."""
    return [f"{r.tenant}/{r.band.value} {r.trail}" for r in runs if not r.granted]


def bounced(runs: Iterable[RunHistory]) -> list[str]:
    """1. Runs that bounced off their tenant's concurrency limit."""
    return [f"{r.tenant}/{r.band.value} {r.id}" for r in runs if r.bounced]


def _over(runs: list[RunHistory], limit: int) -> list[RunHistory]:
    """Runs that went Pending while ``limit`` others were busy."""
    return [r for r in runs if count((o for o in runs if o is not r), r.pending, pending) >= limit]


def quota_violations(runs: list[RunHistory], quotas: dict[str, int]) -> list[str]:
    """1. Runs that went Pending while their tenant already had its quota busy."""
    out = []
    for tenant, quota in quotas.items():
        mine = [r for r in runs if r.tenant == tenant]
        out += [f"{tenant}: {r.id} over quota {quota}" for r in _over(mine, quota)]
    return out


def pool_violations(runs: list[RunHistory], limit: int | None) -> list[str]:
    """4. Runs that went Pending while the pool already had its limit busy."""
    if limit is None:
        return []
    return [f"{r.tenant}/{r.band.value} {r.id} over pool limit {limit}" for r in _over(runs, limit)]


def band_violations(
    runs: list[RunHistory], quotas: dict[str, int], decisions: list[Decision]
) -> list[str]:
    """2. Runs picked up while a run of a higher band, whose tenant had a free slot,
    waited."""
    by_tenant: dict[str, list[RunHistory]] = {}
    for r in runs:
        by_tenant.setdefault(r.tenant, []).append(r)
    out = []
    for r in runs:
        seen = seen_by(decisions, r)
        for w in runs:
            if (
                w.band.rank < r.band.rank
                and waits(w, seen, r.picked)
                and eligible(by_tenant[w.tenant], quotas[w.tenant], seen, r.picked)
            ):
                out.append(f"{r.tenant}/{r.band.value} while {w.tenant}/{w.band.value}")
    return out


def ran_once(runs: Iterable[RunHistory]) -> list[str]:
    """Runs taken or started more than once."""
    return [
        f"{r.tenant}/{r.band.value} {r.id}: {r.picks} pick-ups, {r.starts} starts"
        for r in runs
        if r.picks > 1 or r.starts > 1
    ]


def timeline(runs: list[RunHistory], decisions: list[Decision]) -> str:
    """Every run's instants and every decision's, relative to the first arrival: what to
    read when a rule fails."""
    t0 = min(r.created for r in runs)
    lines = [
        f"{r.tenant:3} {r.band.value:8} created {r.created - t0:6.1f} picked "
        f"{r.picked - t0:6.1f} pending {r.pending - t0:6.1f} running {r.running - t0:6.1f} "
        f"end {r.end - t0:6.1f}"
        for r in sorted(runs, key=lambda r: r.picked)
    ]
    lines += [
        f"decision read {d.snapshot - t0:6.1f} written {d.decided - t0:6.1f}" for d in decisions
    ]
    return "\n".join(lines)
