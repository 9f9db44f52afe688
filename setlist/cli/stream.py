"""``setlist stream …``: a tenant's real-time event stream — send events, see how far it is."""

from __future__ import annotations

import json

import typer

from setlist.cli._common import TenantOpt, _echo, _run, app
from setlist.core.tenancy import SetlistError

stream_app = typer.Typer(
    help="Tenants' event streams: send events to one, see its lag and live figures.",
    no_args_is_help=True,
)
app.add_typer(stream_app, name="stream")


@stream_app.command("send")
@_run
async def stream_send(
    tenant: TenantOpt,
    file: str = typer.Argument(
        None, metavar="[FILE|-]", help="JSON lines, plain or gzip; '-' or none: standard input"
    ),
    demo: int = typer.Option(None, "--demo", min=1, help="send N generated demo events instead"),
) -> None:
    """Send events to the tenant's stream, one JSON line each, for its stream-ingest job."""
    from setlist.stream.produce import demo_lines, file_lines, send_events

    if demo is not None and file is not None:
        raise SetlistError("give a FILE or --demo N, not both")
    lines = demo_lines(tenant, demo) if demo is not None else file_lines(file or "-")
    sent = await send_events(tenant, lines)
    _echo(
        f"sent {sent.events} events to the stream of {sent.tenant_id}"
        + (f"; last position {sent.last_position}" if sent.last_position else "")
    )


@stream_app.command("status")
@_run
async def stream_status_cmd(
    tenant: TenantOpt, as_json: bool = typer.Option(False, "--json")
) -> None:
    """The tenant's lag, committed position, appended backlog and live figures."""
    from setlist.stream.status import stream_status

    status = await stream_status(tenant)
    if as_json:
        print(json.dumps(status.as_dict(), indent=2))
        return
    _echo(
        f"{status.tenant_id} on {status.broker}: lag {status.lag:,}, committed up to "
        f"{status.committed_position or 'nothing yet'}; {status.appended_rows:,} rows in "
        f"{status.appended_files} appended files await compaction"
    )
    live = status.live
    if live is None:
        _echo(f"live figures: {status.live_error or 'none yet'}")
        return
    skips = "-" if live.skip_rate_5m is None else f"{live.skip_rate_5m:.1%}"
    _echo(
        f"live (as of {live.updated}): {live.plays:,} plays by {live.listeners:,} listeners "
        f"in the minute from {live.minute}; skip rate {skips} over 5 minutes"
    )
    for rank, track in enumerate(live.top_tracks_5m, 1):
        _echo(f"  {rank}. {track['track_id']}  {track['plays']:,} plays")
