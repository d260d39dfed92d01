"""One space across batches (userrep.continuity): each step exact where it claims to be, and a
continued batch close to its anchor where a fresh fit is not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from userrep.continuity import (
    WEIGHTS,
    Anchor,
    column_names,
    columns_of,
    continue_fit,
    fold_rotation,
    warm_start,
)
from userrep.data import load_dataset
from userrep.encoders import ItemVectors, align_vectors
from userrep.features import FeatureConfig, fit_feature_space
from userrep.featurize import build_user_features
from userrep.model import AEConfig, embed
from userrep.train import fit_autoencoder

AE = AEConfig(latent=16, hidden=64, epochs=6)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


@pytest.fixture(scope="module")
def first(small_world):
    """A batch-like anchor as of May 1: its space, model and embeddings; and the dataset."""
    ds = load_dataset(small_world)
    space = fit_feature_space(ds, "2026-05-01")
    features = build_user_features(ds, "2026-05-01", space)
    model = fit_autoencoder(features, AE).model
    return ds, Anchor("b1", space, model, features.user_ids, embed(model, features.matrix)), features


def test_item_vectors_rotated_away_are_rotated_back_exactly():
    rng = np.random.default_rng(0)
    anchor = ItemVectors(
        "collab", np.array([f"i{i}" for i in range(200)], dtype=object), rng.normal(size=(200, 8)).astype(np.float32)
    )
    turned = ortho_group.rvs(8, random_state=1)
    new = ItemVectors("collab", anchor.item_ids[::-1].copy(), (anchor.vectors[::-1] @ turned).astype(np.float32))
    aligned = align_vectors(new, anchor)
    np.testing.assert_allclose(aligned.vectors, anchor.vectors[::-1], atol=1e-4)


def test_a_warm_start_computes_the_anchors_embedding_of_every_input(first):
    """Later data with other columns (here fewer top artists, standing in for a vocabulary that
    moved) and another standardization: the warm-started model still embeds every user exactly as
    the anchor's model does."""
    ds, anchor, _ = first
    space = fit_feature_space(ds, "2026-06-30", FeatureConfig(top_artists=128), anchor=anchor.space)
    later = build_user_features(ds, "2026-06-30", space)
    columns = column_names(space)
    assert set(columns) != set(anchor.columns)  # the vocabulary moved: the name matching is exercised
    model = warm_start(anchor, later, columns, AE)
    ours = embed(model, later.matrix)
    theirs = embed(anchor.model, columns_of(later.matrix, columns, anchor.columns))
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_folding_a_rotation_turns_the_embedding_and_keeps_the_reconstruction(first):
    _, anchor, features = first
    rotation = ortho_group.rvs(AE.latent, random_state=3)
    model = fit_autoencoder(features, replace(AE, epochs=1)).model
    x = torch.from_numpy(features.matrix[:200])
    with torch.no_grad():
        before, z_before = model(x)
        after, z_after = fold_rotation(model, rotation)(x)
    np.testing.assert_allclose(z_after.numpy(), z_before.numpy() @ rotation, atol=1e-4)
    np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-4)


def test_a_retrain_with_another_seed_lands_in_the_anchors_space(first):
    """Same data, seed 1 instead of 0: fresh, the basis is unrelated; continued, the same users
    keep their coordinates."""
    ds, anchor, features = first
    reseeded = replace(AE, seed=1)
    space = fit_feature_space(ds, "2026-05-01", FeatureConfig(seed=1), anchor=anchor.space)
    again = build_user_features(ds, "2026-05-01", space)
    fresh = embed(fit_autoencoder(again, reseeded).model, again.matrix)
    fit, aligned_to = continue_fit(again, space, anchor, reseeded)
    continued = embed(fit.model, again.matrix)
    assert aligned_to["batch_id"] == "b1" and aligned_to["stability_weight"] in WEIGHTS
    assert np.median(cosines(fresh, anchor.embeddings)) < 0.5
    assert np.median(cosines(continued, anchor.embeddings)) > 0.9


def test_a_model_of_another_size_starts_a_new_space_and_says_why(first):
    _, anchor, features = first
    fit, aligned_to = continue_fit(features, anchor.space, anchor, replace(AE, latent=8, epochs=1))
    assert aligned_to["batch_id"] is None and "latent" in aligned_to["reason"]
    assert embed(fit.model, features.matrix[:5]).shape == (5, 8)
