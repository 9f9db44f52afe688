"""Raw Prefect API calls shared by the dispatcher's modules.

``_call`` is a request whose 404 is ``None`` rather than an exception, as absence is an
answer here (no heartbeat, a deleted run), and whose 503 is tried again within
milliseconds; ``_filter_runs`` reads every page of a flow-run filter, dropping a run
seen on an earlier page (pages shift while runs are created), and before each page
after the first awaits ``pace`` when given (the dispatcher's background reads wait there
while a cycle runs); ``_ts`` and ``_iso`` convert the API's timestamps to and from POSIX
seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prefect.client.orchestration import PrefectClient

_PAGE = 200

Pace = Callable[[], Awaitable[Any]] | None


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


# Seconds between the quick tries of a call the server answered 503: SQLite refuses a
# write at once while another holds the lock, and Prefect's client waits 2, 4 then 8 s
# before trying again, a 14 s stall in a cycle meant to last a fraction of a second.
_BUSY_RETRIES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


async def _call(client: PrefectClient, method: str, path: str, **kwargs: Any):
    """A raw API call; ``None`` when the object does not exist (404). A 503 (a busy
    SQLite) is tried again within milliseconds (``_BUSY_RETRIES``, 1.6 s in all) before
    the client's own retries, which wait seconds, take over."""
    import httpx

    http = client._client
    for delay in _BUSY_RETRIES:
        # Prefect's client less its retries: the same request, headers and transport.
        try:
            resp = await httpx.AsyncClient.send(http, http.build_request(method, path, **kwargs))
        except httpx.TransportError:
            break  # the server is away: the client's own path waits it out
        if resp.status_code == 503:
            await asyncio.sleep(delay)
            continue
        if resp.status_code == 403 and "CSRF" in resp.text:
            break  # a server that wants a CSRF token: the client's own path adds it
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp
    try:
        return await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return None
        raise


async def _filter_runs(
    client: PrefectClient, body: dict[str, Any], pace: Pace = None
) -> list[dict]:
    """Every flow run matching ``body`` (raw JSON, paged)."""
    out: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        if pace is not None and offset:
            await pace()
        resp = await _call(
            client,
            "POST",
            "/flow_runs/filter",
            json={**body, "limit": _PAGE, "offset": offset, "sort": "ID_DESC"},
        )
        page = resp.json()
        for r in page:
            if r["id"] not in seen:
                seen.add(r["id"])
                out.append(r)
        if len(page) < _PAGE:
            return out
        offset += _PAGE
