"""Prefect's server app inside Setlist's gate, for uvicorn (``--factory``)."""

from __future__ import annotations

import logging
import os

from setlist.controlplane.gate import Gate
from setlist.core.credentials import SERVER_AUTH_STRING_ENV
from setlist.core.tenancy import SetlistError

log = logging.getLogger("setlist.controlplane")


def _leaves(exc: BaseException) -> list[BaseException]:
    """``exc``'s own exceptions: those it groups (Starlette's middleware wraps what an
    endpoint raises in an ``ExceptionGroup``), each with the chain it was raised from."""
    out, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        else:
            out.append(e)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return out


def database_unreachable(exc: BaseException) -> BaseException | None:
    """The error that makes ``exc`` a call that failed because the database can't be reached now
    (refused or dropped connection, a server starting or shutting down), if it is one:
    a call the client can make again. Prefect's server answers those 503 — which its clients retry
    with back-off — only when they arrive as a driver error, alone; a refused connection
    arrives as a bare ``ConnectionRefusedError``, often inside an ``ExceptionGroup``, and
    was answered 500, which no client retries: during a PostgreSQL restart a job's
    final state, or the worker's report of a job that never started, was lost for good
    (``bench/chaos.py --only postgres-restart``: runs left Submitting or Running)."""
    from prefect.server.api.server import is_client_retryable_exception

    for e in _leaves(exc):
        if isinstance(e, ConnectionError) or (
            isinstance(e, Exception) and is_client_retryable_exception(e)
        ):
            return e
    return None


def _unavailable_handler():
    from prefect.server.api.server import custom_internal_exception_handler
    from starlette import status
    from starlette.responses import JSONResponse

    async def handler(request, exc: Exception):
        if (cause := database_unreachable(exc)) is not None:
            log.warning(
                "%s %s: the database can't be reached (%s); answered 503",
                request.method,
                request.url.path,
                type(cause).__name__,
            )
            return JSONResponse(
                content={"exception_message": "Service Unavailable"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            )
        return await custom_internal_exception_handler(request, exc)

    return handler


def create_app():
    """The gated app. The operator credential must be set: an open control plane is
    exactly what the gate exists to prevent, so it refuses to start without one."""
    from prefect.server.api.server import create_app as prefect_app

    operator = os.environ.get(SERVER_AUTH_STRING_ENV)
    if not operator:
        raise SetlistError(f"{SERVER_AUTH_STRING_ENV} is not set: refusing to serve an open API")
    app = prefect_app()
    # read when the API app builds its middleware, at its first request
    app.api_app.exception_handlers[Exception] = _unavailable_handler()
    return Gate(app, operator)
