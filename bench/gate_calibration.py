"""Calibrate the gate's thresholds on known shifts (prints JSON; not a test).

Takes the serving batch and a candidate (default: the two batches `make demo` builds) and
reports, side by side with the GatePolicy limits:

* embedding drift (Evidently's domain-classifier ROC AUC, the gate's method) for the clean
  retrain and for planted shifts: +delta reference-std on 8 of the dims, and a population
  shift (only users on one side of the first principal axis);
* kNN@10 overlap after Procrustes for the clean retrain and for shuffled embeddings;
* the largest per-column feature drift score in the clean retrain, and for one activity
  column scaled 10x.

    python bench/gate_calibration.py [--root work/batches] [--candidate ID] [--serving ID]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from userrep.batch.layout import BatchDir, read_manifest


def main() -> None:
    from evidently.metrics.embeddings import ModelDriftMethod

    from userrep.backfill import read_embeddings
    from userrep.batch.gate import GatePolicy, comparable_frame, feature_drift, knn_overlap, procrustes
    from userrep.batch.registry import list_batches, read_pointer
    from userrep.data import load_dataset
    from userrep.features import FeatureSpace, to_utc
    from userrep.featurize import build_user_features
    from userrep.model import UserAutoencoder, embed

    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("work/batches"))
    parser.add_argument("--candidate")
    parser.add_argument("--serving")
    args = parser.parse_args()
    rows = sorted(list_batches(args.root), key=lambda r: r["as_of"])
    if len(rows) < 2:
        raise SystemExit(f"need two batches under {args.root}: run `make demo` first")
    pointer = read_pointer(args.root)
    serving_id = args.serving or (pointer["history"][-1] if pointer["history"] else rows[0]["batch_id"])
    candidate_id = args.candidate or rows[-1]["batch_id"]
    candidate, serving = args.root / candidate_id, args.root / serving_id
    policy = GatePolicy()
    rng = np.random.default_rng(0)
    started = time.perf_counter()

    manifest = read_manifest(candidate)
    ds = load_dataset(manifest["data"]["path"])
    ids, cand, _ = read_embeddings(BatchDir(candidate).embeddings)
    _, serv, _ = read_embeddings(BatchDir(serving).embeddings)
    fit_rows = np.sort(rng.choice(len(ids), size=min(len(ids), 4 * policy.sample), replace=False))
    same_time = embed(
        UserAutoencoder.load(BatchDir(serving).model),
        build_user_features(
            ds, to_utc(manifest["as_of"]), FeatureSpace.load(BatchDir(serving).encoders), user_ids=ids[fit_rows]
        ).matrix,
    )
    align = procrustes(cand[fit_rows], same_time)
    aligned = align(cand)
    queries = np.arange(min(len(fit_rows), policy.sample))

    def sample(x: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(x[np.sort(rng.choice(len(x), size=min(len(x), policy.sample), replace=False))])

    def drift(x: np.ndarray) -> float:
        return round(float(ModelDriftMethod()(sample(x), sample(serv))[0]), 4)

    std = serv.std(axis=0)
    dims = rng.choice(serv.shape[1], size=8, replace=False)
    shifted = {}
    for delta in (0.1, 0.25, 0.5, 1.0):
        moved = aligned.copy()
        moved[:, dims] += delta * std[dims]
        shifted[f"+{delta}std_on_8_dims"] = drift(moved)
    axis = np.linalg.svd(serv - serv.mean(axis=0), full_matrices=False)[2][0]
    side = (aligned - aligned.mean(axis=0)) @ axis > 0
    shuffled = cand[fit_rows][rng.permutation(len(fit_rows))]

    share, over, _ = feature_drift(candidate, serving, GatePolicy(max_column_drift=0.0))
    from scipy.stats import wasserstein_distance

    column = "activity_30d:log_plays"  # Evidently's "Wasserstein distance (normed)": W / std(reference)
    ref_col, cur_col = comparable_frame(serving)[column].to_numpy(), comparable_frame(candidate)[column].to_numpy()
    scaled = {
        "column": column,
        "clean": round(wasserstein_distance(ref_col, cur_col) / ref_col.std(), 4),
        "scaled_10x": round(wasserstein_distance(ref_col, 10 * cur_col) / ref_col.std(), 4),
    }
    natural_max = max(over.values()) if over else 0.0
    out = {
        "candidate": candidate_id,
        "serving": serving_id,
        "embedding_drift_auc": {
            "clean_retrain": drift(aligned),
            **shifted,
            "population_half_of_first_axis": drift(aligned[side]),
            "limit": policy.max_embedding_drift,
        },
        "knn_overlap": {
            "clean_retrain": round(knn_overlap(align(cand[fit_rows]), same_time, queries), 4),
            "shuffled_rows": round(knn_overlap(align(shuffled), same_time, queries), 4),
            "chance": round(10 / len(fit_rows), 4),
            "floor": policy.min_knn_overlap,
        },
        "feature_drift": {
            "clean_retrain_share": share,
            "clean_retrain_max_column_score": natural_max,
            "clean_retrain_worst_columns": dict(sorted(over.items(), key=lambda kv: -kv[1])[:5]),
            "one_column": scaled,
            "share_limit": policy.max_drift_share,
            "column_limit": policy.max_column_drift,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
