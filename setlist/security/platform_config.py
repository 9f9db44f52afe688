"""Configuration checks of a tenant on the Prefect side: blocks, deployments, webhooks,
the quota.

The data is read without secrets (``include_secrets=False``), so a proper Secret field
comes back masked and passes, while a credential left in a plain field comes back as it
is and fails. A webhook source's signing secret is judged by its length alone, and the
tenant's quota must exist as a concurrency limit that every deployment is bound to, or
the quota is only a number in a profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from setlist.security.checks import CHECKS, Category, CheckId, Finding, _Collector
from setlist.security.redaction import looks_like_secret, redact_secret


def secret_fields(
    tenant_id: str, resource: str, data: Any, out: _Collector, path: str = ""
) -> None:
    """Plain fields of a block/deployment whose name or value says it holds a secret.

    Read the data without secrets (``include_secrets=False``): SecretStr fields then come
    back masked and pass; a credential in a plain field comes back as it is and fails.
    """
    if isinstance(data, dict):
        for key, value in data.items():
            secret_fields(tenant_id, resource, value, out, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            secret_fields(tenant_id, resource, value, out, f"{path}[{i}]")
    elif looks_like_secret(path.rsplit(".", 1)[-1], data):
        out.add(CheckId.plaintext_secret, resource, f"{path} = {redact_secret(data)}")


@dataclass
class WebhookState:
    """A webhook source block and what its signing-secret block holds (length only)."""

    source: str
    secret_block: str
    secret_length: int | None  # None: the Secret block does not exist


@dataclass
class QuotaState:
    """The tenant's concurrency limit and which of its deployments are bound to it."""

    concurrent_jobs: int
    limit_name: str
    limit: int | None  # None: no such global concurrency limit
    unbound_deployments: list[str] = field(default_factory=list)


MIN_SIGNING_SECRET = 16


def config_findings(
    tenant_id: str,
    plain_data: dict[str, Any],
    webhooks: list[WebhookState],
    quota: QuotaState,
) -> list[Finding]:
    """``plain_data``: resource name → its data as read without secrets."""
    out = _Collector(tenant_id)
    for resource, data in sorted(plain_data.items()):
        secret_fields(tenant_id, resource, data, out)
    for hook in webhooks:
        res = f"webhook-source/{hook.source}"
        if hook.secret_length is None:
            out.add(CheckId.webhook_unsigned, res, f"Secret block {hook.secret_block!r} is missing")
        elif hook.secret_length < MIN_SIGNING_SECRET:
            out.add(
                CheckId.webhook_unsigned,
                res,
                f"signing secret has {hook.secret_length} characters; at least "
                f"{MIN_SIGNING_SECRET} needed",
            )
    res = f"tenant/{tenant_id}"
    if quota.limit is None:
        out.add(CheckId.no_quota, res, f"no concurrency limit {quota.limit_name}")
    elif quota.limit != quota.concurrent_jobs:
        out.add(
            CheckId.no_quota,
            res,
            f"concurrency limit {quota.limit_name} is {quota.limit}, the profile's quota "
            f"is {quota.concurrent_jobs}",
        )
    for name in quota.unbound_deployments:
        out.add(CheckId.no_quota, res, f"deployment {name} is not bound to {quota.limit_name}")
    return out.findings()


CONFIG_CHECKS = {c for c, row in CHECKS.items() if row.category is Category.config}
