"""Prefect's server app inside Setlist's gate, for uvicorn (``--factory``)."""

from __future__ import annotations

import os

from setlist.controlplane.gate import Gate
from setlist.core.credentials import SERVER_AUTH_STRING_ENV
from setlist.core.tenancy import SetlistError


def create_app():
    """The gated app. The operator credential must be set: an open control plane is
    exactly what the gate exists to prevent, so it refuses to start without one."""
    from prefect.server.api.server import create_app as prefect_app

    operator = os.environ.get(SERVER_AUTH_STRING_ENV)
    if not operator:
        raise SetlistError(f"{SERVER_AUTH_STRING_ENV} is not set: refusing to serve an open API")
    return Gate(prefect_app(), operator)
