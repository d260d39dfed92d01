"""Out-of-core encoders and point-in-time features: events split by user hash, one partition per task.

A dataset directory is validated as it streams (``load_dataset(keep=...)``) and every batch's
events before ``as_of`` go straight to partition files: partition ``p`` holds every event and
every users-table row of the users with ``hash(user_id) % n == p``. Nothing needs the whole
table after that:

- the collaborative encoder is fitted on the (users x items) play matrix, whose rows depend on
  one user's events each: each partition's rows, put in user-id order, equal the matrix of the
  whole table (``partition_interactions``);
- once the ``FeatureSpace`` is fitted, a user's features depend on that user's events and
  sign-up row only, so each partition is turned into feature rows by the same
  ``build_user_features`` as the in-memory path, in one bounded-memory task: a loop in this
  process, or Ray Data tasks reading and writing shared storage (one box or a cluster). The rows
  are put back in user-id order into one memory-mapped matrix.

The results equal ``fit_feature_space`` + ``build_user_features`` on the loaded dataset bit for
bit, while memory follows a partition (and the play matrix), not the events table.

Layout under the work directory (removed by the caller when done):

    events/part-00000.parquet ...    events before as_of of the partition's users
    users/part-00000.parquet ...     the partition's users-table rows (when the dataset has users)
    features/part-00000.npy, part-00000.ids.npy   each partition's rows and their user ids
    features.npy                     the assembled matrix, rows in user-id order
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from userrep.data import EVENT_COLUMNS, EVENT_SCHEMA, Dataset, load_dataset, table_path
from userrep.encoders import user_item_matrix
from userrep.features import FeatureConfig, FeatureSpace, UserFeatures, fit_feature_space, to_utc
from userrep.featurize import build_user_features

# A task's memory follows its partition, not the dataset: 100k users in 7 partitions of ~1.9M
# events never raised the step above the encoder fit's peak (2.4 GB with the dataset loaded).
EVENTS_PER_PARTITION = 2_000_000


def partition_count(n_events: int) -> int:
    return max(1, math.ceil(n_events / EVENTS_PER_PARTITION))


def user_partition(user_ids, partitions: int) -> np.ndarray:
    """The partition of each user id: a keyed SipHash of the id (the same in every process and
    on every machine, unlike Python's salted ``hash``), modulo ``partitions``."""
    ids = np.asarray(
        user_ids.to_numpy(zero_copy_only=False) if isinstance(user_ids, (pa.Array, pa.ChunkedArray)) else user_ids,
        dtype=object,
    )
    return (pd.util.hash_array(ids, categorize=False) % np.uint64(partitions)).astype(np.int64)


class _Splitter:
    """A ``load_dataset`` ``keep``: appends each batch's events before ``as_of`` to their users'
    partition files and holds none of them."""

    def __init__(self, as_of, partitions: int, directory: Path):
        self.cutoff = pa.scalar(to_utc(as_of), pa.timestamp("us", tz="UTC"))
        self.partitions, self.directory = partitions, directory
        self.writers: dict[int, pq.ParquetWriter] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: pa.Table) -> None:
        self.write(batch.filter(pc.less(batch.column("ts"), self.cutoff)))

    def write(self, table: pa.Table) -> None:
        part = user_partition(table.column("user_id"), self.partitions)
        order = np.argsort(part, kind="stable")  # stable: a user's events keep their order
        table, part = table.take(pa.array(order)), part[order]
        bounds = np.searchsorted(part, np.arange(self.partitions + 1))
        for p in range(self.partitions):
            if bounds[p + 1] > bounds[p]:
                if p not in self.writers:
                    self.writers[p] = pq.ParquetWriter(self.directory / f"part-{p:05d}.parquet", table.schema)
                self.writers[p].write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]))

    def close(self, schema: pa.Schema) -> None:
        for writer in self.writers.values():
            writer.close()
        for p in set(range(self.partitions)) - set(self.writers):  # an empty file where no user fell
            pq.write_table(schema.empty_table(), self.directory / f"part-{p:05d}.parquet")


def event_rows(directory: Path) -> int:
    """Rows of a dataset's events (file and compacted online parts), without reading them: parquet
    footers, or the lines of a CSV file."""
    from userrep.eventlog import part_files

    path = table_path(directory, "events")
    try:
        if path is None:
            rows = 0
        elif path.suffix == ".parquet":
            rows = pq.read_metadata(path).num_rows
        else:
            with open(path, "rb") as fh:
                rows = max(0, sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b"")) - 1)
        return rows + sum(pq.read_metadata(p).num_rows for p in part_files(directory))
    except (pa.ArrowInvalid, OSError):  # an unreadable file: ``load_dataset`` reports it, naming the file
        return 0


def split_dataset(
    source: Dataset | str | Path, as_of, work: Path, partitions: int | None = None
) -> tuple[Dataset, int]:
    """Write the events before ``as_of`` and the users table under ``work``, split by user hash.

    ``source``: a dataset directory, streamed (validated batch by batch, its events never held),
    or a loaded ``Dataset``. Returns the dataset without its events (the catalog, users and
    pairs: what the encoders read besides the events) and the number of partitions.
    """
    work = Path(work)
    rows = source.events.num_rows if isinstance(source, Dataset) else event_rows(Path(source))
    partitions = partitions or partition_count(rows)
    splitter = _Splitter(as_of, partitions, work / "events")
    try:
        if isinstance(source, Dataset):
            ds = replace(source, events=EVENT_SCHEMA.empty_table())
            for batch in source.events.select(EVENT_COLUMNS).to_batches(1 << 20):
                splitter(pa.Table.from_batches([batch]))
        else:
            ds = load_dataset(source, keep=splitter)
    finally:
        splitter.close(EVENT_SCHEMA)
    if ds.users is not None:
        users = _Splitter(as_of, partitions, work / "users")
        for batch in ds.users.to_batches(1 << 20):
            users.write(pa.Table.from_batches([batch], ds.users.schema))
        users.close(ds.users.schema)
    return ds, partitions


def _read_part(work: Path, kind: str, p: int) -> pa.Table | None:
    path = work / kind / f"part-{p:05d}.parquet"
    return pq.read_table(path) if path.exists() else None


def partition_interactions(work: Path, partitions: int, items: pa.Table) -> tuple[np.ndarray, sp.csr_matrix]:
    """``user_item_matrix`` of every partition's events, stacked in user-id order: equal to the
    matrix of the whole table, with one partition's events in memory at a time."""
    parts = []
    for p in range(partitions):  # each partition's rows, kept as its CSR arrays (not its events)
        users, matrix = user_item_matrix(_read_part(work, "events", p), items)
        parts.append((users, matrix.indptr, matrix.indices, matrix.data))
    ids = np.concatenate([part[0] for part in parts]) if parts else np.array([], object)
    order = np.argsort(ids, kind="stable")
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    lengths = np.concatenate([np.diff(part[1]) for part in parts]) if parts else np.array([], np.int64)
    indptr = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths[order], out=indptr[1:])
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.float64)
    start = 0
    for users, part_indptr, part_indices, part_data in parts:
        rows = position[start : start + len(users)]
        start += len(users)
        # each local row's values go to its global row's slot, in the same order
        to = np.repeat(indptr[rows] - part_indptr[:-1], np.diff(part_indptr)) + np.arange(len(part_data))
        indices[to], data[to] = part_indices, part_data
    parts.clear()
    return ids[order], sp.csr_matrix((data, indices, indptr), shape=(len(ids), items.num_rows))


def partition_features(task: dict) -> dict:
    """One partition's feature rows (a task: paths in, paths out, so it runs anywhere the work
    directory is mounted)."""
    work, p = Path(task["work"]), int(task["part"])
    name = f"part-{p:05d}"
    no_items = pa.table({"item_id": pa.array([], pa.string())})  # the features never read the catalog
    ds = Dataset(work, events=_read_part(work, "events", p), items=no_items, users=_read_part(work, "users", p))
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
        partition_features, num_cpus=cpus_per_worker(workers), concurrency=workers
    ).materialize()


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
        rows = position[start : start + len(part_ids)]
        matrix[rows] = np.load(work / "features" / f"{name}.npy")  # one partition in memory at a time
        start += len(part_ids)
    matrix.flush()
    del matrix
    return all_ids[order], path


def partitioned_features(work: Path, partitions: int, as_of, space_dir: Path, workers: int = 0) -> UserFeatures:
    """``build_user_features(ds, as_of, space)`` for every user, from the partitions ``split_dataset``
    wrote under ``work``, computed partition by partition.

    ``space_dir``: the saved FeatureSpace the tasks load. The matrix is memory-mapped from
    ``work/features.npy``; the caller removes ``work`` once done with it.
    """
    work = Path(work)
    space = FeatureSpace.load(space_dir)
    tasks = [
        {"work": str(work), "part": p, "as_of": to_utc(as_of).isoformat(), "space": str(space_dir)}
        for p in range(partitions)
    ]
    _run(tasks, workers)
    user_ids, path = _assemble(work, partitions, space.schema.n_features)
    duplicated = pd.Index(user_ids).duplicated()
    if duplicated.any():  # a hash that sent one user to two partitions would double its row
        raise RuntimeError(f"user {user_ids[duplicated][0]!r} fell in two partitions")
    return UserFeatures(user_ids, np.load(path, mmap_mode="r"), space.schema)


def partitioned_snapshot(
    source: Dataset | str | Path,
    as_of,
    config: FeatureConfig,
    space_dir: Path,
    work: Path,
    partitions: int | None = None,
    workers: int = 0,
    anchor: FeatureSpace | None = None,
) -> tuple[FeatureSpace, UserFeatures]:
    """The encoders and every user's features as of ``as_of``, without holding the events: the
    dataset is split into user partitions under ``work`` as it is read, the encoders are fitted
    on the partitions' user x item matrix, and the features computed partition by partition.
    Equal to ``fit_feature_space`` + ``build_user_features`` on the whole dataset (tested).
    ``anchor``: see ``fit_feature_space``. The space is saved to ``space_dir``; the caller removes ``work`` once done with the matrix.
    """
    ds, partitions = split_dataset(source, as_of, work, partitions)
    space = fit_feature_space(
        ds, as_of, config, interactions=partition_interactions(work, partitions, ds.items), anchor=anchor
    )
    space.save(space_dir)
    return space, partitioned_features(work, partitions, as_of, space_dir, workers)
