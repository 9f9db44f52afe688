"""A webhook payload made into a Prefect event, by the source's typed mapping.

The body is parsed strictly (``parse_body``): duplicate keys, non-finite numbers and
nesting deeper than ``MAX_DEPTH`` are refused (422) — the depth is measured on the bytes
before parsing, so no payload can exhaust the parser's recursion. The event is then built
as data, never as text (``extract`` and ``build_event``):

- the event name is the source's ``event``, or the string at ``event_path``; either way
  it must be in the source's ``allowed_events`` and outside the platform's reserved names;
- the tenant id is the string at ``tenant_path``, a valid tenant id;
- each payload field is the JSON value at its pointer, copied as it is;
- the resource is ``setlist.tenant.<id>`` with the ``setlist.tenant`` label and nothing
  else, and the only related resource is the webhook source, added here.

Anything else is ``Unprocessable`` (422). Event ids derive from (source, dedupe key), so
a redelivered event is the same event to Prefect.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from blocks.webhook import WebhookSource, is_reserved_event
from setlist.core.tenancy import SetlistError, validate_tenant_id

TENANT_RESOURCE_PREFIX = "setlist.tenant."
MAX_DEPTH = 32
_EVENT_NAMESPACE = uuid.UUID("6f1c1f7e-4f5e-4d51-9a55-6c9b1b0a8e21")
_LABEL_SAFE = re.compile(r"^[A-Za-z0-9_:.\-]{1,200}$")
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")


class Unprocessable(Exception):
    """The payload can't be made into a valid event of this source (422)."""


class NotJson(Exception):
    """The body is not JSON at all (415)."""


# --------------------------------------------------------------------------- parsing

# A JSON string (escapes included); what is left between them is structure. The closing
# quote is optional so an unterminated string matches to the end instead of failing: a
# failed match from every quote of a body would make the scan quadratic.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when ``body`` nests arrays/objects deeper than ``limit`` (strings skipped).

    Linear in the body and recursion-free, so it runs before the parser ever sees a body.
    """
    structure = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if len(structure) <= 2 * limit:  # valid JSON closes each bracket it opens
        return False
    depth = 0
    for byte in structure:
        if byte in _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


class _DuplicateKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``body``: ``NotJson`` when it isn't JSON, ``Unprocessable`` when
    it is ambiguous (a key twice: parsers disagree on which one counts) or too deep."""
    if too_deep(body, max_depth):
        raise Unprocessable(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(body, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except _DuplicateKey:
        raise Unprocessable("JSON object has a duplicate key") from None
    except RecursionError:  # not reachable past too_deep; never a 500 all the same
        raise Unprocessable(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError:
        raise NotJson("body is not valid JSON") from None


# --------------------------------------------------------------------------- mapping

_MISSING = object()


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """The value at JSON pointer ``pointer`` (RFC 6901) in ``doc``, or ``_MISSING``."""
    if pointer == "":
        return doc
    current = doc
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(current, dict):
            if token not in current:
                return _MISSING
            current = current[token]
        elif isinstance(current, list):
            if not _INDEX.match(token) or int(token) >= len(current):
                return _MISSING
            current = current[int(token)]
        else:
            return _MISSING
    return current


@dataclass(frozen=True)
class Mapped:
    tenant_id: str
    event: str
    payload: dict[str, Any]


def _event_name(config: WebhookSource, body: Any) -> str:
    if config.event_path:
        name = resolve_pointer(body, config.event_path)
        if not isinstance(name, str):
            raise Unprocessable(f"no event name (a string) at {config.event_path}")
        where = f"the event named at {config.event_path}"
    else:
        name = config.event
        where = f"event {name!r}"
    # Checked here too, not only when the block is saved: the block may have been edited.
    if name not in config.allowed_events or is_reserved_event(name):
        raise Unprocessable(f"{where} is not allowed for this source")
    return name


def extract_tenant(config: WebhookSource, body: Any) -> str:
    """The valid tenant id at the source's ``tenant_path`` in ``body`` (a JSON object)."""
    if not isinstance(body, dict):
        raise Unprocessable("the payload must be a JSON object")
    tenant_id = resolve_pointer(body, config.tenant_path)
    if tenant_id is _MISSING:
        raise Unprocessable(f"no tenant id at {config.tenant_path or '(the body)'}")
    if not isinstance(tenant_id, str):
        raise Unprocessable(f"the tenant id at {config.tenant_path} is not a string")
    try:
        return validate_tenant_id(tenant_id)
    except SetlistError as exc:
        raise Unprocessable(str(exc)) from None


def extract(config: WebhookSource, body: Any) -> Mapped:
    """The tenant, event name and payload the source's mapping takes from ``body``."""
    tenant_id = extract_tenant(config, body)
    name = _event_name(config, body)
    payload = {}
    for key, pointer in config.payload_fields.items():
        value = resolve_pointer(body, pointer)
        if value is not _MISSING:
            payload[key] = value
    return Mapped(tenant_id=tenant_id, event=name, payload=payload)


def event_id(source_name: str, dedupe_key: str) -> str:
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{source_name}\x00{dedupe_key}"))


def build_event(
    source_name: str, mapped: Mapped, event_id: str, delivery_id: str | None
) -> dict[str, Any]:
    """The validated Prefect event (as JSON data) of a mapped delivery."""
    from prefect.events import Event

    webhook = {
        "prefect.resource.id": f"setlist.webhook.{source_name}",
        "prefect.resource.role": "webhook",
        "prefect.resource.name": source_name,
    }
    if delivery_id and _LABEL_SAFE.match(delivery_id):
        webhook["setlist.delivery"] = delivery_id
    try:
        event = Event(
            id=uuid.UUID(event_id),
            occurred=datetime.now(UTC),
            event=mapped.event,
            resource={
                "prefect.resource.id": TENANT_RESOURCE_PREFIX + mapped.tenant_id,
                "setlist.tenant": mapped.tenant_id,
            },
            related=[webhook],
            payload=mapped.payload,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Unprocessable(
            f"not a valid event: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        ) from None
    return event.model_dump(mode="json")
