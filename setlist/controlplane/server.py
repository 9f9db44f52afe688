"""Prefect's server app inside Setlist's gate, for uvicorn (``--factory``)."""

from __future__ import annotations

import logging
import os

from setlist.controlplane.gate import Gate
from setlist.controlplane.unavailable import database_unreachable
from setlist.core.credentials import SERVER_AUTH_STRING_ENV
from setlist.core.tenancy import SetlistError

log = logging.getLogger("setlist.controlplane")


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
