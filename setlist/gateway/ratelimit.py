"""Rate limits for the gateway: one token bucket per (source, tenant), in memory.

A source's ``rate_limit_per_s`` and ``burst`` apply to each tenant it speaks for, so one
sender's flood for its tenant is refused (429) without refusing the source's other
tenants. Buckets are only made for tenants on a source's allow-list, and the table is
bounded besides (``max_buckets``, the least recently used bucket dropped first). The
buckets live in the gateway process, so a restart refills them; the limit is the
gateway's own, not a promise across replicas.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: ``rate`` per second sustained, ``burst`` at once."""

    def __init__(self, max_buckets: int = 10_000) -> None:
        self.max_buckets = max(1, max_buckets)
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, rate: float, burst: int) -> float:
        """0 if allowed, else the seconds until a token is free."""
        now = time.monotonic()
        b = self._buckets.get(key)
        if b is None:
            while len(self._buckets) >= self.max_buckets:
                self._buckets.popitem(last=False)
            b = self._buckets[key] = _Bucket(tokens=float(burst), at=now)
        else:
            self._buckets.move_to_end(key)
        b.tokens = min(float(burst), b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / rate
