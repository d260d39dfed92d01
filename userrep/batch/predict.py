"""A batch's task models as one predictor: what a server loads whole and calls.

``TaskPredictor.load`` reads both heads of a batch (future listening, artist preference) with the
candidate artists they share; ``recommend`` and ``preference`` score users given their embeddings
and, for heads of the ``embedding+history`` design, their history of each candidate artist (none:
scored as a user without history). A server swaps predictors by reference, so a request never
mixes a head of one batch with another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from userrep.batch.heads import load_head
from userrep.batch.layout import BatchDir
from userrep.tasks import artist_preference
from userrep.tasks._mlp import MLPHead
from userrep.tasks.future_listening import deployed_scores
from userrep.tasks.history import WITH_HISTORY, side_features


def _probability(logit: float) -> float:
    return round(float(1 / (1 + np.exp(-logit))), 6)


@dataclass(frozen=True)
class TaskPredictor:
    batch_id: str
    recommend_head: MLPHead
    recommend_meta: dict
    preference_head: MLPHead
    preference_meta: dict
    artists: list  # the candidate artists (the order of both heads' history features)
    artist_index: dict
    artist_vectors: np.ndarray

    @classmethod
    def load(cls, batch_dir: str | Path, batch_id: str) -> TaskPredictor:
        files = BatchDir(batch_dir)
        recommend, meta = load_head(files.head("future_listening"))
        preference, pmeta = load_head(files.head("artist_preference"))
        if pmeta["artists"] != meta["artists"]:
            raise RuntimeError(f"batch {batch_id}: the two heads have different candidate artists")
        return cls(
            batch_id,
            recommend,
            meta,
            preference,
            pmeta,
            meta["artists"],
            {a: i for i, a in enumerate(pmeta["artists"])},
            np.asarray(pmeta["artist_vectors"], np.float32),
        )

    @property
    def dim(self) -> int:
        """The embedding size the heads take."""
        return self.recommend_head.n_in

    @property
    def takes_history(self) -> bool:
        return WITH_HISTORY in (self.recommend_meta.get("design"), self.preference_meta.get("design"))

    def unknown_artists(self, artists: list[str]) -> list[str]:
        return [a for a in artists if a not in self.artist_index]

    def recommend(self, x: np.ndarray, k: int, plays=None, recent=None) -> list[dict]:
        """The top ``k`` candidate artists for one user (``x``: (1, dim)); each score is the sigmoid
        of the ranking score (a +history head adds the history score)."""
        scores = deployed_scores(self.recommend_head, self.recommend_meta, x, plays, recent)[0]
        return [{"artist_id": self.artists[i], "score": _probability(scores[i])} for i in np.argsort(-scores)[:k]]

    def preference(self, x: np.ndarray, artists: list[str], plays=None, recent=None) -> dict[str, float]:
        """P(the user plays each of ``artists``) for one user (``x``: (1, dim)); artists known here."""
        rows = np.array([self.artist_index[a] for a in artists])
        side = None
        if self.preference_meta.get("design") == WITH_HISTORY:
            plays = np.zeros((1, len(self.artists)), np.float32) if plays is None else plays
            side = side_features(plays, plays if recent is None else recent)
        pairs = (np.zeros(len(rows), np.int64), rows, None)
        logits = artist_preference.scores(self.preference_head, x, self.artist_vectors, pairs, side)
        return {a: _probability(v) for a, v in zip(artists, logits)}
