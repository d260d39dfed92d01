"""Future listening: rank the top-K artists by how likely the user plays them in the label window."""

from __future__ import annotations

import numpy as np

from userrep.metrics import ndcg_at_k, recall_at_k
from userrep.tasks._mlp import HeadConfig, MLPHead, fit_mlp, predict


def fit_head(x: np.ndarray, labels: np.ndarray, config: HeadConfig = HeadConfig()) -> MLPHead:
    """Multi-label head: representation -> one logit per top-K artist; bias starts at base rates."""
    return fit_mlp(x, labels, config, prior=labels.mean(axis=0))


def scores(head: MLPHead, x: np.ndarray) -> np.ndarray:
    return predict(head, x)


def ranking_metrics(scores: np.ndarray, labels: np.ndarray, history: np.ndarray) -> dict[str, float]:
    """nDCG@10 and recall@50 over all top-K artists, and nDCG@10_new over artists the user did
    not play before the cutoff (those are masked out of the ranking)."""
    new_scores = np.where(history > 0, -np.inf, scores)
    new_labels = np.where(history > 0, 0, labels)
    return {"ndcg@10": ndcg_at_k(scores, labels, 10), "recall@50": recall_at_k(scores, labels, 50),
            "ndcg@10_new": ndcg_at_k(new_scores, new_labels, 10)}
