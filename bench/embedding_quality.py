"""Neighbour-taste agreement of the embedding vs. simple alternatives, side by side.

    python bench/embedding_quality.py             # default world (20k users), 20 epochs in-process

For warm users: share of each user's 10 nearest neighbours (cosine) whose hidden dominant genre
(truth.parquet) equals the user's. For cold users (no events before as_of, onboarding picked):
the same share among their 10 nearest *warm* users. Representations: the autoencoder embedding,
the raw standardized features, PCA of them to the same dimension, and chance. Prints JSON with
ratios against chance. (Issue "Transfer learning and evaluation" builds the full protocol.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from userrep.data import load_dataset
from userrep.features import fit_feature_space
from userrep.featurize import build_user_features
from userrep.model import AEConfig, embed, standardization
from userrep.train import fit_autoencoder
from userrep.world import WorldConfig, generate_world


def agreement(x: np.ndarray, labels: np.ndarray, queries: np.ndarray, pool: np.ndarray, k: int = 10) -> float:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    hits = []
    for start in range(0, len(queries), 2048):
        q = queries[start : start + 2048]
        sims = x[q] @ x[pool].T
        sims[pool[None, :] == q[:, None]] = -np.inf
        top = pool[np.argpartition(-sims, k, axis=1)[:, :k]]
        hits.append((labels[top] == labels[q, None]).mean(axis=1))
    return float(np.concatenate(hits).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--as-of", default="2026-05-01")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(WorldConfig(users=args.users), tmp, progress=False)
        ds = load_dataset(tmp)
        truth = pd.read_parquet(f"{tmp}/truth.parquet").set_index("user_id")
    space = fit_feature_space(ds, args.as_of)
    features = build_user_features(ds, args.as_of, space)
    started = time.perf_counter()
    model = fit_autoencoder(features, AEConfig(epochs=args.epochs)).model
    fit_s = time.perf_counter() - started
    labels = truth["dominant_genre"].reindex(features.user_ids).to_numpy()
    slices = features.schema.slices()
    warm = np.flatnonzero(features.matrix[:, slices["activity_180d"]][:, 3] == 1)
    cold = np.flatnonzero(
        (features.matrix[:, slices["activity_180d"]][:, 3] == 0)
        & (features.matrix[:, slices["onboarding"]][:, -1] == 1)
    )
    mean, std = standardization(features.matrix)
    raw = (features.matrix - mean) / std
    dim = model.config.latent
    representations = {
        "autoencoder": embed(model, features.matrix),
        "raw_standardized": raw,
        f"pca_{dim}": PCA(n_components=dim, random_state=0).fit(raw[warm]).transform(raw),
    }
    chance = float((pd.Series(labels[warm]).value_counts(normalize=True) ** 2).sum())
    rows = {}
    for name, x in representations.items():
        w = agreement(x, labels, warm, warm)
        c = agreement(x, labels, cold, warm)
        rows[name] = {
            "warm_top10": round(w, 4),
            "cold_top10": round(c, 4),
            "warm_vs_chance": round(w / chance, 2),
            "cold_vs_chance": round(c / chance, 2),
        }
    print(
        json.dumps(
            {
                "bench": "embedding_quality",
                "users": args.users,
                "warm": len(warm),
                "cold": len(cold),
                "chance": round(chance, 4),
                "fit_s": round(fit_s, 1),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
