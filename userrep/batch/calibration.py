"""The gate's scores on a clean retrain and on planted shifts of it: what its limits are calibrated
on (bench/gate_calibration.py) and checked against (tests/test_rollout.py).

The clean retrain is a candidate batch and the batch serving before it, both built on the same
healthy data. Each planted shift changes one thing a reviewer must not let through, and is scored
by the gate's own measurement of the check it must trip:

=====================  ===================================================  ======================
planted shift          what changes                                         check it must trip
=====================  ===================================================  ======================
scaled_column          one activity column of the candidate's features x10  feature_column_drift
shuffled_embeddings    the candidate's embeddings given to the wrong users   stability_knn
half_population        only the users on one side of the first principal    embedding_drift
                       axis remain (half the population gone)
shifted_subspace       +``SHIFT`` std on ``SHIFTED_DIMS`` dims (an eighth)   embedding_drift
=====================  ===================================================  ======================

Limits pass every clean retrain and block every planted shift; ``margins`` says by how much.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from userrep.batch.drift import aligned_pair, embedding_drift, feature_drift, frame_drift, knn_overlap
from userrep.batch.policy import LIMITS, GatePolicy, limit_of, within
from userrep.source import EventSource

SHIFT = 0.25  # reference standard deviations: the smallest move a downstream team would notice
SCALED = 10.0  # the planted column's scale
CALIBRATED = ("feature_drift", "feature_column_drift", "embedding_drift", "stability_knn")  # of ``LIMITS``
PLANTED = {
    "scaled_column": "feature_column_drift",
    "shuffled_embeddings": "stability_knn",
    "half_population": "embedding_drift",
    "shifted_subspace": "embedding_drift",
}


def scores(candidate: Path, serving: Path, source: EventSource, policy: GatePolicy = GatePolicy()) -> dict:
    """{"clean": {check: value}, "planted": {shift: value of the check it must trip}}."""
    rng = np.random.default_rng(policy.seed)
    share, _, frames = feature_drift(candidate, serving, policy)
    columns = frames["column_scores"]
    pair = aligned_pair(candidate, serving, source, policy)
    aligned = pair.align(pair.candidate)
    queries = np.arange(min(len(pair.fit_rows), policy.sample))
    clean = {
        "feature_drift": round(share, 4),
        "feature_column_drift": round(max(columns.values(), default=0.0), 4),
        "embedding_drift": embedding_drift(aligned, pair.serving, policy),
        "stability_knn": round(knn_overlap(pair.align(pair.fitted), pair.same_time, queries), 4),
    }
    activity = [c for c in frames["current"].columns if c.startswith("activity") and frames["current"][c].std() > 0]
    column = max(activity, key=lambda c: frames["current"][c].std())  # the most spread activity column
    scaled = frames["current"].assign(**{column: SCALED * frames["current"][column]})
    scaled_scores = frame_drift(scaled, frames["reference"], policy)[2]["column_scores"]
    shuffled = pair.fitted[rng.permutation(len(pair.fit_rows))]
    std = pair.serving.std(axis=0)
    dims = rng.choice(pair.serving.shape[1], size=max(1, pair.serving.shape[1] // 8), replace=False)
    shifted = aligned.copy()
    shifted[:, dims] += SHIFT * std[dims]
    axis = np.linalg.svd(pair.serving - pair.serving.mean(axis=0), full_matrices=False)[2][0]
    side = (aligned - aligned.mean(axis=0)) @ axis > 0
    planted = {
        "scaled_column": round(max(scaled_scores.values()), 4),
        "shuffled_embeddings": round(knn_overlap(pair.align(shuffled), pair.same_time, queries), 4),
        "half_population": embedding_drift(aligned[side], pair.serving, policy),
        "shifted_subspace": embedding_drift(shifted, pair.serving, policy),
    }
    return {"clean": clean, "planted": planted, "scaled_column": column, "shifted_dims": len(dims)}


def margins(results: list[dict], policy: GatePolicy = GatePolicy()) -> dict:
    """Per check: its limit, the worst clean retrain and the mildest planted shift of ``results``
    (``scores`` of several pairs), and the margin on each side (positive: on the right side)."""
    out = {}
    for check in CALIBRATED:
        limit = limit_of(check, policy)
        sign = 1.0 if LIMITS[check][1] == "max" else -1.0  # margins are measured as "how far inside/outside"
        clean = [r["clean"][check] for r in results]
        planted = [r["planted"][s] for r in results for s, c in PLANTED.items() if c == check]
        worst = max(clean, key=lambda v: sign * v)
        entry = {"limit": limit, "worst_clean": worst, "clean_margin": round(sign * (limit - worst), 4)}
        if planted:
            mildest = min(planted, key=lambda v: sign * v)
            entry |= {"mildest_planted": mildest, "planted_margin": round(sign * (mildest - limit), 4)}
        out[check] = entry
    return out


def holds(result: dict, policy: GatePolicy = GatePolicy()) -> dict[str, bool]:
    """Whether the limits pass the clean retrain (``clean``) and block each planted shift."""
    out = {"clean": all(within(check, v, policy) for check, v in result["clean"].items())}
    return out | {shift: not within(PLANTED[shift], v, policy) for shift, v in result["planted"].items()}
