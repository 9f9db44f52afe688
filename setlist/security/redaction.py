"""What a finding may say about a secret: that there is one, and its length.

Evidence never holds a secret. A plain field is taken for a credential by its name
(``password``, ``token``, ``api_key``… but not ``token_ttl`` or ``secret_block``, which
name one) or by its value's shape (private keys, vendor tokens, passwords in URLs); it
is then reduced to its length. The SARIF writer reuses the value shapes as its last scrub.
"""

from __future__ import annotations

import re

_SECRET_NAME = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|api[-_]?key|private[-_]?key|credential|"
    r"access[-_]?key|auth(orization|[-_]?string|[-_]?token)|dsn|signing[-_]?key|client[-_]?secret|webhook[-_]?url)",
    re.IGNORECASE,
)
# Names that match the words above but hold no secret.
_NOT_SECRET_NAME = re.compile(
    r"(_(id|ids|name|names|file|path|block|url_template|secret_block|key_id)$|"
    r"^(token_)?automount|service_account|_ttl$|^secret_block$)",
    re.IGNORECASE,
)
_SECRET_VALUE = re.compile(
    r"(-----BEGIN [A-Z ]*PRIVATE KEY-----|\bxox[abposr]-[0-9A-Za-z-]{10,}|"
    r"\bgh[pousr]_[0-9A-Za-z]{30,}|"
    r"\bsk_(live|test)_[0-9A-Za-z]{16,}|\bpnu_[0-9A-Za-z]{30,}|hooks\.slack\.com/services/|"
    r"://[^/\s:@]+:[^/\s@]{3,}@)"
)
_MASKED = re.compile(r"^\**$")


def redact_secret(value: object) -> str:
    """What a finding may say about a secret: that there is one, and its length."""
    return f"<redacted, {len(str(value))} chars>"


def looks_like_secret(name: str, value: object) -> bool:
    """A plain (non-Secret) name/value pair that holds a credential."""
    if value is None or isinstance(value, bool | int | float):
        return False
    text = str(value)
    if not text or _MASKED.match(text):
        return False
    if _SECRET_VALUE.search(text):
        return True
    return bool(_SECRET_NAME.search(name)) and not _NOT_SECRET_NAME.search(name)
