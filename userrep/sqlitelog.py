"""The embedded event log: one SQLite file in WAL mode (``synchronous=FULL``: a commit is on disk
before the write is acknowledged). The semantics every backend shares are in ``userrep.eventlog``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import threading
import time
from pathlib import Path

from userrep.erasure import event_ids_of, id_hash, record_users, scrub, scrub_entries


def _events_record(encoded: list[str]) -> str:
    return '{"kind": "events", "events": [' + ", ".join(encoded) + "]}"


def _delete_in(db, table: str, column: str, values) -> int:
    """Delete the rows of ``table`` whose ``column`` is one of ``values``; returns how many."""
    values, deleted = sorted(values), 0
    for at in range(0, len(values), 500):
        chunk = values[at : at + 500]
        deleted += db.execute(f"DELETE FROM {table} WHERE {column} IN ({','.join('?' * len(chunk))})", chunk).rowcount
    return deleted


class CommitConflict(Exception):
    """An optimistic commit lost a race; it reads again."""


class SqliteLog:
    """One SQLite file in WAL mode: the log, the event ids, every batch's state and group."""

    blocks = False  # ``deliver`` returns at once when there is nothing (consumers poll)

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS log(pos INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS event_ids(id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS users(batch TEXT, user_id TEXT, blob BLOB NOT NULL, version INTEGER NOT NULL,
                                         PRIMARY KEY(batch, user_id)) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS groups(batch TEXT PRIMARY KEY, start INTEGER NOT NULL, cursor INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS pending(batch TEXT, pos INTEGER, consumer TEXT NOT NULL, at REAL NOT NULL,
                                           PRIMARY KEY(batch, pos)) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS applied(batch TEXT, pos INTEGER, PRIMARY KEY(batch, pos)) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS erased(hash TEXT PRIMARY KEY, at TEXT NOT NULL) WITHOUT ROWID;
    """

    def __init__(self, path: str | Path, event_id_ttl_s: float):
        self.event_id_ttl_s = event_id_ttl_s
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.where = str(self.path.resolve())
        self._local = threading.local()  # one connection per thread (sqlite3 objects are not shared)
        self._db().executescript(self.SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # the commit is fsynced before the acknowledgement
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _tx(self):
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- the log -------------------------------------------------------------------------
    def append(self, record: dict) -> int:
        with self._tx() as db:
            return db.execute("INSERT INTO log(record) VALUES(?)", (json.dumps(record),)).lastrowid

    def append_events(self, events: list[dict]) -> tuple[int | None, list[int]]:
        """Log the events whose ``event_id`` is new (or absent) as one record; returns (its position
        or None, the indices of the events dropped as duplicates)."""
        now = time.time()
        with self._tx() as db:
            duplicates, encoded = [], []
            for i, event in enumerate(events):
                event_id = event.get("event_id")
                if (
                    event_id is not None
                    and db.execute("INSERT OR IGNORE INTO event_ids VALUES(?, ?)", (event_id, now)).rowcount == 0
                ):
                    duplicates.append(i)
                    continue
                encoded.append(json.dumps(event))
            position = (
                db.execute("INSERT INTO log(record) VALUES(?)", (_events_record(encoded),)).lastrowid
                if encoded
                else None
            )
        return position, duplicates

    def read(self, after=None, upto=None):
        """(position, record) of every record after ``after`` (None: all), up to ``upto``."""
        last = int(after or 0)
        while True:
            rows = (
                self._db()
                .execute(
                    "SELECT pos, record FROM log WHERE pos > ? AND pos <= ? ORDER BY pos LIMIT 1000",
                    (last, upto if upto is not None else 1 << 62),
                )
                .fetchall()
            )
            yield from scrub_entries([(pos, json.loads(record)) for pos, record in rows], self.erased)
            if rows:
                last = rows[-1][0]
            if len(rows) < 1000:
                return

    def last(self):
        return self._db().execute("SELECT max(pos) FROM log").fetchone()[0]

    @staticmethod
    def key(position) -> tuple:
        return (int(position or 0),)

    # -- per batch: shared state and consumer group ---------------------------------------
    @contextlib.contextmanager
    def lock(self, batch: str):
        """Held by the one replica bootstrapping ``batch`` (others wait, then find it ready)."""
        with open(f"{self.path}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def ready(self, batch: str):
        row = self._db().execute("SELECT start FROM groups WHERE batch = ?", (batch,)).fetchone()
        return None if row is None else row[0]

    def bootstrap(self, batch: str, blobs: dict[str, bytes], position) -> None:
        """Write a batch's whole state and start its group after ``position`` (one transaction)."""
        start = int(position or 0)
        with self._tx() as db:
            db.execute("DELETE FROM users WHERE batch = ?", (batch,))
            db.executemany("INSERT INTO users VALUES(?, ?, ?, 0)", ((batch, u, b) for u, b in blobs.items()))
            for table in ("pending", "applied", "groups"):
                db.execute(f"DELETE FROM {table} WHERE batch = ?", (batch,))
            db.execute("INSERT INTO groups VALUES(?, ?, ?)", (batch, start, start))

    def load(self, batch: str, users) -> dict[str, bytes]:
        return {u: b for u, b, _ in self._rows(self._db(), batch, list(users))}

    @staticmethod
    def _rows(db, batch: str, users: list[str]) -> list[tuple]:
        """(user, blob, version) of the users found."""
        found = []
        for at in range(0, len(users), 500):
            chunk = users[at : at + 500]
            found += db.execute(
                f"SELECT user_id, blob, version FROM users WHERE batch = ? AND user_id IN "
                f"({','.join('?' * len(chunk))})",
                (batch, *chunk),
            ).fetchall()
        return found

    def deliver(self, batch: str, consumer: str, count: int, idle_ms: int) -> list[tuple]:
        """Records of ``batch``'s group for ``consumer``: its own unfinished ones, those another
        consumer left idle for ``idle_ms``, then new ones; at most ``count``."""
        db, now = self._db(), time.time()
        group = db.execute("SELECT cursor FROM groups WHERE batch = ?", (batch,)).fetchone()
        if group is None:
            return []
        waiting = db.execute(
            "SELECT count(*) FROM pending WHERE batch = ? AND (consumer = ? OR at < ?)",
            (batch, consumer, now - idle_ms / 1000),
        ).fetchone()[0]
        if not waiting and (self.last() or 0) <= group[0]:
            return []  # nothing to do: no write transaction (consumers poll this)
        with self._tx() as db:
            db.execute(
                "UPDATE pending SET consumer = ?, at = ? WHERE batch = ? AND (consumer = ? OR at < ?)",
                (consumer, now, batch, consumer, now - idle_ms / 1000),
            )
            mine = [
                p
                for (p,) in db.execute(
                    "SELECT pos FROM pending WHERE batch = ? AND consumer = ? ORDER BY pos LIMIT ?",
                    (batch, consumer, count),
                )
            ]
            cursor = db.execute("SELECT cursor FROM groups WHERE batch = ?", (batch,)).fetchone()[0]
            fresh = [
                p
                for (p,) in db.execute(
                    "SELECT pos FROM log WHERE pos > ? ORDER BY pos LIMIT ?", (cursor, max(count - len(mine), 0))
                )
            ]
            if fresh:
                db.executemany("INSERT INTO pending VALUES(?, ?, ?, ?)", ((batch, p, consumer, now) for p in fresh))
                db.execute("UPDATE groups SET cursor = ? WHERE batch = ?", (fresh[-1], batch))
            positions = mine + fresh
            records = (
                dict(
                    db.execute(
                        f"SELECT pos, record FROM log WHERE pos IN ({','.join('?' * len(positions))})", positions
                    ).fetchall()
                )
                if positions
                else {}
            )
        # a record gone while pending (an erasure removed it; trim stops at pending ones) is acknowledged empty
        return scrub_entries([(p, json.loads(records[p]) if p in records else None) for p in positions], self.erased)

    def commit(self, batch: str, positions: list, work) -> list:
        """Apply ``positions`` once: ``work(todo, load)`` gets the positions not applied yet and a
        ``load(users)`` of their current state blobs and returns the changed blobs. Optimistic, as
        on Redis: the work (re-embedding, online writes) runs outside the write lock; the write
        transaction then checks that no user it read changed and no record was applied meanwhile
        (else it reads again), writes the blobs, marks the records applied and acknowledges them.
        Returns ``todo``."""
        marks = ",".join("?" * len(positions))
        while True:
            db = self._db()
            done = {
                p
                for (p,) in db.execute(
                    f"SELECT pos FROM applied WHERE batch = ? AND pos IN ({marks})", (batch, *positions)
                )
            }
            todo = [p for p in positions if p not in done]
            seen: dict[str, int | None] = {}

            def load(users, db=db, seen=seen):  # called by work() within this iteration
                rows = {u: (b, v) for u, b, v in self._rows(db, batch, list(users))}
                seen.update({u: rows[u][1] if u in rows else None for u in users})
                return {u: b for u, (b, _) in rows.items()}

            blobs = work(todo, load) if todo else {}
            try:
                with self._tx() as db:
                    if (
                        todo
                        and db.execute(
                            f"SELECT count(*) FROM applied WHERE batch = ? AND pos IN ({','.join('?' * len(todo))})",
                            (batch, *todo),
                        ).fetchone()[0]
                    ):
                        raise CommitConflict  # another consumer applied one of them first
                    now = {u: v for u, _, v in self._rows(db, batch, list(seen))}
                    if any(now.get(u) != v for u, v in seen.items()):
                        raise CommitConflict  # a user changed under us
                    db.executemany(
                        "INSERT OR REPLACE INTO users VALUES(?, ?, ?, ?)",
                        ((batch, u, b, (seen.get(u) or 0) + 1) for u, b in blobs.items()),
                    )
                    db.executemany("INSERT OR IGNORE INTO applied VALUES(?, ?)", ((batch, p) for p in todo))
                    db.execute(f"DELETE FROM pending WHERE batch = ? AND pos IN ({marks})", (batch, *positions))
                return todo
            except CommitConflict:
                continue

    def applied(self, batch: str, positions) -> bool:
        positions = [int(p) for p in positions]
        marks = ",".join("?" * len(positions))
        found = (
            self._db()
            .execute(f"SELECT count(*) FROM applied WHERE batch = ? AND pos IN ({marks})", (batch, *positions))
            .fetchone()[0]
        )
        return found == len(positions)

    def batches(self) -> list[str]:
        return [b for (b,) in self._db().execute("SELECT batch FROM groups")]

    def follow(self, notify, stopped: threading.Event, every_s: float = 0.002) -> None:
        """Call ``notify()`` after another connection (a replica's logger or consumer, in any
        process) commits; returns once ``stopped`` is set. ``PRAGMA data_version`` reads the WAL
        index in shared memory, no disk: a few microseconds a check."""
        db = self._db()
        seen = db.execute("PRAGMA data_version").fetchone()[0]
        while not stopped.wait(every_s):
            now = db.execute("PRAGMA data_version").fetchone()[0]
            if now != seen:
                seen = now
                notify()

    def drop(self, batch: str) -> None:
        """Forget a batch's state and group (a batch that can no longer serve)."""
        with self._tx() as db:
            for table in ("users", "pending", "applied", "groups"):
                db.execute(f"DELETE FROM {table} WHERE batch = ?", (batch,))

    # -- erasure (userrep.erasure) -------------------------------------------------------
    def erase(self, hashes: dict[str, str]) -> None:
        """Record erased users (id hash -> time): every read leaves them out from now on."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO erased VALUES(?, ?)", hashes.items())

    def erased(self, users) -> set[str]:
        """The ids of ``users`` that were erased (every read asks: none erased is one cheap query)."""
        if self._db().execute("SELECT 1 FROM erased LIMIT 1").fetchone() is None:
            return set()
        hashes = {id_hash(u): str(u) for u in users}
        found: set[str] = set()
        keys = list(hashes)
        for at in range(0, len(keys), 500):
            chunk = keys[at : at + 500]
            found |= {
                hashes[h]
                for (h,) in self._db().execute(
                    f"SELECT hash FROM erased WHERE hash IN ({','.join('?' * len(chunk))})", chunk
                )
            }
        return found

    def forget(self, users, event_ids=()) -> dict:
        """Remove ``users`` from the log and every batch's state, in one transaction: records
        naming only them go, shared records are rewritten without their events (same position, so
        the consumer groups' bookkeeping stands); their remembered event ids (those in the log and
        ``event_ids``, from the compacted data) go too."""
        users, event_ids = {str(u) for u in users}, set(event_ids)
        removed = rewritten = 0
        with self._tx() as db:
            for pos, text in db.execute("SELECT pos, record FROM log").fetchall():
                record = json.loads(text)
                if not users & set(record_users(record)):
                    continue
                event_ids.update(event_ids_of(record, users))
                kept = scrub(record, users) or {}
                if kept.get("events"):
                    db.execute("UPDATE log SET record = ? WHERE pos = ?", (json.dumps(kept), pos))
                    rewritten += 1
                else:  # their sign-up, or a record of their events only
                    db.execute("DELETE FROM log WHERE pos = ?", (pos,))
                    removed += 1
            states = _delete_in(db, "users", "user_id", users)
            _delete_in(db, "event_ids", "id", event_ids)
        return {"records_removed": removed, "records_rewritten": rewritten, "records_left": 0, "states": states}

    # -- retention -----------------------------------------------------------------------
    def retained_from(self):
        """Position through which the log was trimmed (None: never)."""
        row = self._db().execute("SELECT value FROM meta WHERE key = 'trimmed'").fetchone()
        return None if row is None else int(row[0])

    def trim(self, through) -> int | None:
        """Drop records up to ``through``, but none a group has not delivered and acknowledged, and
        event ids older than the retry window. Returns where it trimmed through."""
        with self._tx() as db:
            bounds = [int(through)]
            for batch, cursor in db.execute("SELECT batch, cursor FROM groups").fetchall():
                oldest = db.execute("SELECT min(pos) FROM pending WHERE batch = ?", (batch,)).fetchone()[0]
                bounds.append(cursor if oldest is None else min(cursor, oldest - 1))
            bound = min(bounds)
            # sign-ups stay: the dataset has no table they are compacted into, and a batch needs them
            db.execute('DELETE FROM log WHERE pos <= ? AND record NOT LIKE \'{"kind": "user"%\'', (bound,))
            db.execute("DELETE FROM event_ids WHERE at < ?", (time.time() - self.event_id_ttl_s,))
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES('trimmed', ?)", (str(max(bound, self.retained_from() or 0)),)
            )
        return bound
