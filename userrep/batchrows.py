"""A batch's rows in the Feast store: offline (keyed by batch id), online, and the batch's feature
service. Published when a batch is built (``userrep.batch.build``) or refreshed, removed when it
is pruned (``userrep batch prune``)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from userrep.onlinestore import embedding_rows, write_online
from userrep.store import StoreConfig, upsert_rows


def publish_embeddings(store, config: StoreConfig, embeddings: pa.Table, batch_id: str, as_of) -> int:
    """Write one batch's embeddings offline (keyed by batch) and online; register its feature service."""
    from feature_repo.feature_services import batch_service

    n = embeddings.num_rows
    table = embedding_rows(embeddings.column("user_id"), embeddings.column("embedding"), batch_id, as_of)
    upsert_rows(Path(config.home) / "data" / "user_embedding.parquet", table, "batch_id", batch_id)
    write_online(store, "user_embedding", table)
    store.apply([batch_service(batch_id)])
    return n


def publish_history(store, config: StoreConfig, table: pa.Table, batch_id: str) -> int:
    """Write one batch's ``user_artist_history`` rows offline (keyed by batch) and online."""
    upsert_rows(Path(config.home) / "data" / "user_artist_history.parquet", table, "batch_id", batch_id)
    write_online(store, "user_artist_history", table)
    return table.num_rows


def unpublish_batch(store, config: StoreConfig, batch_id: str, user_ids) -> None:
    """Remove what ``publish_embeddings`` and ``publish_history`` wrote for a batch: its offline
    rows, its online rows (``user_ids``: the batch's users) and its feature service."""
    from feature_repo.feature_services import batch_service_name
    from userrep.onlinestore import delete_online

    for view in ("user_embedding", "user_artist_history"):
        path = Path(config.home) / "data" / f"{view}.parquet"
        if path.exists():
            upsert_rows(path, [], "batch_id", batch_id)
    delete_online(store, ["user_embedding", "user_artist_history"], user_ids, batch_id)
    if batch_service_name(batch_id) in {s.name for s in store.list_feature_services()}:
        store.delete_feature_service(batch_service_name(batch_id))
