"""Webhook signatures: GitHub's and Setlist's, computed and checked in constant time.

GitHub signs the body alone (``X-Hub-Signature-256: sha256=HEX``). Setlist's scheme
signs ``t.body`` (``X-Setlist-Signature: t=UNIX,v1=HEX``), so a captured request can't
be replayed after ``tolerance_s``, and it accepts several ``v1`` values, so a sender can
rotate its secret without a window of refused deliveries. A refusal's reason is safe to
return to the sender: it never holds the secret or the expected signature.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from blocks.webhook import SignatureScheme, WebhookSource

GITHUB_HEADER = "x-hub-signature-256"
SETLIST_HEADER = "x-setlist-signature"


def _hex_hmac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_github(secret: str | bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return "sha256=" + _hex_hmac(_bytes(secret), body)


def sign_setlist(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Setlist-Signature`` value for ``body`` signed at ``timestamp`` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1=" + _hex_hmac(_bytes(secret), f"{t}.".encode() + body)


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class SignatureError(Exception):
    """Why a signature was refused (the reason is safe to return; it holds no secret)."""


def verify_github(secret: str | bytes, body: bytes, header: str | None) -> None:
    if not header:
        raise SignatureError(f"missing {GITHUB_HEADER} header")
    scheme, _, digest = header.strip().partition("=")
    if scheme != "sha256" or not digest:
        raise SignatureError(f"{GITHUB_HEADER} is not sha256=HEX")
    expected = _hex_hmac(_bytes(secret), body)
    if not hmac.compare_digest(expected.encode(), digest.strip().lower().encode()):
        raise SignatureError("signature does not match")


def verify_setlist(
    secret: str | bytes,
    body: bytes,
    header: str | None,
    tolerance_s: int = 300,
    now: float | None = None,
) -> None:
    if not header:
        raise SignatureError(f"missing {SETLIST_HEADER} header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        raise SignatureError(f"{SETLIST_HEADER} is not t=UNIX,v1=HEX") from None
    candidates = parts.get("v1") or []
    if not candidates:
        raise SignatureError(f"{SETLIST_HEADER} has no v1 signature")
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        raise SignatureError(f"signature timestamp outside the {tolerance_s} s tolerance")
    expected = _hex_hmac(_bytes(secret), f"{t}.".encode() + body).encode()
    # Several v1 values let a sender sign with the old and the new secret during rotation.
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(expected, candidate.strip().lower().encode())
    if not ok:
        raise SignatureError("signature does not match")


def verify(source: WebhookSource, secret: str | bytes, body: bytes, headers: Any) -> None:
    if source.scheme == SignatureScheme.github:
        verify_github(secret, body, headers.get(GITHUB_HEADER))
    else:
        verify_setlist(secret, body, headers.get(SETLIST_HEADER), source.tolerance_s)
