"""The platform's own credentials: the operator's API credential and the platform key.

Open-source Prefect authenticates with one basic-auth string. Setlist keeps it as the
*operator credential*: the server checks it, every platform process (worker, dispatcher,
gateway, exporter, CLI) sends it, and no tenant job ever holds it. The *platform key*
signs what only the platform may issue: run tokens (``setlist.core.runtokens``) and the
dispatcher's grants. Each purpose gets its own key derived from it, so a value signed
for one purpose is worthless for another.

Both come from the environment when set (``PREFECT_API_AUTH_STRING`` and
``SETLIST_PLATFORM_KEY``, as a Kubernetes Secret provides them), else from files under
the stack's home, created 0600 on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from setlist.core.settings import get_settings

OPERATOR_USER = "setlist"
PLATFORM_KEY_ENV = "SETLIST_PLATFORM_KEY"
AUTH_STRING_ENV = "PREFECT_API_AUTH_STRING"
SERVER_AUTH_STRING_ENV = "PREFECT_SERVER_API_AUTH_STRING"


def credentials_dir(home: Path | None = None) -> Path:
    return (home or get_settings().home) / "credentials"


def _read_or_create(path: Path, make) -> tuple[str, bool]:
    """The file's content, or a new value written 0600 (never readable by others, even
    for an instant: the file is created with that mode). True when it was created."""
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = make()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its value
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value, True


def operator_auth_string(home: Path | None = None, create: bool = False) -> str | None:
    """The operator credential (``user:password``): the environment's, else the stack's
    file; None when neither exists and ``create`` is false."""
    configured = os.environ.get(AUTH_STRING_ENV)
    if configured:
        return configured
    path = credentials_dir(home) / "api-auth"
    if not create and not path.exists():
        return None
    value, _ = ensure_operator_auth_string(home)
    return value


def ensure_operator_auth_string(home: Path | None = None) -> tuple[str, bool]:
    """The stack's operator credential, created on first start; True when new."""
    return _read_or_create(
        credentials_dir(home) / "api-auth",
        lambda: f"{OPERATOR_USER}:{secrets.token_urlsafe(32)}",
    )


def platform_key(home: Path | None = None) -> bytes:
    """The platform key: ``SETLIST_PLATFORM_KEY`` when set, else the stack's key file."""
    configured = os.environ.get(PLATFORM_KEY_ENV)
    if configured:
        return configured.encode()
    value, _ = _read_or_create(
        credentials_dir(home) / "platform.key", lambda: secrets.token_hex(32)
    )
    return value.encode()


def derived_key(purpose: str, home: Path | None = None) -> bytes:
    """A key for one purpose (``run-token``, ``grant``…), derived from the platform key."""
    return hmac.new(platform_key(home), f"setlist/{purpose}".encode(), hashlib.sha256).digest()


def client_settings(url: str, auth: str | None = None) -> dict:
    """Prefect client settings for a platform process talking to ``url`` as operator
    (``auth`` or the stack's credential), for ``prefect.settings.temporary_settings``."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    updates: dict = {PREFECT_API_URL: url}
    auth = auth or operator_auth_string()
    if auth:
        updates[PREFECT_API_AUTH_STRING] = auth
    return updates


def http_auth(auth: str | None = None) -> tuple[str, str] | None:
    """The operator credential as httpx's ``auth=(user, password)``, for the platform's
    own plain-HTTP readers of the API."""
    auth = auth or operator_auth_string()
    if not auth:
        return None
    user, _, password = auth.partition(":")
    return user, password
