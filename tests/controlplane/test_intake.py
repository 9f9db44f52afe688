"""Durable event intake: ``POST /api/events`` is answered once the events are kept, a
redelivery is not passed on again, and a database that can't keep them is a 503."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from setlist.controlplane.gate import Gate

OPERATOR = "setlist:intake-test-operator"


def _event(event_id: str | None = None, name: str = "setlist.test.intake") -> dict:
    return {
        "id": event_id or str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": "setlist.tenant.intake-test"},
        "payload": {},
    }


class Ledger:
    """The database as a set; ``fail`` makes the next reads or writes raise."""

    def __init__(self) -> None:
        self.kept: dict[uuid.UUID, str] = {}
        self.fail_reads = self.fail_writes = False

    async def known(self, ids):
        if self.fail_reads:
            raise ConnectionError("database down")
        return {i for i in ids if i in self.kept}

    async def write(self, events) -> None:
        if self.fail_writes:
            raise ConnectionError("database down")
        self.kept.update({e.id: e.event for e in events})


class Bus:
    """Prefect's app as far as the intake sees it: what reached ``POST /api/events``."""

    def __init__(self, status: int = 204) -> None:
        self.received: list[list[dict]] = []
        self.status = status

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append(json.loads(body))
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    @property
    def ids(self) -> list[str]:
        return [e["id"] for batch in self.received for e in batch]


@pytest.fixture
def world():
    ledger, bus = Ledger(), Bus()
    gate = Gate(bus, OPERATOR, key=b"k" * 32, ledger=ledger)
    auth = "Basic " + base64.b64encode(OPERATOR.encode()).decode()
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gate),
        base_url="http://gate/api",
        headers={"Authorization": auth},
    )
    return ledger, bus, http


async def test_events_are_kept_before_the_answer_and_a_redelivery_is_not_passed_on(world):
    ledger, bus, http = world
    first, second = _event(), _event()
    r = await http.post("/events", json=[first, second, first])  # an id twice in one batch
    assert r.status_code == 204
    assert bus.ids == [first["id"], second["id"]]
    assert {str(i) for i in ledger.kept} == {first["id"], second["id"]}
    # The sender did not see that answer and sends the batch again, with one more event.
    third = _event()
    r = await http.post("/events", json=[first, second, third])
    assert r.status_code == 204
    assert bus.ids == [first["id"], second["id"], third["id"]]
    r = await http.post("/events", json=[first])
    assert r.status_code == 204 and len(bus.received) == 2


async def test_a_database_that_cant_keep_events_is_a_503_and_nothing_counts_as_kept(world):
    ledger, bus, http = world
    ledger.fail_reads = True
    r = await http.post("/events", json=[_event()])
    assert r.status_code == 503 and r.headers["retry-after"]
    assert bus.received == []
    ledger.fail_reads, ledger.fail_writes = False, True
    lost = _event()
    r = await http.post("/events", json=[lost])
    assert r.status_code == 503 and not ledger.kept
    # Retried once the database is back: kept, and on the bus again (at least once).
    ledger.fail_writes = False
    r = await http.post("/events", json=[lost])
    assert r.status_code == 204 and bus.ids == [lost["id"], lost["id"]]
    assert set(ledger.kept) == {uuid.UUID(lost["id"])}


async def test_what_is_not_a_list_of_events_gets_prefects_own_answer(world):
    ledger, bus, http = world
    bus.status = 422
    r = await http.post("/events", content=b'{"not": "a list"}')
    assert r.status_code == 422 and bus.received == [{"not": "a list"}]
    # Prefect refusing valid-looking events: its answer, and nothing kept.
    r = await http.post("/events", json=[_event()])
    assert r.status_code == 422 and not ledger.kept


@pytest.mark.server
async def test_an_acknowledged_event_is_in_the_database_at_once(client):
    """Prefect's persister writes events seconds after its answer; through the gate the
    answer comes after the write, so a server stopping right after it loses nothing."""
    event = _event(name="setlist.test.intake.kept")
    r = await client._client.post("/events", json=[event])
    assert r.status_code == 204
    found = await client._client.post(
        "/events/filter", json={"filter": {"id": {"id": [event["id"]]}}, "limit": 50}
    )
    assert [e["id"] for e in found.json()["events"]] == [event["id"]]
    again = await client._client.post("/events", json=[event])
    assert again.status_code == 204
