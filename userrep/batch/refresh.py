"""Daily refresh between retrains: today's features, embedded by the *serving* batch (no retrain).

The serving batch's encoders compute every user's features as of the refresh time and its
autoencoder embeds them; the vectors stay in that batch's space, so its downstream heads and
neighbour index keep working. They are written to BATCH/refresh/AS_OF.parquet and published to
the online store under the same batch id (newer event_timestamp), never under another batch.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from userrep.backfill import embeddings_table, load_encoder
from userrep.batch.build import dataset_as_of
from userrep.batch.layout import BatchDir
from userrep.batch.registry import batch_dir, serving_batch
from userrep.batchrows import publish_embeddings
from userrep.features import to_utc
from userrep.model import embed
from userrep.partitions import partitioned_features, split_dataset
from userrep.store import StoreConfig, open_store

log = logging.getLogger(__name__)


def refresh(data: str | Path, as_of, batch_root: str | Path, store: StoreConfig | None) -> dict:
    """Every user's features as of ``as_of`` (default: midnight after the last event) in the
    serving batch's space, streamed as the training steps do (the dataset split into user
    partitions as it is read, features computed a partition at a time: the events are never held
    whole), embedded by its autoencoder, written and published under its id."""
    batch_id = serving_batch(batch_root)
    if batch_id is None:
        raise ValueError(f"batch_root: no batch is serving under {batch_root}; train and promote one first")
    directory = batch_dir(batch_root, batch_id)
    as_of = to_utc(as_of) if as_of else dataset_as_of(data)
    _, model = load_encoder(directory)
    out = directory / "refresh" / f"{as_of:%Y%m%dT%H%M%S}.parquet"
    work = out.with_suffix(".parts")
    shutil.rmtree(work, ignore_errors=True)
    try:
        _, partitions = split_dataset(data, as_of, work)
        features = partitioned_features(work, partitions, as_of, BatchDir(directory).encoders)
        table = embeddings_table(features.user_ids, embed(model, features.matrix), batch_id)
        del features  # the memory-mapped matrix, before its file goes
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pq.write_table(table, out)
    if store is not None:
        publish_embeddings(open_store(store, apply=False), store, table, batch_id, as_of)
    log.info(f"refreshed {table.num_rows} embeddings of serving batch {batch_id} as of {as_of.isoformat()} -> {out}")
    return {"batch_id": batch_id, "as_of": as_of.isoformat(), "users": table.num_rows, "path": str(out)}
