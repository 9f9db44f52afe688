"""Prefect's multi-replica control plane: API replicas, services processes, Redis.

Prefect's documented shape for more than one API process (self-hosted, "multiple
replicas"): every replica serves the API without the background services
(``python -m setlist.controlplane --no-services``, which sets Prefect's own
``PREFECT__SERVER_WEBSERVER_ONLY``, as ``prefect server start --no-services`` does), two
processes run the services (``prefect server services start``; with Redis, Prefect
shares their work out: consumer groups for the events, docket for the periodic
services, PostgreSQL's NOTIFY for automation changes), the migrations run once
(``prefect server database upgrade -y``) and never on a replica's start, and whatever
the replicas would otherwise keep in memory lives in Redis: the event and log messaging
and its dedupe cache, the events' causal ordering, the leases of global concurrency
limits (without them a slot taken through one replica could not be renewed or released
through another: Setlist's tenant quotas and locks are such limits), and the docket of
background tasks.

One step more than Prefect's page: the block types. Every Prefect server registers them
on start, and two replicas starting together on a fresh database collide on
``uq_block_type__slug`` (seen here: one replica's startup fails with the
IntegrityError). So the migration step registers them too, once, and the replicas and
the services processes start with ``PREFECT_API_BLOCKS_REGISTER_ON_START=false``.

This module holds the settings that make that shape (``redis_env``, ``REPLICA_ENV``),
the commands of its two other processes (``MIGRATE``: ``python -m
setlist.controlplane.ha migrate``, Prefect's own upgrade then the block types;
``SERVICES``), a reachability check of Redis, and ``python -m setlist.controlplane.ha
wait-for-migrations``: what a replica's init container runs so that it starts only
after the migration Job finished. The local stack (``setlist up --ha``) and Kubernetes
(``k8s/components/prefect-ha``) use the same settings and commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from setlist.core.tenancy import SetlistError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
# prefect-redis in place of Prefect's in-memory implementations.
REDIS_BACKENDS = {
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
}
# Replicas and the services processes: the schema and the block types are the migration
# step's alone.
REPLICA_ENV = {
    "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
}
MIGRATE = ["-m", "setlist.controlplane.ha", "migrate"]
SERVICES = ["-m", "prefect", "server", "services", "start"]


def run_migrations(env: dict[str, str], log: Path, timeout: float = 600.0) -> None:
    """``MIGRATE`` once, in its own process, output appended to ``log``; raises with the
    log's path when it fails or overruns."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        try:
            done = subprocess.run(
                [sys.executable, *MIGRATE],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise SetlistError(
                f"the migrations did not finish in {timeout:.0f} s; see {log}"
            ) from None
    if done.returncode != 0:
        raise SetlistError(f"the migrations failed; see {log}")


def redis_env(url: str = DEFAULT_REDIS_URL) -> dict[str, str]:
    """Every Redis setting of a replica and of a services process, from one URL
    (``redis://[user:password@]host[:port][/db]``, ``rediss://`` for TLS). Messaging,
    cache, ordering and leases use the discrete ``PREFECT_REDIS_MESSAGING_*`` settings;
    the docket shares the same database (its keys carry the docket's name)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise SetlistError(
            f"not a Redis URL: {redact_redis(url)!r}; accepted: redis://[user:password@]host"
            "[:port][/db] or rediss://… for TLS"
        )
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise SetlistError(f"the Redis database in {redact_redis(url)!r} must be a number")
    db = int(path or 0)
    try:
        port = parts.port or 6379
    except ValueError:
        raise SetlistError(f"the port in {redact_redis(url)!r} is not a number") from None
    env = {
        **REDIS_BACKENDS,
        "PREFECT_REDIS_MESSAGING_HOST": parts.hostname,
        "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_REDIS_MESSAGING_DB": str(db),
        "PREFECT_SERVER_DOCKET_URL": parts._replace(path=f"/{db}", query="").geturl(),
    }
    if parts.username:
        env["PREFECT_REDIS_MESSAGING_USERNAME"] = unquote(parts.username)
    if parts.password:
        env["PREFECT_REDIS_MESSAGING_PASSWORD"] = unquote(parts.password)
    if parts.scheme == "rediss":
        env["PREFECT_REDIS_MESSAGING_SSL"] = "true"
    return env


def redact_redis(url: str) -> str:
    """``url`` with its password replaced, for messages."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def redis_unreachable(url: str = DEFAULT_REDIS_URL, timeout: float = 2.0) -> str | None:
    """None when Redis at ``url`` answers a PING; else why not, in words."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"Redis at {redact_redis(url)} does not answer: {type(exc).__name__}: {exc}"
    return None


CLAIM_KEY = "setlist-claim"


@contextlib.contextmanager
def claimed_database(url: str = DEFAULT_REDIS_URL, ttl_s: int = 3600):
    """A Redis database on the server at ``url`` that no one else uses, for a test or
    benchmark stack of its own: the highest-numbered empty one, claimed with a key (so
    two runs side by side take different ones); flushed when done. → its URL. Raises
    SetlistError when Redis does not answer or every database holds keys."""
    import redis

    reason = redis_unreachable(url)
    if reason:
        raise SetlistError(reason)
    parts = urlsplit(url)
    for db in range(15, 0, -1):
        candidate = parts._replace(path=f"/{db}").geturl()
        client = redis.Redis.from_url(candidate)
        if client.set(CLAIM_KEY, str(os.getpid()), nx=True, ex=ttl_s):
            if client.dbsize() == 1:
                break
            client.delete(CLAIM_KEY)  # claimed by us, but someone else's keys are in it
        client.close()
    else:
        raise SetlistError(f"no empty Redis database at {redact_redis(url)} to claim")
    try:
        yield candidate
    finally:
        client.flushdb()
        client.close()


# ---- the migration step, and waiting for it


async def migrate(echo=print) -> str:
    """What ``prefect server database upgrade -y`` does (Prefect's alembic upgrade to
    its newest migration), then the block types' registration every server would
    otherwise race to do on its start. → the revision the database is at."""
    from prefect.server.database import provide_database_interface
    from prefect.server.database.alembic_commands import alembic_upgrade
    from prefect.server.models.block_registration import run_block_auto_registration
    from prefect.utilities.asyncutils import run_sync_in_worker_thread

    db = provide_database_interface()
    echo("running Prefect's migrations")
    await run_sync_in_worker_thread(alembic_upgrade)
    async with await db.session() as session:  # it opens its own transactions
        await run_block_auto_registration(session=session)
    revision = await database_revision()
    echo(f"database at {revision}; block types registered")
    return revision or ""


def head_revision() -> str:
    """The newest migration of the installed Prefect, for the configured database's
    dialect (what ``prefect server database upgrade`` brings the database to)."""
    from alembic.script import ScriptDirectory
    from prefect.server.database import provide_database_interface
    from prefect.server.database.alembic_commands import alembic_config

    versions = provide_database_interface().orm.versions_dir
    script = ScriptDirectory.from_config(alembic_config())
    head = ScriptDirectory(script.dir, version_locations=[str(versions)]).get_current_head()
    if head is None:
        raise SetlistError(f"no migration found under {versions}")
    return head


async def database_revision() -> str | None:
    """The migration the configured database is at; None before the first one."""
    import sqlalchemy as sa
    from prefect.server.database import provide_database_interface

    engine = await provide_database_interface().engine()
    async with engine.connect() as conn:
        try:
            result = await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
        except sa.exc.ProgrammingError:  # no such table (PostgreSQL)
            return None
        except sa.exc.OperationalError as exc:  # SQLite says so this way
            if "no such table" in str(exc):
                return None
            raise
        return result.scalar()


async def wait_for_migrations(timeout: float, echo=print) -> str:
    """Until the database is at ``head_revision()``; → that revision. An unreachable
    database is waited for too (it may be starting beside us)."""
    head = head_revision()
    deadline = time.monotonic() + timeout
    seen: str | None = "unknown"
    while True:
        try:
            current = await database_revision()
        except Exception as exc:  # the database is not up yet, or refuses us for now
            current, reason = None, f"{type(exc).__name__}: {exc}"
        else:
            reason = f"at {current or 'no migration'}"
        if current == head:
            echo(f"database at {head}: migrated")
            return head
        if reason != seen:
            echo(f"waiting for the migration step to bring the database to {head}; {reason}")
            seen = reason
        if time.monotonic() > deadline:
            raise SetlistError(
                f"the database is not at {head} after {timeout:.0f} s ({reason}); "
                "did the migration Job (prefect server database upgrade -y) run?"
            )
        await asyncio.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m setlist.controlplane.ha")
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser(
        "wait-for-migrations",
        help="wait until the database is at the installed Prefect's newest migration",
    )
    wait.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    sub.add_parser("migrate", help="migrate the database and register the block types, once")
    args = parser.parse_args(argv)

    def echo(message: str) -> None:
        print(message, flush=True)

    try:
        if args.command == "migrate":
            asyncio.run(migrate(echo))
        else:
            asyncio.run(wait_for_migrations(args.timeout, echo))
    except SetlistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
