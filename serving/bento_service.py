"""BentoML service: downstream task inference with the promoted batch's heads.

    POST /recommend/artists           {"user_id": ...} or {"embedding": [...], "batch_id": ...}, "k"
    POST /predict/artist-preference   same user input, "artists": [...]

The heads, the artist list and the batch id are loaded together (one bundle) and reloaded when
SERVING.json changes; a request takes one bundle, so it never mixes a head of one batch with an
embedding of another. A user's embedding comes from the online store under the bundle's batch id;
an embedding stamped with another batch id is refused with 409.

Heads of the ``embedding+history`` design also take the user's history of each candidate artist:
for a ``user_id`` it is read from the online store (``user_artist_history``, same batch id, kept
current by the event path); a request with an ``embedding`` is scored as a user without history.

Settings from the environment: USERREP_BATCH_ROOT, USERREP_FEAST_HOME (optional), USERREP_ONLINE,
USERREP_REDIS.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ConfigDict, Field

from userrep.layout import BatchDir, pointer_path
from userrep.tasks.history import WITH_HISTORY


class Conflict(BentoMLException):
    error_code = HTTPStatus.CONFLICT


class BadInput(BentoMLException):
    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class UnknownUser(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class UserInput(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, not silently ignored
    user_id: str | None = Field(default=None, min_length=1, max_length=256)
    embedding: list[float] | None = Field(default=None, max_length=4096)
    batch_id: str | None = Field(default=None, max_length=256)


class RecommendInput(UserInput):
    k: int = Field(default=10, ge=1, le=1000)


class PreferenceInput(UserInput):
    artists: list[str] = Field(min_length=1, max_length=1000)


@dataclass
class Bundle:
    batch_id: str
    pointer_mtime: float
    recommend: object
    recommend_meta: dict
    artists: list  # the candidate artists (the order of both heads' history features)
    preference: object
    preference_meta: dict
    artist_index: dict
    artist_vectors: np.ndarray
    dim: int

    @property
    def takes_history(self) -> bool:
        return WITH_HISTORY in (self.recommend_meta.get("design"), self.preference_meta.get("design"))


def load_bundle(root: Path) -> Bundle:
    from userrep.batches import batch_dir, read_pointer
    from userrep.downstream import load_head

    mtime = pointer_path(root).stat().st_mtime
    batch_id = read_pointer(root)["serving"]
    if batch_id is None:
        raise RuntimeError(f"no batch is serving under {root}")
    directory = batch_dir(root, batch_id)
    recommend, meta = load_head(BatchDir(directory).head("future_listening"))
    preference, pmeta = load_head(BatchDir(directory).head("artist_preference"))
    if pmeta["artists"] != meta["artists"]:
        raise RuntimeError(f"batch {batch_id}: the two heads have different candidate artists")
    return Bundle(
        batch_id,
        mtime,
        recommend,
        meta,
        meta["artists"],
        preference,
        pmeta,
        {a: i for i, a in enumerate(pmeta["artists"])},
        np.asarray(pmeta["artist_vectors"], np.float32),
        recommend.hidden[0].in_features,
    )


@bentoml.service(name="userrep_tasks", traffic={"timeout": 30})
class TaskService:
    def __init__(self) -> None:
        self.root = Path(os.environ.get("USERREP_BATCH_ROOT", "work/batches"))
        self._lock = threading.Lock()
        self.bundle = load_bundle(self.root)
        self._store = None
        home = os.environ.get("USERREP_FEAST_HOME")
        if home:
            from userrep.store import open_store, store_config

            self._store = open_store(
                store_config(
                    home, os.environ.get("USERREP_ONLINE", "sqlite"), os.environ.get("USERREP_REDIS", "127.0.0.1:6379")
                ),
                apply=False,
            )

    def current(self) -> Bundle:
        """The bundle of the serving batch (reloaded whole when the pointer file changes)."""
        try:
            mtime = pointer_path(self.root).stat().st_mtime
        except OSError:
            return self.bundle
        if mtime != self.bundle.pointer_mtime:
            with self._lock:
                if mtime != self.bundle.pointer_mtime:
                    self.bundle = load_bundle(self.root)
        return self.bundle

    def _embedding(self, bundle: Bundle, user_id: str | None, embedding: list | None, batch_id: str | None):
        if (user_id is None) == (embedding is None):
            raise BadInput("user_id/embedding: give exactly one of them")
        if embedding is not None:
            if batch_id is None:
                raise BadInput("batch_id: required with an embedding (which batch made it?)")
            if batch_id != bundle.batch_id:
                raise Conflict(f"batch_id: embedding of batch {batch_id!r}, serving batch is {bundle.batch_id!r}")
            if len(embedding) != bundle.dim or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in embedding
            ):
                raise BadInput(f"embedding: expected {bundle.dim} finite numbers")
            return np.asarray(embedding, np.float32)[None, :]
        if self._store is None:
            raise BadInput("user_id: this server has no online store; send an embedding")
        from userrep.onlinestore import online_embeddings

        vectors, found = online_embeddings(self._store, [user_id], bundle.batch_id)
        if not found[0]:
            raise UnknownUser(
                f"user_id: unknown user {user_id!r} in batch {bundle.batch_id} "
                f"(register new users with POST /users on the embedding service)"
            )
        return vectors[:1]

    def _history(self, bundle: Bundle, user_id: str | None):
        """(plays, recent) (1, K) of a user for heads that take history; (None, None) otherwise."""
        if user_id is None or self._store is None or not bundle.takes_history:
            return None, None
        from userrep.onlinestore import online_history

        return online_history(self._store, [user_id], bundle.batch_id, bundle.artists)

    @bentoml.api(route="/recommend/artists", input_spec=RecommendInput)
    def recommend_artists(
        self, user_id: str | None = None, embedding: list[float] | None = None, batch_id: str | None = None, k: int = 10
    ) -> dict:
        from userrep.tasks.future_listening import deployed_scores

        bundle = self.current()
        x = self._embedding(bundle, user_id, embedding, batch_id)
        scores = deployed_scores(bundle.recommend, bundle.recommend_meta, x, *self._history(bundle, user_id))[0]
        top = np.argsort(-scores)[
            :k
        ]  # score: the sigmoid of the ranking score (a +history head adds the history score)
        return {
            "batch_id": bundle.batch_id,
            "user_id": user_id,
            "artists": [
                {"artist_id": bundle.artists[i], "score": round(float(1 / (1 + np.exp(-scores[i]))), 6)} for i in top
            ],
        }

    @bentoml.api(route="/predict/artist-preference", input_spec=PreferenceInput)
    def predict_artist_preference(
        self,
        artists: list[str],
        user_id: str | None = None,
        embedding: list[float] | None = None,
        batch_id: str | None = None,
    ) -> dict:
        from userrep.tasks import artist_preference
        from userrep.tasks.history import side_features

        bundle = self.current()
        unknown = [a for a in artists if a not in bundle.artist_index]
        if unknown:
            raise BadInput(f"artists: unknown to batch {bundle.batch_id}: {unknown[:5]}")
        x = self._embedding(bundle, user_id, embedding, batch_id)
        rows = np.array([bundle.artist_index[a] for a in artists])
        side = None
        if bundle.preference_meta.get("design") == WITH_HISTORY:
            plays, recent = self._history(bundle, user_id)
            plays = np.zeros((1, len(bundle.artists)), np.float32) if plays is None else plays
            side = side_features(plays, plays if recent is None else recent)
        pairs = (np.zeros(len(rows), np.int64), rows, None)
        logits = artist_preference.scores(bundle.preference, x, bundle.artist_vectors, pairs, side)
        return {
            "batch_id": bundle.batch_id,
            "user_id": user_id,
            "probabilities": {a: round(float(1 / (1 + np.exp(-v))), 6) for a, v in zip(artists, logits)},
        }
