"""Metric functions against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from userrep.metrics import auc, ndcg_at_k, ndcg_from_gains, recall_at_k, top_k


def test_top_k_orders_best_first_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.9]])
    assert top_k(scores, 3).tolist() == [[1, 3, 2]]


def test_ndcg_perfect_and_hand_computed():
    relevance = np.array([[1, 0, 1, 0]])
    assert ndcg_at_k(np.array([[4, 3, 2, 1]]), relevance, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    # Ranking: items 0, 2 first -> perfect.
    assert ndcg_at_k(np.array([[4, 1, 3, 0]]), relevance, 2) == pytest.approx(1.0)
    # Relevant at ranks 2 and 4 of 4: (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3)).
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(np.array([[3, 4, 1, 2]]), relevance, 4) == pytest.approx(expected)


def test_ndcg_graded_gains_and_rows_without_relevance_are_skipped():
    relevance = np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    scores = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 3.0]])
    # Row 0 ranks gains [1, 3]; ideal [3, 1].
    expected = (1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3))
    assert ndcg_at_k(scores, relevance, 2) == pytest.approx(expected)  # row 1 ignored, not a 0


def test_ndcg_from_gains_uses_all_ideal_items():
    # 3 relevant items exist but only 1 was retrieved at rank 1 of k=2: DCG 1, ideal 1 + 1/log2(3).
    value = ndcg_from_gains(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0, 1.0]]))
    assert value[0] == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_recall_at_k():
    relevance = np.array([[1, 1, 0, 1], [0, 0, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.8, 0.7], [1, 2, 3, 4]])
    assert recall_at_k(scores, relevance, 2) == pytest.approx(1 / 3)
    assert recall_at_k(scores, relevance, 3) == pytest.approx(2 / 3)


def test_auc_hand_cases():
    assert auc([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.3, 0.8, 0.9]) == 0.0
    assert auc([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == pytest.approx(0.75)
    assert auc([1, 0], [0.5, 0.5]) == 0.5  # ties count half
    assert math.isnan(auc([1, 1], [0.1, 0.2]))
