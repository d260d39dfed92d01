"""Like-for-like quality of two batches: both batches' deployed heads scored on the same users and
the same label window (the candidate's), user by user, and compared paired.

A batch's own validation metric (its task record) is measured on its own window and users: two
batches a month apart are scored on different labels, so the difference of those numbers mixes
model quality with a change in the data. Here the candidate's task data fixes the users (its
validation users), the window [T - L, T) and its labels; each batch embeds those users as of
T - L with its own encoders and model, and its deployed head (its design, its candidate artists,
its recency decay) scores them:

- future_listening: nDCG@10 per user over the candidate's top-K artists; an artist the serving
  head does not rank scores -inf for it (it could not have been recommended);
- artist_preference: AUC per user on the same sampled (user, artist) pairs, of artists both
  heads know;
- similar_users: nDCG@50 per query user, neighbours searched among the same users in each
  batch's space, relevance the overlap of their window artists.

Per task: both means, the mean paired difference and its standard error (``paired``).
``userrep.batch.policy.decide`` blocks a candidate worse beyond the tolerance and that error. The
same pass gives the head-stability check: the serving artist-preference head's AUC on the
aligned candidate embeddings over its AUC on its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from userrep.backfill import load_encoder
from userrep.baselines import decayed_matrix, user_artist_matrix
from userrep.batch.downstream import (
    WITH_HISTORY,
    DownstreamConfig,
    TaskData,
    head_scores_auc,
    pa_ts,
    reindex_pairs,
    task_data,
)
from userrep.batch.heads import load_head
from userrep.batch.layout import TASKS, BatchDir, read_manifest
from userrep.batch.registry import skipped_tasks
from userrep.features import to_utc
from userrep.featurize import build_user_features
from userrep.metrics import auc
from userrep.model import embed
from userrep.source import EventSource
from userrep.tasks import artist_preference, future_listening, similar_users

log = logging.getLogger(__name__)

# The metric of each task the gate compares (higher is better for all three).
METRICS = {"future_listening": "ndcg@10", "artist_preference": "auc", "similar_users": "ndcg@50"}
QUERIES = 1000  # validation users queried for neighbours (as the task's record measures it)


def window_embeddings(batch_dir: Path, source: EventSource, data: TaskData, start: pd.Timestamp) -> np.ndarray:
    """Every user of ``data`` embedded by ``batch_dir``'s encoders and model as of ``start``."""
    space, model = load_encoder(batch_dir)
    features = build_user_features(source.of_users(data.user_ids), start, space, user_ids=data.user_ids)
    return embed(model, features.matrix)


def per_user(batch_dir: Path, x: np.ndarray, data: TaskData, source: EventSource, start: pd.Timestamp, pairs) -> dict:
    """One batch's deployed heads on the candidate's window (``x``: its embeddings of ``data``'s
    users as of ``start``): per validation user, each task's metric (NaN: nothing to rank); per
    validation pair, the artist-preference score (NaN: an artist the head does not know)."""
    files = BatchDir(batch_dir)
    space, _ = load_encoder(batch_dir)
    valid = data.valid
    users = data.user_ids[valid]
    events = source.of_users(users).events
    before = events.filter(pc.less(events.column("ts"), pa_ts(start)))
    out = {}
    if files.head("future_listening").exists():
        head, meta = load_head(files.head("future_listening"))
        cols = space.artist_index(meta["artists"])
        plays = user_artist_matrix(before, space, users)[:, cols].toarray()
        recent = decayed_matrix(before, space, users, start, meta.get("half_life_days"))[:, cols].toarray()
        scores = future_listening.deployed_scores(head, meta, x[valid], plays, recent)
        where = pd.Index(meta["artists"]).get_indexer(pd.Index(data.artists))
        ranked = np.full((len(valid), len(data.artists)), -np.inf, np.float32)
        ranked[:, where >= 0] = scores[:, where[where >= 0]]
        rows = future_listening.ranking_rows(ranked, data.labels[valid], data.history[valid])
        out["future_listening"] = rows["ndcg@10"]
    if files.head("artist_preference").exists():
        head, meta = load_head(files.head("artist_preference"))
        columns = pd.Index(meta["artists"]).get_indexer(pd.Index(data.artists))
        vectors = np.asarray(meta["artist_vectors"], np.float32)[np.maximum(columns, 0)]
        side = data.side if meta.get("design") == WITH_HISTORY else None
        scores = artist_preference.scores(head, x, vectors, pairs, side)  # per pair: ``pair_auc`` groups them
        out["artist_preference"] = np.where(columns[pairs[1]] >= 0, scores, np.nan)
    queries = valid[:QUERIES]
    found = similar_users.neighbours(similar_users.build_index(x), x, queries, 50)
    out["similar_users"] = similar_users.ndcg_with_overlap(found, queries, data.window_artists)
    return out


def pair_auc(pairs, candidate: np.ndarray, serving: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user AUC of both batches' pair scores, on the pairs both can score."""
    users, _, y = pairs
    both = np.isfinite(candidate) & np.isfinite(serving)
    rows = np.unique(users[both])
    values = np.full((2, len(rows)), np.nan)
    for i, row in enumerate(rows):
        mine = both & (users == row)
        values[:, i] = auc(y[mine], candidate[mine]), auc(y[mine], serving[mine])
    return values[0], values[1]


def paired(candidate: np.ndarray, serving: np.ndarray) -> dict:
    """Means over the users both batches score, their mean paired difference and its standard error."""
    ok = np.isfinite(candidate) & np.isfinite(serving)
    n = int(ok.sum())
    if n == 0:
        return {
            "candidate": float("nan"),
            "serving": float("nan"),
            "difference": float("nan"),
            "se": float("nan"),
            "n": 0,
        }
    diff = candidate[ok] - serving[ok]
    se = float(np.std(diff, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {
        "candidate": round(float(candidate[ok].mean()), 6),
        "serving": round(float(serving[ok].mean()), 6),
        "difference": round(float(diff.mean()), 6),
        "se": round(se, 6),
        "n": n,
        "sd_candidate": round(float(np.std(candidate[ok], ddof=1)), 6) if n > 1 else float("nan"),
        "sd_serving": round(float(np.std(serving[ok], ddof=1)), 6) if n > 1 else float("nan"),
    }


def recorded_quality(candidate: Path, serving: Path) -> dict[str, dict]:
    """Per task, the validation metric of both batches' task records (each on its own window and
    users: shown beside the like-for-like numbers, and the comparison where the candidate could
    not train a task). A task the serving batch skipped (too little data), or both did, is absent:
    there is nothing to regress from. One only the candidate skipped compares as NaN, which
    ``decide`` blocks."""
    quality = {}
    for task in TASKS:
        paths = [BatchDir(p).task_record(task) for p in (candidate, serving)]
        if not all(p.exists() for p in paths):
            continue
        metric = METRICS[task]
        cand_record, serving_record = (json.loads(p.read_text()) for p in paths)
        if metric not in serving_record["metrics"]:
            continue
        quality[task] = {
            "candidate": cand_record["metrics"].get(metric, float("nan")),
            "serving": serving_record["metrics"][metric],
            "n_candidate": cand_record["n_valid"],
            "n_serving": serving_record["n_valid"],
        }
    return quality


def on_candidate_window(
    candidate: Path, serving: Path, source: EventSource, downstream: DownstreamConfig, align
) -> tuple[float | None, dict[str, dict]]:
    """(the serving artist-preference head's AUC kept on the aligned candidate space, or None;
    per task, the like-for-like comparison, or the recorded one where the candidate skipped it)."""
    recorded = recorded_quality(candidate, serving)
    data = task_data(candidate, source, downstream)
    if data.skipped:
        return None, recorded
    start = to_utc(read_manifest(candidate)["as_of"]) - pd.Timedelta(days=data.label_days)
    own = window_embeddings(serving, source, data, start)
    kept = None
    if "artist_preference" not in {**skipped_tasks(candidate), **skipped_tasks(serving)}:
        auc_own, auc_aligned = head_scores_auc(serving, own, data), head_scores_auc(serving, align(data.x), data)
        kept = auc_aligned / auc_own if auc_own > 0 else float("nan")
        log.info(f"stability: serving AP head AUC {auc_aligned:.3f} on aligned candidate vs {auc_own:.3f} ({kept:.0%})")
    popularity = data.labels[data.train].sum(axis=0) + 1.0
    pairs = reindex_pairs(
        artist_preference.sample_pairs(data.labels[data.valid], popularity, downstream.seed + 1), data.valid
    )
    ours = per_user(candidate, data.x, data, source, start, pairs)
    theirs = per_user(serving, own, data, source, start, pairs)
    quality = {}
    for task, pair in recorded.items():
        if task not in ours or task not in theirs:
            quality[task] = pair
            continue
        values = (
            pair_auc(pairs, ours[task], theirs[task]) if task == "artist_preference" else (ours[task], theirs[task])
        )
        quality[task] = {**paired(*values), "recorded": {k: pair[k] for k in ("candidate", "serving")}}
        log.info(
            f"quality {task}: {METRICS[task]} {quality[task]['candidate']:.4f} vs serving {quality[task]['serving']:.4f} "
            f"on the same {quality[task]['n']} users and labels"
        )
    return kept, quality
