"""The names a batch root and a batch directory are made of, spelled here only.

    ROOT/SERVING.json         the pointer: serving batch id, history (userrep.batch.registry)
    ROOT/<batch id>/          one batch (``BatchDir``):
        build.json            the fit stage's record (settings, as_of, timings)
        encoders/             the fitted FeatureSpace
        features.parquet      every user's feature vector as of the batch's as_of
        checkpoints/          the fit's per-epoch checkpoints (resume after a crash)
        model.pt              the autoencoder
        embeddings.parquet    every user's embedding (the backfill)
        downstream/<task>.pt  one model per downstream task (userrep.tasks.registry), <task>.json its record
        gate.json             the gate's decision
        rollout.html          the rollout report: the decision and every number it was made on
        drift_report.html     Evidently's feature drift report
        FAILED.json           a pipeline run that failed marks its batch (never promoted)
        manifest.json         written last: a directory without it is not a finished batch

Imports nothing from userrep, so every module (batches, build, downstream, gate, serving) can
use it without a cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
POINTER = "SERVING.json"
POINTER_LOCK = "SERVING.lock"  # held while the pointer changes (userrep.batch.registry)


def manifest_path(batch_dir: str | Path) -> Path:
    return Path(batch_dir) / MANIFEST


def read_manifest(batch_dir: str | Path) -> dict:
    return json.loads(manifest_path(batch_dir).read_text())


def pointer_path(root: str | Path) -> Path:
    return Path(root) / POINTER


@dataclass(frozen=True)
class BatchDir:
    """The files of one batch directory."""

    path: Path | str  # as given; ``directory`` is its Path

    @property
    def directory(self) -> Path:
        return Path(self.path)

    @property
    def manifest(self) -> Path:
        return self.directory / MANIFEST

    @property
    def build_record(self) -> Path:
        return self.directory / "build.json"

    @property
    def encoders(self) -> Path:
        return self.directory / "encoders"

    @property
    def features(self) -> Path:
        return self.directory / "features.parquet"

    @property
    def partitions(self) -> Path:
        return self.directory / "partitions"

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def model(self) -> Path:
        return self.directory / "model.pt"

    @property
    def embeddings(self) -> Path:
        return self.directory / "embeddings.parquet"

    @property
    def downstream(self) -> Path:
        return self.directory / "downstream"

    def head(self, task: str) -> Path:
        return self.downstream / f"{task}.pt"

    def task_record(self, task: str) -> Path:
        return self.downstream / f"{task}.json"

    @property
    def neighbour_index(self) -> Path:
        """The similar-users FAISS index and its row ids, in embeddings.parquet order."""
        return self.downstream / "similar_users.faiss"

    @property
    def neighbour_ids(self) -> Path:
        return self.downstream / "similar_users.ids.npy"

    @property
    def gate(self) -> Path:
        return self.directory / "gate.json"

    @property
    def rollout_report(self) -> Path:
        return self.directory / "rollout.html"

    @property
    def drift_report(self) -> Path:
        return self.directory / "drift_report.html"

    @property
    def failed(self) -> Path:
        return self.directory / "FAILED.json"

    @property
    def hashed(self) -> tuple[Path, ...]:
        """The files the manifest records a sha256 of."""
        return (self.model, self.embeddings, self.features)
