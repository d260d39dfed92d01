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

Erased users (``userrep.erasure``): each backend keeps the erasure record (``erase``/``erased``),
leaves the erased users' events and sign-ups out of every ``read`` and ``deliver``, and removes
them from its records and every batch's state (``forget``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from userrep.redislog import RedisStreamLog
from userrep.sqlitelog import SqliteLog

ONLINE_EVENTS = "events.online"  # the dataset's directory of compacted online events
WATERMARK = "_watermark.json"
EVENT_ID_TTL_S = 7 * 86400  # how long an accepted client event_id is remembered (the retry window)


def default_log(batch_root: str | Path) -> Path:
    """Where the online service logs writes for the batches under ``batch_root`` (WORK/online/)."""
    return Path(batch_root).resolve().parent / "online" / "events.sqlite"


def open_log(where: str | Path) -> SqliteLog | RedisStreamLog:
    """A file path (SQLite), or ``redis://HOST:PORT[/STREAM][?password=...]``."""
    if str(where).startswith("redis://"):
        return RedisStreamLog(str(where), EVENT_ID_TTL_S)
    return SqliteLog(where, EVENT_ID_TTL_S)


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
