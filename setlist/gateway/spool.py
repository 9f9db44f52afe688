"""The gateway's spool: deliveries seen and events not yet sent, in one SQLite file.

An acknowledged webhook must never be lost, so a delivery is acknowledged only once its
delivery id and its event are on disk, in one transaction. The delivery ids are kept for
the dedupe window (7 days) so a redelivery is recognised; the events leave the outbox once
the forwarder has sent them. The outbox is bounded (``max_pending``): when Prefect is down
long enough to fill it, the gateway answers 503 and the sender keeps the delivery.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


class SpoolFull(Exception):
    pass


class Spool:
    """Deliveries seen and events not yet sent, in one SQLite file (WAL).

    Accepting a delivery is one transaction: the delivery id (the dedupe record) and its
    event go in together, so an acknowledged webhook always has its event on disk.
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

    def seen(self, source: str, delivery_id: str) -> str | None:
        row = self._db.execute(
            "SELECT event_id FROM deliveries WHERE source = ? AND delivery_id = ?",
            (source, delivery_id),
        ).fetchone()
        return row[0] if row else None

    def accept(self, source: str, delivery_id: str, event_id: str, event_json: str) -> bool:
        """Record the delivery and spool its event; False if the delivery was seen already."""
        if self._pending >= self.max_pending:
            raise SpoolFull(f"{self._pending} events wait for the Prefect API")
        now = time.time()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO deliveries VALUES (?, ?, ?, ?)",
                    (source, delivery_id, event_id, now),
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
        """Forget delivery ids older than the dedupe window."""
        cur = self._db.execute(
            "DELETE FROM deliveries WHERE accepted_at < ?", (time.time() - self.dedupe_s,)
        )
        return cur.rowcount

    def close(self) -> None:
        self._db.close()
