"""The rules a recorded dispatch is judged by, on made-up histories: each must catch the
breach it names and let the same history pass without it."""

from __future__ import annotations

from setlist.core.tenancy import Priority
from setlist.dispatch import history
from setlist.dispatch.history import Decision, RunHistory


def _r(tenant: str, band: str, created: float, picked: float, end: float, **kw) -> RunHistory:
    return RunHistory(
        id=f"{tenant}-{band}-{picked}",
        tenant=tenant,
        band=Priority(band),
        created=created,
        picked=picked,
        pending=picked + 0.1,
        running=picked + 0.2,
        end=end,
        bounced=kw.pop("bounced", False),
        granted=kw.pop("granted", True),
        **kw,
    )


def test_quota_counts_runs_busy_at_once_per_tenant():
    runs = [_r("a", "normal", 0, 1, 5), _r("a", "normal", 0, 2, 6), _r("b", "normal", 0, 2, 6)]
    assert history.quota_violations(runs, {"a": 2, "b": 1}) == []
    assert len(history.quota_violations(runs, {"a": 1, "b": 1})) == 1
    back_to_back = [_r("a", "normal", 0, 1, 3), _r("a", "normal", 0, 2.9, 5)]
    assert history.quota_violations(back_to_back, {"a": 1}) == []  # ended as the next began


def test_pool_limit_counts_every_tenant():
    runs = [_r(t, "normal", 0, i + 1, 9) for i, t in enumerate("abc")]
    assert history.pool_violations(runs, 3) == []
    assert len(history.pool_violations(runs, 2)) == 1
    assert history.pool_violations(runs, None) == []


def test_a_lower_band_before_a_waiting_higher_one_is_a_violation():
    decisions = [Decision(1.0, 1.1, 0.1, grants=1), Decision(9.0, 9.1, 0.1, grants=1)]
    low = _r("a", "low", 0, 11, 15)
    high = _r("b", "high", 0, 20, 25)  # waited, its tenant idle: it should have gone first
    assert history.band_violations([low, high], {"a": 1, "b": 1}, decisions) == [
        "a/low while b/high"
    ]
    busy = _r("b", "normal", 0, 5, 30)  # b at its quota throughout: the low run may go
    assert history.band_violations([low, high, busy], {"a": 1, "b": 1}, decisions) == []
    late = _r("b", "high", 9.5, 20, 25)  # arrived after the decision's reads began
    assert history.band_violations([low, late], {"a": 1, "b": 1}, decisions) == []


def test_grants_bounces_and_repeats_are_listed():
    runs = [
        _r("a", "normal", 0, 1, 2),
        _r("a", "normal", 0, 3, 4, granted=False),
        _r("a", "normal", 0, 5, 6, bounced=True),
        _r("a", "normal", 0, 7, 8, picks=2, starts=2),
    ]
    assert len(history.ungranted(runs)) == 1
    assert len(history.bounced(runs)) == 1
    assert len(history.ran_once(runs)) == 1


def test_decisions_are_read_from_every_log_in_order():
    line = (
        "2024-01-01 setlist.dispatcher decision snapshot={s} decided={d} cycle_ms=40 "
        'waiting=3 busy=1 writes=0 grants={{"setlist-local/t.normal": {g}}}\n'
    )
    first = line.format(s="20.000", d="20.040", g=2)
    second = line.format(s="10.000", d="10.040", g=1) + "dispatcher standing by\n"
    got = history.parse_decisions(first, second)
    assert [(d.snapshot, d.grants) for d in got] == [(10.0, 1), (20.0, 2)]
    assert got[0].cycle_s == 0.04
    late = _r("a", "normal", 0, 20.5, 22)
    assert history.decision_for(got, late).snapshot == 10.0  # 20.04 is too close to 20.5
