"""Prefect's multi-replica shape, for real: two gated API replicas without services, one
services process, a fresh embedded PostgreSQL and a Redis database of the test's own.

What must cross replicas does: a flow run created through A moves through its states
through B; a tenant quota (a global concurrency limit) taken through A is full through
B, and its lease is renewed and released through B (Redis lease storage: in memory it
would be A's alone); an event sent to A is read back from B (Redis messaging to the
services process, which persists it); B keeps serving when A is killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from setlist.controlplane import ha
from setlist.controlplane.local import start_local_ha
from setlist.controlplane.postgres import EmbeddedPostgres
from setlist.core.tenancy import SetlistError, concurrency_limit_name

REDIS_URL = os.environ.get("SETLIST_TEST_REDIS_URL", ha.DEFAULT_REDIS_URL)


@pytest.fixture(scope="module")
def redis_url():
    """A Redis database no one else uses (``ha.claimed_database``)."""
    reason = ha.redis_unreachable(REDIS_URL)
    if reason:
        pytest.skip(f"the HA test needs Redis ({reason}); set SETLIST_TEST_REDIS_URL")
    with ha.claimed_database(REDIS_URL) as url:
        yield url


@pytest.fixture(scope="module")
def replicas(redis_url, setlist_home):
    home = Path(tempfile.mkdtemp(prefix="ha-", dir=setlist_home))
    pg = EmbeddedPostgres(home / "postgres")
    operator = os.environ["PREFECT_API_AUTH_STRING"]  # the session's, set by conftest
    try:
        started = start_local_ha(home, operator, pg.start(), redis_url)
    except BaseException:
        pg.stop()
        raise
    try:
        yield started
    finally:
        started.stop()
        pg.stop()
        shutil.rmtree(pg.root, ignore_errors=True)  # 40 MB a cluster


def _api(url: str) -> httpx.Client:
    user, _, password = os.environ["PREFECT_API_AUTH_STRING"].partition(":")
    return httpx.Client(base_url=url, auth=(user, password), timeout=30)


def _ok(response: httpx.Response) -> dict:
    assert response.status_code < 300, (response.status_code, response.text)
    return response.json() if response.content else {}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis://127.0.0.1:6379",
            {
                "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
                "PREFECT_REDIS_MESSAGING_PORT": "6379",
                "PREFECT_REDIS_MESSAGING_DB": "0",
                "PREFECT_SERVER_DOCKET_URL": "redis://127.0.0.1:6379/0",
            },
        ),
        (
            "rediss://app:p%40ss@cache.internal:6380/3",
            {
                "PREFECT_REDIS_MESSAGING_HOST": "cache.internal",
                "PREFECT_REDIS_MESSAGING_PORT": "6380",
                "PREFECT_REDIS_MESSAGING_DB": "3",
                "PREFECT_REDIS_MESSAGING_USERNAME": "app",
                "PREFECT_REDIS_MESSAGING_PASSWORD": "p@ss",
                "PREFECT_REDIS_MESSAGING_SSL": "true",
                "PREFECT_SERVER_DOCKET_URL": "rediss://app:p%40ss@cache.internal:6380/3",
            },
        ),
    ],
)
def test_one_redis_url_gives_every_setting_prefect_documents(url, expected):
    assert ha.redis_env(url) == {**ha.REDIS_BACKENDS, **expected}


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "redis://127.0.0.1:6379/cache", "redis://h:port/0"]
)
def test_what_is_not_a_redis_url_is_refused_without_its_password(url):
    with pytest.raises(SetlistError, match="Redis|number"):
        ha.redis_env(url)
    assert "s3cret" not in ha.redact_redis("redis://u:s3cret@h:1/0")


def test_an_unreachable_redis_is_named():
    reason = ha.redis_unreachable("redis://:s3cret@127.0.0.1:1/0", timeout=0.5)
    assert reason and "127.0.0.1:1" in reason and "s3cret" not in reason


@pytest.mark.server  # its own servers: 45 s on an idle machine, 100 s under load
def test_two_replicas_share_runs_quotas_and_events(replicas):
    (proc_a, url_a), (_, url_b) = replicas.replicas
    assert url_a != url_b
    a, b = _api(url_a), _api(url_b)
    # what a replica's init container runs: passes at once on a migrated database
    waiting = subprocess.Popen(
        [sys.executable, "-m", "setlist.controlplane.ha", "wait-for-migrations", "--timeout", "5"],
        env=replicas.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    # a flow run created through A, moved through its states through B
    flow = _ok(a.post("/flows/", json={"name": f"setlist-ha-{uuid.uuid4().hex[:6]}"}))
    run = _ok(a.post("/flow_runs/", json={"flow_id": flow["id"], "state": {"type": "SCHEDULED"}}))
    assert _ok(b.get(f"/flow_runs/{run['id']}"))["state_type"] == "SCHEDULED"
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        moved = _ok(b.post(f"/flow_runs/{run['id']}/set_state", json={"state": {"type": state}}))
        assert moved["status"] == "ACCEPT", moved
    assert _ok(a.get(f"/flow_runs/{run['id']}"))["state_type"] == "COMPLETED"

    # a tenant quota of 1, taken through A: full through B; its lease lives in Redis
    quota = concurrency_limit_name(f"ha-{uuid.uuid4().hex[:6]}")
    _ok(a.post("/v2/concurrency_limits/", json={"name": quota, "limit": 1}))
    take = {"names": [quota], "slots": 1, "mode": "concurrency", "lease_duration": 60}
    lease = _ok(a.post("/v2/concurrency_limits/increment-with-lease", json=take))["lease_id"]
    refused = b.post("/v2/concurrency_limits/increment-with-lease", json=take)
    assert refused.status_code == 423, refused.text
    renewed = b.post(f"/v2/concurrency_limits/leases/{lease}/renew", json={"lease_duration": 60})
    assert renewed.status_code == 204, renewed.text  # 410 with leases in A's memory
    _ok(b.post("/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease}))
    assert _ok(a.get(f"/v2/concurrency_limits/{quota}"))["active_slots"] == 0
    _ok(b.post("/v2/concurrency_limits/increment-with-lease", json=take))

    # an event sent to A, read back from B
    name = f"setlist.test.ha.{uuid.uuid4().hex[:8]}"
    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": f"setlist.test.{uuid.uuid4().hex[:8]}"},
        "payload": {"replica": "a"},
    }
    _ok(a.post("/events", json=[event]))
    since = (datetime.now(UTC).replace(microsecond=0).timestamp()) - 600
    query = {
        "filter": {
            "event": {"name": [name]},
            "occurred": {"since": datetime.fromtimestamp(since, UTC).isoformat()},
        },
        "limit": 10,
    }
    deadline = time.monotonic() + 30
    while True:
        found = _ok(b.post("/events/filter", json=query))["events"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [e["id"] for e in found] == [event["id"]]

    # A killed: B serves on, reads what A wrote, takes new runs
    proc_a.kill()
    proc_a.wait(timeout=10)
    with pytest.raises(httpx.HTTPError):
        a.get("/health")
    assert b.get("/health").status_code == 200
    assert _ok(b.get(f"/flow_runs/{run['id']}"))["state_type"] == "COMPLETED"
    _ok(b.post("/flow_runs/", json={"flow_id": flow["id"], "state": {"type": "SCHEDULED"}}))
    assert all(p.poll() is None for p in replicas.services)  # the services are untouched
    out, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "migrated" in out, out
