"""Run tokens: what a tenant job holds instead of the operator credential.

A run token names one flow run, its tenant and an expiry, and carries an HMAC made
with a key derived from the platform key, so only the platform (the worker that starts
the run) can issue one and the control-plane gate (``setlist.controlplane``) can check
one without a lookup. The job sends it as Prefect's basic-auth string
(``run:<token>``), which every Prefect client path uses: HTTP, the events websocket
and the log stream, so no Prefect code needs to change.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
from dataclasses import dataclass
from hashlib import sha256
from uuid import UUID

from setlist.core.credentials import derived_key
from setlist.core.tenancy import SetlistError, validate_tenant_id

RUN_USER = "run"
DEFAULT_TTL_S = 24 * 3600  # the longest job (backup: 6 h) with a wide margin


class InvalidRunToken(SetlistError):
    """A token that is malformed, forged, or expired."""


@dataclass(frozen=True)
class RunToken:
    run_id: UUID
    tenant_id: str
    expires: int  # unix seconds

    def encode(self, key: bytes | None = None) -> str:
        body = json.dumps(
            {"r": str(self.run_id), "t": self.tenant_id, "e": self.expires},
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(key or derived_key("run-token"), body, sha256).digest()
        return f"{_b64(body)}.{_b64(mac)}"

    def auth_string(self, key: bytes | None = None) -> str:
        """The value for ``PREFECT_API_AUTH_STRING`` in the job's environment."""
        return f"{RUN_USER}:{self.encode(key)}"


def issue(run_id: UUID | str, tenant_id: str, ttl_s: int = DEFAULT_TTL_S) -> RunToken:
    return RunToken(UUID(str(run_id)), validate_tenant_id(tenant_id), int(time.time()) + ttl_s)


def verify(token: str, key: bytes | None = None, now: float | None = None) -> RunToken:
    """The token's claims, once its MAC and expiry check out."""
    try:
        body_b64, mac_b64 = token.split(".")
        body, mac = _unb64(body_b64), _unb64(mac_b64)
    except ValueError:
        raise InvalidRunToken("malformed run token") from None
    expected = hmac.new(key or derived_key("run-token"), body, sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise InvalidRunToken("run token signature does not match")
    try:
        claims = json.loads(body)
        parsed = RunToken(UUID(claims["r"]), validate_tenant_id(claims["t"]), int(claims["e"]))
    except (ValueError, KeyError, TypeError, SetlistError):
        raise InvalidRunToken("run token claims are not valid") from None
    if parsed.expires < (time.time() if now is None else now):
        raise InvalidRunToken("run token expired")
    return parsed


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc
