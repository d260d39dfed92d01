"""What a downstream task is (``DownstreamTask``), and the one registry every fan-out reads.

A task is one module holding one object that satisfies the protocol below, registered as an entry
point of the group ``userrep.tasks`` (this package's in its ``pyproject.toml``; another package
adds one the same way):

    [project.entry-points."userrep.tasks"]
    genre_affinity = "userrep.tasks.genre_affinity:TASK"

Everything that runs once per task reads ``tasks()``: the training pipeline's ParallelFor (the
plan step's task list), the downstream step, the gate's like-for-like quality and the rollout
report, ``userrep evaluate`` and its report, the batch's predictor and the BentoML routes.

A task is trained per batch on the batch's shared ``TaskData`` (``userrep.batch.downstream``:
the users' embeddings as of T - L, their listening in the label window [T - L, T), the
candidate artists): it derives its own labels from it, chooses its head's design on the
validation users, writes its files under ``BATCH/downstream/`` and returns its record's metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from userrep.batch.layout import BatchDir
    from userrep.source import EventSource

GROUP = "userrep.tasks"
# ``userrep.batch.downstream``'s TaskData and DownstreamConfig, which import this module: named
# here by their meaning only, so the registry stays below everything that reads it.
TaskData = Any
DownstreamConfig = Any


@dataclass(frozen=True)
class Trained:
    """What a task's ``train`` returns: validation metrics (``metric`` among them), the files it
    wrote (hashed into its record) and what else its record keeps (its design, both designs'
    validation scores)."""

    metrics: dict[str, float]
    files: list[Path]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    """The candidate's label window as the gate scores every batch on it: ``batch`` (the
    candidate's directory) and ``data`` (its ``TaskData``: its validation users, labels and
    artists), the events, the window's start and a seed for any sampling, so that two calls score
    the same units."""

    batch: Path
    data: TaskData
    source: EventSource
    start: pd.Timestamp
    seed: int


class Skipped(Exception):
    """Raised by a task's ``train`` where the batch cannot train it (its message the reason): the
    task is registered as skipped, the batch stays complete, the gate shows why."""


@runtime_checkable
class Scorer(Protocol):
    """A task's deployed head of one batch, loaded for serving."""

    dim: int  # the embedding size it takes
    # the candidate artists whose history it takes beside the embedding (``user_artist_history``
    # in the online store), or None
    history_artists: list[str] | None

    def answer(self, x: np.ndarray, history: tuple | None, request: Any) -> dict:
        """The route's answer for one user (``x``: (1, dim)); ``history``: (plays, recent) (1, K)
        over ``history_artists``, or None (scored as a user without history). Bad request fields
        raise ValueError naming the field."""
        ...


@runtime_checkable
class DownstreamTask(Protocol):
    name: str  # the registry key, the pipeline's ParallelFor item, BATCH/downstream/<name>.*
    metric: str  # the validation metric its record leads with and the gate compares (higher is better)
    # evaluate's report columns: {row name: metrics}, the first metric of each its headline
    # (a task may report more than one row: future listening adds cold_start)
    columns: dict[str, tuple[str, ...]]
    has_head: bool  # a consumer keeps a trained model of it (the gate checks the serving one on the candidate)
    needs_labels: bool  # False: trained even where the batch has too few labelled users (an index)
    route: str | None  # its BentoML route, or None
    request: type | None  # the pydantic model of the route's own fields (beside user_id/embedding/batch_id)

    def train(self, files: BatchDir, data: TaskData, config: DownstreamConfig) -> Trained: ...

    def paired(self, batches: Sequence[Path], xs: Sequence[np.ndarray], window: Window) -> list[np.ndarray]:
        """Per unit (a validation user), the task's metric of each batch's deployed model on its
        own embeddings ``xs`` of the window's users, on the same units: NaN where one is not scored."""
        ...

    def scorer(self, files: BatchDir) -> Scorer | None: ...

    def evaluate(self, ctx: Any, board: Any, reps: dict, cold_reps: dict | None, config: Any) -> dict[str, str]:
        """``userrep evaluate``'s rows of this task for each representation in ``reps`` (with
        ``cold_reps``: also ``METHOD+history`` rows where the task has that design; None in
        ablations); returns {row: why it was skipped} for rows it could not score."""
        ...


@functools.cache
def tasks() -> dict[str, DownstreamTask]:
    """Every registered task by name, in name order (cached: ``tasks.cache_clear()`` after
    registering one at run time)."""
    found = {}
    for point in entry_points(group=GROUP):
        task = point.load()
        if not isinstance(task, DownstreamTask):
            raise TypeError(f"entry point {point.name} = {point.value}: not a DownstreamTask")
        if task.name != point.name:
            raise ValueError(f"entry point {point.name} = {point.value}: its task is named {task.name!r}")
        found[task.name] = task
    return dict(sorted(found.items()))


def names() -> tuple[str, ...]:
    return tuple(tasks())


def get(name: str) -> DownstreamTask:
    """The task called ``name``; a ValueError naming ``task`` otherwise."""
    try:
        return tasks()[name]
    except KeyError:
        raise ValueError(f"task: expected one of {', '.join(names())}, got {name!r}") from None
