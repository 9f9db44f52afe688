"""Webhook signatures: Standard Webhooks', Setlist's and GitHub's, signed and checked in
constant time.

- ``standard`` (Standard Webhooks): ``webhook-id``, ``webhook-timestamp`` and
  ``webhook-signature: v1,BASE64`` (several, space-separated, while rotating) over
  ``id.timestamp.body``: the delivery id and the time are signed, so a captured request
  can neither be replayed after ``tolerance_s`` nor passed off as another delivery.
- ``setlist``: ``X-Setlist-Signature: t=UNIX,v1=HEX`` over ``t.body`` (several ``v1``
  values while rotating). Its delivery id header is not signed.
- ``github``: ``X-Hub-Signature-256: sha256=HEX`` over the body alone (no time, no id).

Signatures are compared as bytes, after decoding: an upper-cased or space-padded spelling
of a valid signature verifies, and nothing downstream depends on how it was spelled (the
dedupe keys come from what was signed, never from the header). A refusal's reason is safe
to return to the sender: it never holds the secret or the expected signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from blocks.webhook import SignatureScheme, WebhookSource

GITHUB_HEADER = "x-hub-signature-256"
SETLIST_HEADER = "x-setlist-signature"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"

_HEX_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
# A signed delivery id: no '.' (the signed string is id.timestamp.body) and no spaces.
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9_:\-]{1,200}$")


@dataclass(frozen=True)
class Verified:
    """What a valid signature vouches for, besides the body."""

    scheme: SignatureScheme
    delivery_id: str | None = None  # signed (standard scheme only)
    timestamp: int | None = None  # signed (standard and setlist schemes)


class SignatureError(Exception):
    """Why a signature was refused (the reason is safe to return; it holds no secret)."""


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _hmac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def _hex_candidate(value: str) -> bytes | None:
    """The digest a hex signature spells (any case, surrounding spaces), or None."""
    value = value.strip()
    return bytes.fromhex(value) if _HEX_SHA256.match(value) else None


def _matches(expected: bytes, candidates: list[bytes | None]) -> bool:
    # Every candidate is compared (constant time each), so the time says nothing of which.
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(expected, candidate or b"")
    return ok


def _check_time(t: int, tolerance_s: int, now: float | None) -> None:
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        raise SignatureError(f"signature timestamp outside the {tolerance_s} s tolerance")


# --------------------------------------------------------------------------- github


def sign_github(secret: str | bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return "sha256=" + _hmac(_bytes(secret), body).hex()


def verify_github(secret: str | bytes, body: bytes, header: str | None) -> Verified:
    if not header:
        raise SignatureError(f"missing {GITHUB_HEADER} header")
    scheme, _, digest = header.strip().partition("=")
    if scheme.strip().lower() != "sha256" or not digest:
        raise SignatureError(f"{GITHUB_HEADER} is not sha256=HEX")
    if not _matches(_hmac(_bytes(secret), body), [_hex_candidate(digest)]):
        raise SignatureError("signature does not match")
    return Verified(SignatureScheme.github)


# --------------------------------------------------------------------------- setlist


def sign_setlist(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Setlist-Signature`` value for ``body`` signed at ``timestamp`` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1=" + _hmac(_bytes(secret), f"{t}.".encode() + body).hex()


def verify_setlist(
    secret: str | bytes,
    body: bytes,
    header: str | None,
    tolerance_s: int = 300,
    now: float | None = None,
) -> Verified:
    if not header:
        raise SignatureError(f"missing {SETLIST_HEADER} header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key.strip(), []).append(value.strip())
    stamps = parts.get("t") or []
    if len(stamps) != 1 or not _TIMESTAMP.match(stamps[0]):
        raise SignatureError(f"{SETLIST_HEADER} is not t=UNIX,v1=HEX")
    t = int(stamps[0])
    candidates = parts.get("v1") or []
    if not candidates:
        raise SignatureError(f"{SETLIST_HEADER} has no v1 signature")
    _check_time(t, tolerance_s, now)
    expected = _hmac(_bytes(secret), f"{t}.".encode() + body)
    # Several v1 values let a sender sign with the old and the new secret during rotation.
    if not _matches(expected, [_hex_candidate(c) for c in candidates[:8]]):
        raise SignatureError("signature does not match")
    return Verified(SignatureScheme.setlist, timestamp=t)


# --------------------------------------------------------------------------- standard


def standard_key(secret: str | bytes) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_BASE64`` decoded, else the
    secret's bytes as they are."""
    if isinstance(secret, str) and secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            pass
    return _bytes(secret)


def sign_standard(
    secret: str | bytes,
    body: bytes,
    delivery_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The three Standard Webhooks headers signing ``body`` as delivery ``delivery_id``
    (default: a fresh one) at ``timestamp`` (default: now)."""
    delivery_id = delivery_id or f"msg_{uuid.uuid4().hex}"
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = _hmac(standard_key(secret), f"{delivery_id}.{t}.".encode() + body)
    return {
        STANDARD_ID_HEADER: delivery_id,
        STANDARD_TIMESTAMP_HEADER: str(t),
        STANDARD_SIGNATURE_HEADER: "v1," + base64.b64encode(mac).decode(),
    }


def _b64_candidate(value: str) -> bytes | None:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == hashlib.sha256().digest_size else None


def verify_standard(
    secret: str | bytes,
    body: bytes,
    headers: Any,
    tolerance_s: int = 300,
    now: float | None = None,
) -> Verified:
    delivery_id = (headers.get(STANDARD_ID_HEADER) or "").strip()
    stamp = (headers.get(STANDARD_TIMESTAMP_HEADER) or "").strip()
    signature = headers.get(STANDARD_SIGNATURE_HEADER) or ""
    if not delivery_id or not stamp or not signature:
        raise SignatureError(
            f"missing {STANDARD_ID_HEADER}, {STANDARD_TIMESTAMP_HEADER} or "
            f"{STANDARD_SIGNATURE_HEADER} header"
        )
    if not _DELIVERY_ID.match(delivery_id):
        raise SignatureError(f"{STANDARD_ID_HEADER} is not 1-200 of A-Z a-z 0-9 _ : -")
    if not _TIMESTAMP.match(stamp):
        raise SignatureError(f"{STANDARD_TIMESTAMP_HEADER} is not a UNIX time in seconds")
    t = int(stamp)
    candidates = []
    for item in signature.split()[:8]:
        version, sep, value = item.partition(",")
        if sep and version == "v1":
            candidates.append(_b64_candidate(value))
    if not candidates:
        raise SignatureError(f"{STANDARD_SIGNATURE_HEADER} has no v1,BASE64 signature")
    _check_time(t, tolerance_s, now)
    expected = _hmac(standard_key(secret), f"{delivery_id}.{t}.".encode() + body)
    if not _matches(expected, candidates):
        raise SignatureError("signature does not match")
    return Verified(SignatureScheme.standard, delivery_id=delivery_id, timestamp=t)


def verify(source: WebhookSource, secret: str | bytes, body: bytes, headers: Any) -> Verified:
    if source.scheme == SignatureScheme.github:
        return verify_github(secret, body, headers.get(GITHUB_HEADER))
    if source.scheme == SignatureScheme.setlist:
        return verify_setlist(secret, body, headers.get(SETLIST_HEADER), source.tolerance_s)
    return verify_standard(secret, body, headers, source.tolerance_s)
