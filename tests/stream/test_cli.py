"""``setlist stream send`` and ``status`` in-process against the session server and real
brokers (Redis and NATS JetStream on loopback), and the module beneath ``send``."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import time
from datetime import UTC, datetime

import orjson
import pytest
from typer.testing import CliRunner

from setlist.brokers.base import Broker, BrokerKind, StreamFull, open_broker
from setlist.cli import app
from setlist.core.settings import get_settings
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.core.tenancy import SetlistError
from setlist.etl.demo import iter_events, iter_raw_lines
from setlist.etl.raw_events import MAX_LINE_BYTES
from setlist.stream.analytics import read_snapshot
from setlist.stream.ingest import IngestSettings
from setlist.stream.job import consume
from setlist.stream.produce import read_lines, send_lines
from setlist.tenants.onboarding import read_profile

URLS = {BrokerKind.redis: "redis://127.0.0.1:6379/0", BrokerKind.nats: "nats://127.0.0.1:4222"}


def _run_with_broker(kind: BrokerKind, work, **kw):
    """``await work(broker)`` on a connection of its own (a CLI test has no event loop)."""

    async def go():
        async with open_broker(kind, URLS[kind], **kw) as broker:
            return await work(broker)

    return asyncio.run(go())


async def _read_all(broker: Broker, tenant_id: str, n: int) -> list[bytes]:
    got: list[bytes] = []
    async with broker.consumer(tenant_id) as consumer:
        for _ in range(50):
            got += [m.data for m in await consumer.fetch(2_000, 0.5)]
            if len(got) >= n:
                break
    return got


def _length(kind: BrokerKind, tenant_id: str) -> int:
    return _run_with_broker(kind, lambda b: b.stream_length(tenant_id))


# --------------------------------------------------------------------------- send's module


def test_lines_are_read_plain_or_gzip_blank_ones_skipped():
    text = b'{"a": 1}\n\n  \r\n{"b": 2}\r\n{"c": 3}'
    assert list(read_lines(io.BytesIO(text))) == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']
    assert list(read_lines(io.BytesIO(gzip.compress(text)))) == list(read_lines(io.BytesIO(text)))
    fits = b"x" * MAX_LINE_BYTES + b"\n"
    assert [len(x) for x in read_lines(io.BytesIO(fits + b"{}\n"))] == [MAX_LINE_BYTES, 2]
    with pytest.raises(SetlistError, match="line 2 is over"):
        list(read_lines(io.BytesIO(b"{}\n" + b"x" * (MAX_LINE_BYTES + 1) + b"\n{}\n")))


@pytest.fixture(params=[BrokerKind.redis, BrokerKind.nats])
async def broker(request):
    async with open_broker(request.param, URLS[request.param], max_pending=1_000) as b:
        yield b


@pytest.fixture
async def stream_tenant(broker, tenant_id):
    yield tenant_id
    await broker.delete_stream(tenant_id)


async def test_send_reads_a_chunk_at_a_time(broker, stream_tenant, monkeypatch):
    """Bounded memory: no line is read before the chunks ahead of it are sent."""
    lines = [line for line, _ in iter_raw_lines(stream_tenant, events=950, defect_share=0.05)]
    read, calls = [0], []
    original = broker.send

    async def spy(tenant_id, events):
        calls.append((len(events), read[0]))
        return await original(tenant_id, events)

    def counted():
        for line in lines:
            read[0] += 1
            yield line

    monkeypatch.setattr(broker, "send", spy)
    sent = await send_lines(broker, stream_tenant, counted(), chunk=300)
    assert sent.events == 950 and [n for n, _ in calls] == [300, 300, 300, 50]
    assert all(seen <= 300 * i for i, (_, seen) in enumerate(calls, 1))
    assert await _read_all(broker, stream_tenant, 950) == lines
    assert sent.last_position is not None


async def test_a_full_stream_stops_the_send_naming_the_lag(broker, stream_tenant):
    lines = [line for line, _ in iter_raw_lines(stream_tenant, events=1_100, defect_share=0)]
    with pytest.raises(StreamFull) as caught:
        await send_lines(broker, stream_tenant, lines, chunk=400)
    message = str(caught.value)
    assert message.startswith("stopped after 800 events, up to position ")
    assert "holds 800 messages" in message and "max_pending=1000" in message
    assert await broker.stream_length(stream_tenant) == 800


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(prefect_server):
    runner = CliRunner()

    def invoke(*args: str, input: bytes | None = None):
        return runner.invoke(app, list(args), input=input)

    return invoke


@pytest.fixture(params=[BrokerKind.redis, BrokerKind.nats])
def kind(request) -> BrokerKind:
    return request.param


@pytest.fixture
def tenant(cli, tenant_id, kind):
    """A tenant, then the platform's broker configured (after onboarding, so the tenant
    gets no broker user of its own); its stream is deleted afterwards."""
    assert cli("tenant", "create", tenant_id).exit_code == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SETLIST_STREAM_BROKER_URL", URLS[kind])
        get_settings.cache_clear()
        try:
            yield tenant_id
        finally:
            _run_with_broker(kind, lambda b: b.delete_stream(tenant_id))
    get_settings.cache_clear()


@pytest.mark.server
def test_send_puts_every_line_of_a_file_in_the_stream_as_it_is(cli, tenant, kind, tmp_path):
    # Defective lines too: validating them is the job's work, not the producer's.
    lines = [line for line, _ in iter_raw_lines(tenant, events=5_000, defect_share=0.02)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines[:2_500]) + b"\n\n\n" + b"\n".join(lines[2_500:]) + b"\n")
    r = cli("stream", "send", "--tenant", tenant, str(path))
    assert r.exit_code == 0, r.output
    assert f"sent 5000 events to the stream of {tenant}; last position " in r.output
    assert _length(kind, tenant) == 5_000
    # gzip on standard input, told by its bytes.
    more = [line for line, _ in iter_raw_lines(tenant, events=200, seed=8)]
    r = cli("stream", "send", "-t", tenant, "-", input=gzip.compress(b"\n".join(more)))
    assert r.exit_code == 0 and "sent 200 events" in r.output, r.output
    stored = _run_with_broker(kind, lambda b: _read_all(b, tenant, 5_200))
    assert stored == lines + more


@pytest.mark.server
def test_send_demo_events(cli, tenant, kind):
    r = cli("stream", "send", "--tenant", tenant, "--demo", "300")
    assert r.exit_code == 0 and "sent 300 events" in r.output, r.output
    expected = [line for line, _ in iter_raw_lines(tenant, events=300, defect_share=0.0)]
    assert _run_with_broker(kind, lambda b: _read_all(b, tenant, 300)) == expected
    r = cli("stream", "send", "--tenant", tenant, "--demo", "3", "some.jsonl")
    assert r.exit_code == 2 and "not both" in r.output


@pytest.mark.server
def test_send_refuses_a_bad_tenant_or_no_broker_before_sending(cli, tenant, kind, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in iter_raw_lines(tenant, events=10)))
    r = cli("stream", "send", "--tenant", "Not_Valid", str(path))
    assert r.exit_code == 2 and "DNS-1123" in r.output, r.output
    unknown = f"{tenant[:50]}-gone"
    r = cli("stream", "send", "--tenant", unknown, str(path))
    assert r.exit_code == 2 and "unknown tenant" in r.output, r.output
    assert _length(kind, unknown) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SETLIST_STREAM_BROKER_URL")
        get_settings.cache_clear()
        r = cli("stream", "send", "--tenant", tenant, str(path))
    get_settings.cache_clear()
    assert r.exit_code == 2 and "set SETLIST_STREAM_BROKER_URL" in r.output, r.output
    assert _length(kind, tenant) == 0


def _live_lines(tenant_id: str, events: int) -> list[bytes]:
    """Events happening now, so the live figures count them."""
    now = datetime.now(UTC).isoformat()
    made = iter_events(tenant_id, events=events, seed=9)  # not the demo's event ids
    return [orjson.dumps({**e, "ts": now}) for e in made]


@pytest.mark.server
def test_status_reports_lag_commit_backlog_and_live_figures(cli, tenant, kind):
    r = cli("stream", "status", "--tenant", tenant, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {
        "tenant_id": tenant,
        "broker": kind.value,
        "lag": 0,
        "committed_position": None,
        "appended_files": 0,
        "appended_rows": 0,
        "live": None,
        "live_error": None,
    }
    assert cli("stream", "send", "-t", tenant, "--demo", "40").exit_code == 0
    assert json.loads(cli("stream", "status", "-t", tenant, "--json").output)["lag"] == 40

    # The job consumes what waits: its commit and its snapshot show in the status.
    async def run_job(broker):
        await broker.send(tenant, _live_lines(tenant, 500))
        profile = await read_profile(tenant)
        storage = tenant_storage(tenant, await load_storage_config(profile.storage_block))
        settings = IngestSettings(max_batch_events=10_000, max_batch_seconds=0.5)
        # no load publishes meanwhile: no table lock to take
        await consume(storage, broker, kind.value, contextlib.nullcontext, settings, seconds=2)
        return read_snapshot(storage)

    started = time.monotonic()
    snapshot = _run_with_broker(kind, run_job)
    assert time.monotonic() - started < 60
    status = json.loads(cli("stream", "status", "-t", tenant, "--json").output)
    assert status["lag"] == 0 and status["committed_position"]
    assert status["appended_files"] >= 1 and status["appended_rows"] == 540
    live = status["live"]
    newest = snapshot["plays_per_minute"][-1]
    assert (live["plays"], live["listeners"], live["minute"]) == (
        newest["plays"],
        newest["listeners"],
        newest["minute"],
    )
    assert live["skip_rate_5m"] == snapshot["skip_rate_5m"] is not None
    assert (
        live["top_tracks_5m"] == snapshot["top_tracks_5m"][:5] and len(live["top_tracks_5m"]) == 5
    )
    r = cli("stream", "status", "-t", tenant)
    assert r.exit_code == 0 and f"{tenant} on {kind.value}: lag 0" in r.output, r.output
    assert "1. " in r.output and "skip rate" in r.output
