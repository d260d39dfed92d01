"""The durable log of accepted online writes, and its compaction into the dataset a batch trains on.

Two backends behind one small interface (``open_log``):

* a file (embedded default): JSON lines, appended and fsynced before a write is acknowledged; a
  record's position is the byte offset after it;
* a Redis stream (production profile, ``redis://HOST:PORT[/STREAM][?password=...]``): one XADD
  per committed write on the Redis the Feast online store uses; a record's position is its entry
  id. Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync always`` (every XADD
  on disk before the reply; ``everysec`` may lose the last second on a crash of the host).

A record is ``{"kind": "events", "events": [...]}`` or ``{"kind": "user", ...}``, one per commit.

Compaction (``userrep events compact``, the training pipeline's first step) appends the logged
events to the dataset as parquet parts under ``DATA/events.online/`` (one part per compaction and
day, named by where in the log it starts) and records the position reached in
``DATA/events.online/_watermark.json``. The loader reads the parts with the events table, so a
batch built after a compaction trains on every acknowledged event before its ``as_of``; the
batch's manifest keeps the watermark, so the online service replays exactly the records the
batch's data does not hold. A rerun after a crash rewrites the same part names: nothing twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ONLINE_EVENTS = "events.online"  # the dataset's directory of compacted online events
WATERMARK = "_watermark.json"
DEFAULT_STREAM = "userrep:events"


def default_log(batch_root: str | Path) -> Path:
    """Where the online service logs writes for the batches under ``batch_root`` (WORK/online/)."""
    return Path(batch_root).resolve().parent / "online" / "events.jsonl"


class FileLog:
    """JSON lines in one file; position = byte offset after a record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.where = str(self.path.resolve())

    def append(self, record: dict) -> None:
        """Durable before acknowledged: written, flushed and fsynced."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self, after=None):
        """(position, record) of every complete record after ``after`` (None: all); a torn last
        line (a crash mid-append, never acknowledged) is skipped."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            offset = int(after or 0)
            fh.seek(offset)
            for line in fh:
                offset += len(line)
                if line.endswith(b"\n") and line.strip():
                    yield offset, json.loads(line)

    @staticmethod
    def key(position) -> tuple:
        return (int(position or 0),)


class RedisStreamLog:
    """One Redis stream; position = entry id ("ms-seq")."""

    def __init__(self, url: str):
        import redis

        parsed = urlparse(url)
        password = parse_qs(parsed.query).get("password", [None])[0] or os.environ.get("REDIS_PASSWORD")
        if not password and os.environ.get("REDIS_PASSWORD_FILE"):  # a mounted Kubernetes Secret
            password = Path(os.environ["REDIS_PASSWORD_FILE"]).read_text().strip()
        self.stream = parsed.path.lstrip("/") or DEFAULT_STREAM
        self.client = redis.Redis(host=parsed.hostname or "127.0.0.1", port=parsed.port or 6379, password=password)
        self.where = f"redis://{parsed.hostname}:{parsed.port or 6379}/{self.stream}"

    def append(self, record: dict) -> None:
        self.client.xadd(self.stream, {"record": json.dumps(record)})

    def read(self, after=None, batch: int = 1000):
        start = "-" if after is None else f"({after}"
        while True:
            entries = self.client.xrange(self.stream, min=start, max="+", count=batch)
            for entry_id, fields in entries:
                yield entry_id.decode(), json.loads(fields[b"record"])
            if len(entries) < batch:
                return
            start = f"({entries[-1][0].decode()}"

    @staticmethod
    def key(position) -> tuple:
        if position is None:
            return (0, 0)
        ms, _, seq = str(position).partition("-")
        return int(ms), int(seq or 0)


def open_log(where: str | Path) -> FileLog | RedisStreamLog:
    """A file path, or ``redis://HOST:PORT[/STREAM][?password=...]``."""
    return RedisStreamLog(str(where)) if str(where).startswith("redis://") else FileLog(where)


def covered(log, position, watermark) -> bool:
    """Whether the record at ``position`` lies within ``watermark`` (compacted into the data)."""
    return watermark is not None and log.key(position) <= log.key(watermark)


def watermark(data: str | Path):
    """Log position up to which the dataset holds the logged events (None: none compacted)."""
    path = Path(data) / ONLINE_EVENTS / WATERMARK
    return json.loads(path.read_text())["position"] if path.exists() else None


def compact(log: str | Path | FileLog | RedisStreamLog, data: str | Path) -> dict:
    """Append the events logged since the dataset's watermark to ``DATA/events.online/``."""
    log = log if isinstance(log, (FileLog, RedisStreamLog)) else open_log(log)
    data = Path(data)
    start = watermark(data)
    rows, end = [], start
    for end, record in log.read(start):
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
    return {"events": len(rows), "parts": parts, "from": start, "to": end}


def part_files(data: str | Path) -> list[Path]:
    """The compacted parts of a dataset, in a stable order."""
    return sorted((Path(data) / ONLINE_EVENTS).glob("day=*/part-*.parquet"))
