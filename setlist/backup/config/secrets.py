"""Secret values in block data: found, masked, and sealed with a passphrase.

Secret values of blocks (fields Prefect marks secret: ``SecretStr``, ``SecretDict``,
the ``Secret`` block's value) are never written in clear. Without a passphrase they
are left out and their blocks are flagged ``needs secret``; with ``include_secrets``
they go into ``secrets.enc.json``, encrypted with AES-256-GCM under a key derived from
the passphrase with scrypt. The block list's SHA-256 is the cipher's associated data, so
sealed secrets can't be moved onto another archive's blocks.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets as _random
from collections.abc import Iterable
from typing import Any

from setlist.backup.config.entries import (
    FORMAT,
    FORMAT_VERSION,
    MASK,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    SECRETS_MEMBER,
    ArchiveRejected,
    WrongPassphrase,
    _dumps,
)


def _expand(data: Any, spec: list[str], prefix: list[str]) -> Iterable[list[str]]:
    """Concrete paths in ``data`` matching a secret-field spec (``*`` matches any key)."""
    if not spec:
        yield prefix
        return
    if not isinstance(data, dict):
        if data is not None and prefix:
            yield prefix  # a secret dict that is not a dict: the whole value is secret
        return
    head, rest = spec[0], spec[1:]
    keys = sorted(data) if head == "*" else ([head] if head in data else [])
    for key in keys:
        yield from _expand(data[key], rest, [*prefix, key])


def _get_path(data: Any, path: list[str]) -> Any:
    for key in path:
        data = data[key]
    return data


def _set_path(data: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def split_secrets(
    data: dict[str, Any], secret_fields: Iterable[str], skip: Iterable[str] = ()
) -> tuple[dict[str, Any], list[tuple[list[str], Any]]]:
    """``data`` with every set secret value masked, and those values by path."""
    masked = copy.deepcopy(data)
    skipped = set(skip)
    found: dict[tuple[str, ...], Any] = {}
    for spec in dict.fromkeys(secret_fields):
        for path in _expand(masked, spec.split("."), []):
            if path[0] in skipped or tuple(path) in found:
                continue
            value = _get_path(masked, path)
            if value is None or value == {} or value == MASK:
                continue
            found[tuple(path)] = value
    for path in found:
        _set_path(masked, list(path), MASK)
    return masked, [(list(p), v) for p, v in sorted(found.items())]


def _derive_key(passphrase: str, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase.encode()
    )


def _aad(blocks_sha256: str) -> bytes:
    # Binds the secrets to the block list they belong to: they can't be moved to another.
    return f"{FORMAT}/{FORMAT_VERSION}/{blocks_sha256}".encode()


def _encrypt(payload: bytes, passphrase: str, aad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = _random.token_bytes(16), _random.token_bytes(12)
    sealed = AESGCM(_derive_key(passphrase, salt)).encrypt(nonce, payload, aad)
    return _dumps(
        {
            "cipher": "AES-256-GCM",
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": base64.b64encode(salt).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(sealed).decode(),
        }
    )


def _decrypt(member: bytes, passphrase: str, aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        sealed = json.loads(member)
        if (sealed["cipher"], sealed["kdf"]) != ("AES-256-GCM", "scrypt") or (
            sealed["n"],
            sealed["r"],
            sealed["p"],
        ) != (SCRYPT_N, SCRYPT_R, SCRYPT_P):
            raise ArchiveRejected(
                f"{SECRETS_MEMBER}: unsupported cipher or key derivation; expected "
                f"AES-256-GCM with scrypt n={SCRYPT_N} r={SCRYPT_R} p={SCRYPT_P}"
            )
        salt = base64.b64decode(sealed["salt"], validate=True)
        nonce = base64.b64decode(sealed["nonce"], validate=True)
        ciphertext = base64.b64decode(sealed["ciphertext"], validate=True)
    except ArchiveRejected:
        raise
    except (ValueError, KeyError, TypeError):
        raise ArchiveRejected(f"{SECRETS_MEMBER} is not a sealed secrets file") from None
    if len(salt) != 16 or len(nonce) != 12:
        raise ArchiveRejected(f"{SECRETS_MEMBER}: bad salt or nonce length")
    try:
        return AESGCM(_derive_key(passphrase, salt)).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise WrongPassphrase(
            "wrong passphrase: the archive's secrets do not decrypt with it (or they were "
            "altered); nothing was imported"
        ) from None
