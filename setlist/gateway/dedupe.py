"""Which deliveries are the same delivery: the spool's dedupe keys of a verified request.

A key is built from what the signature vouches for and the tenant, never from how a
header was spelled, so a captured request stays a duplicate whatever is changed around
it:

- ``standard``: (tenant, signed ``webhook-id``, body): a retry is a duplicate; another id
  needs another signature; and a co-sender who signs a victim's predictable id first, with
  another body or for another tenant, claims nothing of the victim's delivery;
- ``setlist``: (tenant, signed timestamp, body) — a replay of the signed message under a
  new or no ``X-Setlist-Delivery`` within the tolerance is a duplicate — and, when the
  sender names its delivery, (tenant, delivery id, body), so its retry signed afresh is one
  too (the unsigned id alone could be claimed by anyone holding the secret: hence the body);
- ``github`` (nothing signed but the body): (tenant, body), for the whole dedupe window.

Keys are hashes: fixed size, and no sender's text in the spool.
"""

from __future__ import annotations

import hashlib

from blocks.webhook import SignatureScheme
from setlist.gateway.signatures import Verified


def _key(kind: str, tenant_id: str, *parts: str) -> str:
    digest = hashlib.sha256("\x00".join((kind, tenant_id, *parts)).encode()).hexdigest()
    return f"{kind}:{digest}"


def dedupe_keys(
    verified: Verified, tenant_id: str, body: bytes, unsigned_id: str | None = None
) -> list[str]:
    """The delivery's dedupe keys; the first one also names its event."""
    body_sha = hashlib.sha256(body).hexdigest()
    if verified.scheme == SignatureScheme.standard:
        return [_key("id", tenant_id, verified.delivery_id or "", body_sha)]
    if verified.scheme == SignatureScheme.setlist:
        keys = [_key("msg", tenant_id, str(verified.timestamp), body_sha)]
        if unsigned_id:
            keys.insert(0, _key("uid", tenant_id, unsigned_id, body_sha))
        return keys
    return [_key("body", tenant_id, body_sha)]
