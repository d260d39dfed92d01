"""BentoML service: downstream task inference with the promoted batch's heads, one route per
registered task that has one (``userrep.tasks.registry``: ``task.route``, ``task.request``):

    POST /recommend/artists           {"user_id": ..., "batch_id"?} or {"embedding": [...], "batch_id": ...}, "k"
    POST /predict/artist-preference   same user input, "artists": [...]
    POST /predict/genre-affinity      same user input, "k"

(and any other registered task's route, with its own request fields beside the user's).
Every live batch (``userrep.batch.registry.live_batches``: the serving one, the previous ones kept
live, the pinned ones) has its predictor (``userrep.batch.predict.TaskPredictor``: its heads and
batch id loaded together), reloaded when SERVING.json changes. A request names its batch with
``batch_id`` (default: the serving one; 410 for a batch that is not live, 404 for none) and takes
that one predictor, so it never mixes a head of one batch with an embedding of another: a
``user_id``'s embedding comes from the online store under that batch id, and an ``embedding``
must say which batch made it. Every answer names its batch.

Heads of the ``embedding+history`` design also take the user's history of each candidate artist:
for a ``user_id`` it is read from the online store (``user_artist_history``, same batch id, kept
current by the event path); a request with an ``embedding`` is scored as a user without history.

Settings from the environment: USERREP_BATCH_ROOT, USERREP_LIVE_PREVIOUS, USERREP_FEAST_HOME
(optional), USERREP_ONLINE, USERREP_REDIS, USERREP_READ_TOKEN(_FILE) (optional: requests then need it, or the write token).
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

from serving.auth import BearerAuth
from userrep.batch.layout import MANIFEST, pointer_path
from userrep.batch.predict import TaskPredictor
from userrep.tasks.registry import tasks


class BadInput(BentoMLException):
    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class UnknownUser(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class NotServed(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class Gone(BentoMLException):  # a batch that exists but is not live (any more)
    error_code = HTTPStatus.GONE


class UserInput(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, not silently ignored
    user_id: str | None = Field(default=None, min_length=1, max_length=256)
    embedding: list[float] | None = Field(default=None, max_length=4096)
    # the batch to answer in (a live one; default the serving one), or the one that made ``embedding``
    batch_id: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Bundle:
    """The live batches' predictors (the serving one first) and the pointer file's mtime they were
    loaded at."""

    pointer_mtime: float
    predictors: dict[str, TaskPredictor]


def load_bundle(root: Path, previous: int, loaded: Bundle | None = None) -> Bundle:
    """The live batches' predictors; one already in ``loaded`` is kept (a batch's heads never change)."""
    from userrep.batch.registry import batch_dir, live_batches, read_pointer

    mtime = pointer_path(root).stat().st_mtime
    wanted = live_batches(read_pointer(root), previous)
    if not wanted:
        raise RuntimeError(f"no batch is serving under {root}")
    kept = loaded.predictors if loaded is not None else {}
    return Bundle(mtime, {b: kept.get(b) or TaskPredictor.load(batch_dir(root, b), b) for b in wanted})


class TaskService:
    def __init__(self) -> None:
        from userrep.batch.registry import LIVE_PREVIOUS

        self.root = Path(os.environ.get("USERREP_BATCH_ROOT", "work/batches"))
        self.live_previous = int(os.environ.get("USERREP_LIVE_PREVIOUS", LIVE_PREVIOUS))
        self._lock = threading.Lock()
        self.bundle = load_bundle(self.root, self.live_previous)
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

    def current(self, batch_id: str | None = None) -> TaskPredictor:
        """The predictor of the live batch ``batch_id`` (default: the serving one); the live set is
        reloaded when the pointer file changes (a promotion, a rollback, a pin)."""
        try:
            mtime = pointer_path(self.root).stat().st_mtime
        except OSError:
            mtime = self.bundle.pointer_mtime
        if mtime != self.bundle.pointer_mtime:
            with self._lock:
                if mtime != self.bundle.pointer_mtime:
                    self.bundle = load_bundle(self.root, self.live_previous, self.bundle)
        predictors = self.bundle.predictors
        if batch_id is None:
            return next(iter(predictors.values()))
        if batch_id not in predictors:
            live = ", ".join(predictors)
            if (self.root / batch_id / MANIFEST).exists():
                raise Gone(f"batch_id: {batch_id!r} is not live (live: {live})")
            raise NotServed(f"batch_id: {batch_id!r} is not a batch (live: {live})")
        return predictors[batch_id]

    def _embedding(self, predictor: TaskPredictor, user_id: str | None, embedding: list | None, batch_id: str | None):
        if (user_id is None) == (embedding is None):
            raise BadInput("user_id/embedding: give exactly one of them")
        if embedding is not None:
            if batch_id is None:
                raise BadInput("batch_id: required with an embedding (which batch made it?)")
            if len(embedding) != predictor.dim or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in embedding
            ):
                raise BadInput(f"embedding: expected {predictor.dim} finite numbers")
            return np.asarray(embedding, np.float32)[None, :]
        if self._store is None:
            raise BadInput("user_id: this server has no online store; send an embedding")
        from userrep.onlinestore import online_embeddings

        vectors, found = online_embeddings(self._store, [user_id], predictor.batch_id)
        if not found[0]:
            raise UnknownUser(
                f"user_id: unknown user {user_id!r} in batch {predictor.batch_id} "
                f"(register new users with POST /users on the embedding service)"
            )
        return vectors[:1]

    def _history(self, predictor: TaskPredictor, scorer, user_id: str | None):
        """(plays, recent) (1, K) of a user over the scorer's history artists; None where it takes
        none, or the user came as an embedding (scored as a user without history)."""
        if user_id is None or self._store is None or scorer.history_artists is None:
            return None
        from userrep.onlinestore import online_history

        return online_history(self._store, [user_id], predictor.batch_id, scorer.history_artists)

    def answer(self, task: str, fields: dict) -> dict:
        """One route's answer in the request's batch: the user's embedding there, its scorer."""
        predictor = self.current(fields.get("batch_id"))
        try:
            scorer = predictor.scorer(task)
        except LookupError as error:
            raise NotServed(str(error)) from None
        request = tasks()[task].request.model_validate({k: v for k, v in fields.items() if k not in USER_FIELDS})
        user_id = fields.get("user_id")
        x = self._embedding(predictor, user_id, fields.get("embedding"), fields.get("batch_id"))
        try:
            return {"user_id": user_id, **predictor.answer(task, x, self._history(predictor, scorer, user_id), request)}
        except ValueError as error:  # a request field the batch cannot answer (e.g. an unknown artist)
            raise BadInput(str(error)) from None


USER_FIELDS = frozenset(UserInput.model_fields)


def endpoint(task: str, request: type[BaseModel]):
    """The route of one registered task: its request fields beside the user's."""
    spec = type(f"{task.title().replace('_', '')}Input", (UserInput, request), {})

    def call(self: TaskService, **fields) -> dict:
        return self.answer(task, fields)

    call.__name__ = task
    return bentoml.api(route=tasks()[task].route, input_spec=spec)(call)


# BentoML reads a service's routes from its class when it is decorated: one per registered task
# with a route (userrep.tasks.registry), added before.
for _name, _task in tasks().items():
    if _task.route is not None:
        setattr(TaskService, _name, endpoint(_name, _task.request))
TaskService = bentoml.service(name="userrep_tasks", traffic={"timeout": 30})(TaskService)
# every endpoint only reads (POST carries the input): the read token when one is set (serving.auth)
TaskService.add_asgi_middleware(BearerAuth, all_reads=True)
