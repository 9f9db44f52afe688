"""Personal data in a tenant's curated data: e-mail addresses, phone numbers, card numbers
and IBANs, found in a sample of rows.

Every text column of each file's own schema is scanned, so a column the ETL should never
have let in is caught too. A pattern alone flags too much (any long digit run looks like
a card), so a match must also pass its validator: Luhn and an issuer prefix for a card,
the ISO 7064 check digits for an IBAN, a plausible digit count for a phone number.
Evidence keeps only a masked shape of a value — an e-mail's first letter and top-level
domain, the last digits of a number — with the column, the count and the files it came
from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from setlist.security.checks import CHECKS, Category, CheckId, Finding, _Collector

_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# International (+CC …) or North-American ((NNN) NNN-NNNN / NNN-NNN-NNNN) forms: a bare
# run of digits is an id, not a phone number.
_PHONE = (
    r"\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{3}\) ?\d{3}-\d{4}|\b\d{3}-\d{3}-\d{4}\b"
)
_CARD = r"\b(?:\d[ -]?){12,18}\d\b"
_IBAN = r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"
_PATTERNS: dict[CheckId, re.Pattern[str]] = {
    CheckId.pii_email: re.compile(_EMAIL),
    CheckId.pii_phone: re.compile(_PHONE),
    CheckId.pii_card: re.compile(_CARD),
    CheckId.pii_iban: re.compile(_IBAN),
}
# Issuer prefixes of the card schemes (Visa, Mastercard, Amex, Discover, JCB, Diners,
# UnionPay, Maestro): with Luhn this keeps random digit runs from passing as cards.
_CARD_IIN = re.compile(r"^(4|5[1-5]|2[2-7]|3[47]|6011|65|64[4-9]|35|30[0-5]|36|38|62|50|5[6-8]|6)")


def luhn_valid(digits: str) -> bool:
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return (
        13 <= len(digits) <= 19
        and len(set(digits)) > 1
        and bool(_CARD_IIN.match(digits))
        and luhn_valid(digits)
    )


def iban_valid(text: str) -> bool:
    """ISO 13616: 15–34 characters, check digits by ISO 7064 mod 97-10."""
    iban = text.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]+", iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def is_phone_number(text: str) -> bool:
    return 8 <= sum(ch.isdigit() for ch in text) <= 15


_VALIDATORS = {
    CheckId.pii_email: lambda s: True,
    CheckId.pii_phone: is_phone_number,
    CheckId.pii_card: is_card_number,
    CheckId.pii_iban: iban_valid,
}


def mask(check: CheckId, value: str) -> str:
    """A shape that identifies the kind of value and never the value."""
    if check is CheckId.pii_email:
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@***.{domain.rsplit('.', 1)[-1]}"
    if check is CheckId.pii_iban:
        compact = value.replace(" ", "")
        return f"{compact[:2]}**{'*' * (len(compact) - 6)}{compact[-2:]}"
    digits = re.sub(r"\D", "", value)
    keep = 4 if check is CheckId.pii_card else 2
    return "*" * (len(digits) - keep) + digits[-keep:]


@dataclass
class ColumnHits:
    count: int = 0
    examples: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)


@dataclass
class PrivacyScan:
    """What the scan read: rows, rows sampled, per (check, column) hits (masked)."""

    sample_rate: float
    rows: int = 0
    sampled: int = 0
    partitions: int = 0
    columns: set[str] = field(default_factory=set)
    hits: dict[tuple[CheckId, str], ColumnHits] = field(default_factory=dict)

    def scan(self, table: pa.Table, seed: int, source: str | None = None) -> None:
        """Sample ``table``'s rows at the stated rate and look for personal data in every
        text column (of the file's own schema, so an unexpected column is scanned too).

        ``source``: the tenant-relative key of the file ``table`` was read from; the
        findings name the files their hits came from.
        """
        n = table.num_rows
        self.rows += n
        self.partitions += 1
        if n == 0:
            return
        if self.sample_rate < 1.0:
            keep = np.random.default_rng(seed).random(n) < self.sample_rate
            table = table.filter(pa.array(keep))
        self.sampled += table.num_rows
        for name in table.column_names:
            column = table[name]
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                if pa.types.is_dictionary(column.type) and pa.types.is_string(
                    column.type.value_type
                ):
                    column = column.cast(pa.string())
                else:
                    continue
            self.columns.add(name)
            for check, pattern in _PATTERNS.items():
                candidates = column.filter(pc.match_substring_regex(column, pattern.pattern))
                for text in candidates.to_pylist():
                    for match in pattern.finditer(text):
                        value = match.group(0)
                        if not _VALIDATORS[check](value):
                            continue
                        hit = self.hits.setdefault((check, name), ColumnHits())
                        hit.count += 1
                        if source:
                            hit.sources.add(source)
                        shape = mask(check, value)
                        if len(hit.examples) < 3 and shape not in hit.examples:
                            hit.examples.append(shape)

    def findings(self, tenant_id: str, table: str) -> list[Finding]:
        out = _Collector(tenant_id)
        for (check, column), hit in sorted(self.hits.items()):
            out.add(
                check,
                f"{table}#{column}",
                f"{hit.count} value(s) in {self.sampled} sampled of {self.rows} rows "
                f"(sample rate {self.sample_rate:g}), e.g. {', '.join(hit.examples)}",
                hit.sources,
            )
        return out.findings()


PRIVACY_CHECKS = {c for c, row in CHECKS.items() if row.category is Category.privacy}
