"""The Prometheus exporter over HTTP against the session server, with known runs."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from prefect.states import Cancelled, Completed, Crashed, Failed, Running, Scheduled
from prometheus_client.parser import text_string_to_metric_families

from setlist.core.tenancy import TenantQuota
from setlist.observability.metrics import Exporter, serve
from setlist.tenants.onboarding import TenantSpec, create_tenant

OBSERVABILITY = Path(__file__).resolve().parents[2] / "k8s" / "observability"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _pick(samples, name: str, **labels) -> float:
    want = {k: str(v) for k, v in labels.items()}
    return sum(
        v for (n, ls), v in samples.items() if n == name and want.items() <= dict(ls).items()
    )


async def _run(client, deployment_id, *states, scheduled: datetime | None = None):
    """A run of the deployment (due at ``scheduled``, default now), then ``states``."""
    run = await client.create_flow_run_from_deployment(
        deployment_id, state=Scheduled(scheduled_time=scheduled) if scheduled else None
    )
    for state in states:
        await client.set_flow_run_state(run.id, state, force=True)
    return run


@pytest.mark.server
async def test_scrape_reports_exact_values_for_known_runs(client, tenant_id, prefect_server):
    quota = TenantQuota(concurrent_jobs=3)
    await create_tenant(client, TenantSpec(tenant_id=tenant_id, quota=quota))
    dep = await client.read_deployment_by_name(f"canary/{tenant_id}")
    # The server times runs by its own clock: real sleeps, and buckets to match them.
    exporter = Exporter(
        prefect_server, ["setlist-local"], profile_ttl=0, buckets=(0.5, 1.0, 2.0, 5.0)
    )
    port = _free_port()
    server, _thread = serve(exporter, port, addr="127.0.0.1")
    try:
        before = _scrape(port)

        async def ran(seconds, end):
            run = await _run(client, dep.id, Running())
            await asyncio.sleep(seconds)
            await client.set_flow_run_state(run.id, end(), force=True)

        await ran(0, Completed)
        await ran(1.3, Completed)
        await ran(2.6, Completed)
        await ran(0, Failed)
        await ran(1.3, Crashed)
        await _run(client, dep.id, Cancelled())
        await _run(client, dep.id, Running())
        await _run(client, dep.id, scheduled=datetime.now(UTC) - timedelta(minutes=2))
        await _run(client, dep.id)  # due now
        await _run(client, dep.id, scheduled=datetime.now(UTC) + timedelta(days=1))

        after = _scrape(port)
        mine = {"tenant": tenant_id, "job_type": "canary", "band": "normal"}
        assert _pick(after, "setlist_up") == 1
        assert _pick(after, "setlist_jobs", **mine, state="running") == 1
        assert _pick(after, "setlist_jobs", **mine, state="scheduled") == 2  # not tomorrow's
        for state, n in (("completed", 3), ("failed", 1), ("crashed", 1), ("cancelled", 1)):
            assert _pick(after, "setlist_jobs_finished_total", **mine, state=state) == n
        assert _pick(after, "setlist_queue_depth", tenant=tenant_id, band="normal") == 2
        oldest = _pick(after, "setlist_queue_oldest_wait_seconds", tenant=tenant_id, band="normal")
        assert 110 <= oldest <= 600
        assert _pick(after, "setlist_tenant_running", tenant=tenant_id) == 1
        assert _pick(after, "setlist_tenant_quota", tenant=tenant_id) == 3

        def hist(le):
            name = "setlist_job_duration_seconds_bucket"
            return _pick(after, name, job_type="canary", le=le) - _pick(
                before, name, job_type="canary", le=le
            )

        # completed ~0, 1.3, 2.6 s and failed ~0 s; crashed and cancelled runs don't count
        assert [hist(le) for le in ("0.5", "1.0", "2.0", "5.0", "+Inf")] == [2, 2, 3, 4, 4]
        count = "setlist_job_duration_seconds_count"
        assert _pick(after, count, job_type="canary") - _pick(before, count, job_type="canary") == 4
        total = "setlist_job_duration_seconds_sum"
        added = _pick(after, total, job_type="canary") - _pick(before, total, job_type="canary")
        # the sleeps are the floor; a loaded machine only adds (each run is under 5 s)
        assert 3.9 - 0.1 <= added < 4 * 5.0

        # finished runs are counted once, however often they are scraped
        again = _scrape(port)
        assert _pick(again, "setlist_jobs_finished_total", **mine, state="completed") == 3
        assert _pick(again, "setlist_exporter_api_calls") <= 8
        assert not any("flow_run" in str(labels) for (_, labels) in again)  # no run ids
    finally:
        server.shutdown()


@pytest.mark.server
async def test_live_snapshots_become_tenant_gauges_and_junk_is_skipped(
    client, tenant_id, prefect_server
):
    """A tenant's live snapshot in its data store becomes the stream gauges, labelled by
    tenant only; another tenant's junk snapshot costs that tenant its samples, nothing
    else."""
    import anyio
    import pyarrow as pa

    from setlist.core.settings import get_settings
    from setlist.core.storage import load_storage_config, tenant_storage
    from setlist.stream.analytics import LIVE_KEY, LiveAnalytics, save_snapshot

    good, junk = f"{tenant_id[:40]}-ok", f"{tenant_id[:40]}-junk"
    for tenant in (good, junk):
        await create_tenant(client, TenantSpec(tenant_id=tenant))
    config = await load_storage_config(get_settings().storage_block)

    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    last_minute = (now_ms // 60_000 - 1) * 60_000 + 5_000
    live = LiveAnalytics(good, now=lambda: now_ms)
    live.update(
        pa.table(
            {
                "user_id": ["u1", "u2", "u1"],
                "track_id": ["t1", "t1", "t2"],
                "ts": pa.array([last_minute] * 3, pa.timestamp("ms", tz="UTC")),
                "ms_played": [10_000, 60_000, 90_000],
            }
        )
    )
    live.set_lag(1234)
    save_snapshot(tenant_storage(good, config), live.snapshot())
    tenant_storage(junk, config).put_bytes(LIVE_KEY, b'{"version": 1, "events_total": -5}')

    exporter = Exporter(prefect_server, ["setlist-local"], profile_ttl=0, stream_ttl=0)
    port = _free_port()
    server, _thread = serve(exporter, port, addr="127.0.0.1")
    try:
        samples = await anyio.to_thread.run_sync(_scrape, port)
    finally:
        server.shutdown()

    assert _pick(samples, "setlist_up") == 1
    mine = {name: v for (name, labels), v in samples.items() if labels == (("tenant", good),)}
    assert mine["setlist_stream_plays_per_minute"] == 3
    assert mine["setlist_stream_listeners_per_minute"] == 2
    assert mine["setlist_stream_skip_rate"] == pytest.approx(1 / 3)
    assert mine["setlist_stream_events_total"] == 3
    assert mine["setlist_stream_consumer_lag"] == 1234
    assert 0 <= mine["setlist_stream_snapshot_age_seconds"] < 60
    stream = {(n, ls) for (n, ls) in samples if n.startswith("setlist_stream_")}
    assert all(ls == (("tenant", ls[0][1]),) for (_n, ls) in stream)  # tenant only
    assert not any(dict(ls)["tenant"] == junk for (_n, ls) in stream)
    assert _pick(samples, "setlist_tenant_quota", tenant=junk) > 0  # the rest of the scrape


@pytest.mark.server
def test_scrape_with_the_api_down_says_so(prefect_server):
    exporter = Exporter("http://127.0.0.1:9/api", ["setlist-local"])
    port = _free_port()
    server, _ = serve(exporter, port, addr="127.0.0.1")
    try:
        samples = _scrape(port)
        assert _pick(samples, "setlist_up") == 0
        assert not any(name.startswith("setlist_jobs") for (name, _) in samples)
    finally:
        server.shutdown()


def _exporter_metric_names() -> set[str]:
    import re

    here = Path(__file__).resolve().parents[2] / "setlist" / "observability"
    source = "".join((here / name).read_text() for name in ("metrics.py", "stream_metrics.py"))
    names = set(re.findall(r'"(setlist_[a-z_]+)"', source))
    expanded = set(names)
    for name in names:
        expanded |= {f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return expanded


def test_alert_rules_parse_and_use_only_exported_metrics():
    import promql_parser

    rule = yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    exported = _exporter_metric_names()
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "SetlistJobSuccessBelowSLA",
        "SetlistJobFailureRate",
        "SetlistQueueBacklogAge",
        "SetlistWorkersDown",
        "SetlistTenantQuotaSaturated",
        "SetlistExporterDown",
        "SetlistTenantStorageHigh",
        "SetlistTenantStorageQuotaReached",
    }
    for alert in alerts:
        promql_parser.parse(alert["expr"])  # raises on a syntax error
        used = {m for m in _metric_names(alert["expr"]) if m.startswith("setlist_")}
        assert used and used <= exported, (alert["alert"], used - exported)
        assert alert["labels"]["severity"] in ("critical", "warning")


def _metric_names(expr: str) -> set[str]:
    import re

    return set(re.findall(r"\b(setlist_[a-z_]+)\b", expr))


def test_dashboard_queries_parse_and_use_only_exported_metrics():
    import json

    import promql_parser

    board = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    exported = _exporter_metric_names()
    targets = [t for p in board["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 8
    titles = {p["title"] for p in board["panels"] if p["type"] == "row"}
    assert titles >= {"Overview", "Per tenant", "Per job type"}
    for target in targets:
        expr = target["expr"].replace("$tenant", "x").replace("$job_type", "x")
        expr = expr.replace("$__rate_interval", "5m")
        promql_parser.parse(expr)
        assert _metric_names(expr) <= exported
