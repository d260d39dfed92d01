"""Ranking and classification metrics, vectorized over users.

Conventions: a row (user) with no relevant item is left out of the mean, since no ranking can
score anything there; nDCG uses log2(rank + 1) discounts and graded gains as given; recall@k is
hits in the top k over all relevant items of the row.
"""

from __future__ import annotations

import numpy as np


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k highest scores per row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def ndcg_from_gains(ranked_gains: np.ndarray, ideal_gains: np.ndarray) -> np.ndarray:
    """Per-row nDCG from the gains of the ranked list and the best achievable gains (both (n, k)).

    Rows whose ideal DCG is 0 come back as NaN (no relevant item).
    """
    k = ranked_gains.shape[1]
    dcg = ranked_gains @ _discounts(k)
    ideal = np.sort(ideal_gains, axis=1)[:, ::-1][:, :k] @ _discounts(min(k, ideal_gains.shape[1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


def ndcg_rows(scores: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """Per-row nDCG@k of rankings by ``scores`` against (graded or binary) ``relevance``, both
    (n, m); NaN for rows without a relevant item."""
    relevance = np.asarray(relevance, dtype=np.float64)
    ranked = np.take_along_axis(relevance, top_k(scores, k), axis=1)
    ideal = -np.sort(-relevance, axis=1)[:, :k]
    return ndcg_from_gains(ranked, ideal)


def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> float:
    """Mean nDCG@k over rows with a relevant item."""
    return _nanmean(ndcg_rows(scores, relevance, k))


def recall_rows(scores: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """Per row: (relevant items in the top k) / (relevant items); NaN without a relevant item."""
    relevant = np.asarray(relevance) > 0
    hits = np.take_along_axis(relevant, top_k(scores, k), axis=1).sum(axis=1)
    total = relevant.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / total, np.nan)


def recall_at_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> float:
    """Mean recall@k over rows with a relevant item."""
    return _nanmean(recall_rows(scores, relevance, k))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half). NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # here: scipy.stats costs every process that imports this module ~1 s

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
