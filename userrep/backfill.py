"""Backfill: embeddings for every user of a batch, in-process or with Ray Data ``map_batches``.

Output: ``embeddings.parquet`` with ``user_id`` (string), ``batch_id`` (string) and ``embedding``
(list<float32>), streamed to disk batch by batch so memory stays flat for large user bases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userrep.batch.layout import BatchDir, read_manifest
from userrep.features import FeatureSpace, UserFeatures
from userrep.model import UserAutoencoder, embed
from userrep.onlinestore import list_column

SCHEMA = pa.schema([("user_id", pa.string()), ("batch_id", pa.string()), ("embedding", pa.list_(pa.float32()))])


def embeddings_table(user_ids, vectors: np.ndarray, batch_id: str) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array(user_ids, pa.string()),
            "batch_id": pa.array([batch_id] * len(vectors), pa.string()),
            "embedding": list_column(vectors),
        },
        schema=SCHEMA,
    )


def load_encoder(batch_dir: str | Path) -> tuple[FeatureSpace, UserAutoencoder]:
    """A batch's encoder: its feature space (what turns events into features) and its autoencoder
    (features into the embedding)."""
    files = BatchDir(batch_dir)
    return FeatureSpace.load(files.encoders), UserAutoencoder.load(files.model)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(user_ids, matrix, batch_id) from an embeddings file; refuses a file mixing batch ids."""
    table = pq.read_table(path)
    batch_ids = table.column("batch_id").unique().to_pylist()
    if len(batch_ids) != 1:
        raise ValueError(f"{path}: expected one batch_id, found {batch_ids}")
    emb = table.column("embedding").combine_chunks()
    dim = len(emb[0]) if len(emb) else 0
    matrix = (
        emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) if dim else np.zeros((len(emb), 0), np.float32)
    )
    return np.asarray(table.column("user_id").to_pylist(), object), matrix, batch_ids[0]


class _Embedder:
    """Ray Data actor: loads the model once, embeds batches of the packed feature column."""

    def __init__(self, model_path: str):
        import torch

        torch.set_num_threads(1)
        self.model = UserAutoencoder.load(model_path)

    def __call__(self, batch: dict) -> dict:
        return {"user_id": batch["user_id"], "embedding": embed(self.model, batch["features"])}


def backfill_embeddings(
    model_path: str | Path,
    features: UserFeatures | Path,
    batch_id: str,
    out: str | Path,
    workers: int = 0,
    batch_size: int = 4096,
) -> int:
    """Write ``out`` (embeddings.parquet) for every row of ``features`` (in memory, or a batch's
    features.parquet, read a batch of rows at a time in-process); returns the row count."""
    out = Path(out)
    tmp = out.with_suffix(".tmp")
    n = 0
    with pq.ParquetWriter(tmp, SCHEMA) as writer:
        if workers == 0:
            model = UserAutoencoder.load(model_path)
            for user_ids, matrix in _feature_batches(features, batch_size):
                writer.write_table(embeddings_table(user_ids, embed(model, matrix), batch_id))
                n += len(user_ids)
        else:
            if not isinstance(features, UserFeatures):
                raise TypeError("features: with workers, features in memory (UserFeatures), not a file")
            for batch in _ray_embeddings(str(model_path), features, workers, batch_size):
                writer.write_table(embeddings_table(batch["user_id"], batch["embedding"], batch_id))
                n += len(batch["user_id"])
    tmp.replace(out)  # readers never see a partial file
    return n


def _feature_batches(features: UserFeatures | Path, batch_size: int):
    if isinstance(features, UserFeatures):
        for start in range(0, len(features.user_ids), batch_size):
            yield features.user_ids[start : start + batch_size], features.matrix[start : start + batch_size]
        return
    for batch in pq.ParquetFile(features).iter_batches(batch_size=batch_size):
        vectors = batch.column("features")
        flat = vectors.flatten().to_numpy(zero_copy_only=False, writable=True)  # writable: torch.from_numpy
        yield np.asarray(batch.column("user_id").to_pylist(), object), flat.reshape(len(batch), vectors.type.list_size)


def _ray_embeddings(model_path: str, features: UserFeatures, workers: int, batch_size: int):
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    from userrep.raylocal import cpus_per_worker

    table = pa.table(
        {
            "user_id": pa.array(features.user_ids, pa.string()),
            "features": ArrowTensorArray.from_numpy(np.ascontiguousarray(features.matrix, np.float32)),
        }
    )
    blocks = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)] or [table]
    dataset = ray.data.from_arrow(blocks).map_batches(  # several blocks, so every actor gets work
        _Embedder,
        fn_constructor_kwargs={"model_path": model_path},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker(workers),
    )
    yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy")


def embed_users(batch_dir: str | Path, ds, user_ids, as_of=None) -> tuple[np.ndarray, str]:
    """Embed ``user_ids`` with a batch's encoders and model at its as_of (or ``as_of``).

    Users with no events before as_of (cold start) are embedded from onboarding/attributes.
    Raises KeyError naming the users the dataset does not know at all.
    """

    from userrep.featurize import build_user_features

    batch_dir = Path(batch_dir)
    manifest = read_manifest(batch_dir)
    known = set(ds.events.column("user_id").unique().to_pylist())
    if ds.users is not None:
        known |= set(ds.users.column("user_id").to_pylist())
    unknown = [u for u in user_ids if u not in known]
    if unknown:
        raise ValueError(f"user_ids: unknown user_id(s) {unknown[:5]}: not in events or users of {ds.path}")
    space, model = load_encoder(batch_dir)
    features = build_user_features(ds, as_of or manifest["as_of"], space, user_ids=list(user_ids))
    return embed(model, features.matrix), manifest["batch_id"]
