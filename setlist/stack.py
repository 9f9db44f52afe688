"""The embedded local stack behind ``make up``: server + UI, pool, worker, demo tenant.

Same path as production with local parts: Prefect server on PostgreSQL, the embedded
one under the project's ``.setlist/postgres/`` (``setlist.controlplane.postgres``;
``--database sqlite`` for SQLite under ``.setlist/prefect/``, ``--database-url`` for
another server), behind Setlist's gate with the operator credential kept in
``.setlist/credentials/`` (created on first start), a process work pool with the
tenant queues, a local directory as object storage. ``up`` is idempotent; ``down`` (or
Ctrl-C) stops exactly the processes ``up`` started, recorded in ``.setlist/stack.json``,
and the embedded PostgreSQL after the server.

``up --ha`` starts Prefect's multi-replica shape instead of the one server
(``setlist.controlplane.ha``): the migrations once, two services processes and two gated
API replicas without services, on PostgreSQL and Redis (``--redis-url``, default the
machine's own on 127.0.0.1:6379). The worker talks to replica 1; the dispatcher, the
gateway and the metrics exporter to replica 2, so that a run's state changes cross
replicas as they would behind a load balancer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prefect.client.orchestration import get_client

from blocks import LocalStorageConfig, register_all
from setlist.controlplane import ha as ha_shape
from setlist.controlplane.postgres import EmbeddedPostgres, redact
from setlist.core.credentials import (
    AUTH_STRING_ENV,
    SERVER_AUTH_STRING_ENV,
    client_settings,
    ensure_operator_auth_string,
)
from setlist.core.settings import KUBERNETES_POOLS, Settings, get_settings
from setlist.core.storage import load_storage_config, tenant_storage
from setlist.core.tenancy import SetlistError
from setlist.dispatch.leadership import dispatcher_active
from setlist.dispatch.queues import ensure_kubernetes_pool, ensure_process_pool
from setlist.etl.demo import write_sample_data
from setlist.tenants.onboarding import TenantSpec, create_tenant

DEMO_TENANT = "enterprise-client-001"
DEFAULT_PORT = 4200
GATEWAY_PORT = 8787
DEMO_SOURCE = "partner"
# The server's database: the embedded PostgreSQL, SQLite, or a server named by a URL.
DATABASES = ("postgres", "sqlite")
# Only the server may hold the database URL: every other process's environment
# reaches the jobs it starts (the process worker copies its own into each job).
DATABASE_URL_ENVS = (
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
)


def api_url(port: int = DEFAULT_PORT) -> str:
    return f"http://127.0.0.1:{port}/api"


async def bootstrap_platform(storage_root: Path) -> None:
    """Register block types, the default storage block, the work pools and the
    platform's own automations; idempotent."""
    settings = get_settings()
    await register_all()
    try:
        await load_storage_config(settings.storage_block)
    except SetlistError:
        Path(storage_root).mkdir(parents=True, exist_ok=True)
        await LocalStorageConfig(root=str(Path(storage_root).resolve())).asave(
            settings.storage_block
        )
    try:
        await load_storage_config(settings.backup_block)
    except SetlistError:
        # Beside the data store, never inside it: a backup must survive losing the data.
        backups = Path(storage_root).resolve().parent / "backups"
        backups.mkdir(parents=True, exist_ok=True)
        await LocalStorageConfig(root=str(backups)).asave(settings.backup_block)
    await ensure_pools(settings.pools)
    await ensure_platform_automations()


async def ensure_platform_automations() -> None:
    """The automations the platform needs whether or not anyone is alerted: a run whose
    process died ends Crashed (``setlist.observability.automations``)."""
    from setlist.observability import automations

    async with get_client() as client:
        await automations.apply_platform(client)


async def ensure_pools(pools: list[str]) -> None:
    """Create or update the pools: a Kubernetes pool with its kind's template (naming
    ``SETLIST_IMAGE`` / ``SETLIST_GPU_IMAGE``), any other as a process pool."""
    settings = get_settings()
    async with get_client() as client:
        for pool in pools:
            if pool in KUBERNETES_POOLS:
                await ensure_kubernetes_pool(client, pool, KUBERNETES_POOLS[pool])
            else:
                await ensure_process_pool(client, pool, settings.parallel_jobs)


async def onboard_demo(tenant_id: str = DEMO_TENANT) -> dict[str, int]:
    """The demo tenant with sample raw events (1% planted defects) in its storage."""
    async with get_client() as client:
        await create_tenant(
            client, TenantSpec(tenant_id=tenant_id), exist_ok=True, adopt_leftovers=True
        )
    config = await load_storage_config(get_settings().storage_block)
    return write_sample_data(tenant_storage(tenant_id, config))


SERVER_MARKER = b"setlist.controlplane"
GATEWAY_MARKER = b"setlist.gateway"
METRICS_MARKER = b"setlist.observability.metrics"
DISPATCHER_MARKER = b"setlist.dispatch"  # also an older `-m setlist.dispatcher`
SERVICES_MARKER = b"server\0services"  # `-m prefect server services start`
METRICS_PORT = 9464


async def ensure_demo_source(source: str = DEMO_SOURCE, tenant_id: str = DEMO_TENANT) -> None:
    """A webhook source for partner data drops, with a random secret, unless one exists,
    allowed to speak for the demo tenant (a source speaks for no tenant until allowed)."""
    import secrets

    from blocks.webhook import WebhookSource, source_block_name
    from setlist.gateway.sources import allow_tenants, save_source

    try:
        await WebhookSource.aload(source_block_name(source))
    except ValueError:
        await save_source(source, secrets.token_urlsafe(32))
    await allow_tenants(source, add=[tenant_id])


async def apply_alerts() -> str:
    """The alert automations, where a notification block for them exists."""
    from setlist.observability import automations

    async with get_client() as client:
        try:
            done = await automations.apply(client)
        except SetlistError as exc:
            return f"alert automations not applied: {exc}"
    return f"alert automations applied: {len(done)}"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class StackState:
    api_url: str
    server_pid: int | None = None
    worker_pid: int | None = None
    gateway_pid: int | None = None
    metrics_pid: int | None = None
    dispatcher_pid: int | None = None
    database: str | None = None  # postgres (embedded), sqlite or external
    postgres_pid: int | None = None
    # --ha: server_pid is replica 1 (on api_url), these the other processes
    replica_url: str | None = None
    replica_pid: int | None = None
    services_pid: int | None = None
    services2_pid: int | None = None  # Prefect's services share their work out via Redis

    @classmethod
    def path(cls, settings: Settings) -> Path:
        return settings.home / "stack.json"

    @classmethod
    def load(cls, settings: Settings) -> StackState | None:
        try:
            return cls(**json.loads(cls.path(settings).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def save(self, settings: Settings) -> None:
        self.path(settings).parent.mkdir(parents=True, exist_ok=True)
        self.path(settings).write_text(json.dumps(self.__dict__))


def _alive(pid: int | None, marker: bytes = b"prefect") -> bool:
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker in cmdline  # a recycled pid is not ours


def stack_env(
    settings: Settings, url: str, database_url: str | None = None, auth: str | None = None
) -> dict[str, str]:
    """The environment of the stack's processes: the API, and the operator credential
    (the server checks it, every other process sends it); ``database_url`` for the
    server's only."""
    env = {k: v for k, v in os.environ.items() if k not in DATABASE_URL_ENVS}
    if auth:
        env[AUTH_STRING_ENV] = auth
        env[SERVER_AUTH_STRING_ENV] = auth
    env.update(
        PREFECT_HOME=str(settings.home / "prefect"),
        PREFECT_API_URL=url,
        PREFECT_UI_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="5",
        PREFECT_LOCAL_STORAGE_PATH=str(settings.home / "results"),
        SETLIST_HOME=str(settings.home),
        SETLIST_CODE_DIR=str(settings.code_dir),
    )
    if database_url:
        env[DATABASE_URL_ENVS[0]] = database_url
    return env


def embedded_postgres(settings: Settings, port: int | None = None) -> EmbeddedPostgres:
    """The stack's own PostgreSQL cluster: data under ``home/postgres``, its log beside
    the stack's other logs."""
    return EmbeddedPostgres(
        settings.home / "postgres", port=port, log=settings.home / "logs" / "postgres.log"
    )


def _start_postgres(settings: Settings, port: int | None, echo) -> tuple[str, int | None]:
    """Start (or find) the embedded PostgreSQL. → its URL and pid."""
    pg = embedded_postgres(settings, port)
    was = pg.running()
    url = pg.start()
    now = pg.running()
    for directory in pg.granted:
        echo(f"let PostgreSQL's user enter {directory} (o+x: enter, not list)")
    where = f"{redact(url)} (data: {pg.data}; log: {pg.log})"
    echo(f"PostgreSQL already running: {where}" if was else f"PostgreSQL started: {where}")
    return url, now.pid if now else None


def _database(database: str | None, database_url: str | None) -> str:
    if database_url:
        if database not in (None, "postgres"):
            raise SetlistError(
                f"--database {database} and --database-url both name the database; give one"
            )
        return "external"
    database = database or "postgres"
    if database not in DATABASES:
        raise SetlistError(f"unknown database {database!r}; accepted: {', '.join(DATABASES)}")
    return database


def _spawn(args: list[str], env: dict[str, str], log: Path, module: str = "prefect") -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: down() stops all of it
        )
    return proc.pid


def wait_healthy(url: str, timeout: float = 120.0, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(url):
            return
        if pid is not None and not _alive(pid, SERVER_MARKER):
            raise SetlistError("the Prefect server exited during start; see its log")
        time.sleep(0.5)
    raise SetlistError(f"Prefect server at {url} not healthy after {timeout:.0f} s")


def start(
    port: int = DEFAULT_PORT,
    database_url: str | None = None,
    echo=print,
    gateway_port: int = GATEWAY_PORT,
    metrics_port: int = METRICS_PORT,
    database: str | None = None,
    postgres_port: int | None = None,
    ha: bool = False,
    redis_url: str | None = None,
    replica_port: int | None = None,
) -> StackState:
    """Bring the stack up (or complete a partial one) and return what runs. The server's
    database: ``database_url``, else ``database`` (default: the embedded PostgreSQL).
    ``ha``: two API replicas (``port`` and ``replica_port``, default ``port + 1``) and
    a services process on PostgreSQL and Redis (``redis_url``) in place of one server."""
    import anyio
    from prefect.settings import temporary_settings

    settings = get_settings()
    choice = _database(database, database_url)
    url = api_url(port)
    auth, created = ensure_operator_auth_string(settings.home)
    if created:
        path = settings.home / "credentials" / "api-auth"
        # Never the secret itself: this output ends up in terminals' scrollback and logs.
        echo(
            f"created the operator credential, kept 0600 in {path}; the UI asks for it once "
            f"(user:password as one line): cat {path}"
        )
    env = stack_env(settings, url, auth=auth)
    logs = settings.home / "logs"
    state = StackState.load(settings) or StackState(api_url=url)
    if state.api_url != url:
        state = StackState(api_url=url)

    if ha:
        replica_url = api_url(replica_port or port + 1)
        _start_ha(
            settings, state, choice, database_url, postgres_port, auth, replica_url, echo, redis_url
        )
        platform_env = stack_env(settings, replica_url, auth=auth)
    elif state.replica_url and healthy(state.replica_url):
        raise SetlistError(
            f"this stack runs two API replicas ({url}, {state.replica_url}): "
            "setlist up --ha, or setlist down first"
        )
    elif healthy(url):
        running_on = state.database or "a database this stack did not record"
        echo(f"Prefect server already up at {url} (on {running_on})")
        if state.database and state.database != choice:
            echo(f"warning: not {choice}; to switch, setlist down, then setlist up again")
        if state.database == "postgres":  # the running server needs it
            _, state.postgres_pid = _start_postgres(settings, postgres_port, echo)
    else:
        if choice == "postgres":
            database_url, state.postgres_pid = _start_postgres(settings, postgres_port, echo)
        elif choice == "sqlite":
            database_url = f"sqlite+aiosqlite:///{settings.home / 'prefect' / 'prefect.db'}"
        state.database = choice
        echo(f"starting Prefect server on {url} (log: {logs / 'server.log'})")
        state.server_pid = _spawn(
            ["--host", "127.0.0.1", "--port", str(port)],
            stack_env(settings, url, database_url, auth),
            logs / "server.log",
            module="setlist.controlplane",
        )
        state.save(settings)
        wait_healthy(url, pid=state.server_pid)
    if not ha:
        platform_env = env

    with temporary_settings(updates=client_settings(url, auth)):
        anyio.run(bootstrap_platform, settings.home / "storage")
        planted = anyio.run(onboard_demo)
        anyio.run(ensure_demo_source)
        alerts = anyio.run(apply_alerts)
    echo(
        f"demo tenant {DEMO_TENANT} onboarded with sample raw events "
        f"({planted['valid']} valid, {sum(planted.values()) - planted['valid']} planted defects)"
    )

    # The dispatcher first: it holds the tenant queues before the worker polls them.
    if _alive(state.dispatcher_pid, DISPATCHER_MARKER):
        echo(f"dispatcher already running (pid {state.dispatcher_pid})")
    else:
        state.dispatcher_pid = _spawn(
            [], platform_env, logs / "dispatcher.log", module="setlist.dispatch"
        )
        state.save(settings)
        echo(f"dispatcher started (log: {logs / 'dispatcher.log'})")
        _wait_dispatcher(url, auth, state.dispatcher_pid, echo)

    if _alive(state.worker_pid):
        echo(f"worker already running (pid {state.worker_pid})")
    else:
        state.worker_pid = _spawn(
            [
                "worker",
                "start",
                "--pool",
                settings.work_pool,
                "--type",
                "setlist-process",
                "--limit",
                str(settings.parallel_jobs),
                "--name",
                "setlist-local-worker",
            ],
            env,
            logs / "worker.log",
        )
        echo(f"worker started on pool {settings.work_pool} (log: {logs / 'worker.log'})")
    echo(alerts)

    if _alive(state.gateway_pid, GATEWAY_MARKER):
        echo(f"webhook gateway already running (pid {state.gateway_pid})")
    else:
        state.gateway_pid = _spawn(
            ["--port", str(gateway_port)],
            platform_env,
            logs / "gateway.log",
            module="setlist.gateway",
        )
        echo(
            f"webhook gateway on http://127.0.0.1:{gateway_port}/hooks/{DEMO_SOURCE} "
            f"(log: {logs / 'gateway.log'}; sign a body: setlist webhook sign {DEMO_SOURCE} FILE)"
        )
    if _alive(state.metrics_pid, METRICS_MARKER):
        echo(f"metrics exporter already running (pid {state.metrics_pid})")
    else:
        state.metrics_pid = _spawn(
            ["--port", str(metrics_port)],
            platform_env,
            logs / "metrics.log",
            module="setlist.observability.metrics",
        )
        echo(f"Prometheus metrics on http://127.0.0.1:{metrics_port}/metrics")
    state.save(settings)
    return state


def _start_ha(
    settings: Settings,
    state: StackState,
    choice: str,
    database_url: str | None,
    postgres_port: int | None,
    auth: str,
    replica_url: str,
    echo,
    redis_url: str | None = None,
) -> None:
    """Prefect's multi-replica shape (``setlist.controlplane.ha``): the migrations once
    (only when no replica answers yet), the services processes, replica 1 on
    ``state.api_url`` and replica 2 on ``replica_url``; each one only when it is not
    running already. Fills ``state``."""
    if choice == "sqlite":
        raise SetlistError(
            "--ha needs PostgreSQL: replicas on one SQLite file would fight over its write "
            "lock; use the embedded PostgreSQL (the default) or --database-url"
        )
    redis_url = redis_url or ha_shape.DEFAULT_REDIS_URL
    problem = ha_shape.redis_unreachable(redis_url)
    if problem:
        raise SetlistError(f"{problem}; start Redis there, or give --redis-url")
    urls = [state.api_url, replica_url]
    running = [healthy(u) for u in urls]
    if running[0] and not state.replica_url:
        raise SetlistError(
            f"a single Prefect server (with its own services) runs at {urls[0]}: "
            "setlist down first, then setlist up --ha"
        )
    if any(running) and state.database != choice:
        raise SetlistError(
            f"the running replicas use {state.database or 'a database not recorded'}, "
            f"not {choice}: setlist down first"
        )
    if choice == "postgres":
        database_url, state.postgres_pid = _start_postgres(settings, postgres_port, echo)
    elif database_url is None:
        raise SetlistError("--database-url is needed to start a replica on it")
    state.database, state.replica_url = choice, replica_url
    logs = settings.home / "logs"
    server_env = {
        **stack_env(settings, state.api_url, database_url, auth),
        **ha_shape.redis_env(redis_url),
        **ha_shape.REPLICA_ENV,
    }
    if not any(running):
        echo(f"migrating the database once (log: {logs / 'migrate.log'})")
        ha_shape.run_migrations(server_env, logs / "migrate.log")
    # Two services processes, as k8s/components/prefect-ha runs two replicas of them:
    # with Redis, Prefect shares their work out (bench/ha.py measured the difference).
    for attr, log_name in (("services_pid", "services.log"), ("services2_pid", "services-2.log")):
        pid = getattr(state, attr)
        if _alive(pid, SERVICES_MARKER):
            echo(f"Prefect services already running (pid {pid})")
            continue
        # Prefect refuses to start its services beside a pid file of a live process;
        # ours is not alive (checked above), so the file is stale.
        (Path(server_env["PREFECT_HOME"]) / "services.pid").unlink(missing_ok=True)
        module, *args = ha_shape.SERVICES[1:]  # after "-m"
        setattr(state, attr, _spawn(args, server_env, logs / log_name, module=module))
        echo(f"Prefect services started (log: {logs / log_name})")
    pids = ["server_pid", "replica_pid"]
    for n, (url, up, attr) in enumerate(zip(urls, running, pids, strict=True), 1):
        if up:
            echo(f"API replica {n} already up at {url}")
            continue
        port = url.rsplit(":", 1)[1].split("/")[0]
        log = logs / ("server.log" if n == 1 else f"server-{n}.log")
        setattr(
            state,
            attr,
            _spawn(
                ["--host", "127.0.0.1", "--port", port, "--no-services"],
                {**server_env, "PREFECT_API_URL": url, "PREFECT_UI_API_URL": url},
                log,
                module="setlist.controlplane",
            ),
        )
        echo(f"starting API replica {n} on {url} (log: {log})")
    state.save(settings)
    for url, attr in zip(urls, pids, strict=True):
        wait_healthy(url, pid=getattr(state, attr))
    if not all(_alive(p, SERVICES_MARKER) for p in (state.services_pid, state.services2_pid)):
        raise SetlistError(f"the Prefect services exited during start; see {logs}/services*.log")
    echo(f"two API replicas up: {urls[0]} (the worker's), {urls[1]} (dispatcher, gateway, metrics)")


def _wait_dispatcher(url: str, auth: str, pid: int, echo, timeout: float = 60.0) -> None:
    """Until the new dispatcher leads (it holds the queues from its first cycle)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    async def active() -> bool:
        async with get_client() as client:
            return await dispatcher_active(client)

    deadline = time.monotonic() + timeout
    with temporary_settings(updates=client_settings(url, auth)):
        while not anyio.run(active):
            if not _alive(pid, DISPATCHER_MARKER) or time.monotonic() > deadline:
                echo("warning: the dispatcher is not leading yet; see its log")
                return
            time.sleep(0.5)


def _stop(
    pid: int | None, name: str, echo, grace: float = 10.0, marker: bytes = b"prefect"
) -> None:
    if not _alive(pid, marker):
        return
    assert pid is not None
    # The worker ignores the first signal and keeps taking runs; the second one stops it.
    # Anything else has stopped by the time the second is due, so it waits briefly.
    for wait in (min(1.5, grace / 2), grace / 2):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid, marker) or _zombie(pid):
                echo(f"stopped {name} (pid {pid})")
                return
            time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    echo(f"killed {name} (pid {pid})")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def stop(echo=print) -> bool:
    """Stop what ``start`` started, and nothing else. False if nothing was running."""
    settings = get_settings()
    state = StackState.load(settings)
    if state is None:
        # The embedded PostgreSQL is this stack's even without a record (a crashed up).
        stopped = _stop_postgres(settings, echo)
        if not stopped:
            echo("no local stack recorded; nothing to stop")
        return stopped
    _stop(state.dispatcher_pid, "dispatcher", echo, marker=DISPATCHER_MARKER)
    _stop(state.metrics_pid, "metrics exporter", echo, marker=METRICS_MARKER)
    _stop(state.gateway_pid, "webhook gateway", echo, marker=GATEWAY_MARKER)
    _stop(state.worker_pid, "worker", echo)
    _stop(state.replica_pid, "API replica 2", echo, marker=SERVER_MARKER)
    _stop(state.server_pid, "Prefect server", echo, marker=SERVER_MARKER)
    _stop(state.services_pid, "Prefect services", echo, marker=SERVICES_MARKER)
    _stop(state.services2_pid, "Prefect services 2", echo, marker=SERVICES_MARKER)
    _stop_postgres(settings, echo)  # after the server: it writes until it stops
    StackState.path(settings).unlink(missing_ok=True)
    return True


def _stop_postgres(settings: Settings, echo) -> bool:
    try:
        pid = embedded_postgres(settings).stop()
    except SetlistError as exc:
        echo(f"warning: the embedded PostgreSQL did not stop: {exc}")
        return False
    if pid:
        echo(f"stopped PostgreSQL (pid {pid})")
    return bool(pid)


def run_foreground(
    port: int = DEFAULT_PORT,
    database_url: str | None = None,
    echo=print,
    gateway_port: int = GATEWAY_PORT,
    metrics_port: int = METRICS_PORT,
    database: str | None = None,
    postgres_port: int | None = None,
    ha: bool = False,
    redis_url: str | None = None,
    replica_port: int | None = None,
) -> None:
    """``setlist up``: start, then stay until Ctrl-C / SIGTERM, then stop everything.
    With two replicas, it stays while either serves (and says when one stopped)."""
    state = start(
        port,
        database_url,
        echo,
        gateway_port=gateway_port,
        metrics_port=metrics_port,
        database=database,
        postgres_port=postgres_port,
        ha=ha,
        redis_url=redis_url,
        replica_port=replica_port,
    )
    pg = embedded_postgres(get_settings()) if state.database == "postgres" else None
    ui = state.api_url.removesuffix("/api")
    echo(f"\nSetlist is up. UI: {ui}   API: {state.api_url}")
    if state.replica_pid:
        echo(f"second API replica: {state.replica_url} (both serve the UI)")
    echo(f"try: setlist submit canary --tenant {DEMO_TENANT} --wait")
    echo("Ctrl-C stops the stack.")

    def _term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    servers = {"replica 1": state.server_pid}
    if state.replica_pid:
        servers["replica 2"] = state.replica_pid
    try:
        while True:
            time.sleep(2)
            stopped = [n for n, pid in servers.items() if pid and not _alive(pid, SERVER_MARKER)]
            if stopped and len(stopped) == len(servers):
                echo("the Prefect server stopped; shutting down")
                break
            for name in stopped:
                echo(f"warning: API {name} stopped; the other one serves on (see its log)")
                servers.pop(name)
            if pg is not None and pg.running() is None:
                echo("PostgreSQL stopped; shutting down")
                break
    except KeyboardInterrupt:
        echo("\nstopping…")
    finally:
        stop(echo)
