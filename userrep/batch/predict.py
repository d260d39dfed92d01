"""A batch's task models as one predictor: what a server loads whole and calls.

``TaskPredictor.load`` reads the deployed scorer of every registered task that has a route
(``userrep.tasks.registry``: ``task.scorer``) from one batch; ``answer`` scores one user given
their embedding and, for a scorer that takes it, their history of its candidate artists (none:
scored as a user without history). A server swaps predictors by reference, so a request never
mixes a head of one batch with another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from userrep.batch.layout import BatchDir
from userrep.tasks.registry import Scorer, tasks


@dataclass(frozen=True)
class TaskPredictor:
    batch_id: str
    scorers: dict[str, Scorer]  # task name -> its deployed scorer of this batch

    @classmethod
    def load(cls, batch_dir: str | Path, batch_id: str) -> TaskPredictor:
        files = BatchDir(batch_dir)
        scorers = {}
        for name, task in tasks().items():
            if task.route is not None and (scorer := task.scorer(files)) is not None:
                scorers[name] = scorer
        if not scorers:
            raise RuntimeError(f"batch {batch_id}: no task has a deployed scorer under {files.directory}")
        dims = {s.dim for s in scorers.values()}
        if len(dims) != 1:
            raise RuntimeError(f"batch {batch_id}: the task scorers take different embedding sizes {sorted(dims)}")
        return cls(batch_id, scorers)

    @property
    def dim(self) -> int:
        """The embedding size the scorers take."""
        return next(iter(self.scorers.values())).dim

    def scorer(self, task: str) -> Scorer:
        """The batch's scorer of ``task``; a LookupError naming it where the batch has none."""
        if task not in self.scorers:
            raise LookupError(f"task: batch {self.batch_id} has no deployed {task} model")
        return self.scorers[task]

    def answer(self, task: str, x: np.ndarray, history: tuple | None, request) -> dict:
        """``task``'s answer for one user (``x``: (1, dim)), named with the batch it came from."""
        return {"batch_id": self.batch_id, **self.scorer(task).answer(x, history, request)}
