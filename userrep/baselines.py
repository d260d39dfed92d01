"""Baselines a practitioner would try, on the same split and users as the embedding.

Each representation is a matrix with one row per user (same order as the features); the task
heads are then shared, so methods differ only in what the user looks like:

* ``raw``: the full standardized feature vector;
* ``pca``: PCA of the same standardized features to the embedding's dimension;
* ``item_mean``: play-weighted mean collaborative item vector over all of the user's history;
* ``onboarding_mean``: mean collaborative vector of the user's onboarding artists (cold start);
* ``als``: implicit ALS on the pre-cutoff user x artist matrix, scored directly (no head);
  factors and regularization chosen on validation users;
* ``history``: the user's own past artists by play weight with recency decay (half-life chosen
  on validation users), then the rest by popularity: what a team ships first, and in music, where
  most plays are repeats, hard to beat;
* ``ease``: EASE^R (Steck 2019), a closed-form item-item model over the candidate artists, L2
  chosen on validation users; it scores from co-occurrence only (its diagonal is 0);
* ``popularity``: every user gets the same artist ranking (no representation).

Choosing on validation users (a share of the head-training users, never test users) is what
the embedding's heads get too: a sandbagged baseline would make every comparison a lie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from userrep.encoders import index_in
from userrep.features import FeatureSpace, UserFeatures
from userrep.model import standardization


def user_artist_matrix(events, space: FeatureSpace, user_ids: np.ndarray) -> sp.csr_matrix:
    """Summed play weight per (user, artist of the space) for the given users."""
    user = index_in(events.column("user_id"), user_ids)
    item = index_in(events.column("item_id"), space.item_ids)
    keep = (user >= 0) & (item >= 0)
    matrix = sp.csr_matrix(
        (events.column("weight").to_numpy()[keep], (user[keep], space.item_artist[item[keep]])),
        shape=(len(user_ids), len(space.artists)),
    )
    matrix.sum_duplicates()
    return matrix


def raw_encoder(features: UserFeatures):
    """The full feature vector standardized with the statistics of ``features``: raw rows -> rows."""
    mean, std = standardization(features.matrix)
    return lambda matrix: (matrix - mean) / std


def pca_encoder(features: UserFeatures, fit_rows: np.ndarray, dim: int, seed: int):
    """PCA of the standardized features, fitted on ``fit_rows`` only (the head-training users)."""
    raw = raw_encoder(features)
    dim = min(dim, features.matrix.shape[1], len(fit_rows))
    from sklearn.decomposition import PCA  # here: sklearn is 0.6 s of a serving replica's start

    pca = PCA(n_components=dim, random_state=seed).fit(raw(features.matrix[fit_rows]))
    return lambda matrix: pca.transform(raw(matrix)).astype(np.float32)


def item_mean_encoder(features: UserFeatures, encoder: str):
    """Play-weighted mean item vector of ``encoder`` (the space's primary, collaborative one) over
    all history: its ``<encoder>_all`` group."""
    slices = features.schema.slices()
    if f"{encoder}_all" not in slices:
        raise ValueError("item_mean needs the all-history window (FeatureConfig.windows containing 0)")
    return lambda matrix: matrix[:, slices[f"{encoder}_all"]]


def onboarding_mean_representation(features: UserFeatures, dim: int) -> np.ndarray:
    """The onboarding group's leading block: the picked artists' mean vector of the primary
    encoder (``dim``: its size)."""
    start = features.schema.slices()["onboarding"].start
    return features.matrix[:, start : start + dim]


@dataclass(frozen=True)
class ALSModel:
    user_factors: np.ndarray  # (users, d), zeros for users without history
    artist_factors: np.ndarray  # (artists, d)

    def scores(self, rows: np.ndarray, artist_cols: np.ndarray) -> np.ndarray:
        return self.user_factors[rows] @ self.artist_factors[artist_cols].T


def fit_als(
    user_artists: sp.csr_matrix,
    dim: int,
    seed: int,
    onboarding: sp.csr_matrix | None = None,
    regularization: float = 0.05,
) -> ALSModel:
    """implicit ALS with confidence log(1 + plays); users without history but with onboarding
    artists get factors solved from those picks (ALS's own fold-in)."""
    from implicit.cpu.als import AlternatingLeastSquares

    confidence = user_artists.copy().astype(np.float32)
    confidence.data = np.log1p(confidence.data)
    # More factors than about half the catalog lets ALS memorize the matrix (84 Deezer genres, 64 factors).
    dim = max(2, min(dim, user_artists.shape[1] // 2))
    with threadpool_limits(1, "blas"):  # implicit's advice: BLAS threads fight its own (it checks at init)
        model = AlternatingLeastSquares(factors=dim, regularization=regularization, iterations=15, random_state=seed)
        model.fit(confidence, show_progress=False)
    users = np.array(model.user_factors, dtype=np.float32)
    users[np.asarray(confidence.sum(axis=1)).ravel() == 0] = 0.0
    if onboarding is not None:
        cold = np.flatnonzero((np.asarray(confidence.sum(axis=1)).ravel() == 0) & (np.diff(onboarding.indptr) > 0))
        if cold.size:
            picks = onboarding[cold].astype(np.float32)
            users[cold] = np.asarray(model.recalculate_user(np.arange(cold.size), picks), dtype=np.float32)
    return ALSModel(users, np.asarray(model.item_factors, dtype=np.float32))


def choose(candidates, fit: Callable, score: Callable) -> tuple[Any, Any, dict]:
    """Fit each candidate setting, score it on validation users (higher is better); return the
    best setting, its fitted model, and every score (so the choice is reported, not hidden)."""
    best, best_model, best_value, scores = None, None, -np.inf, {}
    for setting in candidates:  # a setting may be None (e.g. no decay): compare values, not settings
        model = fit(setting)
        scores[str(setting)] = value = float(score(model))
        if value > best_value:
            best, best_model, best_value = setting, model, value
    return best, best_model, scores


def tune_als(user_artists: sp.csr_matrix, dim: int, seed: int, onboarding, score: Callable):
    """Factors (half, same, twice the embedding's dimension), then L2 at the best factors."""
    factors, model, by_factors = choose(
        (dim // 2, dim, dim * 2), lambda f: fit_als(user_artists, f, seed, onboarding), score
    )
    regularization, tuned, by_reg = choose(
        (0.005, 0.5, 5.0), lambda r: fit_als(user_artists, factors, seed, onboarding, r), score
    )
    if by_reg[str(regularization)] <= by_factors[str(factors)]:
        regularization, tuned = 0.05, model
    return tuned, {
        "factors": factors,
        "regularization": regularization,
        "validation": {
            **{f"factors={k}": v for k, v in by_factors.items()},
            **{f"regularization={k}": v for k, v in by_reg.items()},
        },
    }


def decayed_matrix(
    events, space: FeatureSpace, user_ids: np.ndarray, as_of: pd.Timestamp, half_life_days: float | None
) -> sp.csr_matrix:
    """Like ``user_artist_matrix`` with each play weighted 0.5 ** (age in days / half-life)."""
    if half_life_days is None:
        return user_artist_matrix(events, space, user_ids)
    age_days = (as_of.value // 1000 - events.column("ts").cast("int64").to_numpy()) / 86_400e6
    decay = np.power(0.5, np.maximum(age_days, 0.0) / half_life_days)
    import pyarrow as pa

    decayed = events.set_column(
        events.schema.get_field_index("weight"), "weight", pa.array(events.column("weight").to_numpy() * decay)
    )
    return user_artist_matrix(decayed, space, user_ids)


def fit_ease(x: sp.csr_matrix | np.ndarray, l2: float) -> np.ndarray:
    """EASE^R item-item weights B (items, items): argmin ||X - XB||^2 + l2 ||B||^2, diag(B) = 0,
    closed form B = I - P diagMat(1 / diag(P)) with P = (X^T X + l2 I)^-1 (Steck 2019)."""
    return _ease(_gram(x), l2)


def _gram(x: sp.csr_matrix | np.ndarray) -> np.ndarray:
    x = x if isinstance(x, np.ndarray) else x.toarray()
    return (x.T @ x).astype(np.float64)


def _ease(gram: np.ndarray, l2: float) -> np.ndarray:
    gram = gram.copy()
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def tune_ease(x: np.ndarray, score: Callable):
    """L2 on a grid scaled by the mean item count (EASE's L2 lives on the Gram matrix's scale);
    the Gram matrix is computed once for the grid."""
    scale = max(float((x > 0).sum(axis=0).mean()), 1.0)
    gram = _gram(x)
    l2, weights, scores = choose(
        tuple(round(scale * f, 3) for f in (0.03, 0.1, 0.3, 1.0, 3.0)), lambda v: _ease(gram, v), score
    )
    return weights, {"l2": l2, "validation": scores}


def collaborative_models(plays: np.ndarray, valid: np.ndarray, dim: int, seed: int, score: Callable):
    """The +history heads' collaborative inputs (``tasks.history.collaborative``), fitted on every
    user's plays (users, K) of the K candidates, each setting chosen on the ``valid`` rows by
    ``score`` (their scores -> higher is better): EASE^R's L2 (``tune_ease``) and ALS's L2 at the
    embedding's dimension. Returns (models, the choices and their validation scores)."""
    played = (plays > 0).astype(np.float32)
    ease, ease_choice = tune_ease(played, lambda b: score(played[valid] @ b))
    matrix, cols = sp.csr_matrix(plays), np.arange(plays.shape[1])
    regularization, als, by_reg = choose(
        (0.05, 0.5, 5.0), lambda r: fit_als(matrix, dim, seed, regularization=r), lambda m: score(m.scores(valid, cols))
    )
    factors = als.artist_factors
    gram = factors.T @ factors + np.float32(regularization) * np.eye(factors.shape[1], dtype=np.float32)
    models = {"ease": ease, "als": (factors, gram)}
    return models, {"ease": ease_choice, "als": {"regularization": regularization, "validation": by_reg}}
