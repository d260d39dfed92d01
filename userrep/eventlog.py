"""The durable log of accepted online writes, and its compaction into the dataset a batch trains on.

The log is JSON lines (one record per committed write: ``{"kind": "events", "events": [...]}`` or
``{"kind": "user", ...}``), appended and fsynced before a write is acknowledged. A record's byte
offset is its position.

Compaction (``userrep events compact``, the training pipeline's first step) appends the logged
events to the dataset as parquet parts under ``DATA/events.online/`` (one part per compaction and
day, named by the log offset it starts at) and records how far it got in
``DATA/events.online/_watermark.json``. The loader reads the parts with the events table, so a
batch built after a compaction trains on every acknowledged event before its ``as_of``; the
batch's manifest keeps the watermark, so the online service replays exactly the log records the
batch's data does not hold. A rerun after a crash rewrites the same part names: nothing twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ONLINE_EVENTS = "events.online"  # the dataset's directory of compacted online events
WATERMARK = "_watermark.json"


def default_log(batch_root: str | Path) -> Path:
    """Where the online service logs writes for the batches under ``batch_root`` (WORK/online/)."""
    return Path(batch_root).resolve().parent / "online" / "events.jsonl"


def append(path: Path, record: dict) -> None:
    """Durable before acknowledged: written, flushed and fsynced."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read(path: Path | None, start: int = 0):
    """(offset, end, record) of every complete record from byte ``start`` on; a torn last line (a
    crash mid-append, never acknowledged) is skipped."""
    if path is None or not Path(path).exists():
        return
    with open(path, "rb") as fh:
        fh.seek(start)
        offset = start
        for line in fh:
            end = offset + len(line)
            if line.endswith(b"\n") and line.strip():
                yield offset, end, json.loads(line)
            offset = end


def watermark(data: str | Path) -> int:
    """Log offset up to which the dataset holds the logged events (0: none compacted)."""
    path = Path(data) / ONLINE_EVENTS / WATERMARK
    return json.loads(path.read_text())["offset"] if path.exists() else 0


def compact(log: str | Path, data: str | Path) -> dict:
    """Append the events logged since the dataset's watermark to ``DATA/events.online/``."""
    data, log = Path(data), Path(log)
    start = watermark(data)
    rows, end = [], start
    for _, end, record in read(log, start):
        if record["kind"] == "events":
            rows += record["events"]
    out = data / ONLINE_EVENTS
    out.mkdir(exist_ok=True)
    parts = []
    if rows:
        frame = pd.DataFrame(rows)
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
        # (a logged event without a weight counted once, as in the contract)
        frame["weight"] = pd.to_numeric(frame["weight"]).fillna(1.0).astype("float64") if "weight" in frame else 1.0
        if "event_id" not in frame:
            frame["event_id"] = None
        for day, part in frame.groupby(frame["ts"].dt.strftime("%Y-%m-%d")):
            directory = out / f"day={day}"
            directory.mkdir(exist_ok=True)
            table = pa.Table.from_pandas(part[["user_id", "item_id", "ts", "weight", "event_id"]], preserve_index=False)
            path = directory / f"part-{start:012d}.parquet"
            pq.write_table(table, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            parts.append(str(path.relative_to(data)))
    tmp = out / (WATERMARK + ".tmp")
    tmp.write_text(json.dumps({"offset": end, "log": str(log.resolve())}))
    os.replace(tmp, out / WATERMARK)
    return {"events": len(rows), "parts": parts, "from_offset": start, "to_offset": end}


def part_files(data: str | Path) -> list[Path]:
    """The compacted parts of a dataset, in a stable order."""
    return sorted((Path(data) / ONLINE_EVENTS).glob("day=*/part-*.parquet"))
