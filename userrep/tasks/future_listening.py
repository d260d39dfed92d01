"""Future listening: rank the top-K artists by how likely the user plays them in the label window."""

from __future__ import annotations

import numpy as np

from userrep.metrics import ndcg_rows, recall_rows
from userrep.tasks import history
from userrep.tasks._mlp import HeadConfig, MLPHead, fit_mlp, predict


def fit_head(
    x: np.ndarray, labels: np.ndarray, config: HeadConfig = HeadConfig(), side: np.ndarray | None = None, validate=None
) -> MLPHead:
    """Multi-label head: representation (+ optional per-artist side features (n, K, f)) -> one
    logit per top-K artist; bias starts at base rates. ``validate``: see ``fit_mlp``."""
    return fit_mlp(x, labels, config, prior=labels.mean(axis=0), side=side, validate=validate)


def fit_with_history(
    fit: tuple, valid: tuple | None, popularity: np.ndarray, config: HeadConfig, score
) -> tuple[MLPHead, dict]:
    """The +history head (the ``embedding+history`` design) and its meta, as ``userrep evaluate``
    measures it and a batch deploys it.

    It learns from the fitting users twice, with their history and as new users (represented from
    onboarding and attributes alone, no history), so it serves both. With validation users it
    stops early on the mean of their nDCG seen warm and seen cold, and the weights of the history
    score (users with history) and the popularity prior (users without) added to its logits are
    chosen on them; without, no early stopping and both weights 0.

    fit: (x, cold_x, labels, side); valid: (x, cold_x, side, plays, recent) or None;
    score: scores of the validation users -> float (higher is better).
    """
    x, cold_x, labels, side = fit
    validate = None
    if valid is not None:
        valid_x, valid_cold, valid_side, plays, recent = valid
        none = np.zeros_like(valid_side)
        validate = lambda h: (score(scores(h, valid_x, valid_side)) + score(scores(h, valid_cold, none))) / 2  # noqa: E731
    head = fit_head(
        np.vstack([x, cold_x]), np.vstack([labels] * 2), config, np.concatenate([side, np.zeros_like(side)]), validate
    )
    warm = cold = 0.0
    if valid is not None:
        warm = history.best_weight(
            scores(head, valid_x, valid_side), history.played_scores(plays, recent, popularity), score
        )
        cold = history.best_weight(scores(head, valid_cold, none), history.prior(popularity, len(valid_x)), score)
    return head, {
        "design": history.WITH_HISTORY,
        "history_weight": warm,
        "prior_weight": cold,
        "popularity": np.asarray(popularity).tolist(),
    }


def scores(head: MLPHead, x: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
    return predict(head, x, side)


def ranking_rows(
    scores: np.ndarray, labels: np.ndarray, history: np.ndarray, unseen_only: bool = False
) -> dict[str, np.ndarray]:
    """Per-user nDCG@10 and recall@50, and nDCG@10_new over artists the user did not play before
    the cutoff (those are masked out of the ranking). ``unseen_only``: the first two rank unseen
    artists only as well (where users do not come back to what they played, e.g. movies)."""
    new_scores = np.where(history > 0, -np.inf, scores)
    new_labels = np.where(history > 0, 0, labels)
    main_scores, main_labels = (new_scores, new_labels) if unseen_only else (scores, labels)
    return {
        "ndcg@10": ndcg_rows(main_scores, main_labels, 10),
        "recall@50": recall_rows(main_scores, main_labels, 50),
        "ndcg@10_new": ndcg_rows(new_scores, new_labels, 10),
    }


def ranking_metrics(
    scores: np.ndarray, labels: np.ndarray, history: np.ndarray, unseen_only: bool = False
) -> dict[str, float]:
    """The means of ``ranking_rows`` over users with a relevant artist."""
    return {
        name: float(np.nanmean(rows)) if np.isfinite(rows).any() else float("nan")
        for name, rows in ranking_rows(scores, labels, history, unseen_only).items()
    }


def deployed_scores(
    head: MLPHead, meta: dict, x: np.ndarray, plays: np.ndarray | None = None, recent: np.ndarray | None = None
) -> np.ndarray:
    """Ranking scores of a batch's future-listening head as it was deployed (``meta``: the head's
    saved meta). An ``embedding+history`` head takes the users' ``plays`` / ``recent`` (users, K)
    over its artists; without them (or all zero) a user is scored as one without history."""
    if meta.get("design") != history.WITH_HISTORY:
        return scores(head, x)
    zeros = np.zeros((len(x), head.out.out_features), np.float32)
    plays = zeros if plays is None else np.asarray(plays, np.float32)
    recent = plays if recent is None else np.asarray(recent, np.float32)
    logits = scores(head, x, history.side_features(plays, recent))
    return history.blended(
        logits, plays, recent, np.asarray(meta["popularity"], np.float32), meta["history_weight"], meta["prior_weight"]
    )
