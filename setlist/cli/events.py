"""``setlist gateway``, ``webhook …`` and ``automations …``: events in and alerts out."""

from __future__ import annotations

import os
from enum import StrEnum
from typing import TypeVar

import typer

from setlist.cli._common import _api_url, _client, _echo, _run, app
from setlist.core.tenancy import SetlistError

E = TypeVar("E", bound=StrEnum)
webhook_app = typer.Typer(
    help="Webhook sources of the gateway: scheme, secret, event mapping, tenants, rate.",
    no_args_is_help=True,
)
app.add_typer(webhook_app, name="webhook")
automations_app = typer.Typer(help="The platform's alert automations.", no_args_is_help=True)
app.add_typer(automations_app, name="automations")


@app.command()
def gateway(
    port: int = typer.Option(8787, help="port of POST /hooks/{source}"),
    host: str = typer.Option("127.0.0.1", help="address to bind"),
) -> None:
    """Serve the webhook gateway: signed webhooks → Prefect events (runs until stopped)."""
    from prefect.settings import temporary_settings

    from setlist.core.credentials import client_settings
    from setlist.gateway.app import serve

    url = _api_url()
    _echo(f"webhook gateway on http://{host}:{port}/hooks/{{source}} → events of {url}")
    with temporary_settings(updates=client_settings(url)):
        serve(host=host, port=port)


def _payload_fields(items: list[str]) -> dict[str, str]:
    fields = {}
    for item in items:
        key, sep, pointer = item.partition("=")
        if not sep:
            raise SetlistError(f"--payload {item!r}: use KEY=/json/pointer")
        fields[key.strip()] = pointer.strip()
    return fields


def _member(enum: type[E], value: str | None, what: str) -> E | None:
    """``value`` as a member of ``enum`` (None: not given), else the accepted values."""
    if value is None:
        return None
    try:
        return enum(value)
    except ValueError:
        accepted = ", ".join(m.value for m in enum)
        raise SetlistError(f"unknown {what} {value!r}; accepted: {accepted}") from None


@webhook_app.command("set")
@_run
async def webhook_set(
    source: str,
    scheme: str = typer.Option(
        None, help="standard (Standard Webhooks; new sources), setlist or github"
    ),
    secret_env: str = typer.Option(
        None, help="read the signing secret from this environment variable (else: prompt)"
    ),
    event: str = typer.Option(
        None, help="the event each delivery becomes (added to the allowed events)"
    ),
    event_path: str = typer.Option(
        None, help="JSON pointer to the event name in the body instead (e.g. /type)"
    ),
    allow_event: list[str] = typer.Option(
        None, "--allow-event", help="event names the source may emit (repeat; replaces)"
    ),
    tenant_path: str = typer.Option(None, help="JSON pointer to the tenant id (/tenant_id)"),
    payload: list[str] = typer.Option(
        None, "--payload", help="payload field KEY=/json/pointer (repeat; replaces all)"
    ),
    rate: float = typer.Option(None, help="requests/s sustained, per tenant"),
    burst: int = typer.Option(None, help="requests at once, per tenant"),
    deliver: str = typer.Option(
        None,
        help="event (one Prefect event a delivery; new sources) or stream (its events "
        "to the tenant's stream)",
    ),
    events_path: str = typer.Option(
        None, help="--deliver stream: JSON pointer to the array of events (/events)"
    ),
) -> None:
    """Create or change a webhook source; its secret goes to its own Secret block.

    New sources map {"tenant_id": …, "files": […], "note": …} to
    setlist.tenant.data.arrived and may speak for no tenant: `setlist webhook allow`.
    Setting --event, --event-path, --tenant-path or --payload migrates a source off a
    legacy whole-document template. With --deliver stream, {"tenant_id": …, "events":
    […]} sends each event to the tenant's stream for its stream-ingest job."""
    from blocks.webhook import Delivery, SignatureScheme, WebhookSource, source_block_name
    from setlist.gateway.sources import save_source

    sig = _member(SignatureScheme, scheme, "scheme")
    mode = _member(Delivery, deliver, "delivery")
    if secret_env:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise SetlistError(f"environment variable {secret_env} is empty or not set")
    else:
        secret = typer.prompt("signing secret", hide_input=True)
    allowed = list(allow_event) if allow_event else None
    if event and not event_path:
        if allowed is None:
            try:
                current = await WebhookSource.aload(source_block_name(source))
                allowed = list(current.allowed_events)
            except ValueError:
                allowed = []
        if event not in allowed:
            allowed.append(event)
    try:
        block = await save_source(
            source,
            secret,
            scheme=sig,
            deliver=mode,
            events_path=events_path,
            event=event,
            event_path=event_path,
            tenant_path=tenant_path,
            payload_fields=_payload_fields(payload) if payload else None,
            allowed_events=allowed,
            rate_limit_per_s=rate,
            burst=burst,
        )
    except ValueError as exc:
        raise SetlistError(str(exc)) from None
    _echo(
        f"webhook source {source}: {block.scheme.value} signatures, "
        f"{block.rate_limit_per_s:g}/s (burst {block.burst}) per tenant, "
        f"secret in {block.secret_block}"
    )
    if block.deliver == Delivery.stream:
        _echo(f"  events at {block.events_path} go to the tenant's stream")
    _echo(
        f"  event {block.event_path or block.event} (allowed: "
        f"{', '.join(block.allowed_events)}), tenant at {block.tenant_path}, payload "
        f"{block.payload_fields}; tenants: {', '.join(block.allowed_tenants) or 'none yet'}"
    )


@webhook_app.command("allow")
@_run
async def webhook_allow(source: str, tenants: list[str]) -> None:
    """Let SOURCE speak for TENANTS (a new source speaks for none)."""
    from setlist.gateway.sources import allow_tenants

    block = await allow_tenants(source, add=tenants)
    _echo(f"webhook source {source} speaks for: {', '.join(block.allowed_tenants) or 'none'}")


@webhook_app.command("disallow")
@_run
async def webhook_disallow(source: str, tenants: list[str]) -> None:
    """Stop SOURCE speaking for TENANTS (takes effect in the gateway within ~30 s)."""
    from setlist.gateway.sources import allow_tenants

    block = await allow_tenants(source, remove=tenants)
    _echo(f"webhook source {source} speaks for: {', '.join(block.allowed_tenants) or 'none'}")


@webhook_app.command("sign")
@_run
async def webhook_sign(source: str, file: str) -> None:
    """Print the headers that sign FILE for SOURCE (to try the gateway with curl)."""
    import uuid
    from pathlib import Path

    from prefect.blocks.system import Secret

    from blocks.webhook import SignatureScheme, WebhookSource, source_block_name
    from setlist.gateway.signatures import sign_github, sign_setlist, sign_standard

    try:
        config = await WebhookSource.aload(source_block_name(source))
    except ValueError:
        raise SetlistError(f"unknown webhook source {source!r}; `setlist webhook set`") from None
    secret = str((await Secret.aload(config.secret_block)).get())
    body = Path(file).read_bytes()
    if config.scheme == SignatureScheme.standard:
        for name, value in sign_standard(secret, body).items():
            print(f"{name}: {value}")
        return
    if config.scheme == SignatureScheme.github:
        print(f"X-Hub-Signature-256: {sign_github(secret, body)}")
    else:
        print(f"X-Setlist-Signature: {sign_setlist(secret, body)}")
    print(f"{config.delivery_header_name}: {uuid.uuid4()}")


@automations_app.command("apply")
@_run
async def automations_apply(
    block: str = typer.Option(
        None, help="block of every severity without its own (default setlist-alerts)"
    ),
    slack_url: str = typer.Option(None, help="(re)create --block as a Slack webhook"),
    webhook_url: str = typer.Option(None, help="(re)create --block as a JSON webhook"),
    critical_block: str = typer.Option(None, help="block of the critical alerts"),
    warning_block: str = typer.Option(None, help="block of the warnings"),
    digest_block: str = typer.Option(None, help="block that also gets every warning"),
    pagerduty_key: str = typer.Option(
        None, help="(re)create the critical block as a PagerDuty Events v2 routing key"
    ),
    pagerduty_url: str = typer.Option(
        None, help="PagerDuty Events v2 endpoint (e.g. the EU one); with --pagerduty-key"
    ),
    warning_slack_url: str = typer.Option(
        None, help="(re)create the warning block as a Slack webhook"
    ),
    digest_webhook_url: str = typer.Option(
        None, help="(re)create the digest block as a JSON webhook (e.g. a mail relay)"
    ),
    digest_email_to: list[str] = typer.Option(
        None, help="(re)create the digest block as e-mail to this address (repeatable)"
    ),
    smtp_server: str = typer.Option(None, help="SMTP relay of --digest-email-to"),
    smtp_port: int = typer.Option(587, help="SMTP relay's port"),
    smtp_security: str = typer.Option("starttls", help="starttls, tls or none (loopback)"),
    smtp_user: str = typer.Option(None, help="SMTP login, when the relay wants one"),
    smtp_password: str = typer.Option(
        None, envvar="SETLIST_SMTP_PASSWORD", help="SMTP password (or SETLIST_SMTP_PASSWORD)"
    ),
    smtp_from: str = typer.Option(None, help="sender address of the e-mails"),
) -> None:
    """Create or update the alert automations: runs crashed or failed, Pending over SLA,
    critical security findings; each severity to its block. With no option, the routing
    last applied is kept."""
    from setlist.observability import automations

    if slack_url or webhook_url:
        block = block or automations.ALERT_BLOCK
        await automations.save_notification_block(
            block, slack_url=slack_url, webhook_url=webhook_url
        )
    if pagerduty_key:
        critical_block = critical_block or f"{automations.ALERT_BLOCK}-critical"
        await automations.save_pagerduty_block(
            critical_block, pagerduty_key, url=pagerduty_url or automations.PAGERDUTY_EVENTS_URL
        )
    elif pagerduty_url:
        raise SetlistError("--pagerduty-url needs --pagerduty-key")
    if warning_slack_url:
        warning_block = warning_block or f"{automations.ALERT_BLOCK}-warning"
        await automations.save_notification_block(warning_block, slack_url=warning_slack_url)
    if digest_webhook_url and digest_email_to:
        raise SetlistError("give the digest a webhook or an e-mail address, not both")
    if digest_webhook_url:
        digest_block = digest_block or f"{automations.ALERT_BLOCK}-digest"
        await automations.save_notification_block(digest_block, webhook_url=digest_webhook_url)
    if digest_email_to:
        if not (smtp_server and smtp_from):
            raise SetlistError("--digest-email-to needs --smtp-server and --smtp-from")
        digest_block = digest_block or f"{automations.ALERT_BLOCK}-digest"
        await automations.save_email_block(
            digest_block,
            smtp_server=smtp_server,
            to=digest_email_to,
            sender=smtp_from,
            port=smtp_port,
            security=smtp_security,
            username=smtp_user,
            password=smtp_password,
        )
    async with _client() as client:
        done = await automations.apply(
            client, block, critical=critical_block, warning=warning_block, digest=digest_block
        )
    for name, what in done:
        _echo(f"{what:8} {name}")


@automations_app.command("digest")
@_run
async def automations_digest(
    send: bool = typer.Option(
        False, "--send", help="send it now to the digest block and close the period"
    ),
) -> None:
    """The warnings' digest of the period since the last one (the metrics exporter sends
    it every SETLIST_ALERT_DIGEST_MINUTES): shown, or with --send sent."""
    from setlist.observability import digest

    async with _client() as client:
        done = await digest.send_due(client, dry_run=not send)
        if done is None:
            _echo("no digest route: `setlist automations apply --digest-block …` sets one")
            return
        if not send:
            fired = await digest.collect(client, done.since, done.until)
            subject, body = digest.render(fired, done.since, done.until)
            print(subject, body, sep="\n")  # plain: the subject's brackets are not markup
            return
    where = f"sent to {done.sent_to}" if done.sent_to else "nothing to send"
    _echo(f"{done.warnings} warnings since {done.since:%Y-%m-%d %H:%M} UTC: {where}")
