"""Build one batch: encoders -> point-in-time features -> autoencoder -> backfill -> manifest.

A batch directory holds everything needed to embed a user the way this batch does:

    encoders/      collab.parquet, content.parquet, space.npz, space.json (the FeatureSpace)
    features.parquet   the training snapshot (user_id, features) at as_of
    checkpoints/   one per epoch (resume)
    model.pt       the autoencoder with its standardization stats
    embeddings.parquet user_id, batch_id, embedding for every user known at as_of
    manifest.json  batch id, data fingerprint, as_of, schema, settings, loss curve, timings, hashes
    downstream/    one model per task, trained on this batch's embeddings (userrep.downstream)
    gate.json, drift_report.html   the promotion gate's decision and report (userrep.gate)

With a Feast store configured, the encoders come from the materialized snapshot and the training
set from a point-in-time ``get_historical_features``; the embeddings are published to the online
store under this batch id.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userrep.backfill import backfill_embeddings
from userrep.downstream import TASKS, DownstreamConfig, task_data, train_task
from userrep.data import TABLES, Dataset, load_dataset, table_path
from userrep.encoders import CollaborativeEncoder, ContentEncoder
from userrep.features import (FeatureConfig, FeatureSpace, UserFeatures, build_user_features, fit_feature_space,
                              to_utc)
from userrep.model import AEConfig
from userrep.store import StoreConfig
from userrep.timing import Stopwatch
from userrep.train import fit_autoencoder


@dataclass(frozen=True)
class BuildConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    workers: int = 0  # 0: in-process torch and backfill; N: Ray Train + Ray Data with N workers
    resume: bool = False
    feast: StoreConfig | None = None  # None: features computed in-process, nothing published
    downstream: DownstreamConfig | None = field(default_factory=DownstreamConfig)  # None: no task models


def default_as_of(ds: Dataset) -> pd.Timestamp:
    """Midnight after the last event: every event counts as history."""
    last = pc.max(ds.events.column("ts")).as_py()
    return (pd.Timestamp(last) + pd.Timedelta(microseconds=1)).ceil("D")


def data_fingerprint(directory: str | Path) -> dict[str, str]:
    """sha256 of each contract table file (what the batch was trained on)."""
    out = {}
    for name in TABLES:
        path = table_path(Path(directory), name)
        if path is not None:
            out[path.name] = _sha256(path)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_batch_id(as_of: pd.Timestamp, fingerprint: dict[str, str], config: BuildConfig) -> str:
    """Deterministic: the same data, cut-off and settings give the same id."""
    key = json.dumps({"data": fingerprint, "as_of": as_of.isoformat(), "features": asdict(config.features),
                      "ae": asdict(config.ae), "workers": config.workers}, sort_keys=True)
    return f"{as_of:%Y%m%d}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def save_features(features: UserFeatures, path: Path) -> None:
    dim = features.matrix.shape[1]
    flat = pa.array(np.ascontiguousarray(features.matrix, np.float32).ravel(), pa.float32())
    table = pa.table({"user_id": pa.array(features.user_ids, pa.string()),
                      "features": pa.FixedSizeListArray.from_arrays(flat, dim)})
    pq.write_table(table, path)


def build_batch(data: str | Path, out: str | Path, as_of=None, config: BuildConfig = BuildConfig(),
                batch_id: str | None = None, log=print, progress=None) -> dict:
    """Run every stage and write the batch directory; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stopwatch(log)
    ds = load_dataset(data)
    fingerprint = data_fingerprint(data)
    as_of = to_utc(as_of) if as_of is not None else default_as_of(ds)
    batch_id = batch_id or default_batch_id(as_of, fingerprint, config)
    log(f"batch {batch_id}: data {data}, as_of {as_of.isoformat()}, workers {config.workers}")
    stage.done("load")
    store = None
    if config.feast is not None:
        from userrep import store as feast

        store = feast.open_store(config.feast)
        snapshot = feast.materialize(ds, as_of, config.feast, config.features, store=store, log=log)
        space = FeatureSpace.load(snapshot.space_dir)
        space.save(out / "encoders")
        stage.done("materialize")
        features = feast.training_set(store, snapshot, space, snapshot.user_ids)
    else:
        space = fit_feature_space(ds, as_of, config.features)
        space.save(out / "encoders")
        stage.done("encoders")
        features = build_user_features(ds, as_of, space)
    save_features(features, out / "features.parquet")
    stage.done("features")
    ray_ctx = nullcontext()
    if config.workers:
        from userrep.raylocal import ray_session

        ray_ctx = ray_session()
    with ray_ctx:
        fit = fit_autoencoder(features, config.ae, workers=config.workers, checkpoint_dir=out / "checkpoints",
                              resume=config.resume, progress=progress)
        fit.model.save(out / "model.pt")
        stage.done("fit")
        n_users = backfill_embeddings(out / "model.pt", features, batch_id, out / "embeddings.parquet",
                                      workers=config.workers)
        stage.done("backfill")
    if store is not None:
        published = feast.publish_embeddings(store, config.feast, pq.read_table(out / "embeddings.parquet"),
                                             batch_id, as_of)
        log(f"published {published} embeddings of batch {batch_id} to the {config.feast.online} online store")
        stage.done("publish")
    timings = stage.finish()
    manifest = {
        "batch_id": batch_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "as_of": as_of.isoformat(),
        "data": {"path": str(Path(data).resolve()), "fingerprint": fingerprint},
        "users": n_users,
        "feature_schema": [list(g) for g in features.schema.groups],
        "n_features": features.schema.n_features,
        "encoders": {
            "collab": {**asdict(CollaborativeEncoder(dim=config.features.collab_dim, seed=config.features.seed)),
                       "method": "randomized SVD of log(1+plays) x IDF user-item matrix, rows L2-normalized"},
            "content": {**asdict(ContentEncoder(dim=config.features.content_dim, max_genres=config.features.max_genres)),
                        "method": "PCA of z-scored content_* columns and genre multi-hot"},
        },
        "feature_config": asdict(config.features),
        "ae_config": asdict(config.ae),
        "workers": config.workers,
        "training": {"losses": [round(x, 6) for x in fit.losses], "resumed_from_epoch": fit.resumed_from_epoch},
        "timings_s": timings,
        "files": {name: _sha256(out / name) for name in ("model.pt", "embeddings.parquet", "features.parquet")},
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "manifest.json")  # embeddings done: a batch without a manifest is incomplete
    if config.downstream is not None:
        data = task_data(out, ds, config.downstream)
        for task in TASKS:
            record = train_task(out, task, ds, config.downstream, data)
            log(f"downstream {task}: {record['metrics']}")
        stage.done("downstream")
        manifest["timings_s"] = stage.finish()
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(out / "manifest.json")
    return manifest
