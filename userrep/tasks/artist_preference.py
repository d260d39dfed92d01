"""Artist preference: will the user play artist X in the label window? (binary, AUC)

Pairs: every label-window artist of the user among the top-K (at most ``max_pos``) as positives,
the same number of negatives drawn by popularity from top-K artists the user did not play —
popular negatives make the task about taste, not about popularity.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from userrep.metrics import auc
from userrep.tasks._mlp import HeadConfig, MLPHead, fit_mlp, predict

PAIR_SAMPLES = 2_500_000  # training budget of the head (pairs x epochs)


def sample_pairs(labels: np.ndarray, popularity: np.ndarray, seed: int, max_pos: int = 20):
    """(user_rows, artist_cols, label) for rows of a binary label matrix (users, K)."""
    rng = np.random.default_rng(seed)
    users, artists, ys = [], [], []
    p = popularity / popularity.sum()
    for row in np.flatnonzero(labels.sum(axis=1) > 0):
        pos = np.flatnonzero(labels[row])
        pos = rng.choice(pos, size=min(max_pos, len(pos)), replace=False)
        weights = np.where(labels[row] > 0, 0.0, p)
        if weights.sum() <= 0:
            continue
        n_neg = min(len(pos), int((weights > 0).sum()))
        neg = rng.choice(len(p), size=n_neg, replace=False, p=weights / weights.sum())
        users += [row] * (len(pos) + n_neg)
        artists += list(pos) + list(neg)
        ys += [1] * len(pos) + [0] * n_neg
    return np.array(users, np.int64), np.array(artists, np.int64), np.array(ys, np.float32)


def _inputs(
    x_users: np.ndarray, artist_vectors: np.ndarray, users: np.ndarray, artists: np.ndarray, side: np.ndarray | None
) -> np.ndarray:
    """(user representation, artist vector[, the user's own history of that artist]) per pair."""
    parts = [x_users[users], artist_vectors[artists]]
    if side is not None:  # (users, K, f): the pair's f history features
        parts.append(side[users, artists])
    return np.hstack(parts)


def pair_config(head: HeadConfig, n_pairs: int) -> HeadConfig:
    """Pairs outnumber users ~20x: larger batches, and at most ``PAIR_SAMPLES`` pairs seen in
    training (8 epochs instead of 15 on the default world: 12 s instead of 25 s per head in
    ``userrep evaluate``, validation AUC -0.004 for every method; small datasets keep all epochs)."""
    return replace(
        head,
        batch_size=max(head.batch_size, 1024),
        epochs=max(1, min(head.epochs, round(PAIR_SAMPLES / max(n_pairs, 1)))),
    )


def fit_head(
    x_users: np.ndarray,
    artist_vectors: np.ndarray,
    pairs,
    config: HeadConfig = HeadConfig(),
    side: np.ndarray | None = None,
    validate=None,
) -> MLPHead:
    """Pair head: (user, artist[, history]) -> logit. ``validate``: see ``fit_mlp``."""
    users, artists, y = pairs
    return fit_mlp(_inputs(x_users, artist_vectors, users, artists, side), y[:, None], config, validate=validate)


def scores(
    head: MLPHead, x_users: np.ndarray, artist_vectors: np.ndarray, pairs, side: np.ndarray | None = None
) -> np.ndarray:
    users, artists, _ = pairs
    return predict(head, _inputs(x_users, artist_vectors, users, artists, side))[:, 0]


def evaluate(
    head: MLPHead, x_users: np.ndarray, artist_vectors: np.ndarray, pairs, side: np.ndarray | None = None
) -> float:
    return auc(pairs[2], scores(head, x_users, artist_vectors, pairs, side))
