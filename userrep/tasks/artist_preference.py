"""Artist preference: will the user play artist X in the label window? (binary, AUC)

Pairs: every label-window artist of the user among the top-K (at most ``max_pos``) as positives,
the same number of negatives drawn by popularity from top-K artists the user did not play —
popular negatives make the task about taste, not about popularity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from userrep.metrics import auc
from userrep.tasks import history
from userrep.tasks._mlp import HeadConfig, MLPHead, fit_mlp, predict

PAIR_SAMPLES = 2_500_000  # training budget of the head (pairs x epochs)


def sample_pairs(labels: np.ndarray, popularity: np.ndarray, seed: int, max_pos: int = 20):
    """(user_rows, artist_cols, label) for rows of a binary label matrix (users, K)."""
    rng = np.random.default_rng(seed)
    users, artists, ys = [], [], []
    p = popularity / popularity.sum()
    for row in np.flatnonzero(labels.sum(axis=1) > 0):
        pos = np.flatnonzero(labels[row])
        pos = rng.choice(pos, size=min(max_pos, len(pos)), replace=False)
        weights = np.where(labels[row] > 0, 0.0, p)
        if weights.sum() <= 0:
            continue
        n_neg = min(len(pos), int((weights > 0).sum()))
        neg = rng.choice(len(p), size=n_neg, replace=False, p=weights / weights.sum())
        users += [row] * (len(pos) + n_neg)
        artists += list(pos) + list(neg)
        ys += [1] * len(pos) + [0] * n_neg
    return np.array(users, np.int64), np.array(artists, np.int64), np.array(ys, np.float32)


def _inputs(
    x_users: np.ndarray, artist_vectors: np.ndarray, users: np.ndarray, artists: np.ndarray, side: np.ndarray | None
) -> np.ndarray:
    """(user representation, artist vector[, the user's own history of that artist]) per pair."""
    parts = [x_users[users], artist_vectors[artists]]
    if side is not None:  # (users, K, f): the pair's f history features
        parts.append(side[users, artists])
    return np.hstack(parts)


def pair_config(head: HeadConfig, n_pairs: int) -> HeadConfig:
    """Pairs outnumber users ~20x: larger batches, and at most ``PAIR_SAMPLES`` pairs seen in
    training (8 epochs instead of 15 on the default world: 12 s instead of 25 s per head in
    ``userrep evaluate``, validation AUC -0.004 for every method; small datasets keep all epochs)."""
    return replace(
        head,
        batch_size=max(head.batch_size, 1024),
        epochs=max(1, min(head.epochs, round(PAIR_SAMPLES / max(n_pairs, 1)))),
    )


def fit_head(
    x_users: np.ndarray,
    artist_vectors: np.ndarray,
    pairs,
    config: HeadConfig = HeadConfig(),
    side: np.ndarray | None = None,
    validate=None,
) -> MLPHead:
    """Pair head: (user, artist[, history]) -> logit. ``validate``: see ``fit_mlp``."""
    users, artists, y = pairs
    return fit_mlp(_inputs(x_users, artist_vectors, users, artists, side), y[:, None], config, validate=validate)


def scores(
    head: MLPHead, x_users: np.ndarray, artist_vectors: np.ndarray, pairs, side: np.ndarray | None = None
) -> np.ndarray:
    users, artists, _ = pairs
    return predict(head, _inputs(x_users, artist_vectors, users, artists, side))[:, 0]


def evaluate(
    head: MLPHead, x_users: np.ndarray, artist_vectors: np.ndarray, pairs, side: np.ndarray | None = None
) -> float:
    return auc(pairs[2], scores(head, x_users, artist_vectors, pairs, side))


# -- the task (userrep.tasks.registry) ------------------------------------------------------------


class PreferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artists: list[str] = Field(min_length=1, max_length=1000)


@dataclass(frozen=True)
class Predictor:
    """The deployed pair head of one batch: P(the user plays each asked artist)."""

    head: MLPHead
    meta: dict

    @property
    def dim(self) -> int:
        return self.meta["embedding_dim"]

    @property
    def with_history(self) -> bool:
        return self.meta.get("design") == history.WITH_HISTORY

    @property
    def history_artists(self) -> list[str] | None:
        return self.meta["artists"] if self.with_history else None

    @cached_property
    def index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.meta["artists"])}

    @cached_property
    def vectors(self) -> np.ndarray:
        """(K, d) the candidate artists' vectors: converted once per loaded batch, not per request."""
        return np.asarray(self.meta["artist_vectors"], np.float32)

    def answer(self, x: np.ndarray, past: tuple | None, request: PreferenceRequest) -> dict:
        unknown = [a for a in request.artists if a not in self.index]
        if unknown:
            raise ValueError(f"artists: unknown to batch {self.meta['batch_id']}: {unknown[:5]}")
        rows = np.array([self.index[a] for a in request.artists])
        side = None
        if self.with_history:
            plays, recent = past or (None, None)
            plays = np.zeros((1, len(self.index)), np.float32) if plays is None else plays
            side = history.side_features(plays, plays if recent is None else recent)
        logits = scores(self.head, x, self.vectors, (np.zeros(len(rows), np.int64), rows, None), side)
        return {"probabilities": {a: history.probability(v) for a, v in zip(request.artists, logits)}}


class ArtistPreference:
    """Whether the user plays a given artist in the next window: a pair head on (embedding, artist
    vector[, the user's history of it]), in the design better on validation pairs; AUC per user."""

    name = "artist_preference"
    metric = "auc"
    columns = {"artist_preference": ("auc",)}
    has_head = True
    needs_labels = True
    route = "/predict/artist-preference"
    request = PreferenceRequest

    def train(self, files, data, config):
        from userrep.batch.heads import save_head
        from userrep.tasks.registry import Trained

        x, train = data.x, data.train
        pairs = sample_pairs(data.labels[train], _pair_popularity(data), config.seed)
        valid_pairs = validation_pairs(data, config.seed)
        head_config = pair_config(config.head, len(pairs[0]))
        heads, validation = {}, {}
        for design, side in ((history.EMBEDDING, None), (history.WITH_HISTORY, data.side)):

            def valid_auc(head, side=side) -> float:
                return auc(valid_pairs[2], scores(head, x, data.artist_vectors, valid_pairs, side))

            heads[design] = fit_head(
                x[train], data.artist_vectors, pairs, head_config, None if side is None else side[train], valid_auc
            )
            validation[design] = round(float(np.nan_to_num(valid_auc(heads[design]))), 6)
        design = (
            history.WITH_HISTORY
            if validation[history.WITH_HISTORY] >= validation[history.EMBEDDING]
            else history.EMBEDDING
        )
        meta = {
            **data.head_meta(self.name, config),
            "design": design,
            "artists": data.artists.tolist(),
            "artist_vectors": data.artist_vectors,
        }
        path = save_head(files.head(self.name), heads[design], meta)
        return Trained({"auc": validation[design]}, [path], {"design": design, "designs": validation})

    def paired(self, batches, xs, window):
        """Per validation user, the AUC of each batch's head on the same sampled (user, artist)
        pairs: the pairs of artists every head knows."""
        from userrep.batch.heads import load_head
        from userrep.batch.layout import BatchDir

        data = window.data
        pairs = validation_pairs(data, window.seed)
        found = []
        for batch, x in zip(batches, xs):
            head, meta = load_head(BatchDir(batch).head(self.name))
            columns = pd.Index(meta["artists"]).get_indexer(pd.Index(data.artists))
            vectors = np.asarray(meta["artist_vectors"], np.float32)[np.maximum(columns, 0)]
            side = data.side if meta.get("design") == history.WITH_HISTORY else None
            found.append(np.where(columns[pairs[1]] >= 0, scores(head, x, vectors, pairs, side), np.nan))
        users, _, y = pairs
        known = np.all(np.isfinite(found), axis=0)
        rows = np.unique(users[known])
        out = [np.full(len(data.valid), np.nan) for _ in found]
        at = np.searchsorted(data.valid, rows)
        for i, row in enumerate(rows):
            mine = known & (users == row)
            for values, pair_scores in zip(out, found):
                values[at[i]] = auc(y[mine], pair_scores[mine])
        return out

    def scorer(self, files):
        from userrep.batch.heads import load_head

        return Predictor(*load_head(files.head(self.name))) if files.head(self.name).exists() else None

    def evaluate(self, ctx, board, reps, cold_reps, config):
        if not ctx.warm:
            return {self.name: ctx.why_not_warm}
        if cold_reps is None:  # ablations: the pair head is the slowest and least telling; left out
            return {}
        for method, x in reps.items():
            self._evaluate_head(ctx, board, method, x, config, None)
            if method in cold_reps:
                self._evaluate_head(ctx, board, method + "+history", x, config, ctx.side)
        users, artists, y = ctx.test_pairs
        for method, scores_of in ctx.direct.items():
            board.add_auc(self.name, method, "test", users, y, np.asarray(scores_of(ctx.test_rows))[users, artists])
        return {}

    def _evaluate_head(self, ctx, board, method: str, x: np.ndarray, config, side: np.ndarray | None) -> None:
        fit, test, valid = ctx.fit_rows, ctx.test_rows, ctx.valid_rows
        pick = lambda rows: None if side is None else side[rows]  # noqa: E731
        check = (
            None
            if not ctx.validated
            else (
                lambda h: auc(ctx.valid_pairs[2], scores(h, x[valid], ctx.artist_vectors, ctx.valid_pairs, pick(valid)))
            )
        )
        head = fit_head(
            x[fit], ctx.artist_vectors, ctx.fit_pairs, pair_config(config.head, len(ctx.fit_pairs[0])), pick(fit), check
        )
        users, _, y = ctx.test_pairs
        board.add_auc(
            self.name, method, "test", users, y, scores(head, x[test], ctx.artist_vectors, ctx.test_pairs, pick(test))
        )


def _pair_popularity(data) -> np.ndarray:
    """The negatives' sampling weight: each artist's label-window plays among training users, + 1."""
    return data.labels[data.train].sum(axis=0) + 1.0


def validation_pairs(data, seed: int):
    """The (user, artist, label) pairs of a task data's validation users, rows in the task data's
    numbering: what a head is early-stopped and chosen on, and what the gate scores both batches'
    heads on (one recipe, one seed: ``seed`` + 1, the training pairs taking ``seed``)."""
    return on_rows(sample_pairs(data.labels[data.valid], _pair_popularity(data), seed + 1), data.valid)


def on_rows(pairs, rows: np.ndarray):
    """Pairs sampled on a row subset index that subset; map them to rows of the full matrix."""
    users, artists, y = pairs
    return rows[users], artists, y


TASK = ArtistPreference()
