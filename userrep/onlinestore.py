"""Rows to and from the Feast online store: the user_embedding and user_artist_history views
(what serving reads), and the chunked writer every online write goes through."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from userrep.features import to_utc

EMBEDDING_FIELDS = ["user_embedding:embedding", "user_embedding:embedding_batch"]
HISTORY_FIELDS = [
    "user_artist_history:artists",
    "user_artist_history:plays",
    "user_artist_history:recent",
    "user_artist_history:history_batch",
]


def list_column(block: np.ndarray) -> pa.Array:
    """Rows of a 2-D array as one list<float32> column (what Feast's Array(Float32) reads)."""
    block = np.ascontiguousarray(block, np.float32)
    offsets = np.arange(len(block) + 1, dtype=np.int32) * block.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(block.ravel(), pa.float32()))


def event_times(as_of, n: int) -> pa.Array:
    """One timestamp per row: ``as_of`` is one time for all rows or a sequence of n (one per user)."""
    times = list(as_of) if isinstance(as_of, (list, tuple, np.ndarray, pd.Index, pd.Series)) else [as_of] * n
    return pa.array([to_utc(t) for t in times], pa.timestamp("us", tz="UTC"))


def embedding_rows(user_ids, embeddings, batch_id: str, as_of) -> pa.Table:
    """Rows of ``user_embedding`` (``embeddings``: an arrow list column; ``as_of``: one time, or
    one per user)."""
    n = len(embeddings)
    now = pd.Timestamp(datetime.now(UTC))
    ids = user_ids if isinstance(user_ids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(user_ids, object))
    return pa.table(
        {
            "user_id": ids.cast(pa.string()),
            "batch_id": pa.array([batch_id] * n, pa.string()),
            "event_timestamp": event_times(as_of, n),
            "created": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "embedding": embeddings.cast(pa.list_(pa.float32())),
            "embedding_batch": pa.array([batch_id] * n, pa.string()),
        }
    )


class OnlineWriter:
    """Arrow rows of a feature view to a store's online store: what ``write_to_online_store`` does,
    without its overhead on small writes. That call looks the view up in the registry (1.2 ms) and
    turns the caller's pandas frame back into arrow before the protos on every call: 2.3 ms for a
    one-row write here, three of them per online micro-batch. This keeps each view from its first
    use and converts arrow with Feast's own function: 0.54 ms (feast pinned in constraints.txt; its
    private ``_convert_arrow_to_proto`` and ``_get_provider`` are used, and a view with a field
    mapping, which that path would apply, is refused)."""

    def __init__(self, store):
        from feast.utils import _convert_arrow_to_proto

        self.store, self._to_proto, self._provider, self._views = (
            store,
            _convert_arrow_to_proto,
            store._get_provider(),
            {},
        )

    def __call__(self, view: str, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if view not in self._views:
            found = self.store.get_feature_view(view)
            if found.batch_source is not None and found.batch_source.field_mapping:
                raise ValueError(f"{view}: a field mapping; write it with write_to_online_store")
            self._views[view] = found, {e.name: e.dtype.to_value_type() for e in found.entity_columns}
        found, join_keys = self._views[view]
        self._provider.online_write_batch(self.store.config, found, self._to_proto(table, found, join_keys), None)


ONLINE_CHUNK = 10_000  # rows per online write: bounds the protos held at once


def write_online(store, view: str, table: pa.Table) -> None:
    """Every row of ``table`` to ``view`` in the online store, a chunk at a time."""
    writer = OnlineWriter(store)
    for start in range(0, table.num_rows, ONLINE_CHUNK):
        writer(view, table.slice(start, ONLINE_CHUNK))


def online_embeddings(store, user_ids, batch_id: str, with_times: bool = False) -> tuple:
    """(vectors, found) for users of one batch; a row of another batch is an error, never returned.
    ``with_times``: also each row's event time (the time its features are as of; NaT where not found)."""
    rows = [{"user_id": str(u), "batch_id": batch_id} for u in user_ids]
    got = store.get_online_features(features=EMBEDDING_FIELDS, entity_rows=rows).to_dict(
        include_event_timestamps=with_times
    )
    found = np.array([v is not None for v in got["embedding"]], bool)
    stamps = np.array(got["embedding_batch"], dtype=object)
    if (found & (stamps != batch_id)).any():
        raise RuntimeError(
            f"batch_id: online store returned rows of batch {set(stamps[found]) - {batch_id}} "
            f"for a read of batch {batch_id}"
        )
    dim = next((len(v) for v in got["embedding"] if v is not None), 0)
    vectors = np.full((len(rows), dim), np.nan, np.float32)
    for i, v in enumerate(got["embedding"]):
        if v is not None:
            vectors[i] = v
    if with_times:
        from feast.online_response import TIMESTAMP_POSTFIX

        times = [
            pd.Timestamp(t, unit="s", tz="UTC") if hit else pd.NaT
            for t, hit in zip(got["embedding" + TIMESTAMP_POSTFIX], found)
        ]
        return vectors, found, times
    return vectors, found


def history_table(user_ids, artists, plays, recent, batch_id: str, as_of) -> pa.Table:
    """Rows of ``user_artist_history``: per user with a play among ``artists`` (K,), the artists
    played with their ``plays`` and ``recent`` values ((users, K), dense or sparse; users without
    a play have no row); ``as_of``: one time, or one per user."""
    import scipy.sparse as sp

    # A copy: a float64 csr converts with its index arrays shared, so sorting them in place would
    # scramble ``recent`` where it is the same matrix (no recency decay: recent = plays).
    plays = sp.csr_matrix(plays, dtype=np.float32, copy=True)
    plays.eliminate_zeros()
    plays.sort_indices()
    users = np.repeat(np.arange(plays.shape[0]), np.diff(plays.indptr))
    recent_at = (
        np.asarray(sp.csr_matrix(recent, dtype=np.float32)[users, plays.indices], np.float32).ravel()
        if len(users)
        else np.zeros(0, np.float32)
    )
    has = np.flatnonzero(np.diff(plays.indptr) > 0)
    n = len(has)

    def lists(values: pa.Array) -> pa.Array:
        offsets = pa.array(plays.indptr[np.r_[has, has[-1] + 1]] if n else [0], pa.int32())
        start, stop = (int(plays.indptr[has[0]]), int(plays.indptr[has[-1] + 1])) if n else (0, 0)
        return pa.ListArray.from_arrays(pa.compute.subtract(offsets, offsets[0]), values.slice(start, stop - start))

    now = pd.Timestamp(datetime.now(UTC))
    return pa.table(
        {
            "user_id": pa.array(np.asarray(user_ids, dtype=object)[has].astype(str), pa.string()),
            "batch_id": pa.array([batch_id] * n, pa.string()),
            "event_timestamp": event_times(as_of, plays.shape[0]).take(pa.array(has, pa.int64())),
            "created": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            # taken in arrow: a numpy str array of a 100k-user batch's 3M ids came back chunked
            "artists": lists(
                pa.array(np.asarray(artists, dtype=object).astype(str).tolist(), pa.string()).take(
                    pa.array(plays.indices, pa.int32())
                )
            ),
            "plays": lists(pa.array(plays.data, pa.float32())),
            "recent": lists(pa.array(recent_at, pa.float32())),
            "history_batch": pa.array([batch_id] * n, pa.string()),
        }
    )


def online_history(store, user_ids, batch_id: str, artists) -> tuple[np.ndarray, np.ndarray]:
    """(plays, recent) (users, K) over ``artists`` for users of one batch (zeros: no history)."""
    rows = [{"user_id": str(u), "batch_id": batch_id} for u in user_ids]
    got = store.get_online_features(features=HISTORY_FIELDS, entity_rows=rows).to_dict()
    column = {a: i for i, a in enumerate(artists)}
    plays, recent = np.zeros((2, len(rows), len(column)), np.float32)
    for i, (names, stamp) in enumerate(zip(got["artists"], got["history_batch"])):
        if names is None:
            continue
        if stamp != batch_id:
            raise RuntimeError(f"batch_id: online store returned history of batch {stamp} for a read of {batch_id}")
        cols = np.array([column.get(a, -1) for a in names], np.int64)
        keep = cols >= 0
        plays[i, cols[keep]] = np.asarray(got["plays"][i], np.float32)[keep]
        recent[i, cols[keep]] = np.asarray(got["recent"][i], np.float32)[keep]
    return plays, recent


def delete_online(store, views: list[str], user_ids, batch_id: str) -> None:
    """Remove the rows of ``user_ids`` under ``batch_id`` from ``views`` of the online store. Feast
    has no per-entity delete for these stores, so this deletes what its writers wrote, by the same
    entity keys: a row per key in each view's SQLite table; in Redis one hash per key holds every
    view of that entity (both of ours are keyed by user and batch), so the key goes."""
    import sqlite3

    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import _redis_key
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig
    from feast.infra.online_stores.sqlite import _quote_id, _table_id
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value

    config, online = store.config, store._get_provider().online_store
    version, users = config.entity_key_serialization_version, [str(u) for u in user_ids]
    redis_keys: set[bytes] = set()  # views keyed alike share one Redis hash: each key deleted once
    for name in views:
        view = store.get_feature_view(name)
        join_keys = [e.name for e in view.entity_columns]  # the order the write path uses (OnlineWriter)
        keys = [
            EntityKeyProto(
                join_keys=join_keys,
                entity_values=[Value(string_val={"user_id": user, "batch_id": batch_id}[k]) for k in join_keys],
            )
            for user in users
        ]
        if isinstance(config.online_store, RedisOnlineStoreConfig):
            redis_keys.update(_redis_key(config.project, k, version) for k in keys)
            continue
        table = _quote_id(_table_id(config.project, view, config.registry.enable_online_feature_view_versioning))
        conn = online._get_conn(config)
        try:
            with conn:
                conn.executemany(
                    f"DELETE FROM {table} WHERE entity_key = ?", [(serialize_entity_key(k, version),) for k in keys]
                )
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):  # a view never written has no table: nothing to delete
                raise
    if redis_keys:
        client, ordered = online._get_client(config.online_store), sorted(redis_keys)
        for start in range(0, len(ordered), ONLINE_CHUNK):
            client.delete(*ordered[start : start + ONLINE_CHUNK])
