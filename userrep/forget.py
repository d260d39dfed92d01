"""The right to erasure: ``userrep users forget ID...`` removes users from every store that holds them.

In this order, each step idempotent, so a run that died is finished by running it again:

1. **The record** (``userrep.erasure``): each id's sha256 and the time, in the dataset's
   ``erasures.json`` and in the event log. From then on no reader of either sees the users: a
   batch built later (``load_dataset``), a compaction, a bootstrap replay after a restart, a
   consumer; and the service refuses their writes (HTTP 410).
2. **The event log**: every batch's state of the users; the records naming only them. SQLite
   rewrites shared records in place. A Redis stream entry cannot be rewritten: an entry shared
   with other users' events stays until retention trims it (``records_left``), unread.
3. **The dataset**: the events file, the compacted online parts, users and pairs, each file that
   names a user rewritten without those rows (write, then rename).
4. **Every batch** under the root, under the pointer lock (a promotion never checks half-rewritten
   files): ``embeddings.parquet`` and ``features.parquet`` without the users, the neighbour index
   rebuilt from the kept embeddings, the hashes in the manifest and the similar-users record, and
   the manifest's ``erasures`` count, on which a serving replica reloads the batch.
5. **The Feast store**: the offline tables (every snapshot's and batch's rows), each snapshot's
   user list, and the online rows of every view: the users' own and under each batch id.

Not rewritten: trained weights (encoders, autoencoder, heads) hold no row of any one user; they
leave when a batch built after the erasure replaces theirs and ``userrep batch prune`` removes it.
The gate's reports show feature distributions of a 2,000-row sample and a projection of 1,000
users' embeddings, without ids.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from userrep.batch.layout import BatchDir, read_manifest
from userrep.batch.registry import pointer_lock
from userrep.data import table_path
from userrep.erasure import USER_COLUMNS, id_hash, naming, record_erasures, without_users
from userrep.eventlog import open_log, part_files
from userrep.fsio import sha256, write_json_atomic

log = logging.getLogger(__name__)


def rewrite_parquet(path: Path, users: set[str], columns) -> int:
    """Rewrite a parquet file without the rows naming ``users`` (a row group at a time); returns
    the rows removed. A file naming none of them is left as it is (its hash stays)."""
    source = pq.ParquetFile(path)
    if not {*columns} <= set(source.schema_arrow.names):
        return 0
    tmp = path.with_name(path.name + ".forget.tmp")
    removed = 0
    with pq.ParquetWriter(tmp, source.schema_arrow) as writer:
        for group in range(source.num_row_groups):
            rows = source.read_row_group(group)
            kept = without_users(rows, users, columns)
            removed += rows.num_rows - kept.num_rows
            if kept.num_rows:
                writer.write_table(kept)
        if source.num_row_groups == 0 or removed == source.metadata.num_rows:
            writer.write_table(source.schema_arrow.empty_table())
    if removed:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return removed


def rewrite_csv(path: Path, users: set[str], columns) -> int:
    """The same for a CSV table: other lines are copied as parsed (values unchanged)."""
    tmp = path.with_name(path.name + ".forget.tmp")
    removed = 0
    with open(path, newline="", encoding="utf-8") as src, open(tmp, "w", newline="", encoding="utf-8") as dst:
        reader, writer = csv.reader(src), csv.writer(dst, lineterminator="\n")
        header = next(reader, None)
        at = [header.index(c) for c in columns if header and c in header]
        if header is not None:
            writer.writerow(header)
        for row in reader:
            if any(i < len(row) and row[i].strip() in users for i in at):
                removed += 1
            else:
                writer.writerow(row)
    if removed:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return removed


def compacted_event_ids(data: Path, users: set[str]) -> list[str]:
    """The client event ids of ``users``' events in the dataset's compacted online parts."""
    found = []
    for part in part_files(data):
        rows = pq.read_table(part, columns=["user_id", "event_id"])
        found += [e for e in rows.filter(naming(rows, users, ["user_id"])).column("event_id").to_pylist() if e]
    return found


def forget_in_dataset(data: Path, users: set[str]) -> dict[str, int]:
    """Rows removed per file of the dataset (its tables and compacted online parts)."""
    removed = {}
    for name, columns in USER_COLUMNS.items():
        path = table_path(data, name)
        if path is not None:
            rewrite = rewrite_parquet if path.suffix == ".parquet" else rewrite_csv
            removed[path.name] = rewrite(path, users, columns)
    for part in part_files(data):
        removed[str(part.relative_to(data))] = rewrite_parquet(part, users, ["user_id"])
    return {name: n for name, n in removed.items() if n}


def forget_in_batch(directory: Path, users: set[str]) -> int:
    """Remove ``users`` from one batch's files; returns the embeddings removed."""
    import faiss

    from userrep.backfill import read_embeddings
    from userrep.tasks.similar_users import build_index

    files = BatchDir(directory)
    removed = {
        path.name: rewrite_parquet(path, users, ["user_id"])
        for path in (files.embeddings, files.features)
        if path.exists()
    }
    if not any(removed.values()):
        return 0
    if files.neighbour_index.exists():  # the index is rebuilt as the pipeline built it, from the kept rows
        ids, vectors, _ = read_embeddings(files.embeddings)
        faiss.write_index(build_index(vectors), str(files.neighbour_index))
        np.save(files.neighbour_ids, ids.astype(str))
        record_path = files.task_record("similar_users")
        if record_path.exists():
            record = json.loads(record_path.read_text())
            record["files"] = {name: sha256(files.downstream / name) for name in record["files"]}
            write_json_atomic(record_path, record)
    if files.manifest.exists():
        manifest = read_manifest(directory)
        manifest["files"] = {path.name: sha256(path) for path in files.hashed if path.name in manifest["files"]}
        manifest["users"] = pq.read_metadata(files.embeddings).num_rows
        manifest["erasures"] = manifest.get("erasures", 0) + 1  # last: a serving replica reloads on it
        write_json_atomic(files.manifest, manifest)
    return removed.get(files.embeddings.name, 0)


def batch_dirs(root: Path) -> list[Path]:
    """Every batch directory under ``root``, finished or not (one being removed is skipped)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def forget_in_store(config, users: set[str], batch_ids: set[str]) -> dict[str, int]:
    """Remove ``users`` from the Feast store: offline tables, snapshot user lists, online rows
    (their own views, and each batch's under every id in ``batch_ids`` or the offline tables)."""
    import pyarrow.compute as pc

    from userrep.onlinestore import delete_online
    from userrep.store import open_store

    home = Path(config.home)
    removed: dict[str, int] = {}
    for path in sorted((home / "data").glob("*.parquet")):
        if "batch_id" in pq.read_schema(path).names:
            batch_ids |= set(pc.unique(pq.read_table(path, columns=["batch_id"]).column("batch_id")).to_pylist())
        removed[f"data/{path.name}"] = rewrite_parquet(path, users, ["user_id"])
    for path in sorted((home / "snapshots").glob("*/users.npy")):
        ids = np.load(path).astype(object)
        kept = ~np.isin(ids, sorted(users))
        if not kept.all():
            tmp = path.with_name("users.forget.tmp.npy")
            np.save(tmp, ids[kept].astype(str))
            os.replace(tmp, path)
            removed[str(path.relative_to(home))] = int((~kept).sum())
    store = open_store(config, apply=False)
    delete_online(store, ["user_history", "user_profile"], sorted(users), "")
    for batch_id in sorted(batch_ids - {None}):
        delete_online(store, ["user_embedding", "user_artist_history"], sorted(users), batch_id)
    return {name: n for name, n in removed.items() if n}


def datasets_of(data: Path, root: Path | None) -> list[Path]:
    """``data`` and every other dataset a batch under ``root`` was built from (still there)."""
    found = {Path(data).resolve(): Path(data)}
    for directory in batch_dirs(Path(root)) if root is not None else []:
        if BatchDir(directory).manifest.exists():
            path = Path(read_manifest(directory)["data"]["path"])
            if path.is_dir():
                found.setdefault(path.resolve(), path)
    return list(found.values())


def forget(
    user_ids,
    data: Path,
    root: Path | None = None,
    store=None,
    events_log: str | None = None,
    lock_redis: str | None = None,
) -> dict:
    """Erase ``user_ids`` from the dataset ``data`` (and any other a batch was built from), the
    batches under ``root``, the Feast store (a ``StoreConfig``) and the event log (a file or
    ``redis://``); None skips one. Returns what was removed where."""
    users = {str(u).strip() for u in user_ids}
    if not users or "" in users:
        raise ValueError("user_id: give one or more non-empty user ids")
    if not Path(data).is_dir():
        raise ValueError(f"data: {data} is not a directory")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    hashes = {id_hash(u): now for u in users}
    datasets = datasets_of(Path(data), root)
    for path in datasets:  # the record first: from here on nothing reads the users back
        record_erasures(path, hashes)
    opened = open_log(events_log) if events_log is not None else None
    report: dict = {"users": len(users), "erased_at": now, "datasets": [str(p) for p in datasets]}
    if opened is not None:  # with the event ids of their compacted events (the log remembers ids for retries)
        opened.erase(hashes)
        report["log"] = opened.forget(users, [e for path in datasets for e in compacted_event_ids(path, users)])
    report["dataset"] = {f"{p}/{name}": n for p in datasets for name, n in forget_in_dataset(p, users).items()}
    batch_ids = set(opened.batches()) if opened is not None else set()
    if root is not None:
        with pointer_lock(root, lock_redis):
            directories = batch_dirs(Path(root))
            report["batches"] = {path.name: forget_in_batch(path, users) for path in directories}
        batch_ids |= {path.name for path in directories}
    if store is not None and Path(store.home).is_dir():
        report["feast"] = forget_in_store(store, users, batch_ids)
    log.info(f"erased {len(users)} user(s) from {len(datasets)} dataset(s), {len(report.get('batches', {}))} batch(es)")
    return report
