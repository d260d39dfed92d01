"""Out-of-core point-in-time features: events split by user hash, one partition per task.

Once the ``FeatureSpace`` is fitted, a user's features depend on that user's events and sign-up
row only. Partition ``p`` therefore holds every event (before ``as_of``) and every users-table row
of the users with ``hash(user_id) % n == p``, and each partition is turned into feature rows by
the same ``build_user_features`` as the in-memory path, in one bounded-memory task: a loop in
this process, or Ray Data tasks reading and writing shared storage (one box or a cluster). The
rows are then put back in user-id order into one memory-mapped matrix, so the result equals
``build_user_features`` on the whole dataset row for row, while a task holds one partition.

Layout under the work directory (removed by the caller when done):

    events/part-00000.parquet ...    events before as_of of the partition's users
    users/part-00000.parquet ...     the partition's users-table rows (when the dataset has users)
    features/part-00000.npy, part-00000.ids.npy   each partition's rows and their user ids
    features.npy                     the assembled matrix, rows in user-id order
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userrep.data import Dataset
from userrep.features import FeatureSpace, UserFeatures, build_user_features, to_utc

# A task's memory follows its partition, not the dataset: 100k users in 7 partitions of ~1.9M
# events never raised the step above the encoder fit's peak (2.4 GB with the dataset loaded).
EVENTS_PER_PARTITION = 2_000_000
_EVENT_COLUMNS = ["user_id", "item_id", "ts", "weight"]
_NO_ITEMS = pa.table({"item_id": pa.array([], pa.string())})  # the features never read the catalog


def partition_count(n_events: int) -> int:
    return max(1, math.ceil(n_events / EVENTS_PER_PARTITION))


def user_partition(user_ids, partitions: int) -> np.ndarray:
    """The partition of each user id: a keyed SipHash of the id (the same in every process and
    on every machine, unlike Python's salted ``hash``), modulo ``partitions``."""
    ids = np.asarray(user_ids.to_numpy(zero_copy_only=False) if isinstance(user_ids, (pa.Array, pa.ChunkedArray))
                     else user_ids, dtype=object)
    return (pd.util.hash_array(ids, categorize=False) % np.uint64(partitions)).astype(np.int64)


def _split(table: pa.Table, partitions: int, writers: dict, directory: Path) -> None:
    """Append each partition's rows of ``table`` to that partition's file."""
    part = user_partition(table.column("user_id"), partitions)
    order = np.argsort(part, kind="stable")
    table, part = table.take(pa.array(order)), part[order]
    bounds = np.searchsorted(part, np.arange(partitions + 1))
    for p in range(partitions):
        if bounds[p + 1] > bounds[p]:
            if p not in writers:
                writers[p] = pq.ParquetWriter(directory / f"part-{p:05d}.parquet", table.schema)
            writers[p].write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]))


def _write_partitions(batches, partitions: int, directory: Path, schema: pa.Schema) -> None:
    """Stream ``batches`` into one parquet file per partition (an empty file where none fell)."""
    directory.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for batch in batches:
            _split(pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch,
                   partitions, writers, directory)
    finally:
        for writer in writers.values():
            writer.close()
    for p in set(range(partitions)) - set(writers):
        pq.write_table(schema.empty_table(), directory / f"part-{p:05d}.parquet")


def partition_dataset(ds: Dataset, as_of, work: Path, partitions: int, batch_rows: int = 1 << 20) -> None:
    """Write the events before ``as_of`` and the users table, split by user hash, under ``work``."""
    cutoff = pa.scalar(to_utc(as_of), pa.timestamp("us", tz="UTC"))
    events = ds.events.select(_EVENT_COLUMNS)
    _write_partitions((b.filter(pc.less(b.column("ts"), cutoff)) for b in events.to_batches(batch_rows)),
                      partitions, work / "events", events.schema)
    if ds.users is not None:
        _write_partitions(ds.users.to_batches(batch_rows), partitions, work / "users", ds.users.schema)


def partition_features(task: dict) -> dict:
    """One partition's feature rows (a task: paths in, paths out, so it runs anywhere the work
    directory is mounted)."""
    work, p = Path(task["work"]), int(task["part"])
    name = f"part-{p:05d}"
    users_file = work / "users" / f"{name}.parquet"
    ds = Dataset(work, events=pq.read_table(work / "events" / f"{name}.parquet"), items=_NO_ITEMS,
                 users=pq.read_table(users_file) if users_file.exists() else None)
    features = build_user_features(ds, task["as_of"], FeatureSpace.load(task["space"]))
    out = work / "features"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{name}.npy", features.matrix)
    np.save(out / f"{name}.ids.npy", features.user_ids.astype(str))
    return {"part": p, "users": len(features.user_ids)}


def _run(tasks: list[dict], workers: int) -> None:
    if not workers:
        for task in tasks:
            partition_features(task)
        return
    import ray.data

    from userrep.raylocal import cpus_per_worker

    # One task per partition, at most ``workers`` at a time; the results are files on shared storage.
    ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
        partition_features, num_cpus=cpus_per_worker(workers), concurrency=workers).materialize()


def _assemble(work: Path, partitions: int, n_features: int) -> tuple[np.ndarray, Path]:
    """Every partition's rows, in user-id order, into one memory-mapped ``features.npy``."""
    names = [f"part-{p:05d}" for p in range(partitions)]
    ids = [np.load(work / "features" / f"{name}.ids.npy").astype(object) for name in names]
    all_ids = np.concatenate(ids) if ids else np.array([], object)
    order = np.argsort(all_ids, kind="stable")  # the order np.unique gives the in-memory path
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    path = work / "features.npy"
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(all_ids), n_features))
    start = 0
    for name, part_ids in zip(names, ids):
        rows = position[start:start + len(part_ids)]
        matrix[rows] = np.load(work / "features" / f"{name}.npy")  # one partition in memory at a time
        start += len(part_ids)
    matrix.flush()
    del matrix
    return all_ids[order], path


def partitioned_features(ds: Dataset, as_of, space_dir: Path, work: Path, partitions: int | None = None,
                         workers: int = 0) -> UserFeatures:
    """``build_user_features(ds, as_of, space)`` for every user, computed partition by partition.

    ``space_dir``: the saved FeatureSpace the tasks load. The matrix is memory-mapped from
    ``work/features.npy``; the caller removes ``work`` once done with it.
    """
    work = Path(work)
    partitions = partitions or partition_count(ds.events.num_rows)
    space = FeatureSpace.load(space_dir)
    partition_dataset(ds, as_of, work, partitions)
    tasks = [{"work": str(work), "part": p, "as_of": to_utc(as_of).isoformat(), "space": str(space_dir)}
             for p in range(partitions)]
    _run(tasks, workers)
    user_ids, path = _assemble(work, partitions, space.schema.n_features)
    duplicated = pd.Index(user_ids).duplicated()
    if duplicated.any():  # a hash that sent one user to two partitions would double its row
        raise RuntimeError(f"user {user_ids[duplicated][0]!r} fell in two partitions")
    return UserFeatures(user_ids, np.load(path, mmap_mode="r"), space.schema)
