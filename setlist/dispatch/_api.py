"""Raw Prefect API calls shared by the dispatcher's modules.

``_call`` is a request whose 404 is ``None`` rather than an exception, as absence is an
answer here (no heartbeat, a deleted run); ``_filter_runs`` reads every page of a
flow-run filter, dropping a run seen on an earlier page (pages shift while runs are
created); ``_ts`` and ``_iso`` convert the API's timestamps to and from POSIX seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect.client.orchestration import PrefectClient

_PAGE = 200


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


async def _call(client: PrefectClient, method: str, path: str, **kwargs: Any):
    """A raw API call; ``None`` when the object does not exist (404)."""
    import httpx

    try:
        return await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return None
        raise


async def _filter_runs(client: PrefectClient, body: dict[str, Any]) -> list[dict]:
    """Every flow run matching ``body`` (raw JSON, paged)."""
    out: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
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
