"""Task heads on disk: what older batches wrote still loads."""

from __future__ import annotations

import numpy as np
import pandas as pd


def test_heads_saved_with_the_old_layer_names_still_load(tmp_path):
    """Batches written before the heads grew side features name their layers net.0 / net.3."""
    import torch

    from userrep.batch.heads import load_head, save_head
    from userrep.tasks._mlp import HeadConfig, MLPHead, predict

    head = MLPHead(4, 3, np.zeros(4), np.ones(4), HeadConfig(hidden=8))
    save_head(tmp_path / "new.pt", head, {"task": "t"})
    blob = torch.load(tmp_path / "new.pt", weights_only=False)
    blob["state"] = {k.replace("hidden.0.", "net.0.").replace("out.", "net.3."): v for k, v in blob["state"].items()}
    del blob["n_side"]
    torch.save(blob, tmp_path / "old.pt")
    loaded, meta = load_head(tmp_path / "old.pt")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    assert meta == {"task": "t"} and np.allclose(predict(loaded, x), predict(head.eval(), x))


def test_history_blend_adds_the_played_score_for_users_with_history_and_the_prior_for_others():
    from userrep.tasks import history

    popularity = np.array([10.0, 5.0, 1.0, 0.0])
    plays = np.array([[0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    logits = np.zeros((2, 4), np.float32)
    scores = history.blended(logits, plays, plays, popularity, history_weight=2.0, prior_weight=0.5)
    # user 0: played artists 2 and 3 first (3 plays > 1 play), the others 0; user 1: popularity order
    assert np.allclose(scores[0], [0.0, 0.0, 2.0 * 2.0, 2.0 * (1.0 + 1.0 / 3.0)])
    assert np.allclose(scores[1], 0.5 * np.array([0.999, 0.4995, 0.0999, 0.0]))
    side = history.side_features(plays, plays / 2)
    assert side.shape == (2, 4, 3) and np.allclose(side[0, 2], [1.0, np.log1p(3.0), np.log1p(1.5)])


def test_deployed_scores_follow_the_design_in_the_heads_meta():
    from userrep.tasks import future_listening
    from userrep.tasks._mlp import HeadConfig, fit_mlp, predict

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), (rng.random((40, 5)) < 0.3).astype(np.float32)
    plain = fit_mlp(x, y, HeadConfig(hidden=8, epochs=2))
    assert np.allclose(future_listening.deployed_scores(plain, {"design": "embedding"}, x), predict(plain, x))
    plays = rng.poisson(1.0, size=(40, 5)).astype(np.float32)
    side_head = fit_mlp(x, y, HeadConfig(hidden=8, epochs=2), side=np.zeros((40, 5, 3), np.float32))
    meta = {"design": "embedding+history", "history_weight": 4.0, "prior_weight": 0.0, "popularity": [5, 4, 3, 2, 1]}
    with_plays = future_listening.deployed_scores(side_head, meta, x, plays, plays)
    without = future_listening.deployed_scores(side_head, meta, x)
    warm = plays.sum(axis=1) > 0
    assert np.allclose(without, predict(side_head, x, np.zeros((40, 5, 3), np.float32)), atol=1e-6)
    assert (with_plays[warm][plays[warm] > 0] > without[warm][plays[warm] > 0] + 3.9).all()  # played artists lifted


def test_the_online_state_gives_the_batch_history_features(small_world):
    """The event path's per-user history of the candidate artists equals the batch's (decay by day)."""
    from userrep.baselines import decayed_matrix, user_artist_matrix
    from userrep.data import load_dataset
    from userrep.encoders import events_before
    from userrep.features import fit_feature_space
    from userrep.state import artist_history, state_from_dataset

    ds = load_dataset(small_world)
    space = fit_feature_space(ds, "2026-05-01")
    state = state_from_dataset(space, ds, "2026-05-01")
    users = np.array(sorted(state.users)[:200], dtype=object)
    columns = np.arange(0, len(space.artists), 3)
    events = events_before(ds, "2026-05-01")
    plays, recent = artist_history(state, users, "2026-05-01", columns, 30.0)
    assert (plays > 0).sum() > 100
    assert np.allclose(plays, user_artist_matrix(events, space, users)[:, columns].toarray(), atol=1e-4)
    batch = decayed_matrix(events, space, users, pd.Timestamp("2026-05-01", tz="UTC"), 30.0)[:, columns].toarray()
    assert np.allclose(recent, batch, rtol=0.03, atol=1e-4)  # a play's age: whole days online, exact in batch


def test_the_collaborative_inputs_are_chosen_where_co_occurrence_predicts_what_comes_next(tmp_path):
    """Items come in pairs and a user goes on to play the partner of what they played: the
    embedding (noise here) cannot know it, EASE^R and ALS over all users' plays can. The +history
    head picks their weights on validation users, they lift their nDCG, and a saved and reloaded
    head scores with them from the plays it is given."""
    from userrep.baselines import collaborative_models
    from userrep.batch.heads import load_head, save_head
    from userrep.tasks import future_listening
    from userrep.tasks._mlp import HeadConfig

    rng = np.random.default_rng(0)
    n, k = 400, 20
    rows, pairs = np.arange(n)[:, None], rng.integers(0, k // 2, size=(n, 2)) * 2  # two pairs per user
    played, labels = np.zeros((n, k), np.float32), np.zeros((n, k), np.float32)
    played[rows, pairs] = 1.0
    played[rows, pairs + 1] = rng.random((n, 2)) < 0.5  # half the time the partner was played too: co-occurrence
    labels[rows, pairs + 1] = 1.0
    x = rng.normal(size=(n, 8)).astype(np.float32)
    side = future_listening.history.side_features(played, played)
    fit, valid = np.arange(300), np.arange(300, n)

    def ndcg(found):
        return future_listening.ranking_metrics(found, labels[valid], np.zeros_like(labels[valid]))["ndcg@10"]

    args = (
        (x[fit], x[fit] * 0, labels[fit], side[fit]),
        (x[valid], x[valid] * 0, side[valid], played[valid], played[valid]),
        played.sum(axis=0),
        HeadConfig(hidden=8, epochs=3),
        ndcg,
    )
    head, without = future_listening.fit_with_history(*args)
    models, choices = collaborative_models(played, valid, 4, 0, ndcg)
    assert set(choices) == {"ease", "als"} and models["ease"].shape == (k, k)
    assert models["als"][0].shape == (k, 4) and models["als"][1].shape == (4, 4)  # artist factors, Y'Y + L2 I
    head, meta = future_listening.fit_with_history(*args, models)
    assert without["collab_weights"] == {} and without["collab_models"] == {}
    assert any(meta["collab_weights"].values())
    assert set(meta["collab_models"]) == {name for name, w in meta["collab_weights"].items() if w}
    head, meta = load_head(save_head(tmp_path / "head.pt", head, meta))
    deployed = future_listening.deployed_scores(head, meta, x[valid], played[valid], played[valid])
    plain = future_listening.deployed_scores(
        head, {**meta, "collab_weights": {}}, x[valid], played[valid], played[valid]
    )
    assert ndcg(deployed) > ndcg(plain) + 0.05


def test_the_served_als_fold_in_solves_as_implicit_does():
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    from userrep.baselines import fit_als
    from userrep.tasks import history

    rng = np.random.default_rng(0)
    plays = (rng.random((300, 200)) < 0.05) * rng.integers(1, 20, size=(300, 200)).astype(np.float32)
    factors = fit_als(sp.csr_matrix(plays), 16, 0, regularization=0.5).artist_factors
    reference = AlternatingLeastSquares(factors=16, regularization=0.5)
    reference.item_factors = factors
    expected = reference.recalculate_user(np.arange(300), sp.csr_matrix(np.log1p(plays)))
    gram = factors.T @ factors + 0.5 * np.eye(16, dtype=np.float32)
    assert np.allclose(history._fold_in(plays, factors, gram), expected, atol=1e-4)
