"""``setlist gateway``, ``webhook …`` and ``automations …``: events in and alerts out."""

from __future__ import annotations

import os

import typer

from setlist.cli._common import _api_url, _client, _echo, _run, app
from setlist.core.tenancy import SetlistError

webhook_app = typer.Typer(
    help="Webhook sources of the gateway: scheme, signing secret, template, rate.",
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


@webhook_app.command("set")
@_run
async def webhook_set(
    source: str,
    scheme: str = typer.Option("setlist", help="github or setlist (timestamped)"),
    secret_env: str = typer.Option(
        None, help="read the signing secret from this environment variable (else: prompt)"
    ),
    template_file: str = typer.Option(None, help="Jinja event template (default: data arrived)"),
    rate: float = typer.Option(None, help="requests/s sustained"),
    burst: int = typer.Option(None, help="requests at once"),
) -> None:
    """Create or change a webhook source; its secret goes to its own Secret block."""
    from pathlib import Path

    from blocks.webhook import SignatureScheme
    from setlist.gateway.sources import save_source

    try:
        sig = SignatureScheme(scheme)
    except ValueError:
        raise SetlistError(f"unknown scheme {scheme!r}; accepted: github, setlist") from None
    if secret_env:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise SetlistError(f"environment variable {secret_env} is empty or not set")
    else:
        secret = typer.prompt("signing secret", hide_input=True)
    template = Path(template_file).read_text() if template_file else None
    try:
        block = await save_source(
            source, secret, scheme=sig, template=template, rate_limit_per_s=rate, burst=burst
        )
    except ValueError as exc:
        raise SetlistError(str(exc)) from None
    _echo(
        f"webhook source {source}: {block.scheme.value} signatures, "
        f"{block.rate_limit_per_s:g}/s (burst {block.burst}), secret in {block.secret_block}"
    )


@webhook_app.command("sign")
@_run
async def webhook_sign(source: str, file: str) -> None:
    """Print the headers that sign FILE for SOURCE (to try the gateway with curl)."""
    import uuid
    from pathlib import Path

    from prefect.blocks.system import Secret

    from blocks.webhook import SignatureScheme, WebhookSource, source_block_name
    from setlist.gateway.signatures import sign_github, sign_setlist

    try:
        config = await WebhookSource.aload(source_block_name(source))
    except ValueError:
        raise SetlistError(f"unknown webhook source {source!r}; `setlist webhook set`") from None
    secret = str((await Secret.aload(config.secret_block)).get())
    body = Path(file).read_bytes()
    if config.scheme == SignatureScheme.github:
        print(f"X-Hub-Signature-256: {sign_github(secret, body)}")
    else:
        print(f"X-Setlist-Signature: {sign_setlist(secret, body)}")
    print(f"{config.delivery_header_name}: {uuid.uuid4()}")


@automations_app.command("apply")
@_run
async def automations_apply(
    block: str = typer.Option("setlist-alerts", help="notification block the alerts use"),
    slack_url: str = typer.Option(None, help="(re)create the block as a Slack webhook"),
    webhook_url: str = typer.Option(None, help="(re)create the block as a JSON webhook"),
) -> None:
    """Create or update the alert automations: failed/crashed runs, Pending over SLA,
    critical security findings."""
    from setlist.observability import automations

    if slack_url or webhook_url:
        await automations.save_notification_block(
            block, slack_url=slack_url, webhook_url=webhook_url
        )
    async with _client() as client:
        done = await automations.apply(client, block)
    for name, what in done:
        _echo(f"{what:8} {name}")
