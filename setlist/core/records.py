"""Platform records in a tenant's own storage, sealed so that the tenant cannot forge them.

Billing statements and storage samples (``billing/``), scan reports (``security/``), the
model registry (``models/``) and the curated table's manifest (``curated/``) live under
the tenant's prefix, which the tenant's own credential can write: a planted ``final``
billing manifest would otherwise bill the tenant nothing, and a planted scan report
would pass compliance. So each such record carries a *seal*: an Ed25519 signature over
the tenant, the record's key and the SHA-256 of its canonical JSON. Readers verify it
and refuse the record (``UnsealedRecord``) when it does not; a seal made for one key or
one tenant is worthless for another.

Who signs: the private key is derived from the platform key, which no tenant job holds.
A platform process (the stack's CLI, the tests, a flow run in-process by the operator)
signs itself, so it must hold the platform key: an operator's CLI pointed at a cluster
needs ``SETLIST_PLATFORM_KEY`` from the Secret, or the stack's key file it would make
signs records no reader verifies. A tenant job, which holds only its run token, asks the
control plane's gate (``POST /api/setlist/records/seal``), which seals only for the
token's own tenant and only under the prefixes its job type writes
(``policy.RECORD_WRITERS``). Verifying needs only the public key: a job fetches it from
the gate once (``GET /api/setlist/records/public-key``).

What a seal does not stop: a tenant that copies an earlier sealed version of the same
record back over the current one (a rollback to something the platform itself wrote),
and whatever a job of the right type is made to seal by a tenant who has taken over
that job (the gate logs each seal it makes, with the run it made it for). A seal names
no run or time: the same record sealed twice is the same bytes, as the deterministic
outputs of a re-run must be.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any

from setlist.core.reach import waiting_out_outages
from setlist.core.tenant_ids import SetlistError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from setlist.core.storage import TenantStorage

SEAL_FIELD = "_seal"
SEAL_VERSION = 1
RECORD_PREFIXES = ("billing/", "security/", "models/", "curated/")
SEAL_PATH = "/setlist/records/seal"
PUBLIC_KEY_PATH = "/setlist/records/public-key"
RUN_USER_PREFIX = "run:"


class UnsealedRecord(SetlistError):
    """A record without a valid platform seal: damaged, planted, or moved from elsewhere."""


def check_record_key(key: str) -> str:
    if not isinstance(key, str) or not key.startswith(RECORD_PREFIXES) or ".." in key:
        raise SetlistError(f"{key!r} is not a platform record key ({', '.join(RECORD_PREFIXES)})")
    return key


def canonical_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of the record without its seal, in one canonical spelling (sorted keys, no
    spaces), so a reader gets the same digest whatever indentation the writer used."""
    body = {k: v for k, v in doc.items() if k != SEAL_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _message(tenant_id: str, key: str, digest: str) -> bytes:
    return b"setlist-record/1\n" + json.dumps([tenant_id, key, digest]).encode()


# ------------------------------------------------------------------------------ keys


def private_key(platform_key: bytes | None = None) -> Ed25519PrivateKey:
    """The platform's record-signing key (derived from the platform key, never stored)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from setlist.core.credentials import derived_key

    seed = (
        hmac.new(platform_key, b"setlist/records", hashlib.sha256).digest()
        if platform_key is not None
        else derived_key("records")
    )
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_text(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def make_seal(
    key: Ed25519PrivateKey, tenant_id: str, record_key: str, digest: str
) -> dict[str, Any]:
    """The seal the gate (or a platform process) attaches to one record."""
    signature = key.sign(_message(tenant_id, record_key, digest))
    return {"v": SEAL_VERSION, "sig": base64.b64encode(signature).decode()}


# -------------------------------------------------------------------- who signs here


def _job_auth() -> bool:
    """True in a tenant job: its API credential is a run token, not the platform's."""
    from prefect.settings import PREFECT_API_AUTH_STRING

    value = PREFECT_API_AUTH_STRING.value()
    if value is not None and hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return bool(value) and str(value).startswith(RUN_USER_PREFIX)


def _signs_here() -> bool:
    """A platform process signs (and verifies) itself; a job goes through the gate."""
    return not _job_auth()


def _gate_call(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """One call to the gate, waiting out a control plane that is briefly away (a job
    that has loaded its data must not fail on a server restart at its last step)."""
    from prefect.client.orchestration import get_client

    def call() -> dict[str, Any]:
        with get_client(sync_client=True) as client:
            return client.request(method, path, **kwargs).json()  # type: ignore[arg-type]

    try:
        return waiting_out_outages(call, what=f"{method} {path}")
    except Exception as exc:  # noqa: BLE001 - the gate's answer becomes the reason
        detail = getattr(getattr(exc, "response", None), "text", "") or str(exc)
        raise SetlistError(f"the control plane refused {path}: {detail[:300]}") from None


_public_keys: dict[str, Ed25519PublicKey] = {}


def _verifying_key() -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if _signs_here():
        return private_key().public_key()
    from prefect.settings import PREFECT_API_URL

    url = str(PREFECT_API_URL.value())
    if url not in _public_keys:
        text = _gate_call("GET", PUBLIC_KEY_PATH)["public_key"]
        _public_keys[url] = Ed25519PublicKey.from_public_bytes(base64.b64decode(text))
    return _public_keys[url]


def seal(tenant_id: str, record_key: str, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its seal: signed here by a platform process, by the gate for a job."""
    check_record_key(record_key)
    doc = json.loads(json.dumps(doc))  # as a reader will parse it: tuples, int keys…
    digest = canonical_digest(doc)
    if _signs_here():
        stamp = make_seal(private_key(), tenant_id, record_key, digest)
    else:
        request = {"key": record_key, "sha256": digest, "tenant": tenant_id}
        stamp = _gate_call("POST", SEAL_PATH, json=request)["seal"]
    return {**{k: v for k, v in doc.items() if k != SEAL_FIELD}, SEAL_FIELD: stamp}


def verify(tenant_id: str, record_key: str, doc: Any) -> dict[str, Any]:
    """The record without its seal, once the seal proves the platform wrote exactly this
    record, for this tenant, at this key."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(doc, dict):
        raise UnsealedRecord(f"{record_key} is not a JSON object")
    stamp = doc.get(SEAL_FIELD)
    if not isinstance(stamp, dict):
        raise UnsealedRecord(f"{record_key} carries no platform seal")
    if stamp.get("v") != SEAL_VERSION:
        raise UnsealedRecord(f"{record_key} has a seal this version cannot read")
    key = _verifying_key()  # the gate unreachable is its own error, not a forged record
    try:
        signature = base64.b64decode(str(stamp.get("sig", "")), validate=True)
        key.verify(signature, _message(tenant_id, record_key, canonical_digest(doc)))
    except (InvalidSignature, binascii.Error, ValueError):
        raise UnsealedRecord(
            f"{record_key} does not verify as a record the platform wrote for tenant "
            f"{tenant_id!r} (edited, planted, or copied from another key or tenant)"
        ) from None
    return {k: v for k, v in doc.items() if k != SEAL_FIELD}


# ------------------------------------------------------------------- on a storage


def dumps(tenant_id: str, record_key: str, doc: dict[str, Any], indent: bool = True) -> bytes:
    sealed = seal(tenant_id, record_key, doc)
    return json.dumps(sealed, indent=2 if indent else None, sort_keys=True).encode()


def loads(tenant_id: str, record_key: str, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise UnsealedRecord(f"{record_key} is not JSON") from None
    return verify(tenant_id, record_key, doc)


def write_record(storage: TenantStorage, record_key: str, doc: dict[str, Any]) -> None:
    """Seal ``doc`` and replace the record with it in one write."""
    storage.put_bytes(record_key, dumps(storage.tenant_id, record_key, doc))


def read_record(storage: TenantStorage, record_key: str) -> dict[str, Any]:
    """The verified record (``ObjectNotFound`` when there is none, ``UnsealedRecord`` when
    what is there is not the platform's)."""
    return loads(storage.tenant_id, record_key, storage.get_bytes(record_key))


def check_bytes(key: str, data: bytes, sha256: str) -> bytes:
    """Bytes a sealed record names by digest: refused when they are not those bytes."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UnsealedRecord(f"{key} is not the file its sealed record names (digest differs)")
    return data
