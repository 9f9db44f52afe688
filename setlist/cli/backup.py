"""``setlist backup …``: tenant snapshots — create, list, verify, restore, migrate, prune."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from setlist.cli._common import TenantOpt, _echo, _flow, _run, app, console

backup_app = typer.Typer(
    help="Tenant backups: encrypted, deduplicated snapshots of data and configuration.",
    no_args_is_help=True,
)
app.add_typer(backup_app, name="backup")


@backup_app.command("create")
@_run
async def backup_create(
    tenant: TenantOpt,
    prune_after: bool = typer.Option(False, "--prune", help="apply the retention policy after"),
) -> None:
    """Snapshot the tenant now (a flow run of tenant-backup)."""
    tenant_backup = _flow("flows/backup.py:tenant_backup")
    r = await tenant_backup(tenant, prune_after=prune_after)
    _echo(
        f"snapshot {r.snapshot_id}: {r.files} files, {r.bytes:,} bytes; {r.files_read} read, "
        f"{r.new_bytes:,} new bytes stored"
        + (f"; pruned {len(r.pruned)} snapshot(s)" if r.pruned else "")
    )


@backup_app.command("list")
@_run
async def backup_list(tenant: TenantOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """The tenant's snapshots, oldest first."""
    from setlist.backup.platform import tenant_repository
    from setlist.backup.snapshots import list_snapshots

    rows = list_snapshots(await tenant_repository(tenant))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("snapshot", "created", "files", "bytes", "new bytes", "config", "from")
    for r in rows:
        table.add_row(
            r["snapshot_id"],
            (r["created_at"] or "")[:19],
            str(r["files"]),
            f"{r['bytes'] or 0:,}",
            f"{r['new_bytes'] or 0:,}",
            "yes" if r["config"] else "no",
            r["migrated_from"] or "",
        )
    console.print(table)


@backup_app.command("verify")
@_run
async def backup_verify(
    tenant: TenantOpt,
    snapshot: str = typer.Option("latest", help="snapshot id or latest"),
    sample: float = typer.Option(
        1.0, min=0.0001, max=1.0, help="share of chunks to read back; 1: every file's sha256"
    ),
) -> None:
    """Read a snapshot back and check every hash; exits 1 on any damage."""
    from setlist.backup.platform import tenant_repository
    from setlist.backup.snapshots import verify_snapshot

    done = verify_snapshot(await tenant_repository(tenant), snapshot, sample=sample)
    for error in done.errors:
        _echo(f"DAMAGED {error}")
    _echo(
        f"snapshot {done.snapshot_id}: {done.files_checked} files, {done.chunks_checked} of "
        f"{done.chunks_total} chunks, {done.bytes_checked:,} bytes checked; "
        + ("ok" if done.ok else f"{len(done.errors)} error(s)")
    )
    if not done.ok:
        raise typer.Exit(1)


@backup_app.command("restore")
@_run
async def backup_restore(
    tenant: TenantOpt,
    snapshot: str = typer.Option("latest", help="snapshot id or latest"),
    path: list[str] = typer.Option([], "--path", help="only this key or prefix (repeatable)"),
    restore_config: bool = typer.Option(False, "--config", help="also restore the configuration"),
    yes: bool = typer.Option(False, "--yes", "-y", help="don't ask"),
) -> None:
    """Restore one of the tenant's snapshots into the tenant (a flow run of tenant-restore)."""
    tenant_restore = _flow("flows/backup.py:tenant_restore")
    if not yes:
        typer.confirm(
            f"replace {'/'.join(path) or 'all'} of {tenant}'s data with snapshot {snapshot}?",
            abort=True,
        )
    r = await tenant_restore(tenant, snapshot, paths=path, restore_config=restore_config)
    _echo(
        f"restored {r.snapshot_id}: {r.files} files, {r.bytes:,} bytes; {r.removed} removed, "
        f"{r.kept} kept" + (f"; config: {', '.join(r.config)}" if r.config else "")
    )


@backup_app.command("migrate")
@_run
async def backup_migrate(
    source: str = typer.Option(..., "--from", help="tenant whose snapshot is copied"),
    target: str = typer.Option(..., "--to", help="tenant whose data it replaces"),
    snapshot: str = typer.Option("latest", help="snapshot id of the source, or latest"),
    yes: bool = typer.Option(False, "--yes", "-y", help="don't ask"),
) -> None:
    """Copy a tenant's snapshot into another tenant, re-encrypted, and restore it there."""
    tenant_migrate = _flow("flows/backup.py:tenant_migrate")
    if not yes:
        typer.confirm(f"replace {target}'s data with {source}'s snapshot {snapshot}?", abort=True)
    r = await tenant_migrate(source, target, snapshot, confirm=f"{source}->{target}")
    _echo(f"{target} now holds {source}'s data: {r.files} files, {r.bytes:,} bytes")


@backup_app.command("prune")
@_run
async def backup_prune(
    tenant: TenantOpt,
    daily: int = typer.Option(7, min=0),
    weekly: int = typer.Option(4, min=0),
    monthly: int = typer.Option(12, min=0),
) -> None:
    """Keep the newest snapshot of the last N days, M weeks and K months; drop the rest
    and every chunk only they referenced."""
    from setlist.backup.results import RetentionPolicy

    prune_flow = _flow("flows/backup.py:backup_prune")
    r = await prune_flow(tenant, RetentionPolicy(daily=daily, weekly=weekly, monthly=monthly))
    _echo(
        f"kept {len(r.kept)} snapshot(s), removed {len(r.removed)}; "
        f"{r.chunks_deleted} chunk(s) deleted, {r.chunks_kept} kept"
    )
