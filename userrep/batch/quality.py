"""Like-for-like quality of two batches: both batches' deployed models scored on the same users
and the same label window (the candidate's), user by user, and compared paired.

A batch's own validation metric (its task record) is measured on its own window and users: two
batches a month apart are scored on different labels, so the difference of those numbers mixes
model quality with a change in the data. Here the candidate's task data fixes the users (its
validation users), the window [T - L, T) and its labels; each batch embeds those users as of
T - L with its own encoders and model, and each registered task scores both batches' deployed
models on the same units (``DownstreamTask.paired``: future listening nDCG@10 per user over the
candidate's top-K artists, artist preference AUC per user on the same sampled pairs, similar
users nDCG@50 per query, ...).

Per task: both means, the mean paired difference and its standard error (``compare``).
``userrep.batch.policy.decide`` blocks a candidate worse beyond the tolerance and that error. The
same pass gives the head-stability check: each serving head on the candidate's embeddings (as
served when the candidate continues the serving space, else aligned) over the same head on its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from userrep.backfill import load_encoder
from userrep.batch.downstream import DownstreamConfig, TaskData, task_data
from userrep.batch.layout import BatchDir, read_manifest
from userrep.batch.registry import batch_tasks, missing_tasks, skipped_tasks
from userrep.features import to_utc
from userrep.featurize import build_user_features
from userrep.model import embed
from userrep.source import EventSource
from userrep.tasks import registry

log = logging.getLogger(__name__)


def window_embeddings(batch_dir: Path, source: EventSource, data: TaskData, start: pd.Timestamp) -> np.ndarray:
    """Every user of ``data`` embedded by ``batch_dir``'s encoders and model as of ``start``."""
    space, model = load_encoder(batch_dir)
    features = build_user_features(source.of_users(data.user_ids), start, space, user_ids=data.user_ids)
    return embed(model, features.matrix)


def compare(candidate: np.ndarray, serving: np.ndarray) -> dict:
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
    for task in batch_tasks(candidate):
        paths = [BatchDir(p).task_record(task) for p in (candidate, serving)]
        if task not in registry.tasks() or not all(p.exists() for p in paths):
            continue
        metric = registry.get(task).metric
        cand_record, serving_record = (json.loads(p.read_text()) for p in paths)
        if metric not in serving_record["metrics"]:
            continue
        quality[task] = {
            "metric": metric,
            "candidate": cand_record["metrics"].get(metric, float("nan")),
            "serving": serving_record["metrics"][metric],
            "n_candidate": cand_record["n_valid"],
            "n_serving": serving_record["n_valid"],
        }
    return quality


def on_candidate_window(
    candidate: Path,
    serving: Path,
    source: EventSource,
    downstream: DownstreamConfig,
    align,
    continues: bool,
    recent: Sequence[Path] = (),
) -> tuple[dict[str, float] | None, dict[str, dict], dict[str, dict]]:
    """(per task with a head, the share of its like-for-like quality the serving batch's head
    keeps on the candidate's embeddings: as served, with no alignment, when the candidate
    ``continues`` the serving batch's space, else after ``align``; None where the candidate has
    no task data. Per task, the like-for-like comparison, or the recorded one where the candidate
    skipped it. Per task, the comparison with the best of the ``recent`` batches (promoted before
    the serving one) on the same users and labels: the gate's memory, so that a chain of small
    losses, each within the tolerance of the batch before, cannot add up)."""
    recorded = recorded_quality(candidate, serving)
    data = task_data(candidate, source, downstream)
    if data.skipped:
        return None, recorded, {}
    start = to_utc(read_manifest(candidate)["as_of"]) - pd.Timedelta(days=data.label_days)
    own = window_embeddings(serving, source, data, start)
    window = registry.Window(candidate, data, source, start, downstream.seed)
    crossed = data.x if continues else align(data.x)
    # skipped, or missing (the gate blocks it as such): nothing to score, the records stand
    skipped = {**skipped_tasks(candidate), **skipped_tasks(serving), **dict.fromkeys(missing_tasks(candidate), "")}
    quality, kept = {}, {}
    for task, pair in recorded.items():
        spec = registry.get(task)
        if task in skipped:
            quality[task] = pair
            continue
        ours, theirs, theirs_on_ours = spec.paired([candidate, serving, serving], [data.x, own, crossed], window)
        quality[task] = {
            "metric": spec.metric,
            **compare(ours, theirs),
            "recorded": {k: pair[k] for k in ("candidate", "serving")},
        }
        log.info(
            f"quality {task}: {spec.metric} {quality[task]['candidate']:.4f} vs serving "
            f"{quality[task]['serving']:.4f} on the same {quality[task]['n']} users and labels"
        )
        if spec.has_head:
            both = compare(theirs_on_ours, theirs)
            kept[task] = round(both["candidate"] / both["serving"], 4) if both["serving"] > 0 else float("nan")
    log.info(f"stability: the serving heads keep {kept} of their quality on the candidate's embeddings")
    return kept, quality, best_recent(candidate, recent, source, data, window, skipped)


def best_recent(candidate: Path, recent: Sequence[Path], source: EventSource, data: TaskData, window, skipped) -> dict:
    """Per task with a head, the candidate against the recent batch whose deployed head scores best
    on the candidate's window (``compare``, its ``serving`` side that batch's; ``batch`` its id)."""
    found: dict[str, dict] = {}
    for batch in recent:
        if missing_tasks(batch):
            continue
        theirs_x = window_embeddings(batch, source, data, window.start)
        batch_id, theirs_skipped = read_manifest(batch)["batch_id"], skipped_tasks(batch)
        for task in batch_tasks(candidate):
            spec = registry.tasks().get(task)
            if spec is None or not spec.has_head or task in skipped or task in theirs_skipped:
                continue
            ours, theirs = spec.paired([candidate, batch], [data.x, theirs_x], window)
            pair = {"metric": spec.metric, "batch": batch_id, **compare(ours, theirs)}
            if task not in found or pair["serving"] > found[task]["serving"]:
                found[task] = pair
    for task, pair in found.items():
        log.info(f"memory {task}: {pair['metric']} {pair['candidate']:.4f} vs {pair['serving']:.4f} of {pair['batch']}")
    return found
