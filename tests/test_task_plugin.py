"""A downstream task added from outside the package: this module defines one and registers it as an
entry point of ``userrep.tasks`` (a temporary distribution's metadata on ``sys.path``, as an
installed plugin package would), and the task is trained with the batches, gated, shown in the
rollout report and served by BentoML, with no other change anywhere."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field
from sklearn.linear_model import LogisticRegression

from tests.conftest import post_to_bento
from userrep.backfill import read_embeddings
from userrep.batch import registry as batches
from userrep.batch.build import BuildConfig, build_batch
from userrep.batch.downstream import DownstreamConfig
from userrep.batch.gate import run_gate
from userrep.batch.layout import BatchDir
from userrep.data import load_dataset
from userrep.model import AEConfig
from userrep.tasks import registry
from userrep.tasks._mlp import HeadConfig

REPO = Path(__file__).resolve().parents[1]


# -- the plugin's task --------------------------------------------------------------------------


class HeavyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=0.5, ge=0, le=1)


@dataclass(frozen=True)
class HeavyScorer:
    weights: np.ndarray  # (dim + 1,) coefficients, then the intercept
    history_artists = None

    @property
    def dim(self) -> int:
        return len(self.weights) - 1

    def answer(self, x, history, request: HeavyRequest) -> dict:
        p = float(1 / (1 + np.exp(-(x[0] @ self.weights[:-1] + self.weights[-1]))))
        return {"p_heavy": round(p, 6), "heavy": p >= request.threshold}


class HeavyListener:
    """Whether a user plays more than the median training user in the label window: logistic
    regression on the embedding; accuracy per user."""

    name = "heavy_listener"
    metric = "accuracy"
    columns = {"heavy_listener": ("accuracy",)}
    has_head = True
    needs_labels = True
    route = "/predict/heavy-listener"
    request = HeavyRequest

    @staticmethod
    def labels(data) -> np.ndarray:
        plays = np.asarray(data.window_artists.sum(axis=1)).ravel()
        return plays > np.median(plays[data.train])

    @staticmethod
    def path(files) -> Path:
        return files.downstream / "heavy_listener.npy"

    def train(self, files, data, config):
        y = self.labels(data)
        model = LogisticRegression(max_iter=1000).fit(data.x[data.train], y[data.train])
        np.save(self.path(files), np.r_[model.coef_[0], model.intercept_])
        accuracy = float((model.predict(data.x[data.valid]) == y[data.valid]).mean())
        return registry.Trained({"accuracy": accuracy}, [self.path(files)])

    def paired(self, batches, xs, window):
        y = self.labels(window.data)[window.data.valid]
        out = []
        for batch, x in zip(batches, xs):
            weights = np.load(self.path(BatchDir(batch)))
            out.append(((x[window.data.valid] @ weights[:-1] + weights[-1] > 0) == y).astype(float))
        return out

    def scorer(self, files):
        return HeavyScorer(np.load(self.path(files))) if self.path(files).exists() else None

    def evaluate(self, ctx, board, reps, cold_reps, config):
        return {self.name: "a test task: not evaluated offline"}


TASK = HeavyListener()


# -- the test -----------------------------------------------------------------------------------


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """This module registered as an installed package's entry point would be."""
    site = tmp_path / "site"
    info = site / "userrep_heavy_listener-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: userrep-heavy-listener\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[userrep.tasks]\nheavy_listener = {__name__}:TASK\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", f"{site}:{REPO}")  # the BentoML server's Python finds it too
    registry.tasks.cache_clear()
    yield
    registry.tasks.cache_clear()


@pytest.mark.slow  # two batches of the small world, a gate run and a BentoML server: ~2 min
def test_a_task_registered_by_another_package_is_trained_gated_reported_and_served(small_world, tmp_path, plugin):
    assert "heavy_listener" in registry.names()
    root, ds = tmp_path / "batches", load_dataset(small_world)
    config = BuildConfig(ae=AEConfig(epochs=2), downstream=DownstreamConfig(head=HeadConfig(epochs=2)))
    build_batch(small_world, root / "b1", "2026-05-01", config, batch_id="b1")
    assert run_gate(root / "b1", None, ds)["passed"]
    batches.promote(root, "b1")
    build_batch(small_world, root / "b2", "2026-06-30", config, batch_id="b2", anchor=root / "b1")

    record = json.loads(BatchDir(root / "b2").task_record("heavy_listener").read_text())
    assert record["metrics"]["accuracy"] > 0.6 and record["batch_id"] == "b2"  # trained, better than a coin
    gate = run_gate(root / "b2", root / "b1", ds)
    assert gate["inputs"]["quality"]["heavy_listener"]["metric"] == "accuracy"
    assert "heavy_listener" in gate["inputs"]["heads_kept_by_task"] and "quality_heavy_listener" in gate["checks"]
    assert "heavy_listener accuracy" in (root / "b2" / "rollout.html").read_text()

    _, vectors, _ = read_embeddings(BatchDir(root / "b1").embeddings)
    body = {"embedding": vectors[0].tolist(), "batch_id": "b1", "threshold": 0.0}
    answer = post_to_bento(root, tmp_path, "/predict/heavy-listener", body)
    expected = TASK.scorer(BatchDir(root / "b1")).answer(vectors[:1], None, HeavyRequest(threshold=0.0))
    assert answer == {"batch_id": "b1", "user_id": None, **expected} and answer["heavy"] is True
