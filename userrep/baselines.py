"""Baselines a practitioner would try, on the same split and users as the embedding.

Each representation is a matrix with one row per user (same order as the features); the task
heads are then shared, so methods differ only in what the user looks like:

* ``raw``: the full standardized feature vector;
* ``pca``: PCA of the same standardized features to the embedding's dimension;
* ``item_mean``: play-weighted mean collaborative item vector over all of the user's history;
* ``onboarding_mean``: mean collaborative vector of the user's onboarding artists (cold start);
* ``als``: implicit ALS on the pre-cutoff user x artist matrix, scored directly (no head);
* ``popularity``: every user gets the same artist ranking (no representation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from userrep.features import FeatureSpace, UserFeatures
from userrep.model import standardization


def user_artist_matrix(events, space: FeatureSpace, user_ids: np.ndarray) -> sp.csr_matrix:
    """Summed play weight per (user, artist of the space) for the given users."""
    user = pd.Index(user_ids).get_indexer(events.column("user_id").to_numpy(zero_copy_only=False))
    item = space.item_index(events.column("item_id").to_numpy(zero_copy_only=False))
    keep = (user >= 0) & (item >= 0)
    matrix = sp.csr_matrix((events.column("weight").to_numpy()[keep], (user[keep], space.item_artist[item[keep]])),
                           shape=(len(user_ids), len(space.artists)))
    matrix.sum_duplicates()
    return matrix


def raw_representation(features: UserFeatures) -> np.ndarray:
    mean, std = standardization(features.matrix)
    return (features.matrix - mean) / std


def pca_representation(features: UserFeatures, fit_rows: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """PCA fitted on ``fit_rows`` only (the head-training users), applied to everyone."""
    raw = raw_representation(features)
    dim = min(dim, raw.shape[1], len(fit_rows))
    return PCA(n_components=dim, random_state=seed).fit(raw[fit_rows]).transform(raw).astype(np.float32)


def item_mean_representation(features: UserFeatures) -> np.ndarray:
    """Play-weighted mean collaborative item vector over all history: the ``collab_all`` group."""
    slices = features.schema.slices()
    if "collab_all" not in slices:
        raise ValueError("item_mean needs the all-history window (FeatureConfig.windows containing 0)")
    return features.matrix[:, slices["collab_all"]]


def onboarding_mean_representation(features: UserFeatures, collab_dim: int) -> np.ndarray:
    """The onboarding group's leading block: mean collaborative vector of the picked artists."""
    start = features.schema.slices()["onboarding"].start
    return features.matrix[:, start:start + collab_dim]


@dataclass(frozen=True)
class ALSModel:
    user_factors: np.ndarray  # (users, d), zeros for users without history
    artist_factors: np.ndarray  # (artists, d)

    def scores(self, rows: np.ndarray, artist_cols: np.ndarray) -> np.ndarray:
        return self.user_factors[rows] @ self.artist_factors[artist_cols].T


def fit_als(user_artists: sp.csr_matrix, dim: int, seed: int, onboarding: sp.csr_matrix | None = None) -> ALSModel:
    """implicit ALS with confidence log(1 + plays); users without history but with onboarding
    artists get factors solved from those picks (ALS's own fold-in)."""
    from implicit.cpu.als import AlternatingLeastSquares

    confidence = user_artists.copy().astype(np.float32)
    confidence.data = np.log1p(confidence.data)
    # More factors than about half the catalog lets ALS memorize the matrix (84 Deezer genres, 64 factors).
    dim = max(2, min(dim, user_artists.shape[1] // 2))
    with threadpool_limits(1, "blas"):  # implicit's advice: BLAS threads fight its own (it checks at init)
        model = AlternatingLeastSquares(factors=dim, regularization=0.05, iterations=15, random_state=seed)
        model.fit(confidence, show_progress=False)
    users = np.array(model.user_factors, dtype=np.float32)
    users[np.asarray(confidence.sum(axis=1)).ravel() == 0] = 0.0
    if onboarding is not None:
        cold = np.flatnonzero((np.asarray(confidence.sum(axis=1)).ravel() == 0) & (np.diff(onboarding.indptr) > 0))
        if cold.size:
            picks = onboarding[cold].astype(np.float32)
            users[cold] = np.asarray(model.recalculate_user(np.arange(cold.size), picks), dtype=np.float32)
    return ALSModel(users, np.asarray(model.item_factors, dtype=np.float32))
