"""Feast: the offline snapshots training sets come from, and the online store serving reads.

Layout of a Feast home (default ``work/feast``; the Feast repo path, so the relative paths in
``feature_repo/data_sources.py`` resolve here):

    data/user_history.parquet   window features, one row per (user, snapshot)
    data/user_profile.parquet   onboarding + demographics, one row per (user, snapshot)
    data/user_embedding.parquet embeddings of every batch, keyed by (user_id, batch_id)
    data/user_artist_history.parquet  each user's plays of a batch's candidate artists, same keys
    snapshots/SPACE_ID/         the encoders (FeatureSpace) a snapshot's vectors were computed with
    registry.db, online.db      Feast registry and SQLite online store (Redis with the redis profile)

A snapshot's vector features live in the basis of its own encoder fit, so every row carries
``space_id`` and readers check it instead of trusting the point-in-time join to pick the right
snapshot.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from userrep.data import Dataset
from userrep.features import PROFILE_GROUPS, FeatureConfig, FeatureSpace, UserFeatures, to_utc
from userrep.fsio import data_fingerprint
from userrep.onlinestore import event_times, list_column, write_online
from userrep.partitions import partitioned_snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreConfig:
    home: Path = Path("work/feast")
    online: str = "sqlite"  # "sqlite" (embedded default) or "redis" (production profile)
    redis: str = "127.0.0.1:6379"  # Feast connection string: host:port[,password=...]
    # "duckdb": point-in-time joins in DuckDB (0.3 s for 20k users x 500 features); "file": Feast's
    # dask store (37 s for the same, and it drops entity rows older than the first feature row).
    offline: str = "duckdb"

    def __post_init__(self):
        if self.online not in ("sqlite", "redis"):
            raise ValueError(f"online: expected 'sqlite' or 'redis', got {self.online!r}")
        if self.offline not in ("duckdb", "file"):
            raise ValueError(f"offline: expected 'duckdb' or 'file', got {self.offline!r}")


def store_config(home: str | Path, online: str = "sqlite", redis: str = "127.0.0.1:6379") -> StoreConfig:
    """A StoreConfig from flat settings (CLI, pipeline parameters); the Redis password comes from
    ``REDIS_PASSWORD`` or the file named by ``REDIS_PASSWORD_FILE`` (a mounted Kubernetes Secret),
    never from a parameter."""
    password = os.environ.get("REDIS_PASSWORD")
    if not password and os.environ.get("REDIS_PASSWORD_FILE"):  # a mounted Secret (preferred on Kubernetes)
        password = Path(os.environ["REDIS_PASSWORD_FILE"]).read_text().strip()
    if online == "redis" and password and "password=" not in redis:
        redis = f"{redis},password={password}"
    return StoreConfig(home=Path(home), online=online, redis=redis)


@dataclass(frozen=True)
class Snapshot:
    space_id: str
    as_of: pd.Timestamp
    space_dir: Path
    user_ids: np.ndarray


def import_feast():
    """``import feast`` with typeguard's ``@typechecked`` as a no-op while it runs.

    Feast decorates its classes with typeguard's ``@typechecked``, which re-parses and recompiles
    each of their methods at import: 6 of the 12 s ``import feast`` took here (cProfile of the
    import), paid again by every pipeline step and server process that opens the store. typeguard
    documents the decorator as meant to be off in production (a no-op under ``python -O``): they
    are feast's development-time argument checks, not its behaviour. Only this import is
    affected; the decorator is restored after it (bench/startup.py measures both)."""
    if "feast" in sys.modules:
        return sys.modules["feast"]
    import typeguard

    checked = typeguard.typechecked
    typeguard.typechecked = _unchecked
    try:
        import feast
    finally:
        typeguard.typechecked = checked
    return feast


def _unchecked(target=None, **_options):
    return target if target is not None else (lambda decorated: decorated)


def repo_config(config: StoreConfig):
    import_feast()
    from feast.repo_config import RepoConfig

    home = Path(config.home).resolve()
    online = (
        {"type": "sqlite", "path": str(home / "online.db")}
        if config.online == "sqlite"
        else {"type": "redis", "connection_string": config.redis}
    )
    return RepoConfig(
        project="userrep",
        provider="local",
        registry=str(home / "registry.db"),
        online_store=online,
        offline_store={"type": config.offline},
        entity_key_serialization_version=3,
        repo_path=home,
    )


def definitions(home: Path) -> list:
    """Every object of the feature repo (what `feast apply` registers), file paths under ``home``.

    Copies, so the package's declarations stay untouched: the DuckDB offline store reads a
    relative path from the process's working directory, not the repo path, so the registered
    sources carry absolute paths.
    """
    FileSource = import_feast().FileSource

    from feature_repo import data_sources, entities, feature_services, features

    objects = copy.deepcopy(
        [  # one deepcopy: views keep pointing at the (copied) sources in this list
            entities.user,
            entities.batch,
            data_sources.user_history_source,
            data_sources.user_profile_source,
            data_sources.user_embedding_source,
            data_sources.user_artist_history_source,
            data_sources.user_history_push,
            data_sources.user_embedding_push,
            data_sources.user_artist_history_push,
            features.user_history,
            features.user_profile,
            features.user_embedding,
            features.user_artist_history,
            feature_services.training_features,
        ]
    )
    for obj in objects:
        if isinstance(obj, FileSource) and not Path(obj.path).is_absolute():
            obj.file_options.uri = str(Path(home).resolve() / obj.path)
    return objects


def open_store(config: StoreConfig, apply: bool = True):
    """A FeatureStore on the home dir; ``apply`` registers the definitions (idempotent)."""
    FeatureStore = import_feast().FeatureStore

    home = Path(config.home)
    (home / "data").mkdir(parents=True, exist_ok=True)
    store = FeatureStore(config=repo_config(config))
    if apply:
        store.apply(definitions(home))
    return store


def space_id(fingerprint: dict, as_of: pd.Timestamp, config: FeatureConfig, anchor: str | None = None) -> str:
    """A snapshot's id: its data, time and settings, and the batch whose space it continues."""
    key = {"data": fingerprint, "as_of": as_of.isoformat(), "features": asdict(config)}
    text = json.dumps(key if anchor is None else {**key, "anchor": anchor}, sort_keys=True)
    return f"{as_of:%Y%m%d}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def materialize(
    data: str | Path | Dataset,
    as_of,
    config: StoreConfig = StoreConfig(),
    features: FeatureConfig = FeatureConfig(),
    store=None,
    workers: int = 0,
    anchor: str | Path | None = None,
) -> Snapshot:
    """Fit encoders as of ``as_of``, write the snapshot's offline rows, apply, load them online.

    The features are computed partition by partition (``userrep.partitions``; Ray Data tasks
    when ``workers`` > 0, in a Ray session the caller holds). ``anchor``: the directory of the
    batch whose space this snapshot continues (its encoders' item vectors are aligned onto it).
    """

    as_of = to_utc(as_of)
    path = data.path if isinstance(data, Dataset) else Path(data)
    anchor_space = None
    if anchor is not None:
        from userrep.batch.layout import BatchDir, read_manifest

        anchor_space = FeatureSpace.load(BatchDir(anchor).encoders)
    sid = space_id(data_fingerprint(path), as_of, features, read_manifest(anchor)["batch_id"] if anchor else None)
    home = Path(config.home)
    (home / "data").mkdir(parents=True, exist_ok=True)
    space_dir = home / "snapshots" / sid
    # A directory is streamed into user partitions, never held (``userrep.partitions``).
    _, user_features = partitioned_snapshot(
        data, as_of, features, space_dir, space_dir / "partitions", workers=workers, anchor=anchor_space
    )
    np.save(space_dir / "users.npy", user_features.user_ids.astype(str))
    (space_dir / "snapshot.json").write_text(
        json.dumps({"space_id": sid, "as_of": as_of.isoformat(), "users": len(user_features.user_ids)})
    )
    store = store or open_store(config)
    # The snapshot's rows, offline and online (what ``store.materialize`` over [as_of - 1s,
    # as_of + 1s] loads), a chunk of users at a time: Feast's materialize held the whole snapshot
    # as pandas and protos at once (the 100k-user step peaked at 5.4 GB with it, 2.5 GB without),
    # and the whole snapshot as arrow was 2 GB at 250k users (bench/scale.py).
    views = ("user_history", "user_profile")
    with contextlib.ExitStack() as files:
        appends = [
            files.enter_context(_upserting(home / "data" / f"{view}.parquet", "space_id", sid)) for view in views
        ]
        for start in range(0, len(user_features.user_ids), OFFLINE_CHUNK):
            frames = offline_frames(user_features.rows(slice(start, start + OFFLINE_CHUNK)), sid, as_of)
            for view, table, append in zip(views, frames, appends):
                write_online(store, view, table)
                append(table)
    shutil.rmtree(space_dir / "partitions")
    log.info(
        f"materialized snapshot {sid}: {len(user_features.user_ids)} users as of {as_of.isoformat()} "
        f"-> {home / 'data'} and the {config.online} online store"
    )
    return Snapshot(sid, as_of, space_dir, user_features.user_ids)


def load_snapshot(config: StoreConfig, sid: str) -> Snapshot:
    """A snapshot materialized earlier (by another process or pipeline step)."""
    space_dir = Path(config.home) / "snapshots" / sid
    if not (space_dir / "snapshot.json").exists():
        known = sorted(p.name for p in (Path(config.home) / "snapshots").glob("*")) if space_dir.parent.exists() else []
        raise ValueError(f"snapshot_id: no snapshot {sid!r} in {config.home} (known: {known or 'none'})")
    meta = json.loads((space_dir / "snapshot.json").read_text())
    return Snapshot(sid, to_utc(meta["as_of"]), space_dir, np.load(space_dir / "users.npy").astype(object))


def offline_frames(features: UserFeatures, sid: str, as_of) -> tuple[pa.Table, pa.Table]:
    """Arrow tables for the history view (all history groups packed) and the profile view; ``as_of``:
    one time, or one per user."""
    slices = features.schema.slices()
    now = pd.Timestamp(datetime.now(UTC))
    n = len(features.user_ids)
    history = [slices[g] for g in features.schema.history_groups()]

    def table(columns: dict[str, np.ndarray]) -> pa.Table:
        return pa.table(
            {
                "user_id": pa.array(features.user_ids, pa.string()),
                "event_timestamp": event_times(as_of, n),
                "created": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                "space_id": pa.array([sid] * n, pa.string()),
                **{name: list_column(block) for name, block in columns.items()},
            }
        )

    def block(group: str) -> np.ndarray:
        return features.matrix[:, slices[group]] if group in slices else np.zeros((n, 0), np.float32)

    return (
        table({"history": np.hstack([features.matrix[:, s] for s in history]) if history else block("none")}),
        table({g: block(g) for g in PROFILE_GROUPS}),
    )


def upsert_rows(path: Path, tables: pa.Table | Iterable[pa.Table], key: str, value: str) -> None:
    """Replace the rows of one snapshot/batch in an offline table with ``tables`` (none: remove them)."""
    with _upserting(path, key, value) as append:
        for table in [tables] if isinstance(tables, pa.Table) else tables:
            append(table)


@contextlib.contextmanager
def _upserting(path: Path, key: str, value: str):
    """Replace the rows of one snapshot/batch in an offline table (write-then-rename), streamed:
    the old rows are copied a row group at a time without ``value``'s; the caller appends the new
    ones through the function this yields. An error leaves the table as it was."""
    tmp = path.with_suffix(".parquet.tmp")
    writer: pq.ParquetWriter | None = None

    def append(table: pa.Table) -> None:
        nonlocal writer
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table.select(writer.schema.names).cast(writer.schema))

    try:
        if path.exists():
            old = pq.ParquetFile(path)
            writer = pq.ParquetWriter(tmp, old.schema_arrow)
            for group in range(old.num_row_groups):
                rows = old.read_row_group(group)
                rows = rows.filter(pa.compute.not_equal(rows.column(key), value))
                if rows.num_rows:
                    writer.write_table(rows)
        yield append
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)


def historical_features(store, entity_df: pd.DataFrame, features) -> tuple[pd.DataFrame, int]:
    """``get_historical_features`` that returns every entity row, in order.

    Feast's file offline store silently drops entity rows whose timestamp precedes the entity's
    first feature row. Each row gets an id and is left-merged back: a dropped row comes back with
    nulls, and the number of such rows is returned so callers decide instead of losing users.
    """
    entity_df = entity_df.reset_index(drop=True).assign(_row=np.arange(len(entity_df)))
    got = store.get_historical_features(entity_df=entity_df, features=features, full_feature_names=True).to_df()
    values = got.drop(columns=[c for c in entity_df.columns if c != "_row"]).drop_duplicates("_row")
    merged = entity_df.merge(values, on="_row", how="left", validate="one_to_one").sort_values("_row")
    return merged.drop(columns="_row").reset_index(drop=True), int(len(entity_df) - len(values))


OFFLINE_CHUNK = 50_000  # users per offline/online write of a snapshot
TRAINING_CHUNK = 50_000  # users per point-in-time join: Feast returns every value as a Python object


def training_set(store, snapshot: Snapshot, space: FeatureSpace, user_ids) -> UserFeatures:
    """The snapshot's feature matrix for ``user_ids`` via point-in-time joins, checked; one join
    per ``TRAINING_CHUNK`` users, so memory is bounded by a chunk's frame (100k users in one
    join took 2.7 GB) plus the float32 matrix."""
    user_ids = np.asarray(user_ids, dtype=object)
    matrix = np.empty((len(user_ids), space.schema.n_features), np.float32)
    service = store.get_feature_service("training_features")
    for start in range(0, len(user_ids), TRAINING_CHUNK):
        rows = slice(start, start + TRAINING_CHUNK)
        matrix[rows] = _training_rows(store, service, snapshot, space.schema, user_ids[rows])
    return UserFeatures(user_ids, matrix, space.schema)


def _training_rows(store, service, snapshot: Snapshot, schema, user_ids: np.ndarray) -> np.ndarray:
    entity_df = pd.DataFrame({"user_id": list(user_ids), "event_timestamp": snapshot.as_of})
    frame, dropped = historical_features(store, entity_df, service)
    missing = frame["user_history__space_id"].isna() | frame["user_profile__space_id"].isna()
    if missing.any():
        first = ", ".join(map(str, frame.loc[missing, "user_id"].head(5)))
        raise ValueError(
            f"user_id: no feature row at {snapshot.as_of.isoformat()} for {int(missing.sum())} of "
            f"{len(frame)} users (e.g. {first}); {dropped} were dropped by Feast and restored as empty"
        )
    wrong = (frame["user_history__space_id"] != snapshot.space_id) | (
        frame["user_profile__space_id"] != snapshot.space_id
    )
    if wrong.any():
        raise ValueError(f"space_id: {int(wrong.sum())} rows come from another snapshot than {snapshot.space_id}")
    n_history = sum(size for name, size in schema.groups if name in schema.history_groups())
    packed = {"history": _stack(frame["user_history__history"], n_history, "history")}
    offset, blocks = 0, []
    for group, size in schema.groups:
        if group in PROFILE_GROUPS:
            blocks.append(_stack(frame[f"user_profile__{group}"], size, group))
        else:
            blocks.append(packed["history"][:, offset : offset + size])
            offset += size
    if list(frame["user_id"]) != list(user_ids):
        raise RuntimeError("user_id: the point-in-time join returned the users in another order")
    return np.hstack(blocks)


def _stack(column: pd.Series, size: int, name: str) -> np.ndarray:
    lengths = column.map(len)
    if (lengths != size).any():
        raise ValueError(
            f"{name}: expected {size} values per user, got {sorted(set(lengths))[:5]} "
            f"(snapshot written with another feature config?)"
        )
    return np.stack(column.to_numpy()).astype(np.float32) if size else np.zeros((len(column), 0), np.float32)
