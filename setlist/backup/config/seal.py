"""The archive's seal: one MAC over the manifest, which holds every member's SHA-256.

Checksums alone prove nothing (whoever edits a member re-hashes it), and the secrets'
AEAD covers only the block list. So every archive carries ``seal.json``: an HMAC-SHA256
of the manifest's exact bytes, keyed by the export passphrase (scrypt, its own salt) or,
without one, by a key derived from the platform key, so only the platform that wrote it
(or whoever knows the passphrase) can make one that verifies. The seal is checked
before any member is parsed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets as _random

from setlist.backup.config.entries import (
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    SEAL_MEMBER,
    ArchiveRejected,
    PassphraseRequired,
    WrongPassphrase,
    _dumps,
)
from setlist.backup.config.secrets import _derive_key

_LABEL = b"setlist-config/seal"


def _mac(key: bytes, manifest: bytes) -> str:
    return hmac.new(hmac.new(key, _LABEL, hashlib.sha256).digest(), manifest, "sha256").hexdigest()


def _platform_key() -> bytes:
    from setlist.core.credentials import derived_key

    return derived_key("config-archive")


def make_seal(manifest: bytes, passphrase: str | None = None) -> bytes:
    if passphrase:
        salt = _random.token_bytes(16)
        return _dumps(
            {
                "key": "passphrase",
                "kdf": "scrypt",
                "n": SCRYPT_N,
                "r": SCRYPT_R,
                "p": SCRYPT_P,
                "salt": base64.b64encode(salt).decode(),
                "mac": _mac(_derive_key(passphrase, salt), manifest),
            }
        )
    return _dumps({"key": "platform", "mac": _mac(_platform_key(), manifest)})


def check_seal(manifest: bytes, seal: bytes | None, passphrase: str | None) -> None:
    """Raise unless ``seal`` is a MAC of ``manifest`` this platform or passphrase made."""
    if seal is None:
        raise ArchiveRejected(
            f"archive has no {SEAL_MEMBER}: it is unsealed (or from an older Setlist); "
            "re-export it from its source"
        )
    try:
        spec = json.loads(seal)
        kind, mac = spec["key"], str(spec["mac"])
    except (ValueError, KeyError, TypeError):
        raise ArchiveRejected(f"{SEAL_MEMBER} is not a seal") from None
    if kind == "platform":
        if not hmac.compare_digest(mac, _mac(_platform_key(), manifest)):
            raise ArchiveRejected(
                "the archive's seal does not verify: it was altered, or sealed by another "
                "platform (export it with --passphrase to move it between platforms)"
            )
        return
    if kind != "passphrase":
        raise ArchiveRejected(f"{SEAL_MEMBER}: unknown key kind {kind!r}")
    if (spec.get("kdf"), spec.get("n"), spec.get("r"), spec.get("p")) != (
        "scrypt",
        SCRYPT_N,
        SCRYPT_R,
        SCRYPT_P,
    ):
        raise ArchiveRejected(f"{SEAL_MEMBER}: unsupported key derivation")
    if not passphrase:
        raise PassphraseRequired(
            "this archive is sealed with a passphrase: give it "
            "(--passphrase or SETLIST_CONFIG_PASSPHRASE)"
        )
    try:
        salt = base64.b64decode(str(spec["salt"]), validate=True)
    except (ValueError, KeyError):
        raise ArchiveRejected(f"{SEAL_MEMBER}: bad salt") from None
    if not hmac.compare_digest(mac, _mac(_derive_key(passphrase, salt), manifest)):
        raise WrongPassphrase(
            "the archive's seal does not verify: wrong passphrase, or the archive was "
            "altered; nothing was imported"
        )
