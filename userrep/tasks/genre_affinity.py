"""Genre affinity: each user's share of listening per genre in the label window, ranked per user.

A team that tags users with their genres (editorial shelves, marketing segments) wants "which
genres will this user listen to next month, in order". The labels come from the batch's own
space: the window's plays of each artist (``TaskData.window_artists``) spread over the artist's
genres (the share of its items tagged with each, ``FeatureSpace.item_genres``), normalized per user.

The head is the shared torch MLP (``userrep.tasks._mlp``) on the embedding alone, trained with BCE
on the soft shares; two widths are fitted (the default hidden layer and a narrow one, nearly
linear) and the better on the validation users is kept. The metric is nDCG@5 per user over the
batch's genres, gains the true shares; the record also keeps the popularity order's validation
score (every user ranked by the training users' mean shares), what a head must beat to be worth
serving. A batch whose items carry no genres, or whose window has too few users with a genre,
skips the task with the reason.

This module is the whole task: its registration is one line in ``pyproject.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from userrep.metrics import ndcg_rows
from userrep.tasks._mlp import MLPHead, fit_mlp, predict
from userrep.tasks.registry import Skipped

K = 5  # the metric's cut-off: nDCG@5 over the batch's genres
NARROW = 32  # the second design's hidden width
MIN_USERS = 20  # validation users with a genre play needed to train the head


class GenreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=K, ge=1, le=1000)


def artist_genres(space) -> np.ndarray:
    """(artists, genres) the share of each artist's items tagged with each genre."""
    items = len(space.item_artist)
    owner = sp.csr_matrix((np.ones(items), (space.item_artist, np.arange(items))), shape=(len(space.artists), items))
    counts = owner @ np.asarray(space.item_genres, np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)


def genre_shares(window_artists: sp.csr_matrix, by_artist: np.ndarray) -> np.ndarray:
    """(users, genres) each user's window listening spread over genres, rows summing to 1 (0:
    no window play of a tagged artist)."""
    weights = np.asarray(window_artists @ by_artist)
    return (weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)


def per_user(scores: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """nDCG@K per user of ranking genres by ``scores`` against the true shares (NaN: no genre play)."""
    return ndcg_rows(scores, shares, K)


@dataclass(frozen=True)
class Scorer:
    """The deployed head of one batch: the user's top ``k`` genres with their predicted shares."""

    head: MLPHead
    meta: dict

    @property
    def dim(self) -> int:
        return self.meta["embedding_dim"]

    history_artists = None  # the embedding alone

    def answer(self, x: np.ndarray, history: tuple | None, request: GenreRequest) -> dict:
        p = 1 / (1 + np.exp(-predict(self.head, x)[0].astype(np.float64)))
        p = p / p.sum()
        top = np.argsort(-p)[: request.k]
        return {"genres": [{"genre": self.meta["genres"][i], "share": round(float(p[i]), 6)} for i in top]}


class GenreAffinity:
    name = "genre_affinity"
    metric = f"ndcg@{K}"
    columns = {"genre_affinity": (f"ndcg@{K}",)}
    has_head = True
    needs_labels = True
    route = "/predict/genre-affinity"
    request = GenreRequest

    def _labels(self, batch_dir, data) -> tuple[list[str], np.ndarray]:
        from userrep.batch.layout import BatchDir
        from userrep.features import FeatureSpace

        space = FeatureSpace.load(BatchDir(batch_dir).encoders)
        return list(space.genres), genre_shares(data.window_artists, artist_genres(space))

    def train(self, files, data, config):
        from userrep.batch.heads import save_head
        from userrep.tasks.registry import Trained

        genres, shares = self._labels(files.directory, data)
        train = data.train[shares[data.train].sum(axis=1) > 0]
        valid = data.valid[shares[data.valid].sum(axis=1) > 0]
        if not genres or len(valid) < MIN_USERS or len(train) < MIN_USERS:
            raise Skipped(f"{len(genres)} genres, {len(train)}/{len(valid)} train/validation users with a genre play")

        def score(found: np.ndarray) -> float:
            return float(np.nanmean(per_user(found, shares[valid])))

        validate = lambda head: score(predict(head, data.x[valid]))  # noqa: E731
        prior = shares[train].mean(axis=0)
        heads = {
            "mlp": fit_mlp(data.x[train], shares[train], config.head, prior=prior, validate=validate),
            f"mlp{NARROW}": fit_mlp(
                data.x[train], shares[train], replace(config.head, hidden=NARROW), prior=prior, validate=validate
            ),
        }
        designs = {name: round(validate(head), 6) for name, head in heads.items()}
        design = max(designs, key=lambda name: designs[name])
        popularity = round(score(np.tile(prior, (len(valid), 1))), 6)
        meta = {**data.head_meta(self.name, config), "design": design, "genres": genres}
        path = save_head(files.head(self.name), heads[design], meta)
        return Trained(
            {self.metric: designs[design]},
            [path],
            {"design": design, "designs": designs, "popularity": popularity, "n_valid_genre": int(len(valid))},
        )

    def paired(self, batches, xs, window):
        """Per validation user of the window, nDCG@K of each batch's head on the window's genre
        shares (in the candidate's genres; a genre a head does not know ranks last for it)."""
        from userrep.batch.heads import load_head
        from userrep.batch.layout import BatchDir

        genres, shares = self._labels(window.batch, window.data)
        valid = window.data.valid
        out = []
        for batch, x in zip(batches, xs):
            head, meta = load_head(BatchDir(batch).head(self.name))
            where = pd.Index(meta["genres"]).get_indexer(pd.Index(genres))
            found = predict(head, x[valid])
            ranked = np.full((len(valid), len(genres)), -np.inf, np.float32)
            ranked[:, where >= 0] = found[:, where[where >= 0]]
            out.append(per_user(ranked, shares[valid]))
        return out

    def scorer(self, files):
        from userrep.batch.heads import load_head

        return Scorer(*load_head(files.head(self.name))) if files.head(self.name).exists() else None

    def evaluate(self, ctx, board, reps, cold_reps, config):
        """Heads on each representation, fit on the warm head-training users, scored on test users
        (the genre shares of their label window); the popularity order beside them."""
        if not ctx.warm:
            return {self.name: ctx.why_not_warm}
        space = ctx.space
        if not space.genres:
            return {self.name: "the items carry no genres"}
        shares = genre_shares(ctx.label_artists, artist_genres(space))
        fit, valid, test = (
            rows[shares[rows].sum(axis=1) > 0] for rows in (ctx.fit_rows, ctx.valid_rows, ctx.test_rows)
        )
        if min(len(fit), len(test)) < MIN_USERS:
            return {self.name: f"only {len(fit)}/{len(test)} fit/test users with a genre play"}
        padded = lambda rows_scores: _on(ctx.test_rows, test, rows_scores)  # noqa: E731
        for method, x in reps.items():
            validate = (
                (lambda h, x=x: float(np.nanmean(per_user(predict(h, x[valid]), shares[valid]))))
                if len(valid)
                else None
            )
            head = fit_mlp(x[fit], shares[fit], config.head, prior=shares[fit].mean(axis=0), validate=validate)
            board.add_rows(
                self.name, method, "test", {self.metric: padded(per_user(predict(head, x[test]), shares[test]))}
            )
        if cold_reps is not None:
            prior = np.tile(shares[fit].mean(axis=0), (len(test), 1))
            board.add_rows(self.name, "popularity", "test", {self.metric: padded(per_user(prior, shares[test]))})
        return {}


def _on(population: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-user values of ``rows`` placed in the population's order (NaN: not scored)."""
    out = np.full(len(population), np.nan)
    out[np.searchsorted(population, rows)] = values
    return out


TASK = GenreAffinity()
