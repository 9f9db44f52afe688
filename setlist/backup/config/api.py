"""The raw Prefect API calls shared by the config export and import.

Objects are read and written as the server's own JSON, with no client model between, so
an archive holds what the server said. ``_paged`` reads every page of a filter (a page
can repeat an object when others are created meanwhile), and ``_http_reason`` explains a
failure, leaving out the server's detail when the request carried a secret.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from setlist.backup.config.entries import PAGE


async def _call(
    client: Any,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    params: dict[str, Any] | None = None,
    missing_ok: bool = False,
) -> Any:
    try:
        response = await client.request(method, path, json=json_body, params=params)
    except httpx.HTTPStatusError as exc:
        if missing_ok and exc.response.status_code == 404:
            return None
        raise
    return response.json() if response.content else None


async def _paged(client: Any, path: str, body: dict[str, Any] | None = None) -> list[dict]:
    items: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = await _call(
            client, "POST", path, json_body={**(body or {}), "limit": PAGE, "offset": offset}
        )
        for item in page:
            key = str(item.get("id", len(items)))
            if key not in seen:
                seen.add(key)
                items.append(item)
        if len(page) < PAGE:
            return items
        offset += PAGE


def _q(name: str) -> str:
    return quote(name, safe="")


def _http_reason(exc: Exception, *, sensitive: bool) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        reason = f"the server answered {exc.response.status_code}"
        if not sensitive:
            try:
                detail = exc.response.json().get("detail")
            except (ValueError, AttributeError):
                detail = None
            if detail:
                reason += f": {str(detail)[:300]}"
        return reason
    return f"the server could not be reached ({type(exc).__name__})"
