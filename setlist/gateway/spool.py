"""The gateway's spool: deliveries seen and events not yet sent, in one SQLite file.

An acknowledged webhook must never be lost, so a delivery is acknowledged only once its
dedupe keys (``dedupe.py``) and its event are on disk, in one transaction. The keys are
kept for the dedupe window (7 days) so a redelivery is recognised; the events leave the outbox once
the forwarder has sent them. The outbox is bounded (``max_pending``): when Prefect is down
long enough to fill it, the gateway answers 503 and the sender keeps the delivery.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path


class SpoolFull(Exception):
    pass


class Spool:
    """Deliveries seen and events not yet sent, in one SQLite file (WAL).

    Accepting a delivery is one transaction: its dedupe keys (one or more, each in the
    ``delivery_id`` column) and its event go in together, so an acknowledged webhook
    always has its event on disk, and a delivery matching any key seen is a duplicate.
    """

    def __init__(self, path: Path, max_pending: int = 10_000, dedupe_days: float = 7.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_pending = max_pending
        self.dedupe_s = dedupe_days * 86400
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL: a commit survives the process crashing (not the OS crashing).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS deliveries (
                source TEXT NOT NULL, delivery_id TEXT NOT NULL, event_id TEXT NOT NULL,
                accepted_at REAL NOT NULL, PRIMARY KEY (source, delivery_id));
            CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (accepted_at);
            CREATE TABLE IF NOT EXISTS outbox (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL,
                accepted_at REAL NOT NULL);
            """
        )
        self._pending = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    @property
    def pending(self) -> int:
        return self._pending

    def seen(self, source: str, keys: str | Sequence[str]) -> str | None:
        """The event id of the delivery recorded under any of ``keys``, or None."""
        for key in [keys] if isinstance(keys, str) else keys:
            row = self._db.execute(
                "SELECT event_id FROM deliveries WHERE source = ? AND delivery_id = ?",
                (source, key),
            ).fetchone()
            if row:
                return row[0]
        return None

    def accept(
        self, source: str, keys: str | Sequence[str], event_id: str, event_json: str
    ) -> bool:
        """Record the delivery under ``keys`` and spool its event; False if any key was
        seen already (nothing is recorded then)."""
        if self._pending >= self.max_pending:
            raise SpoolFull(f"{self._pending} events wait for the Prefect API")
        keys = [keys] if isinstance(keys, str) else list(dict.fromkeys(keys))
        now = time.time()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO deliveries VALUES (?, ?, ?, ?)",
                    [(source, key, event_id, now) for key in keys],
                )
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return False
            self._db.execute(
                "INSERT INTO outbox (event, accepted_at) VALUES (?, ?)", (event_json, now)
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._pending += 1
        return True

    def batch(self, limit: int = 100) -> list[tuple[int, str]]:
        return self._db.execute(
            "SELECT seq, event FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()

    def sent(self, seqs: list[int]) -> None:
        if not seqs:
            return
        self._db.execute(
            f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(seqs))})",  # noqa: S608
            seqs,
        )
        self._pending = self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def prune(self) -> int:
        """Forget dedupe keys older than the dedupe window."""
        cur = self._db.execute(
            "DELETE FROM deliveries WHERE accepted_at < ?", (time.time() - self.dedupe_s,)
        )
        return cur.rowcount

    def close(self) -> None:
        self._db.close()
