"""Calls that wait out a control plane that is briefly away, within a bound.

Prefect's client retries a refused connection only after it has connected once, so a
process whose first call lands during a server restart or a database failover fails at
once. A job's first calls (the Job's guard, the gate that seals its manifest) are such
calls: they wait, with exponential back-off, for up to ``budget_s``, and only for a
transport failure (refused, reset, timed out). An answer, even a refusal, is final.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("setlist.reach")

BUDGET_S = 120.0
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 10.0


def unreachable(exc: Exception) -> bool:
    """A transport failure: the call got no answer. (httpx is not imported for this: an
    error can only be one of its errors once it is, and the ETL's worker processes,
    which import this module and make no API call, are spared its 0.2 s.)"""
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(exc, httpx.TransportError)


def waiting_out_outages(
    call: Callable[[], T],
    *,
    what: str,
    budget_s: float = BUDGET_S,
    sleep=time.sleep,
    retry: Callable[[Exception], bool] = unreachable,
) -> T:
    """``call()``, repeated while the API can't be reached (an error ``retry`` accepts),
    until ``budget_s`` is spent; then the last such error is raised."""
    deadline = time.monotonic() + budget_s
    wait = FIRST_WAIT_S
    while True:
        try:
            return call()
        except Exception as exc:
            if not retry(exc) or time.monotonic() + wait > deadline:
                raise
            log.warning("%s: the API is unreachable (%s); retrying in %.1fs", what,
                        type(exc).__name__, wait)  # fmt: skip
            sleep(wait)
            wait = min(wait * 2, MAX_WAIT_S)
