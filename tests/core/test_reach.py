"""A first call waits out an unreachable API, within its bound; an answer is final."""

from __future__ import annotations

import socket

import httpx
import pytest

from setlist.core.reach import waiting_out_outages


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_is_retried_until_the_api_answers():
    port, calls, waits = _closed_port(), [], []

    def call():
        calls.append(1)
        if len(calls) < 3:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
        return "answered"

    assert waiting_out_outages(call, what="probe", sleep=waits.append) == "answered"
    assert len(calls) == 3 and waits == [0.5, 1.0]


def test_the_wait_is_bounded_and_the_last_error_raised():
    port, waits = _closed_port(), []
    with pytest.raises(httpx.ConnectError):
        waiting_out_outages(
            lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=1),
            what="probe",
            budget_s=0.2,
            sleep=waits.append,
        )
    assert waits == []  # the first back-off already passes the budget


def test_an_answer_even_a_refusal_is_not_retried():
    calls = []

    def call():
        calls.append(1)
        request = httpx.Request("POST", "http://gate/api/setlist/seal")
        raise httpx.HTTPStatusError("403", request=request, response=httpx.Response(403))

    with pytest.raises(httpx.HTTPStatusError):
        waiting_out_outages(call, what="probe", sleep=lambda s: None)
    assert calls == [1]
