"""The durable log of accepted online writes, the shared per-user state it feeds, and its
compaction into the dataset a batch trains on.

Two backends behind one small interface (``open_log``), the same semantics in each:

* SQLite (embedded default, a file path): WAL mode, ``synchronous=FULL``, so a commit is on disk
  before the write is acknowledged; the logger group-commits every request waiting (one fsync).
  A record's position is its row id (never reused: ``AUTOINCREMENT``).
* A Redis stream (production profile, ``redis://HOST:PORT[/STREAM][?password=...]``) on the Redis
  the Feast online store uses: XADD, consumer groups, per-user state keys. Durability is Redis's:
  run it with ``appendonly yes`` and ``appendfsync always`` (every write on disk before the reply;
  ``everysec`` may lose the last second on a crash of the host). A position is the entry id.

What the log holds and who reads it:

* records ``{"kind": "events", "events": [...]}`` (one per group commit) and ``{"kind": "user",
  ...}`` (a sign-up). ``append_events`` drops events whose client ``event_id`` was accepted before
  (kept ``EVENT_ID_TTL_S``) in the same atomic step as the append: a retry is logged once, by any
  replica.
* per batch, the **shared user state**: every user's feature buckets, sign-up information and
  newest online embedding, keyed by (batch, user), written once by whichever replica loads the
  batch first (``bootstrap``, under ``lock``), then kept up to date by a **consumer group** named
  after the batch that starts right after the last record the bootstrap held. Any replica's
  consumer takes records from the group (``deliver``: its own unfinished ones, then ones another
  consumer left idle longer than ``idle_ms``, then new ones) and ``commit``s them, optimistically:
  read the touched users, apply, re-embed and write online outside any lock, then in one short
  transaction check that none of those users changed and none of the records was applied
  meanwhile (else read again), write the users, mark the records applied and acknowledge them
  (SQLite: a version per user, checked under ``BEGIN IMMEDIATE``; Redis: ``WATCH``/``MULTI``).
  So two consumers on the same users lose no update, and a consumer killed at any point leaves
  its records to another, never applied twice. Bucket sums commute, so records of one user
  applied out of order give the same state.

Compaction (``userrep events compact``, the training pipeline's first step) appends the logged
events to the dataset as parquet parts under ``DATA/events.online/`` (one part per compaction and
day, named by where in the log it starts) and records the position reached in
``DATA/events.online/_watermark.json``; the loader reads the parts with the events table, so a
batch built after a compaction trains on every acknowledged event before its ``as_of``. The
batch's manifest keeps the watermark, so its bootstrap replays exactly the records its data does
not hold. Then the log is trimmed (retention) up to the watermark, but never past a record that
a live consumer group has not delivered and acknowledged (the serving batch's and the previous
one's, kept for a rollback); sign-ups are kept (the dataset has no table for them). A rerun after a crash rewrites the same part names: nothing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ONLINE_EVENTS = "events.online"  # the dataset's directory of compacted online events
WATERMARK = "_watermark.json"
DEFAULT_STREAM = "userrep:events"
EVENT_ID_TTL_S = 7 * 86400  # how long an accepted client event_id is remembered (the retry window)
# What a redis-server holding the stream must run with (every write on disk before its reply);
# the tests and benches start it so, and k8s/ configures the same.
REDIS_DURABLE_ARGS = ("--appendonly", "yes", "--appendfsync", "always")


def default_log(batch_root: str | Path) -> Path:
    """Where the online service logs writes for the batches under ``batch_root`` (WORK/online/)."""
    return Path(batch_root).resolve().parent / "online" / "events.sqlite"


def _events_record(encoded: list[str]) -> str:
    return '{"kind": "events", "events": [' + ", ".join(encoded) + "]}"


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
    """

    def __init__(self, path: str | Path):
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
            for last, record in rows:
                yield last, json.loads(record)
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
        # a record trimmed away while pending (never: trim stops at pending records) is acknowledged empty
        return [(p, json.loads(records[p]) if p in records else None) for p in positions]

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
                        raise _Conflict  # another consumer applied one of them first
                    now = {u: v for u, _, v in self._rows(db, batch, list(seen))}
                    if any(now.get(u) != v for u, v in seen.items()):
                        raise _Conflict  # a user changed under us
                    db.executemany(
                        "INSERT OR REPLACE INTO users VALUES(?, ?, ?, ?)",
                        ((batch, u, b, (seen.get(u) or 0) + 1) for u, b in blobs.items()),
                    )
                    db.executemany("INSERT OR IGNORE INTO applied VALUES(?, ?)", ((batch, p) for p in todo))
                    db.execute(f"DELETE FROM pending WHERE batch = ? AND pos IN ({marks})", (batch, *positions))
                return todo
            except _Conflict:
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
            db.execute("DELETE FROM event_ids WHERE at < ?", (time.time() - EVENT_ID_TTL_S,))
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES('trimmed', ?)", (str(max(bound, self.retained_from() or 0)),)
            )
        return bound


class _Conflict(Exception):
    """An optimistic commit lost a race; it reads again."""


# Atomic dedupe + append: KEYS[1] = stream; ARGV = ttl, key prefix, then (event_id or "", json) pairs.
_APPEND_EVENTS = """
local fresh, duplicates = {}, {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if id == "" or redis.call("SET", ARGV[2] .. id, "1", "NX", "EX", ARGV[1]) then
    table.insert(fresh, ARGV[i + 1])
  else
    table.insert(duplicates, (i - 1) / 2 - 1)
  end
end
local position = false
if #fresh > 0 then
  position = redis.call("XADD", KEYS[1], "*", "record", '{"kind": "events", "events": [' .. table.concat(fresh, ", ") .. "]}")
end
return {position, duplicates}
"""


class RedisStreamLog:
    """One Redis stream plus, per batch, a consumer group and one state key per user."""

    blocks = True  # ``deliver`` waits up to ``block_ms`` for a new record

    def __init__(self, url: str):
        import redis

        parsed = urlparse(url)
        password = parse_qs(parsed.query).get("password", [None])[0] or os.environ.get("REDIS_PASSWORD")
        if not password and os.environ.get("REDIS_PASSWORD_FILE"):  # a mounted Kubernetes Secret
            password = Path(os.environ["REDIS_PASSWORD_FILE"]).read_text().strip()
        self.stream = parsed.path.lstrip("/") or DEFAULT_STREAM
        # Any: redis-py types every sync command as ``Awaitable | Any`` (its client may be async).
        self.client: Any = redis.Redis(host=parsed.hostname or "127.0.0.1", port=parsed.port or 6379, password=password)
        self.where = f"redis://{parsed.hostname}:{parsed.port or 6379}/{self.stream}"
        self.channel = f"{self.stream}:applied"  # pub/sub: each commit publishes its batch here (follow)
        self._append_events = self.client.register_script(_APPEND_EVENTS)

    def _key(self, *parts) -> str:
        return ":".join([self.stream, *map(str, parts)])

    # -- the log -------------------------------------------------------------------------
    def append(self, record: dict) -> str:
        return self.client.xadd(self.stream, {"record": json.dumps(record)}).decode()

    def append_events(self, events: list[dict]) -> tuple[str | None, list[int]]:
        args: list = [EVENT_ID_TTL_S, self._key("event_id", "")]
        for event in events:
            args += [event.get("event_id") or "", json.dumps(event)]
        position, duplicates = self._append_events(keys=[self.stream], args=args)
        return (position.decode() if position else None), [int(i) for i in duplicates]

    def read(self, after=None, upto=None, batch: int = 1000):
        start = "-" if after is None else f"({after}"
        while True:
            entries = self.client.xrange(self.stream, min=start, max=upto or "+", count=batch)
            for entry_id, fields in entries:
                yield entry_id.decode(), json.loads(fields[b"record"])
            if len(entries) < batch:
                return
            start = f"({entries[-1][0].decode()}"

    def last(self):
        entries = self.client.xrevrange(self.stream, count=1)
        return entries[0][0].decode() if entries else None

    @staticmethod
    def key(position) -> tuple:
        if position is None:
            return (0, 0)
        ms, _, seq = str(position).partition("-")
        return int(ms), int(seq or 0)

    # -- per batch: shared state and consumer group ---------------------------------------
    def lock(self, batch: str):
        return self.client.lock(self._key("lock", batch), timeout=900, blocking_timeout=900)

    def ready(self, batch: str):
        value = self.client.get(self._key("ready", batch))
        return None if value is None else value.decode()

    def bootstrap(self, batch: str, blobs: dict[str, bytes], position) -> None:
        import redis

        self.drop(batch)
        items = list(blobs.items())
        for at in range(0, len(items), 2000):
            with self.client.pipeline(transaction=False) as pipe:
                for user, blob in items[at : at + 2000]:
                    pipe.set(self._key("state", batch, user), blob)
                pipe.execute()
        start = position or "0-0"
        try:
            self.client.xgroup_create(self.stream, f"apply:{batch}", id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            self.client.xgroup_setid(self.stream, f"apply:{batch}", start)
        self.client.set(self._key("ready", batch), start)  # last: a crash before it bootstraps again

    def load(self, batch: str, users) -> dict[str, bytes]:
        users = list(users)
        values = self.client.mget([self._key("state", batch, u) for u in users]) if users else []
        return {u: v for u, v in zip(users, values) if v is not None}

    def deliver(self, batch: str, consumer: str, count: int, idle_ms: int, block_ms: int = 50) -> list[tuple]:
        group = f"apply:{batch}"
        got = []
        for _, entries in self.client.xreadgroup(group, consumer, {self.stream: "0"}, count=count) or []:
            got += entries  # this consumer's own unfinished records (a failed commit)
        if len(got) < count:
            got += self.client.xautoclaim(self.stream, group, consumer, idle_ms, "0-0", count=count - len(got))[1]
        if not got:
            for _, entries in (
                self.client.xreadgroup(group, consumer, {self.stream: ">"}, count=count, block=block_ms) or []
            ):
                got += entries
        return [(i.decode(), json.loads(f[b"record"]) if f else None) for i, f in got]

    def commit(self, batch: str, positions: list, work) -> list:
        import redis

        marks = [self._key("applied", batch, p) for p in positions]
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*marks)  # another consumer applying one of them first aborts this one
                    todo = [p for p, flag in zip(positions, pipe.mget(marks)) if flag is None]

                    def load(users):
                        keys = [self._key("state", batch, u) for u in users]
                        pipe.watch(*marks, *keys)
                        return {u: v for u, v in zip(users, pipe.mget(keys)) if v is not None}

                    blobs = work(todo, load) if todo else {}
                    pipe.multi()
                    for user, blob in blobs.items():
                        pipe.set(self._key("state", batch, user), blob)
                    for p in todo:
                        pipe.set(self._key("applied", batch, p), 1, ex=EVENT_ID_TTL_S)
                    pipe.xack(self.stream, f"apply:{batch}", *positions)
                    pipe.publish(self.channel, batch)  # wakes the waiters of every replica (follow)
                    pipe.execute()
                    return todo
                except redis.WatchError:
                    continue  # a user or a record changed under us: read again

    def follow(self, notify, stopped: threading.Event) -> None:
        """Call ``notify()`` when any consumer commits (its PUBLISH); returns once ``stopped`` is
        set. A lost connection (Redis restarting) is opened again; the waiters poll meanwhile."""
        import redis

        while not stopped.is_set():
            try:
                with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(self.channel)
                    while not stopped.is_set():
                        if pubsub.get_message(timeout=0.5) is not None:
                            notify()
            except redis.RedisError:  # a restart, a timeout: subscribe again
                stopped.wait(0.5)

    def applied(self, batch: str, positions) -> bool:
        positions = list(positions)
        return self.client.exists(*[self._key("applied", batch, p) for p in positions]) == len(positions)

    def _groups(self) -> list[dict]:
        """XINFO GROUPS of the batches' consumer groups (none before the stream exists)."""
        import redis

        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return []
        return [g for g in groups if g["name"].decode().startswith("apply:")]

    def batches(self) -> list[str]:
        return [g["name"].decode().removeprefix("apply:") for g in self._groups()]

    def drop(self, batch: str) -> None:
        import redis

        self.client.delete(self._key("ready", batch))
        with contextlib.suppress(redis.ResponseError):
            self.client.xgroup_destroy(self.stream, f"apply:{batch}")
        for pattern in (self._key("state", batch, "*"), self._key("applied", batch, "*")):
            keys = list(self.client.scan_iter(match=pattern, count=5000))
            for at in range(0, len(keys), 5000):
                self.client.delete(*keys[at : at + 5000])

    # -- retention -----------------------------------------------------------------------
    def retained_from(self):
        value = self.client.get(self._key("trimmed"))
        return None if value is None else value.decode()

    def trim(self, through):
        bounds = [through]
        for info in self._groups():
            bound = info["last-delivered-id"].decode()
            pending = self.client.xpending(self.stream, info["name"])
            if pending["pending"]:
                ms, seq = self.key(pending["min"].decode())
                bound = min(bound, f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{(1 << 64) - 1}", key=self.key)
            bounds.append(bound)
        bound = min(bounds, key=self.key)
        doomed = [p for p, record in self.read(upto=bound) if record["kind"] == "events"]  # sign-ups stay
        for at in range(0, len(doomed), 5000):
            self.client.xdel(self.stream, *doomed[at : at + 5000])
        previous = self.retained_from()
        self.client.set(self._key("trimmed"), max(bound, previous or "0-0", key=self.key))
        return bound


def open_log(where: str | Path) -> SqliteLog | RedisStreamLog:
    """A file path (SQLite), or ``redis://HOST:PORT[/STREAM][?password=...]``."""
    return RedisStreamLog(str(where)) if str(where).startswith("redis://") else SqliteLog(where)


def covered(log, position, watermark) -> bool:
    """Whether the record at ``position`` lies within ``watermark`` (compacted into the data)."""
    return watermark is not None and log.key(position) <= log.key(watermark)


def watermark(data: str | Path):
    """Log position up to which the dataset holds the logged events (None: none compacted)."""
    path = Path(data) / ONLINE_EVENTS / WATERMARK
    return json.loads(path.read_text())["position"] if path.exists() else None


def compact(log: str | Path | SqliteLog | RedisStreamLog, data: str | Path, trim: bool = True) -> dict:
    """Append the events logged since the dataset's watermark to ``DATA/events.online/``, then
    trim the log up to the new watermark where no consumer group still needs it."""
    log = log if isinstance(log, (SqliteLog, RedisStreamLog)) else open_log(log)
    data = Path(data)
    start = watermark(data)
    retained = log.retained_from()
    if retained is not None and log.key(retained) > log.key(start):
        raise ValueError(
            f"data: {data} holds the log up to {start}, but the log was trimmed through {retained}; "
            "compact into the dataset the pipeline compacted into before"
        )
    rows, end = [], start
    for end, record in log.read(start):  # noqa: B007 (end: the last position read, used below)
        if record["kind"] == "events":
            rows += record["events"]
    out = data / ONLINE_EVENTS
    out.mkdir(exist_ok=True)
    parts = []
    if rows:
        frame = pd.DataFrame(rows)
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
        # (a logged event without a weight counts once, as in the contract)
        frame["weight"] = pd.to_numeric(frame["weight"]).fillna(1.0).astype("float64") if "weight" in frame else 1.0
        if "event_id" not in frame:
            frame["event_id"] = None
        name = "part-" + "-".join(f"{k:013d}" for k in log.key(start)) + ".parquet"
        for day, part in frame.groupby(frame["ts"].dt.strftime("%Y-%m-%d")):
            directory = out / f"day={day}"
            directory.mkdir(exist_ok=True)
            table = pa.Table.from_pandas(part[["user_id", "item_id", "ts", "weight", "event_id"]], preserve_index=False)
            path = directory / name
            pq.write_table(table, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            parts.append(str(path.relative_to(data)))
    tmp = out / (WATERMARK + ".tmp")
    tmp.write_text(json.dumps({"position": end, "log": log.where}))
    os.replace(tmp, out / WATERMARK)
    trimmed = log.trim(end) if trim and end is not None else None
    return {"events": len(rows), "parts": parts, "from": start, "to": end, "trimmed_through": trimmed}


def part_files(data: str | Path) -> list[Path]:
    """The compacted parts of a dataset, in a stable order."""
    return sorted((Path(data) / ONLINE_EVENTS).glob("day=*/part-*.parquet"))
