"""BentoML service: downstream task inference with the promoted batch's heads, one route per
registered task that has one (``userrep.tasks.registry``: ``task.route``, ``task.request``):

    POST /recommend/artists           {"user_id": ...} or {"embedding": [...], "batch_id": ...}, "k"
    POST /predict/artist-preference   same user input, "artists": [...]

(and any other registered task's route, with its own request fields beside the user's).
The heads and the batch id are loaded together (``userrep.batch.predict.TaskPredictor``)
and reloaded when SERVING.json changes; a request takes one predictor, so it never mixes a head of
one batch with an embedding of another. A user's embedding comes from the online store under the
predictor's batch id; an embedding stamped with another batch id is refused with 409.

Heads of the ``embedding+history`` design also take the user's history of each candidate artist:
for a ``user_id`` it is read from the online store (``user_artist_history``, same batch id, kept
current by the event path); a request with an ``embedding`` is scored as a user without history.

Settings from the environment: USERREP_BATCH_ROOT, USERREP_FEAST_HOME (optional), USERREP_ONLINE,
USERREP_REDIS, USERREP_READ_TOKEN(_FILE) (optional: requests then need it, or the write token).
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
from userrep.batch.layout import pointer_path
from userrep.batch.predict import TaskPredictor
from userrep.tasks.registry import tasks


class Conflict(BentoMLException):
    error_code = HTTPStatus.CONFLICT


class BadInput(BentoMLException):
    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class UnknownUser(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class NotServed(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class UserInput(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it, not silently ignored
    user_id: str | None = Field(default=None, min_length=1, max_length=256)
    embedding: list[float] | None = Field(default=None, max_length=4096)
    batch_id: str | None = Field(default=None, max_length=256)


@dataclass(frozen=True)
class Bundle:
    """The serving batch's predictor and the pointer file's mtime it was loaded at."""

    pointer_mtime: float
    predictor: TaskPredictor


def load_bundle(root: Path) -> Bundle:
    from userrep.batch.registry import batch_dir, read_pointer

    mtime = pointer_path(root).stat().st_mtime
    batch_id = read_pointer(root)["serving"]
    if batch_id is None:
        raise RuntimeError(f"no batch is serving under {root}")
    return Bundle(mtime, TaskPredictor.load(batch_dir(root, batch_id), batch_id))


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

    def current(self) -> TaskPredictor:
        """The serving batch's predictor (reloaded whole when the pointer file changes)."""
        try:
            mtime = pointer_path(self.root).stat().st_mtime
        except OSError:
            return self.bundle.predictor
        if mtime != self.bundle.pointer_mtime:
            with self._lock:
                if mtime != self.bundle.pointer_mtime:
                    self.bundle = load_bundle(self.root)
        return self.bundle.predictor

    def _embedding(self, predictor: TaskPredictor, user_id: str | None, embedding: list | None, batch_id: str | None):
        if (user_id is None) == (embedding is None):
            raise BadInput("user_id/embedding: give exactly one of them")
        if embedding is not None:
            if batch_id is None:
                raise BadInput("batch_id: required with an embedding (which batch made it?)")
            if batch_id != predictor.batch_id:
                raise Conflict(f"batch_id: embedding of batch {batch_id!r}, serving batch is {predictor.batch_id!r}")
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
        """One route's answer: the user's embedding in the predictor's batch, the task's scorer."""
        predictor = self.current()
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
