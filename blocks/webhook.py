"""The WebhookSource block: how the gateway accepts one source's webhooks.

One block per source (``setlist-webhook-<source>``): which signature scheme it signs
with, the name of the Secret block holding its signing secret (so the secret is rotated
on its own and never sits in this block), what a delivery becomes (``deliver``), the
typed mapping from its JSON payload to a Prefect event, the events and tenants it may
speak for, and its rate limit.

A delivery becomes one Prefect event (``deliver=event``, the default), or, for a source of
listening events (``deliver=stream``), the array at ``events_path`` goes to the tenant's
broker stream, one message per element, for its stream-ingest job: one event per play
would flood Prefect's events API, which is made for lifecycle signals, not data.

The mapping is data, never template text: the event name comes from the block (or from
one path into the body, checked against ``allowed_events``), the tenant id and each
payload field are JSON pointers (RFC 6901) into the body, and what they point at is put
into the event as a value. Nothing a sender writes can become part of the event's
structure.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from setlist.core.tenancy import SetlistError, validate_tenant_id

_SOURCE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SOURCE_MAX = 40

DATA_ARRIVED = "setlist.tenant.data.arrived"

# Event names: ``setlist.`` and dot-separated lower-case segments.
_EVENT_NAME = re.compile(r"^setlist(\.[a-z0-9]([-_a-z0-9]*[a-z0-9])?){1,8}$")
EVENT_NAME_MAX = 120
# Namespaces the platform emits itself (audit, lifecycle, jobs, security findings and
# alerts, configuration, the flows' own completions): never accepted from outside, whatever
# a source's allow-list says. ``setlist.tenant.data.*`` is the one part of ``setlist.tenant.``
# that outside senders speak for.
RESERVED_EVENT_NAMESPACES = (
    "setlist.tenant",
    "setlist.job",
    "setlist.security",
    "setlist.config",
    "setlist.audit",
    "setlist.actor",
    "setlist.grants",
    "setlist.backup",
    "setlist.billing",
    "setlist.etl",
    "setlist.ml",
    "setlist.usage",
    "setlist.webhook",
    # a forged `setlist.stream.ended` or `compaction-due` would start a tenant's runs
    "setlist.stream",
)
OPEN_EVENT_NAMESPACES = ("setlist.tenant.data",)

_PAYLOAD_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
PAYLOAD_FIELDS_MAX = 32
ALLOWED_TENANTS_MAX = 10_000
# Events one stream delivery may carry: with the body's 1 MiB (about 300 bytes an event)
# a sender rarely gets near it; it bounds the work one request can ask of the broker.
STREAM_EVENTS_MAX = 10_000

# The template every source got by default before the typed mapping. A block still holding
# it (saved by an older Setlist) is read as the default typed mapping, which means the same.
LEGACY_DATA_ARRIVED_TEMPLATE = """{
  "event": "setlist.tenant.data.arrived",
  "resource": {"prefect.resource.id": "setlist.tenant.{{ body.tenant_id }}"},
  "payload": {"files": {{ body.files | default([]) | tojson }},
              "note": {{ body.note | default("") | tojson }}}
}"""


class Delivery(StrEnum):
    """What a source's delivery becomes. ``event``: one Prefect event, by the typed
    mapping. ``stream``: each element of the array at ``events_path`` one message of the
    tenant's broker stream (the stream-ingest job validates and quarantines them)."""

    event = "event"
    stream = "stream"


class SignatureScheme(StrEnum):
    """``standard``: Standard Webhooks, ``webhook-signature: v1,BASE64`` over
    ``webhook-id.webhook-timestamp.body`` (the delivery id and time are signed).
    ``setlist``: ``X-Setlist-Signature: t=UNIX,v1=HEX`` over ``t.body``, with a tolerance.
    ``github``: ``X-Hub-Signature-256: sha256=HEX`` over the body."""

    standard = "standard"
    setlist = "setlist"
    github = "github"


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


def _in_namespace(name: str, namespace: str) -> bool:
    return name == namespace or name.startswith(namespace + ".")


def is_reserved_event(name: str) -> bool:
    """True for a name only the platform may emit (audit, lifecycle, jobs, security…)."""
    if any(_in_namespace(name, ns) for ns in OPEN_EVENT_NAMESPACES):
        return False
    return any(_in_namespace(name, ns) for ns in RESERVED_EVENT_NAMESPACES)


def validate_event_name(value: Any) -> str:
    """An event name a webhook source may emit, else ValueError with the reason."""
    if not isinstance(value, str) or len(value) > EVENT_NAME_MAX or not _EVENT_NAME.match(value):
        raise ValueError(
            f"event name {value!r} is not valid: 'setlist.' and dot-separated lower-case "
            f"segments, at most {EVENT_NAME_MAX} characters"
        )
    if is_reserved_event(value):
        raise ValueError(
            f"event {value!r} is reserved for the platform (audit, lifecycle, jobs, "
            "security, configuration); a webhook source can't emit it"
        )
    return value


def validate_pointer(value: Any) -> str:
    """A JSON pointer (RFC 6901): '' (the whole body) or '/a/0/b' (~0 is '~', ~1 is '/')."""
    if not isinstance(value, str) or len(value) > 200:
        raise ValueError(f"{value!r} is not a JSON pointer of at most 200 characters")
    if value and not value.startswith("/"):
        raise ValueError(f"JSON pointer {value!r} must be empty or start with '/'")
    if re.search(r"~(?![01])", value):
        raise ValueError(f"JSON pointer {value!r}: '~' must be followed by 0 or 1")
    return value


def normalized_template(text: str) -> str:
    return "".join(text.split())


class WebhookSource(Block):
    """A webhook source of the gateway: scheme, secret, event mapping, allow-lists, rate."""

    _block_type_name = "Setlist Webhook Source"
    _block_type_slug = "setlist-webhook-source"
    _description = (
        "How Setlist's gateway accepts one source's webhooks: signature scheme, the Secret "
        "block with the signing secret, what a delivery becomes (a Prefect event, or "
        "events for the tenant's stream), the typed event mapping, the events and tenants "
        "the source may speak for, and the rate limit per tenant."
    )

    scheme: SignatureScheme = SignatureScheme.standard
    secret_block: str = Field(description="name of the Secret block holding the signing secret")
    deliver: Delivery = Field(
        default=Delivery.event,
        description=(
            "event: each delivery becomes one Prefect event (the mapping below); stream: "
            "the events at events_path go to the tenant's broker stream"
        ),
    )
    events_path: str = Field(
        default="/events",
        description=(
            f"deliver=stream: JSON pointer to the array of events (JSON objects, at most "
            f"{STREAM_EVENTS_MAX}) in the body"
        ),
    )
    event: str = Field(
        default=DATA_ARRIVED,
        description="the event every delivery becomes (must be in allowed_events)",
    )
    event_path: str = Field(
        default="",
        description=(
            "JSON pointer to the event name in the body (e.g. /type); empty: always "
            "`event`. A name from the body must be in allowed_events."
        ),
    )
    tenant_path: str = Field(
        default="/tenant_id", description="JSON pointer to the tenant id in the body"
    )
    payload_fields: dict[str, str] = Field(
        default_factory=lambda: {"files": "/files", "note": "/note"},
        description=(
            "event payload field → JSON pointer into the body; the value found is copied "
            "as data, a missing one is left out"
        ),
    )
    allowed_events: list[str] = Field(
        default_factory=lambda: [DATA_ARRIVED],
        description="event names this source may emit (never the platform's reserved ones)",
    )
    allowed_tenants: list[str] = Field(
        default_factory=list,
        description=(
            "tenants this source may speak for (`setlist webhook allow SOURCE TENANT`); "
            "empty: none. Any other tenant id is refused like an unknown one."
        ),
    )
    template: str = Field(
        default="",
        description=(
            "legacy whole-document Jinja template (before the typed mapping); no longer "
            "rendered: a source still holding a custom one refuses deliveries until it is "
            "migrated (`setlist webhook set SOURCE --tenant-path … --payload …`)"
        ),
    )
    event_prefixes: list[str] = Field(
        default_factory=lambda: ["setlist."],
        description="legacy, unused: allowed_events is the allow-list now",
    )
    rate_limit_per_s: float = Field(
        default=50.0, gt=0, description="sustained requests/s, per tenant of the source"
    )
    burst: int = Field(default=100, ge=1, description="requests allowed at once, per tenant")
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
            "header carrying an unsigned delivery id (setlist and github schemes); empty: "
            "X-GitHub-Delivery for github, X-Setlist-Delivery for setlist. The standard "
            "scheme's webhook-id is signed and always used."
        ),
    )

    @field_validator("secret_block")
    @classmethod
    def _secret_name(cls, v: str) -> str:
        if not v:
            raise ValueError("secret_block is empty; name the Secret block of the signing secret")
        return v

    @field_validator("event")
    @classmethod
    def _event(cls, v: str) -> str:
        return validate_event_name(v)

    @field_validator("allowed_events")
    @classmethod
    def _allowed_events(cls, v: list[str]) -> list[str]:
        return sorted({validate_event_name(name) for name in v})

    @field_validator("allowed_tenants")
    @classmethod
    def _allowed_tenants(cls, v: list[str]) -> list[str]:
        if len(v) > ALLOWED_TENANTS_MAX:
            raise ValueError(f"at most {ALLOWED_TENANTS_MAX} tenants per source")
        try:
            return sorted({validate_tenant_id(t) for t in v})
        except SetlistError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("event_path", "tenant_path")
    @classmethod
    def _pointer(cls, v: str) -> str:
        return validate_pointer(v)

    @field_validator("events_path")
    @classmethod
    def _events_pointer(cls, v: str) -> str:
        if v == "":  # the body is the object the tenant id is read from, never the array
            raise ValueError("events_path must point into the body, e.g. /events")
        return validate_pointer(v)

    @field_validator("payload_fields")
    @classmethod
    def _payload_fields(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > PAYLOAD_FIELDS_MAX:
            raise ValueError(f"at most {PAYLOAD_FIELDS_MAX} payload fields")
        for key, pointer in v.items():
            if not _PAYLOAD_KEY.match(key):
                raise ValueError(
                    f"payload field {key!r} is not valid: a letter or '_', then letters, "
                    "digits, '_', '.', '-' (at most 64)"
                )
            validate_pointer(pointer)
        return v

    @property
    def delivery_header_name(self) -> str:
        if self.delivery_header:
            return self.delivery_header
        return (
            "X-GitHub-Delivery" if self.scheme == SignatureScheme.github else "X-Setlist-Delivery"
        )

    @property
    def legacy_template(self) -> bool:
        """True when the block holds a custom whole-document template of an older Setlist
        (the old default counts as the typed mapping)."""
        text = normalized_template(self.template)
        return bool(text) and text != normalized_template(LEGACY_DATA_ARRIVED_TEMPLATE)
