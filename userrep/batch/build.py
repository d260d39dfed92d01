"""Build one batch: encoders -> point-in-time features -> autoencoder -> backfill -> manifest.

A batch directory holds everything needed to embed a user the way this batch does:

    encoders/      <encoder>.parquet per modality encoder, space.npz, space.json (the FeatureSpace)
    features.parquet   the training snapshot (user_id, features) at as_of
    checkpoints/   one per epoch (resume)
    model.pt       the autoencoder with its standardization stats
    embeddings.parquet user_id, batch_id, embedding for every user known at as_of
    manifest.json  batch id, data fingerprint, as_of, schema, settings, loss curve, timings, hashes
    downstream/    one model per task, trained on this batch's embeddings (userrep.batch.downstream)
    gate.json, rollout.html, drift_report.html   the promotion gate's decision and reports (userrep.batch.gate)

With a Feast store configured, the encoders come from the materialized snapshot and the training
set from a point-in-time ``get_historical_features``; the embeddings are published to the online
store under this batch id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from userrep.backfill import backfill_embeddings
from userrep.batch.downstream import DownstreamConfig, serving_history, task_data, train_task
from userrep.batch.layout import BatchDir, manifest_path, read_manifest
from userrep.continuity import continue_fit, load_anchor
from userrep.data import Dataset, load_dataset
from userrep.encoders import describe_encoders
from userrep.eventlog import watermark
from userrep.features import FeatureConfig, FeatureSpace, UserFeatures, to_utc
from userrep.fsio import data_fingerprint, midnight_after, sha256, write_json_atomic
from userrep.model import AEConfig
from userrep.partitions import partitioned_snapshot
from userrep.source import EventSource
from userrep.store import StoreConfig
from userrep.tasks import registry as task_registry
from userrep.timing import Stopwatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    workers: int = 0  # 0: in-process torch and backfill; N: Ray Train + Ray Data with N workers
    resume: bool = False
    feast: StoreConfig | None = None  # None: features computed in-process, nothing published
    downstream: DownstreamConfig | None = field(default_factory=DownstreamConfig)  # None: no task models
    tuned: dict | None = None  # the tuned.json choice (userrep tune) these settings came from, if any


def default_as_of(ds: Dataset) -> pd.Timestamp:
    """Midnight after the last event: every event counts as history."""
    return midnight_after(pc.max(ds.events.column("ts")).as_py())


def dataset_as_of(data: str | Path) -> pd.Timestamp:
    """``default_as_of`` of a dataset directory, validated as it streams: each batch of events
    leaves only its latest event in memory."""
    return default_as_of(load_dataset(data, keep=_latest_event))


def _latest_event(batch: pa.Table) -> pa.Table:
    return batch.take([int(np.argmax(batch.column("ts").cast(pa.int64()).to_numpy()))])


def default_batch_id(as_of: pd.Timestamp, fingerprint: dict[str, str], config: BuildConfig) -> str:
    """Deterministic: the same data, cut-off and settings give the same id. The downstream
    settings count too: a batch is its embeddings and its task models, served together."""
    key = json.dumps(
        {
            "data": fingerprint,
            "as_of": as_of.isoformat(),
            "features": asdict(config.features),
            "ae": asdict(config.ae),
            "workers": config.workers,
            "downstream": asdict(config.downstream) if config.downstream is not None else None,
        },
        sort_keys=True,
    )
    return f"{as_of:%Y%m%d}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


FEATURE_ROWS = 1 << 16  # rows per row group of features.parquet: readers stream it a group at a time


def save_features(features: UserFeatures, path: Path) -> None:
    """The training snapshot as parquet, written a row group at a time (the whole matrix as one
    arrow array was a copy of it: 2.5 GB at 1M users, and as much again in the writer)."""
    dim = features.matrix.shape[1]
    schema = pa.schema([("user_id", pa.string()), ("features", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(features.user_ids), FEATURE_ROWS):
            rows = slice(start, start + FEATURE_ROWS)
            flat = pa.array(np.ascontiguousarray(features.matrix[rows], np.float32).ravel(), pa.float32())
            writer.write_table(
                pa.table(
                    {
                        "user_id": pa.array(features.user_ids[rows], pa.string()),
                        "features": pa.FixedSizeListArray.from_arrays(flat, dim),
                    },
                    schema=schema,
                )
            )
        if not len(features.user_ids):
            writer.write_table(schema.empty_table())


def config_from_dict(raw: dict) -> BuildConfig:
    """Inverse of ``asdict(BuildConfig)`` (how pipeline steps pass settings to each other)."""
    from userrep.tasks._mlp import HeadConfig

    feast = raw.get("feast")
    downstream = raw.get("downstream")
    return BuildConfig(
        features=FeatureConfig(**{**raw["features"], "windows": tuple(raw["features"]["windows"])}),
        ae=AEConfig(**raw["ae"]),
        workers=int(raw["workers"]),
        resume=bool(raw["resume"]),
        feast=StoreConfig(**{**feast, "home": Path(feast["home"])}) if feast else None,
        downstream=DownstreamConfig(**{**downstream, "head": HeadConfig(**downstream["head"])}) if downstream else None,
        tuned=raw.get("tuned"),
    )


def load_features(batch_dir: Path, rows: np.ndarray | None = None) -> UserFeatures:
    """The training snapshot of a batch; ``rows`` (sorted positions): only those rows, read a row
    group at a time (the gate's sample of 1M users reads a few MB, not the 2.5 GB matrix)."""
    files = BatchDir(batch_dir)
    schema = FeatureSpace.load(files.encoders).schema
    parquet = pq.ParquetFile(files.features)
    ids, blocks, start = [], [], 0
    for group in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(group).num_rows
        wanted = None if rows is None else rows[(rows >= start) & (rows < start + n)] - start
        if wanted is None or len(wanted):
            table = parquet.read_row_group(group)
            table = table if wanted is None else table.take(pa.array(wanted))
            ids.append(table.column("user_id").to_numpy(zero_copy_only=False).astype(object))
            blocks.append(table.column("features").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1))
        start += n
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, schema.n_features), np.float32)
    return UserFeatures(np.concatenate(ids) if ids else np.array([], object), matrix, schema)


def _ray_if(workers: int):
    """A Ray session for N workers (joins one already running: one session per build)."""
    if not workers:
        return nullcontext()
    from userrep.raylocal import ray_session

    return ray_session()


def fit_stage(
    data: str | Path,
    out: str | Path,
    as_of=None,
    config: BuildConfig = BuildConfig(),
    batch_id: str | None = None,
    snapshot_id: str | None = None,
    progress=None,
    spec: dict | None = None,
    anchor: str | Path | None = None,
) -> dict:
    """Training set (from a Feast snapshot, or in-process) -> autoencoder; writes BATCH/build.json.
    `spec`: the `BatchSpec` this batch was asked for, kept in the build record and the manifest.
    `anchor`: the directory of the batch whose space this one continues (``userrep.continuity``;
    None: a new space)."""
    out = Path(out)
    files = BatchDir(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stopwatch()
    # The dataset is streamed (validated, split into user partitions) where features are computed;
    # a given snapshot holds the training set already.
    fingerprint = data_fingerprint(data)
    as_of = to_utc(as_of) if as_of is not None else dataset_as_of(data)
    batch_id = batch_id or default_batch_id(as_of, fingerprint, config)
    log.info(f"batch {batch_id}: data {data}, as_of {as_of.isoformat()}, workers {config.workers}")
    stage.done("load")
    snapshot = None
    with _ray_if(config.workers):  # one session for the feature tasks and the fit
        if config.feast is not None:
            from userrep import store as feast

            store = feast.open_store(config.feast)
            if snapshot_id:
                snapshot = feast.load_snapshot(config.feast, snapshot_id)
                if snapshot.as_of != as_of:
                    raise ValueError(
                        f"snapshot_id: {snapshot_id} is as of {snapshot.as_of.isoformat()}, "
                        f"the batch as of {as_of.isoformat()}"
                    )
            else:
                snapshot = feast.materialize(
                    data, as_of, config.feast, config.features, store=store, workers=config.workers, anchor=anchor
                )
                stage.done("materialize")
            space = FeatureSpace.load(snapshot.space_dir)
            features = feast.training_set(store, snapshot, space, snapshot.user_ids)
            space.save(files.encoders)
        else:
            space, features = partitioned_snapshot(
                data,
                as_of,
                config.features,
                files.encoders,
                files.partitions,
                workers=config.workers,
                anchor=FeatureSpace.load(BatchDir(anchor).encoders) if anchor else None,
            )
            stage.done("encoders")
        save_features(features, files.features)
        stage.done("features")
        fit, aligned_to = continue_fit(
            features,
            space,
            load_anchor(anchor) if anchor else None,
            config.ae,
            workers=config.workers,
            checkpoint_dir=files.checkpoints,
            resume=config.resume,
            progress=progress,
        )
    shutil.rmtree(files.partitions, ignore_errors=True)
    fit.model.save(files.model)
    stage.done("fit")
    record = {
        "batch_id": batch_id,
        "as_of": as_of.isoformat(),
        "data": {
            "path": str(Path(data).resolve()),
            "fingerprint": fingerprint,
            "events_watermark": watermark(data),
        },  # the logged events the data holds
        "snapshot": snapshot.space_id if snapshot else None,
        "spec": spec,
        "aligned_to": aligned_to,
        "tasks": list(task_registry.names()),  # the downstream tasks this batch is built with
        "config": asdict(config),
        "training": {"losses": [round(x, 6) for x in fit.losses], "resumed_from_epoch": fit.resumed_from_epoch},
        "timings_s": {k: v for k, v in stage.finish().items() if k != "total"},
    }
    write_json_atomic(files.build_record, record)
    return record


def backfill_stage(out: str | Path) -> dict:
    """Embed every user with the fitted model, publish online, write the manifest (embeddings done)."""
    out = Path(out)
    files = BatchDir(out)
    record = json.loads(files.build_record.read_text())
    config = config_from_dict(record["config"])
    batch_id = record["batch_id"]
    stage = Stopwatch()
    schema = FeatureSpace.load(files.encoders).schema
    features = load_features(out) if config.workers else files.features  # in-process: streamed
    with _ray_if(config.workers):
        n_users = backfill_embeddings(files.model, features, batch_id, files.embeddings, workers=config.workers)
    stage.done("backfill")
    if config.feast is not None:
        from userrep import store as feast
        from userrep.batchrows import publish_embeddings

        published = publish_embeddings(
            feast.open_store(config.feast, apply=False),
            config.feast,
            pq.read_table(files.embeddings),
            batch_id,
            record["as_of"],
        )
        log.info(f"published {published} embeddings of batch {batch_id} to the {config.feast.online} online store")
        stage.done("publish")
    timings = {**record["timings_s"], **{k: v for k, v in stage.finish().items() if k != "total"}}
    manifest = {
        "batch_id": batch_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "as_of": record["as_of"],
        "data": record["data"],
        "snapshot": record["snapshot"],
        "spec": record.get("spec"),
        "aligned_to": record.get("aligned_to"),
        "tasks": record.get("tasks"),
        "users": n_users,
        "feature_schema": [list(g) for g in schema.groups],
        "n_features": schema.n_features,
        "encoders": describe_encoders(config.features),
        "feature_config": asdict(config.features),
        "ae_config": asdict(config.ae),
        "tuned": config.tuned,
        "workers": config.workers,
        "training": record["training"],
        "timings_s": {**timings, "total": round(sum(timings.values()), 2)},
        "files": {path.name: sha256(path) for path in files.hashed},
    }
    write_json_atomic(manifest_path(out), manifest)  # a batch without a manifest is incomplete
    return manifest


def downstream_stage(out: str | Path, tasks: list[str] | None = None, publish_history: bool = True) -> dict:
    """Train the downstream task models of a finished batch (``tasks``: default every registered
    one; the settings come from build.json). ``publish_history``: also publish the candidate-artist
    history the batch's +history heads take online (the pipeline's steps run one task each: the
    first task's step publishes)."""
    out = Path(out)
    record = json.loads(BatchDir(out).build_record.read_text())
    config = config_from_dict(record["config"])
    ds = EventSource(record["data"]["path"])  # streamed: never the whole events table
    downstream = config.downstream or DownstreamConfig()
    data = task_data(out, ds, downstream)
    results = {}
    for task in tasks or task_registry.names():
        results[task] = done = train_task(out, task, ds, downstream, data)
        log.info(
            f"downstream {task}: skipped: {done['skipped']}"
            if done.get("skipped")
            else f"downstream {task} ({done.get('design', 'index')}): {done['metrics']}"
        )
    if config.feast is not None and publish_history and not data.skipped:
        # The task features of the batch's +history heads, online under the batch id.
        from userrep import store as feast
        from userrep.batchrows import publish_history as publish
        from userrep.onlinestore import history_table

        as_of = read_manifest(out)["as_of"]
        ids, plays, recent = serving_history(out, ds, data)
        table = history_table(ids, data.artists, plays, recent, data.batch_id, as_of)
        published = publish(feast.open_store(config.feast, apply=False), config.feast, table, data.batch_id)
        log.info(f"published the candidate-artist history of {published} users of batch {data.batch_id}")
    return results


def _design(record: dict) -> dict:
    return {"design": record["design"], "designs": record["designs"]} if "design" in record else {}


def build_batch(
    data: str | Path,
    out: str | Path,
    as_of=None,
    config: BuildConfig = BuildConfig(),
    batch_id: str | None = None,
    progress=None,
    spec: dict | None = None,
    anchor: str | Path | None = None,
) -> dict:
    """Every stage in one process (one Ray session); returns the manifest. ``anchor``: see ``fit_stage``."""
    out = Path(out)
    with _ray_if(config.workers):
        fit_stage(data, out, as_of, config, batch_id, progress=progress, spec=spec, anchor=anchor)
        manifest = backfill_stage(out)
    if config.downstream is not None:
        watch = Stopwatch()
        results = downstream_stage(out)
        watch.done("downstream")
        manifest["downstream"] = {
            task: {
                "label_days": r["label_days"],
                **({"skipped": r["skipped"]} if r.get("skipped") else {"metrics": r["metrics"], **_design(r)}),
            }
            for task, r in results.items()
        }
        timings = {k: v for k, v in manifest["timings_s"].items() if k != "total"}
        timings["downstream"] = watch.timings["downstream"]
        manifest["timings_s"] = {**timings, "total": round(sum(timings.values()), 2)}
        write_json_atomic(manifest_path(out), manifest)
    return manifest
