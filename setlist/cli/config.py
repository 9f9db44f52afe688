"""``setlist config export|import``: the platform's configuration as a checked archive."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from setlist.cli._common import _client, _echo, _run, app, err
from setlist.core.tenancy import SetlistError

config_app = typer.Typer(
    help="Back up and restore the platform's configuration (pools, queues, limits, "
    "deployments, automations, variables, blocks).",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")

PassphraseOpt = Annotated[
    str,
    typer.Option(
        "--passphrase",
        envvar="SETLIST_CONFIG_PASSPHRASE",
        help="passphrase of the archive's secrets (env SETLIST_CONFIG_PASSPHRASE; "
        "prompted for when missing on a terminal)",
        show_default=False,
        show_envvar=False,
    ),
]


def _ask_passphrase(confirm: bool) -> str:
    if not sys.stdin.isatty():
        raise SetlistError(
            "a passphrase is needed: pass --passphrase or set SETLIST_CONFIG_PASSPHRASE"
        )
    return typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


@config_app.command("export")
@_run
async def config_export(
    file: str,
    include_secrets: bool = typer.Option(
        False, "--include-secrets", help="also write secret values, encrypted with a passphrase"
    ),
    passphrase: PassphraseOpt = None,  # type: ignore[assignment]
    force: bool = typer.Option(False, "--force", help="overwrite FILE if it exists"),
) -> None:
    """Write the platform's configuration to FILE (.tar.gz); secret values are left out
    unless --include-secrets. The archive is sealed with --passphrase when given (it can
    then move to another platform), else with this platform's key."""
    from pathlib import Path

    from setlist.backup.config.export import export_config

    if include_secrets and not passphrase:
        passphrase = _ask_passphrase(confirm=True)
    async with _client() as client:
        report = await export_config(
            client,
            Path(file),
            include_secrets=include_secrets,
            passphrase=passphrase or None,
            overwrite=force,
        )
    counts = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in report.counts.items())
    _echo(f"wrote {report.path} ({report.size} bytes): {counts}")
    if report.secrets_included:
        _echo("secret values included, encrypted with the passphrase")
    elif report.needs_secret:
        _echo(
            f"secret values left out; {len(report.needs_secret)} block(s) will need their "
            f"secret on import: {', '.join(report.needs_secret)}"
        )


@config_app.command("import")
@_run
async def config_import(
    file: str,
    passphrase: PassphraseOpt = None,  # type: ignore[assignment]
    replace: bool = typer.Option(
        False, "--replace", help="overwrite objects of the same name the server already holds"
    ),
    yes: bool = typer.Option(False, "--yes", help="with --replace: overwrite without asking"),
) -> None:
    """Recreate the configuration of FILE on this server. Refuses when objects of the same
    names exist, unless --replace (which lists them and asks, or takes --yes); the archive
    (its seal first) is checked in full before anything is written."""
    from pathlib import Path

    from setlist.backup.config.archive import load_archive
    from setlist.backup.config.entries import PassphraseRequired
    from setlist.backup.config.importer import import_archive

    try:
        archive = load_archive(Path(file), passphrase or None)
    except PassphraseRequired:
        archive = load_archive(Path(file), _ask_passphrase(confirm=False))

    def confirm(clashes: list[str]) -> bool:
        _echo(f"--replace overwrites {len(clashes)} object(s) this server holds:")
        for name in clashes:
            _echo(f"  {name}")
        if yes:
            return True
        if not sys.stdin.isatty():
            err.print("[red]error:[/] not confirmed: pass --yes to overwrite without a prompt")
            return False
        return typer.confirm("overwrite them?", default=False)

    async with _client() as client:
        report = await import_archive(client, archive, replace=replace, confirm=confirm)
    for kind, names in report.created.items():
        _echo(f"created  {len(names):4} {kind}")
    for kind, names in report.replaced.items():
        _echo(f"replaced {len(names):4} {kind}")
    for kind, name, reason in report.skipped:
        _echo(f"skipped  {kind} {name}: {reason}")
