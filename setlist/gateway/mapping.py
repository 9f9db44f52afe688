"""A webhook payload made into a Prefect event, by the source's template.

The template (sandboxed Jinja, strict about undefined names) sees the body, the headers
(never the signature, authorization or cookie headers) and the source's name. Whatever it
renders is checked before it becomes an event: an allowed event name, a resource that is
one tenant (``setlist.tenant.<id>``), no other tenant among the related resources, and a
valid Prefect event; anything else is ``Unprocessable`` (422). Event ids derive from
(source, delivery id), so a redelivered event is the same event to Prefect.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from jinja2 import TemplateError
from pydantic import ValidationError

from setlist.core.tenancy import SetlistError, validate_tenant_id
from setlist.gateway.signatures import GITHUB_HEADER, SETLIST_HEADER
from setlist.gateway.sources import _Source

TENANT_RESOURCE_PREFIX = "setlist.tenant."
_HIDDEN_HEADERS = {GITHUB_HEADER, SETLIST_HEADER, "x-hub-signature", "authorization", "cookie"}
_EVENT_NAMESPACE = uuid.UUID("6f1c1f7e-4f5e-4d51-9a55-6c9b1b0a8e21")


class Unprocessable(Exception):
    """The template could not make a valid event of this payload (422)."""


def render_event(
    source_name: str,
    source: _Source,
    body: Any,
    headers: dict[str, str],
    delivery_id: str,
) -> tuple[str, dict[str, Any]]:
    """Template → validated event JSON (as a dict) and its tenant id."""
    from prefect.events import Event

    try:
        text = source.template.render(body=body, headers=headers, source=source_name)
    except TemplateError as exc:
        raise Unprocessable(f"event template failed: {exc}") from None
    try:
        spec = json.loads(text)
    except ValueError:
        raise Unprocessable("event template did not render JSON") from None
    if not isinstance(spec, dict):
        raise Unprocessable("event template must render a JSON object")
    name = spec.get("event")
    if not isinstance(name, str) or not name:
        raise Unprocessable("event template gave no event name")
    if not any(name.startswith(p) for p in source.config.event_prefixes):
        raise Unprocessable(
            f"event {name!r} is not allowed for this source; allowed prefixes: "
            f"{', '.join(source.config.event_prefixes)}"
        )
    resource = spec.get("resource")
    if not isinstance(resource, dict):
        raise Unprocessable("event template gave no resource")
    resource_id = str(resource.get("prefect.resource.id", ""))
    if not resource_id.startswith(TENANT_RESOURCE_PREFIX):
        raise Unprocessable(f"resource must be {TENANT_RESOURCE_PREFIX}<tenant id>")
    tenant_id = resource_id.removeprefix(TENANT_RESOURCE_PREFIX)
    try:
        validate_tenant_id(tenant_id)
    except SetlistError as exc:
        raise Unprocessable(str(exc)) from None
    related = spec.get("related") or []
    if not isinstance(related, list) or not all(isinstance(r, dict) for r in related):
        raise Unprocessable("related must be a list of resources")
    for r in related:
        rid = str(r.get("prefect.resource.id", ""))
        if rid.startswith(TENANT_RESOURCE_PREFIX) and rid != resource_id:
            raise Unprocessable("an event may name only its own tenant")
    payload = spec.get("payload") or {}
    if not isinstance(payload, dict):
        raise Unprocessable("payload must be a JSON object")
    resource = {
        **{k: str(v) for k, v in resource.items()},
        "prefect.resource.name": tenant_id,
        "setlist.tenant": tenant_id,
    }
    related = [
        *related,
        {
            "prefect.resource.id": f"setlist.webhook.{source_name}",
            "prefect.resource.role": "webhook",
            "prefect.resource.name": source_name,
            "setlist.delivery": delivery_id,
        },
    ]
    try:
        event = Event(
            id=uuid.uuid5(_EVENT_NAMESPACE, f"{source_name}\x00{delivery_id}"),
            occurred=datetime.now(UTC),
            event=name,
            resource=resource,
            related=related,
            payload=payload,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Unprocessable(
            f"not a valid event: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        ) from None
    return tenant_id, event.model_dump(mode="json")
