"""Per-source rate limits for the gateway: one token bucket per source, in memory.

A source's ``rate_limit_per_s`` and ``burst`` keep one noisy sender from filling the spool
that every source shares. The buckets live in the gateway process, so a restart refills
them; the limit is the gateway's own, not a promise across replicas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per source: ``rate`` per second sustained, ``burst`` at once."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, rate: float, burst: int) -> float:
        """0 if allowed, else the seconds until a token is free."""
        now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(tokens=float(burst), at=now)
        b.tokens = min(float(burst), b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / rate
