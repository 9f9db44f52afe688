"""The dispatcher's raw calls try a busy server (503) again within milliseconds.

SQLite refuses a write at once while another holds its lock and Prefect's server answers
503; Prefect's client would wait 2, 4 then 8 s before trying again, inside a cycle meant
to last a fraction of a second.
"""

from __future__ import annotations

import time

import httpx
import pytest

from setlist.dispatch import _api


def _client(answers: list[int], seen: list[str]):
    from prefect.client.orchestration import PrefectClient

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        code = answers.pop(0) if answers else 200
        return httpx.Response(code, json={"ok": code})

    return PrefectClient(
        "http://prefect.test/api", httpx_settings={"transport": httpx.MockTransport(handler)}
    )


async def test_a_503_is_tried_again_within_milliseconds():
    seen: list[str] = []
    client = _client([503, 503, 503, 200], seen)
    t0 = time.perf_counter()
    resp = await _api._call(client, "PATCH", "/flow_runs/x", json={"tags": ["a"]})
    assert resp.status_code == 200 and resp.json() == {"ok": 200}
    assert time.perf_counter() - t0 < 1.0  # the client's own retry waits 2 s at first
    assert seen == ["PATCH /api/flow_runs/x"] * 4


async def test_a_404_is_none_and_other_errors_raise():
    seen: list[str] = []
    assert await _api._call(_client([404], seen), "GET", "/variables/name/v") is None
    with pytest.raises(httpx.HTTPStatusError):
        await _api._call(_client([409], seen), "POST", "/variables/")
