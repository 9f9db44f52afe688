"""The WebhookSource block: how the gateway accepts one source's webhooks.

One block per source (``setlist-webhook-<source>``): which signature scheme it signs
with, the name of the Secret block holding its signing secret (so the secret is rotated
on its own and never sits in this block), the Jinja template that maps its JSON payload
to a Prefect event, and its rate limit.
"""

from __future__ import annotations

import re
from enum import StrEnum

from prefect.blocks.core import Block
from pydantic import Field, field_validator

_SOURCE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SOURCE_MAX = 40


class SignatureScheme(StrEnum):
    """``github``: ``X-Hub-Signature-256: sha256=HEX`` over the body.
    ``setlist``: ``X-Setlist-Signature: t=UNIX,v1=HEX`` over ``t.body``, with a tolerance."""

    github = "github"
    setlist = "setlist"


# The partner data-drop template: {"tenant_id": ..., "files": [...], ...} → data arrived.
DATA_ARRIVED_TEMPLATE = """{
  "event": "setlist.tenant.data.arrived",
  "resource": {"prefect.resource.id": "setlist.tenant.{{ body.tenant_id }}"},
  "payload": {"files": {{ body.files | default([]) | tojson }},
              "note": {{ body.note | default("") | tojson }}}
}"""


def validate_source_name(value: str) -> str:
    if not isinstance(value, str) or len(value) > SOURCE_MAX or not _SOURCE.match(value):
        raise ValueError(
            f"webhook source {value!r} is not valid: use at most {SOURCE_MAX} lower-case "
            "letters, digits and '-', starting and ending with a letter or digit"
        )
    return value


def source_block_name(source: str) -> str:
    return f"setlist-webhook-{validate_source_name(source)}"


def secret_block_name(source: str) -> str:
    return f"setlist-webhook-{validate_source_name(source)}-secret"


class WebhookSource(Block):
    """A webhook source of the gateway: signature scheme, secret, event template, rate."""

    _block_type_name = "Setlist Webhook Source"
    _block_type_slug = "setlist-webhook-source"
    _description = (
        "How Setlist's gateway accepts one source's webhooks: signature scheme, the Secret "
        "block with the signing secret, the Jinja event template and the rate limit."
    )

    scheme: SignatureScheme = SignatureScheme.setlist
    secret_block: str = Field(description="name of the Secret block holding the signing secret")
    template: str = Field(
        default=DATA_ARRIVED_TEMPLATE,
        description=(
            "Jinja template rendering a JSON event: event, resource (prefect.resource.id "
            "setlist.tenant.<id>), optional related and payload. Variables: body (the JSON "
            "payload), headers (lower-case names, signature headers removed), source."
        ),
    )
    event_prefixes: list[str] = Field(
        default_factory=lambda: ["setlist."],
        description="event names the source may emit must start with one of these",
    )
    rate_limit_per_s: float = Field(default=50.0, gt=0, description="sustained requests/s")
    burst: int = Field(default=100, ge=1, description="requests allowed at once")
    tolerance_s: int = Field(
        default=300, ge=1, le=3600, description="max clock skew of a timestamped signature"
    )
    secret_length: int | None = Field(
        default=None,
        description=(
            "length of the signing secret, measured by the platform when it was saved, so "
            "a tenant's security scan judges it without reading the secret"
        ),
    )
    delivery_header: str = Field(
        default="",
        description=(
            "header carrying the delivery id (duplicates are accepted once); empty: "
            "X-GitHub-Delivery for github, X-Setlist-Delivery for setlist"
        ),
    )

    @field_validator("secret_block")
    @classmethod
    def _secret_name(cls, v: str) -> str:
        if not v:
            raise ValueError("secret_block is empty; name the Secret block of the signing secret")
        return v

    @property
    def delivery_header_name(self) -> str:
        if self.delivery_header:
            return self.delivery_header
        return (
            "X-GitHub-Delivery" if self.scheme == SignatureScheme.github else "X-Setlist-Delivery"
        )
