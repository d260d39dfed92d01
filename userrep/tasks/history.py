"""The user's own history of each candidate artist: the task features a deployed head takes next to
the embedding (``+history`` rows in ``userrep evaluate``, the ``embedding+history`` design of a
batch's downstream models), and the history score blended into its ranking.

One owner for these definitions: ``userrep.evaluate`` measures the design with them, a batch's
downstream models train with them, and serving scores with them, so what is measured is what runs.

Inputs are two (users, K) matrices over the K candidate artists: ``plays`` (summed play weight
before the reference time) and ``recent`` (the same with each play weighted 0.5 ** (age in days /
half-life); ``recent = plays`` without decay).

The collaborative inputs score the candidates from the user's own plays with models of all users'
plays over them (``collaborative``): EASE^R's item-item weights, and ALS's artist factors with the
user folded in. They carry what the embedding cannot on item-centric data (movies: nothing is
watched twice, so the history score is worthless there and co-occurrence is all). Their weights
are chosen on validation users with the history weight, for every representation alike; 0 turns
one off.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

HALF_LIVES = (None, 7.0, 30.0, 90.0, 365.0)  # days; recency decays tried, the best on validation users kept
BLEND_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)  # of the history score added to a +history head
COLLAB_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 64.0)  # of each collaborative score (64: near that input's own order)
WITH_HISTORY = "embedding+history"  # the design of a batch's heads that take these features
EMBEDDING = "embedding"  # the other design: the embedding alone


def side_features(plays: np.ndarray, recent: np.ndarray) -> np.ndarray:
    """(users, K, 3): played (0/1), log(1 + plays), log(1 + recency-decayed plays).

    Log scale: a user's play counts span orders of magnitude, and the head adds these linearly
    to a logit (nDCG@10 on the held-out users of the 1,500-user test world: log counts 0.679,
    linear shares 0.645).
    """
    plays, recent = np.asarray(plays, np.float32), np.asarray(recent, np.float32)
    return np.stack([plays > 0, np.log1p(plays), np.log1p(recent)], axis=2).astype(np.float32)


def history_scores(recent: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Past artists first, by decayed play weight, then the rest by popularity (all in (0, 2])."""
    played = np.asarray(recent.toarray() if hasattr(recent, "toarray") else recent)
    top = played.max(axis=1, keepdims=True)
    fill = popularity / max(float(popularity.max()), 1e-12) * 0.999
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(played > 0, 1.0 + played / np.where(top > 0, top, 1.0), fill[None, :]).astype(np.float32)


def played_scores(plays: np.ndarray, recent: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """The history score on the artists the user played, 0 elsewhere (the head ranks the rest)."""
    return np.where(np.asarray(plays) > 0, history_scores(recent, popularity), 0.0).astype(np.float32)


def prior(popularity: np.ndarray, n: int) -> np.ndarray:
    """The history score of a user without history: popularity scaled into [0, 1)."""
    return np.broadcast_to(history_scores(np.zeros((1, len(popularity))), popularity), (n, len(popularity)))


def collaborative(plays: np.ndarray, models: dict) -> dict[str, np.ndarray]:
    """Each collaborative input's scores (users, K) of the candidates from the users' plays, scaled
    per user to a largest magnitude of 1 (their scales differ by user and model; a blend weight
    needs one), 0 for a user without plays. ``models``: ``"ease"``: EASE^R's item-item weights
    (K, K, diagonal 0) over the played sets; ``"als"``: (artist factors Y (K, d), Y'Y + L2 I), the
    user folded in from log(1 + plays) as ALS itself solves for a user (``_fold_in``)."""
    plays = np.asarray(plays, np.float32)
    out = {}
    if models.get("ease") is not None:
        out["ease"] = _per_user_scaled((plays > 0).astype(np.float32) @ np.asarray(models["ease"], np.float32))
    if models.get("als") is not None:
        factors, gram = models["als"]
        out["als"] = _per_user_scaled(_fold_in(plays, factors, gram) @ factors.T)
    return out


def _per_user_scaled(raw: np.ndarray) -> np.ndarray:
    top = np.abs(raw).max(axis=1, keepdims=True)
    return np.divide(raw, top, out=np.zeros_like(raw), where=top > 0).astype(np.float32)


def _fold_in(plays: np.ndarray, factors: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Each user's ALS factors from confidence log(1 + plays) with the artist factors held
    (``gram``: their Y'Y + L2 I, kept with them): the least-squares solve ``implicit`` runs per
    user (``recalculate_user``), in numpy: a served request folds in one user, and implicit's
    call took 16 ms for it here against 0.3 ms for both collaborative inputs this way (1,000
    candidates, 64 factors, one BLAS thread)."""
    confidence = np.log1p(plays)
    out = np.zeros((len(plays), factors.shape[1]), np.float32)
    for user in np.flatnonzero((confidence > 0).any(axis=1)):
        cols = np.flatnonzero(confidence[user] > 0)
        c, y = confidence[user, cols], factors[cols]
        out[user] = np.linalg.solve(gram + (y.T * (c - 1.0)) @ y, y.T @ c)
    return out


def collab_sum(collab: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray | float:
    """The weighted sum of the collaborative scores (0 where every weight is 0)."""
    return sum((w * collab[name] for name, w in weights.items() if w), 0.0)


def best_weights(
    logits: np.ndarray, history: np.ndarray, collab: dict[str, np.ndarray], score
) -> tuple[float, dict[str, float]]:
    """(history weight, {input: weight}) of ``logits + w_h * history + sum(w_c * collab[c])`` that
    ``score`` (validation users) likes best: coordinate ascent from all 0, each weight over its
    grid with the others held, two sweeps (a full grid is 8 x 7 x 7 scorings per head)."""
    weights = {"history": 0.0, **{name: 0.0 for name in collab}}
    grids = {"history": BLEND_WEIGHTS, **{name: COLLAB_WEIGHTS for name in collab}}
    scores = {"history": history, **collab}

    def value(w: dict) -> float:
        return score(logits + sum((v * scores[k] for k, v in w.items() if v), 0.0))

    best = value(weights)
    for _ in range(2):
        for name, grid in grids.items():
            for candidate in grid:
                trial = {**weights, name: candidate}
                found = value(trial)
                if found > best:
                    best, weights = found, trial
    return weights.pop("history"), weights


def best_weight(logits: np.ndarray, extra: np.ndarray, score: Callable[[np.ndarray], float]) -> float:
    """The blend weight w of ``logits + w * extra`` that ``score`` (validation users) likes best."""
    values = [score(logits + w * extra) for w in BLEND_WEIGHTS]
    return BLEND_WEIGHTS[int(np.argmax(values))]


def blended(
    logits: np.ndarray,
    plays: np.ndarray,
    recent: np.ndarray,
    popularity: np.ndarray,
    history_weight: float,
    prior_weight: float,
    collab: dict[str, np.ndarray] | None = None,
    collab_weights: dict[str, float] | None = None,
) -> np.ndarray:
    """A +history head's ranking scores: its logits plus, for users with history among the
    candidates, the weighted history score of the artists they played and the weighted
    collaborative scores (``collab``: ``collaborative``'s), and for users without, the weighted
    popularity prior (the weights were chosen on validation users)."""
    warm = (np.asarray(plays) > 0).any(axis=1, keepdims=True)
    known = history_weight * played_scores(plays, recent, popularity) + collab_sum(collab or {}, collab_weights or {})
    extra = np.where(warm, known, prior_weight * prior(popularity, len(logits)))
    return (logits + extra).astype(np.float32)


def probability(logit: float) -> float:
    """A served score: the sigmoid of a head's logit, rounded for the wire."""
    return round(float(1 / (1 + np.exp(-logit))), 6)


def window_history(batch_dir, window, artists, half_life_days: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(plays, recent) (validation users, len(artists)) of the gate's window (``registry.Window``):
    each validation user's history of ``artists`` before the window starts, in one batch's space,
    with that batch's recency decay (what its deployed +history heads take)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from userrep.baselines import decayed_matrix, user_artist_matrix
    from userrep.batch.layout import BatchDir
    from userrep.features import FeatureSpace

    space = FeatureSpace.load(BatchDir(batch_dir).encoders)
    users = window.data.user_ids[window.data.valid]
    events = window.source.of_users(users).events
    start = pa.scalar(window.start.to_pydatetime(), pa.timestamp("us", tz="UTC"))
    before = events.filter(pc.less(events.column("ts"), start))
    cols = space.artist_index(artists)
    plays = user_artist_matrix(before, space, users)[:, cols].toarray()
    recent = decayed_matrix(before, space, users, window.start, half_life_days)[:, cols].toarray()
    return plays, recent
