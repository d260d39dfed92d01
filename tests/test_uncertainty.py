"""Bootstrap intervals and the baselines' closed forms against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from userrep.baselines import choose, fit_ease
from userrep.metrics import auc
from userrep.tasks.history import history_scores
from userrep.uncertainty import Board, interval, resample_weights, weighted_aucs, weighted_means


def test_weighted_means_are_the_means_of_the_resamples():
    values = np.array([0.0, 1.0, np.nan])  # the third user has no relevant item: left out
    weights = np.array([[2, 0, 1], [0, 2, 1], [1, 1, 1]], np.float32)
    assert weighted_means(values, weights).tolist() == [0.0, 1.0, 0.5]


def test_weighted_auc_equals_the_auc_of_the_expanded_pairs():
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.3, 0.5, 0.1])  # one tie across classes (0.3)
    users = np.array([0, 0, 1, 1, 2, 2])
    counts = np.array([[1, 1, 1], [2, 0, 1], [0, 3, 0]], np.float32)
    got = weighted_aucs(labels, scores, users, counts)
    for c, value in zip(counts, got):
        keep = np.repeat(np.arange(6), c[users].astype(int))
        assert value == pytest.approx(auc(labels[keep], scores[keep]))
    assert got[2] == pytest.approx(0.5)  # user 1 alone: its positive ties its negative


def test_binned_auc_interval_is_close_to_the_exact_one():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 200, 20_000)
    labels = rng.random(20_000) < 0.5
    scores = rng.normal(size=20_000) + labels * 0.5
    weights = resample_weights(200, seed=4, rounds=200)
    exact = weighted_aucs(labels, scores, users, weights, levels=10**6)
    assert np.abs(weighted_aucs(labels, scores, users, weights) - exact).max() < 1e-3


def test_interval_of_a_mean_matches_the_normal_approximation():
    values = np.random.default_rng(1).normal(size=400)
    lo, hi = interval(weighted_means(values, resample_weights(400, seed=2)))
    half = 1.96 * values.std() / np.sqrt(400)  # ~0.098
    assert lo == pytest.approx(values.mean() - half, abs=0.02) and hi == pytest.approx(values.mean() + half, abs=0.02)


def test_paired_comparison_sees_a_small_consistent_gain_the_intervals_hide():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, size=300)
    board = Board({"test": 300}, seed=0)
    board.add_rows("t", "baseline", "test", {"m": base})
    board.add_rows("t", "gur", "test", {"m": base + 0.01})  # every user +0.01: tiny, but always
    values = board.tasks()["t"]
    assert values["gur"]["m_ci"][0] < values["baseline"]["m_ci"][1]  # the two intervals overlap ...
    found = board.comparisons(lambda m: m.startswith("gur"))["t"]["m"]
    assert found["ours"] == "gur" and found["significant"] and found["diff_ci"][0] > 0  # ... the paired one does not


def test_ease_weights_match_the_closed_form_by_hand():
    """X = [[1, 1], [1, 0]], l2 = 1: G = [[3, 1], [1, 2]], P = G^-1 = [[2, -1], [-1, 3]] / 5,
    B_ij = -P_ij / P_jj: B_01 = (1/5) / (3/5) = 1/3, B_10 = (1/5) / (2/5) = 1/2, diagonal 0."""
    b = fit_ease(np.array([[1.0, 1.0], [1.0, 0.0]]), l2=1.0)
    assert b == pytest.approx(np.array([[0.0, 1 / 3], [1 / 2, 0.0]]), abs=1e-6)


def test_history_ranks_past_artists_by_weight_then_the_rest_by_popularity():
    scores = history_scores(np.array([[0.0, 2.0, 0.0, 5.0]]), popularity=np.array([10.0, 1.0, 3.0, 0.5]))
    assert np.argsort(-scores[0]).tolist() == [3, 1, 0, 2]


def test_choose_keeps_a_none_setting_when_it_scores_best():
    best, model, scores = choose((None, 7, 30), lambda s: s, lambda s: {None: 0.7, 7: 0.6, 30: 0.69}[s])
    assert best is None and model is None and scores == {"None": 0.7, "7": 0.6, "30": 0.69}
