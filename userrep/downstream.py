"""Downstream models of one batch, trained on that batch's embeddings only.

A batch built as of T cannot see labels after T, so every task learns "embedding at T - L ->
listening in [T - L, T)" (L = ``label_days``): the batch's own encoders and autoencoder embed
the users' features as of T - L, labels come from the window. Serving then applies the heads to
embeddings as of T (and later, online) to predict the next window.

Each task is one call (the KFP pipeline fans out over ``TASKS``) writing into BATCH/downstream/:

    future_listening.pt      multi-label head: embedding -> logit per top-K artist
    artist_preference.pt     pair head: (embedding, artist vector) -> logit
    similar_users.faiss      FAISS index over the batch's embeddings (+ similar_users.ids.npy)
    TASK.json                batch id, validation metrics, file hashes (the registration record)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch

from userrep.baselines import user_artist_matrix
from userrep.backfill import read_embeddings
from userrep.data import Dataset
from userrep.features import FeatureSpace, build_user_features, to_utc
from userrep.model import UserAutoencoder, embed
from userrep.tasks import artist_preference, future_listening, similar_users
from userrep.tasks._mlp import HeadConfig, MLPHead

TASKS = ("future_listening", "artist_preference", "similar_users")


@dataclass(frozen=True)
class DownstreamConfig:
    label_days: int = 28
    top_k: int = 1000
    valid_share: float = 0.2
    head: HeadConfig = field(default_factory=HeadConfig)
    seed: int = 0


@dataclass
class TaskData:
    """What every task of one batch shares (computed from the batch dir and the dataset)."""

    batch_id: str
    user_ids: np.ndarray
    x: np.ndarray  # (users, d) embeddings as of T - L
    labels: np.ndarray  # (users, K) window plays of the top-K artists
    history: np.ndarray  # (users, K) plays of the same artists before T - L
    artists: np.ndarray  # (K,) artist ids
    artist_vectors: np.ndarray  # (K, collab dim)
    train: np.ndarray
    valid: np.ndarray
    window_artists: object  # (users, all artists) csr window plays, for neighbour relevance
    label_days: int  # the window used (wider than asked where the data is sparse)
    skipped: str | None = None  # why the tasks cannot be trained on this batch, if they cannot


MIN_LABELLED = 20  # users with a label-window play needed to train and validate a task


def task_data(batch_dir: str | Path, ds: Dataset, config: DownstreamConfig = DownstreamConfig()) -> TaskData:
    """Embeddings as of T - L and labels from [T - L, T). Where fewer than ``MIN_LABELLED`` users
    play a top artist in the window (sparse data), the window doubles while the data reaches back
    that far; if it is still too thin the tasks are skipped (``TaskData.skipped`` says why)."""
    batch_dir = Path(batch_dir)
    manifest = json.loads((batch_dir / "manifest.json").read_text())
    space = FeatureSpace.load(batch_dir / "encoders")
    model = UserAutoencoder.load(batch_dir / "model.pt")
    as_of = to_utc(manifest["as_of"])
    first = pd.Timestamp(pc.min(ds.events.column("ts")).as_py())
    label_days = config.label_days
    while True:
        found = _labelled(ds, space, as_of, label_days, config.top_k)
        if len(found[0]) >= MIN_LABELLED or as_of - pd.Timedelta(days=2 * label_days) < first:
            break
        label_days *= 2
    rows, features, labels, history, top, win_all = found
    users = features.user_ids
    skipped = None
    if len(rows) < MIN_LABELLED:
        skipped = (f"label_days: only {len(rows)} users play a top artist in the {label_days} days before "
                   f"{as_of.isoformat()} (the widest window the data allows); at least {MIN_LABELLED} are needed")
    rows = np.random.default_rng(config.seed).permutation(rows)
    n_valid = max(1, int(round(config.valid_share * len(rows))))
    artist_ids, vectors = space.collab.artist_vectors(ds.items)
    artist_vectors = vectors[pd.Index(artist_ids).get_indexer(space.artists[top])]
    return TaskData(manifest["batch_id"], users, embed(model, features.matrix), labels, history,
                    space.artists[top].astype(str), artist_vectors, np.sort(rows[n_valid:]), np.sort(rows[:n_valid]),
                    win_all, label_days, skipped)


def _labelled(ds: Dataset, space: FeatureSpace, as_of: pd.Timestamp, label_days: int, top_k: int):
    """Users with a top-artist play in [as_of - label_days, as_of), their features as of the window's
    start, and the label and history matrices."""
    start = as_of - pd.Timedelta(days=label_days)
    features = build_user_features(ds, start, space)
    users = features.user_ids
    ts = ds.events.column("ts")
    before = ds.events.filter(pc.less(ts, pa_ts(start)))
    window = ds.events.filter(pc.and_(pc.greater_equal(ts, pa_ts(start)), pc.less(ts, pa_ts(as_of))))
    hist_all, win_all = user_artist_matrix(before, space, users), user_artist_matrix(window, space, users)
    weight = np.asarray(hist_all.sum(axis=0)).ravel()
    played = np.flatnonzero(weight > 0)
    top = played[np.argsort(-weight[played], kind="stable")][:top_k]
    labels = (win_all[:, top] > 0).toarray().astype(np.float32)
    history = (hist_all[:, top] > 0).toarray().astype(np.float32)
    return np.flatnonzero(labels.sum(axis=1) > 0), features, labels, history, top, win_all


def pa_ts(ts: pd.Timestamp):
    import pyarrow as pa

    return pa.scalar(ts.to_pydatetime(), pa.timestamp("us", tz="UTC"))


def train_task(batch_dir: str | Path, task: str, ds: Dataset, config: DownstreamConfig = DownstreamConfig(),
               data: TaskData | None = None) -> dict:
    """Train one task's model on the batch, validate it, write its files and registration record."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    batch_dir = Path(batch_dir)
    out = batch_dir / "downstream"
    out.mkdir(exist_ok=True)
    data = data or task_data(batch_dir, ds, config)
    x, train, valid = data.x, data.train, data.valid
    meta = {"task": task, "batch_id": data.batch_id, "label_days": data.label_days, "head": asdict(config.head)}
    if data.skipped and task != "similar_users":  # registered as skipped: the batch is complete without it, the gate sees why
        return _register(out, task, {**meta, "skipped": data.skipped, "metrics": {}, "n_train": 0, "n_valid": 0,
                                     "files": {}})
    if task == "future_listening":
        head = future_listening.fit_head(x[train], data.labels[train], config.head)
        metrics = future_listening.ranking_metrics(future_listening.scores(head, x[valid]), data.labels[valid],
                                                   data.history[valid])
        files = [_save_head(out / "future_listening.pt", head, {**meta, "artists": data.artists.tolist()})]
    elif task == "artist_preference":
        popularity = data.labels[train].sum(axis=0) + 1.0
        pairs = artist_preference.sample_pairs(data.labels[train], popularity, config.seed)
        valid_pairs = artist_preference.sample_pairs(data.labels[valid], popularity, config.seed + 1)
        head = artist_preference.fit_head(x[train], data.artist_vectors, pairs,
                                          HeadConfig(**{**asdict(config.head), "batch_size": 1024}))
        metrics = {"auc": artist_preference.evaluate(head, x, data.artist_vectors, _reindex(valid_pairs, valid))}
        files = [_save_head(out / "artist_preference.pt", head,
                            {**meta, "artists": data.artists.tolist(), "artist_vectors": data.artist_vectors})]
    else:
        import faiss

        ids, vectors, batch_id = read_embeddings(batch_dir / "embeddings.parquet")
        if batch_id != data.batch_id:
            raise ValueError(f"embeddings.parquet: batch_id {batch_id} in batch {data.batch_id}")
        faiss.write_index(similar_users.build_index(vectors), str(out / "similar_users.faiss"))
        np.save(out / "similar_users.ids.npy", ids.astype(str))
        queries = valid[: 1000]  # (the index needs no labels: it is built even on thin data)
        found = similar_users.neighbours(similar_users.build_index(x), x, queries, 50)
        metrics = {"ndcg@50": similar_users.mean(similar_users.ndcg_with_overlap(found, queries, data.window_artists))}
        files = [out / "similar_users.faiss", out / "similar_users.ids.npy"]
    return _register(out, task, {**meta, "metrics": {k: round(float(v), 6) for k, v in metrics.items()},
                                 "n_train": int(len(train)), "n_valid": int(len(valid)),
                                 "files": {f.name: sha256(f) for f in files}})


def _register(out: Path, task: str, record: dict) -> dict:
    record = {**record, "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = out / f"{task}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / f"{task}.json")  # the record last: a task without it is not done
    return record


def skipped_tasks(batch_dir: str | Path) -> dict[str, str]:
    """Tasks registered as skipped (too little data), with the reason."""
    out = Path(batch_dir) / "downstream"
    records = {task: out / f"{task}.json" for task in TASKS}
    return {task: reason for task, path in records.items() if path.exists()
            and (reason := json.loads(path.read_text()).get("skipped"))}


def _reindex(pairs, rows: np.ndarray):
    """Pairs sampled on a row subset index that subset; map them to rows of the full matrix."""
    users, artists, y = pairs
    return rows[users], artists, y


def _save_head(path: Path, head: MLPHead, meta: dict) -> Path:
    torch.save({"meta": meta, "n_in": head.hidden[0].in_features, "n_out": head.out.out_features,
                "n_side": head.n_side, "config": asdict(head.config), "state": head.state_dict()}, path)
    return path


def load_head(path: str | Path) -> tuple[MLPHead, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    n_in = blob["n_in"]
    head = MLPHead(n_in, blob["n_out"], np.zeros(n_in), np.ones(n_in), HeadConfig(**blob["config"]),
                   n_side=blob.get("n_side", 0))
    head.load_state_dict(_renamed(blob["state"]))
    return head.eval(), blob["meta"]


def _renamed(state: dict) -> dict:
    """Heads saved before the side features had one ``net`` Sequential (0: hidden, 3: output)."""
    names = {"net.0.": "hidden.0.", "net.3.": "out."}
    return {next((new + k[len(old):] for old, new in names.items() if k.startswith(old)), k): v for k, v in state.items()}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_tasks(batch_dir: str | Path) -> list[str]:
    """Tasks without a registration record, or whose files are gone or changed since."""
    out = Path(batch_dir) / "downstream"
    missing = []
    for task in TASKS:
        record_path = out / f"{task}.json"
        if not record_path.exists():
            missing.append(task)
            continue
        record = json.loads(record_path.read_text())
        if any(not (out / name).exists() or sha256(out / name) != digest for name, digest in record["files"].items()):
            missing.append(task)
    return missing


def head_scores_auc(batch_dir: str | Path, x: np.ndarray, data: TaskData) -> float:
    """AUC of a batch's artist-preference head on embeddings ``x`` (rows of ``data``) for validation pairs."""
    head, meta = load_head(Path(batch_dir) / "downstream" / "artist_preference.pt")
    vectors = pd.Index(meta["artists"]).get_indexer(pd.Index(data.artists))
    popularity = data.labels[data.train].sum(axis=0) + 1.0
    users, artists, y = _reindex(artist_preference.sample_pairs(data.labels[data.valid], popularity, 1), data.valid)
    known = vectors[artists] >= 0
    return artist_preference.evaluate(head, x, meta["artist_vectors"], (users[known], vectors[artists[known]], y[known]))

