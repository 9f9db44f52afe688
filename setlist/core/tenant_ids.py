"""A tenant id's rules and the platform's refusal error: what every other module takes
from ``setlist.core.tenancy``, in a module that imports nothing heavy, so that a process
that only opens a tenant's storage (an ETL staging worker) starts in a fraction of the
time. ``setlist.core.tenancy`` re-exports these names.
"""

from __future__ import annotations

import re

# DNS-1123 label: the tenant id is used as a Kubernetes namespace, a label value, a
# Prefect block name and an object-storage prefix, so it must be valid for all four.
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# 50, not 63: the namespace "tenant-<id>" must itself stay a DNS-1123 label.
TENANT_ID_MAX = 50


class SetlistError(ValueError):
    """A request the platform refuses; the message says what was wrong and what is accepted."""


class InvalidTenantId(SetlistError):
    pass


def validate_tenant_id(value: str) -> str:
    """Return ``value`` if it is a valid tenant id, else raise with the reason."""
    if not isinstance(value, str) or not value:
        raise InvalidTenantId("tenant id is empty; expected a DNS-1123 label like 'acme-music'")
    if len(value) > TENANT_ID_MAX:
        raise InvalidTenantId(
            f"tenant id {value!r} is {len(value)} characters; at most {TENANT_ID_MAX} allowed"
        )
    if not _DNS1123_LABEL.match(value):
        raise InvalidTenantId(
            f"tenant id {value!r} is not a DNS-1123 label: use lower-case letters, digits and "
            "'-', starting and ending with a letter or digit"
        )
    return value
