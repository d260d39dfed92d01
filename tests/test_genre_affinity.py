"""Genre affinity (userrep.tasks.genre_affinity): its labels, and the task through a batch, the gate,
the rollout report and its BentoML route, found through the registry alone."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import copy_work, post_to_bento
from userrep.backfill import read_embeddings
from userrep.batch.gate import run_gate
from userrep.batch.layout import BatchDir
from userrep.data import load_dataset
from userrep.tasks import genre_affinity
from userrep.tasks.registry import tasks


def test_labels_spread_each_artists_plays_over_its_genres():
    # artist a: two items tagged g0; artist b: one item tagged g0 and g1
    space = SimpleNamespace(
        item_artist=np.array([0, 0, 1]),
        artists=np.array(["a", "b"]),
        item_genres=np.array([[1, 0], [1, 0], [1, 1]], np.float32),
    )
    by_artist = genre_affinity.artist_genres(space)
    np.testing.assert_allclose(by_artist, [[1.0, 0.0], [0.5, 0.5]])
    window = sp.csr_matrix(np.array([[2.0, 2.0], [0.0, 0.0]]))  # user 0: two plays of each; user 1: none
    np.testing.assert_allclose(genre_affinity.genre_shares(window, by_artist), [[0.75, 0.25], [0.0, 0.0]])
    # the metric ranks genres against the true shares; a user without a genre play is not scored
    found = genre_affinity.per_user(np.array([[0.1, 0.9], [0.5, 0.5]]), genre_affinity.genre_shares(window, by_artist))
    assert 0 < found[0] < 1 and np.isnan(found[1])


@pytest.mark.slow  # a copy of the session's two batches, a gate run and a BentoML server: ~40 s
def test_genre_affinity_is_trained_gated_reported_and_served(small_world, two_batches, tmp_path):
    assert "genre_affinity" in tasks()
    work = tmp_path / "work"
    copy_work(two_batches, work)
    root = work / "batches"
    record = json.loads(BatchDir(root / "b2").task_record("genre_affinity").read_text())
    assert not record.get("skipped"), record
    # the head is worth serving: it ranks each user's genres better than the popularity order
    assert record["metrics"]["ndcg@5"] > record["popularity"] and record["design"] in record["designs"]

    gate = run_gate(root / "b2", root / "b1", load_dataset(small_world))
    quality = gate["inputs"]["quality"]["genre_affinity"]
    assert quality["metric"] == "ndcg@5" and quality["n"] > 0
    assert 0 < gate["inputs"]["heads_kept_by_task"]["genre_affinity"] <= 1.2
    assert "quality_genre_affinity" in gate["checks"]
    assert "genre_affinity" in (root / "b2" / "rollout.html").read_text()

    # b1 serves; an embedding is sent with its batch
    _, vectors, _ = read_embeddings(BatchDir(root / "b1").embeddings)
    body = {"embedding": vectors[0].tolist(), "batch_id": "b1", "k": 3}
    answer = post_to_bento(root, work, "/predict/genre-affinity", body)
    assert answer["batch_id"] == "b1" and len(answer["genres"]) == 3
    shares = [g["share"] for g in answer["genres"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-6
    served = tasks()["genre_affinity"].scorer(BatchDir(root / "b1"))
    expected = served.answer(vectors[:1], None, genre_affinity.GenreRequest(k=3))["genres"]
    assert [g["genre"] for g in answer["genres"]] == [g["genre"] for g in expected]
