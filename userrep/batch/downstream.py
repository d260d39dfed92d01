"""Downstream models of one batch, trained on that batch's embeddings only.

A batch built as of T cannot see labels after T, so every task learns "embedding at T - L ->
listening in [T - L, T)" (L = ``label_days``): the batch's own encoders and autoencoder embed
the users' features as of T - L, labels come from the window. Serving then applies the heads to
embeddings as of T (and later, online) to predict the next window.

``task_data`` computes what every task of a batch shares (``TaskData``); each registered task
(``userrep.tasks.registry``: future listening, artist preference, similar users, and any other
package's) is one call of ``train_task`` (the KFP pipeline fans out over the registry), which
writes its files into BATCH/downstream/ and its registration record last:

    <task>.pt / .faiss ...   the task's model files
    <task>.json              batch id, validation metrics, design, file hashes

Heads come in designs chosen on the validation users: ``embedding`` (the embedding alone) and,
where a task has it, ``embedding+history`` (the embedding plus the user's own history of each
candidate, ``userrep.tasks.history``; what a downstream team deploys). The validation users choose
early stopping, blend weights and the design, and report the metric the gate compares: both
batches of a comparison are measured the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from userrep.backfill import load_encoder, read_embeddings
from userrep.baselines import choose, decayed_matrix, user_artist_matrix
from userrep.batch.layout import BatchDir, read_manifest
from userrep.batch.registry import register_task
from userrep.data import Dataset
from userrep.features import FeatureSpace, to_utc
from userrep.featurize import build_user_features
from userrep.fsio import sha256
from userrep.model import embed
from userrep.source import EventSource
from userrep.tasks import future_listening, history, registry
from userrep.tasks._mlp import HeadConfig


@dataclass(frozen=True)
class DownstreamConfig:
    label_days: int = 28
    top_k: int = 1000
    valid_share: float = 0.2
    # The task models train and validate on a seeded sample of at most this many users (the
    # candidate artists and their popularity come from the same sample): the task data holds
    # several (users x top_k) matrices, 4 KB a user each. The heads' history features served
    # online are computed for every user of the batch all the same (``serving_history``).
    max_users: int = 50_000
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
    artist_vectors: np.ndarray  # (K, d) the primary encoder's artist vectors
    train: np.ndarray
    valid: np.ndarray
    window_artists: object  # (users, all artists) csr window plays, for neighbour relevance
    label_days: int  # the window used (wider than asked where the data is sparse)
    plays: np.ndarray  # (users, K) play weight of the top-K artists before T - L
    recent: np.ndarray  # (users, K) the same with the recency decay chosen on validation users
    half_life_days: float | None  # that decay (None: none)
    popularity: np.ndarray  # (K,) play weight of the top-K artists before T - L
    cold_x: np.ndarray  # (users, d) the users embedded from onboarding and attributes alone
    skipped: str | None = None  # why the tasks cannot be trained on this batch, if they cannot

    @cached_property
    def side(self) -> np.ndarray:
        """(users, K, 3) the history features of every (user, top-K artist)."""
        return history.side_features(self.plays, self.recent)

    def head_meta(self, task: str, config: DownstreamConfig) -> dict:
        """What every task's saved head keeps beside its own: which batch and window it was
        trained on, its settings, the recency decay of the history features."""
        return {
            "task": task,
            "batch_id": self.batch_id,
            "label_days": self.label_days,
            "embedding_dim": int(self.x.shape[1]),
            "head": asdict(config.head),
            "half_life_days": self.half_life_days,
        }


MIN_LABELLED = 20  # users with a label-window play needed to train and validate a task


def task_data(
    batch_dir: str | Path, source: Dataset | EventSource, config: DownstreamConfig = DownstreamConfig()
) -> TaskData:
    """Embeddings as of T - L and labels from [T - L, T). Where fewer than ``MIN_LABELLED`` users
    play a top artist in the window (sparse data), the window doubles while the data reaches back
    that far; if it is still too thin the tasks are skipped (``TaskData.skipped`` says why).
    ``source``: a dataset directory's ``EventSource`` reads only the sample's events."""
    batch_dir = Path(batch_dir)
    source = source if isinstance(source, EventSource) else EventSource(source)
    manifest = read_manifest(batch_dir)
    space, model = load_encoder(batch_dir)
    as_of = to_utc(manifest["as_of"])
    first = source.first_time()
    label_days = config.label_days
    while True:
        found = _labelled(source, space, as_of, label_days, config.top_k, config.max_users, config.seed)
        if len(found[0]) >= MIN_LABELLED or first is None or as_of - pd.Timedelta(days=2 * label_days) < first:
            break
        label_days *= 2
    rows, features, labels, played, top, win_all, before, start, plays_all = found
    users = features.user_ids
    skipped = None
    if len(rows) < MIN_LABELLED:
        skipped = (
            f"label_days: only {len(rows)} users play a top artist in the {label_days} days before "
            f"{as_of.isoformat()} (the widest window the data allows); at least {MIN_LABELLED} are needed"
        )
    rows = np.random.default_rng(config.seed).permutation(rows)
    n_valid = max(1, int(round(config.valid_share * len(rows))))
    train, valid = np.sort(rows[n_valid:]), np.sort(rows[:n_valid])
    popularity = np.asarray(plays_all.sum(axis=0)).ravel()[top].astype(np.float32)

    def score(recent: np.ndarray) -> float:  # the history baseline on the validation users
        scores = history.history_scores(recent[valid], popularity)
        return future_listening.validation_score(scores, labels[valid], played[valid]) if len(valid) else 0.0

    half_life, recent, _ = choose(
        history.HALF_LIVES, lambda h: _dense(decayed_matrix(before, space, users, start, h), top), score
    )
    artist_ids, vectors = space.primary.artist_vectors(source.items)
    artist_vectors = vectors[pd.Index(artist_ids).get_indexer(space.artists[top])]
    return TaskData(
        manifest["batch_id"],
        users,
        embed(model, features.matrix),
        labels,
        played,
        space.artists[top].astype(str),
        artist_vectors,
        train,
        valid,
        win_all,
        label_days,
        _dense(plays_all, top),
        recent,
        half_life,
        popularity,
        embed(model, features.cold_like()),
        skipped,
    )


def _dense(matrix, cols: np.ndarray) -> np.ndarray:
    return matrix[:, cols].toarray().astype(np.float32)


def _labelled(
    source: EventSource,
    space: FeatureSpace,
    as_of: pd.Timestamp,
    label_days: int,
    top_k: int,
    max_users: int,
    seed: int,
):
    """Users with a top-artist play in [as_of - label_days, as_of), their features as of the window's
    start, the label and played (0/1) matrices, the top-K artists, the window's plays, the events
    before the window, its start and their plays (users, all artists). Users: those known at the
    window's start, or a seeded sample of ``max_users`` of them."""
    start = as_of - pd.Timedelta(days=label_days)
    users = source.known_users(start)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    ds = source.of_users(users)  # only the sample's events from here on (5% of them for 50k of 1M users)
    features = build_user_features(ds, start, space, user_ids=users)
    users = features.user_ids
    ts = ds.events.column("ts")
    before = ds.events.filter(pc.less(ts, pa_ts(start)))
    window = ds.events.filter(pc.and_(pc.greater_equal(ts, pa_ts(start)), pc.less(ts, pa_ts(as_of))))
    hist_all, win_all = user_artist_matrix(before, space, users), user_artist_matrix(window, space, users)
    weight = np.asarray(hist_all.sum(axis=0)).ravel()
    played = np.flatnonzero(weight > 0)
    top = played[np.argsort(-weight[played], kind="stable")][:top_k]
    labels = (win_all[:, top] > 0).toarray().astype(np.float32)
    played = (hist_all[:, top] > 0).toarray().astype(np.float32)
    return np.flatnonzero(labels.sum(axis=1) > 0), features, labels, played, top, win_all, before, start, hist_all


def pa_ts(ts: pd.Timestamp):
    return pa.scalar(ts.to_pydatetime(), pa.timestamp("us", tz="UTC"))


def train_task(
    batch_dir: str | Path,
    task: str,
    ds: Dataset | EventSource,
    config: DownstreamConfig = DownstreamConfig(),
    data: TaskData | None = None,
) -> dict:
    """Train one registered task's model on the batch, validate it, write its files and
    registration record (``register_task``); a task that needs labels the batch lacks is
    registered as skipped, with the reason (the batch is complete without it, the gate sees why)."""
    spec = registry.get(task)
    batch_dir = Path(batch_dir)
    files = BatchDir(batch_dir)
    files.downstream.mkdir(exist_ok=True)
    data = data or task_data(batch_dir, ds, config)
    record = {"task": task, "batch_id": data.batch_id, "label_days": data.label_days, "head": asdict(config.head)}
    record["half_life_days"] = data.half_life_days  # the recency decay of the history features
    skipped = {"metrics": {}, "n_train": 0, "n_valid": 0, "files": {}}
    if data.skipped and spec.needs_labels:
        return register_task(batch_dir, task, {**record, "skipped": data.skipped, **skipped})
    try:
        trained = spec.train(files, data, config)
    except registry.Skipped as reason:
        return register_task(batch_dir, task, {**record, "skipped": str(reason), **skipped})
    return register_task(
        batch_dir,
        task,
        {
            **record,
            **trained.meta,
            "metrics": {k: round(float(v), 6) for k, v in trained.metrics.items()},
            "n_train": int(len(data.train)),
            "n_valid": int(len(data.valid)),
            "files": {f.name: sha256(f) for f in trained.files},
        },
    )


def serving_history(batch_dir: str | Path, source: Dataset | EventSource, data: TaskData):
    """(user_ids, plays, recent) of every user of the batch as of its ``as_of`` over the batch's
    candidate artists (sparse (users, K)): what its +history heads take when serving. Summed over
    the events a batch at a time (``EventSource.fold``): only the sums are held."""
    batch_dir = Path(batch_dir)
    source = source if isinstance(source, EventSource) else EventSource(source)
    manifest = read_manifest(batch_dir)
    space = FeatureSpace.load(BatchDir(batch_dir).encoders)
    ids, _, _ = read_embeddings(BatchDir(batch_dir).embeddings)
    as_of = to_utc(manifest["as_of"])
    cols = space.artist_index(data.artists)

    def add(total, events: pa.Table):
        events = events.filter(pc.less(events.column("ts"), pa_ts(as_of)))
        plays = user_artist_matrix(events, space, ids)[:, cols]
        recent = (
            plays
            if data.half_life_days is None
            else decayed_matrix(events, space, ids, as_of, data.half_life_days)[:, cols]
        )
        return (plays, recent) if total is None else (total[0] + plays, total[1] + recent)

    plays, recent = source.fold(add, None)
    return ids, plays, recent
