"""Daily refresh between retrains: today's features, embedded by the *serving* batch (no retrain).

The serving batch's encoders compute every user's features as of the refresh time and its
autoencoder embeds them; the vectors stay in that batch's space, so its downstream heads and
neighbour index keep working. They are written to BATCH/refresh/AS_OF.parquet and published to
the online store under the same batch id (newer event_timestamp), never under another batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from userrep.backfill import embeddings_table, load_encoder
from userrep.batch.build import default_as_of
from userrep.batch.registry import batch_dir, serving_batch
from userrep.batchrows import publish_embeddings
from userrep.data import load_dataset
from userrep.features import to_utc
from userrep.featurize import build_user_features
from userrep.model import embed
from userrep.store import StoreConfig, open_store

log = logging.getLogger(__name__)


def refresh(data: str | Path, as_of, batch_root: str | Path, store: StoreConfig | None) -> dict:
    batch_id = serving_batch(batch_root)
    if batch_id is None:
        raise ValueError(f"batch_root: no batch is serving under {batch_root}; train and promote one first")
    directory = batch_dir(batch_root, batch_id)
    ds = load_dataset(data)
    as_of = to_utc(as_of) if as_of else default_as_of(ds)
    space, model = load_encoder(directory)
    features = build_user_features(ds, as_of, space)
    vectors = embed(model, features.matrix)
    out = directory / "refresh" / f"{as_of:%Y%m%dT%H%M%S}.parquet"
    out.parent.mkdir(exist_ok=True)
    table = embeddings_table(features.user_ids, vectors, batch_id)
    pq.write_table(table, out)
    if store is not None:
        publish_embeddings(open_store(store, apply=False), store, table, batch_id, as_of)
    log.info(
        f"refreshed {len(features.user_ids)} embeddings of serving batch {batch_id} as of {as_of.isoformat()} -> {out}"
    )
    return {"batch_id": batch_id, "as_of": as_of.isoformat(), "users": len(features.user_ids), "path": str(out)}
