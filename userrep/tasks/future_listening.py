"""Future listening: rank the top-K artists by how likely the user plays them in the label window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from userrep.metrics import ndcg_rows, recall_rows
from userrep.tasks import history
from userrep.tasks._mlp import HeadConfig, MLPHead, fit_mlp, predict

HANDOVER_EVENTS = (1, 3, 10)  # evaluation's hand-over: users held out as new get their first k events back


def fit_head(
    x: np.ndarray, labels: np.ndarray, config: HeadConfig = HeadConfig(), side: np.ndarray | None = None, validate=None
) -> MLPHead:
    """Multi-label head: representation (+ optional per-artist side features (n, K, f)) -> one
    logit per top-K artist; bias starts at base rates. ``validate``: see ``fit_mlp``."""
    return fit_mlp(x, labels, config, prior=labels.mean(axis=0), side=side, validate=validate)


def fit_with_history(
    fit: tuple,
    valid: tuple | None,
    popularity: np.ndarray,
    config: HeadConfig,
    score,
    collab_models: dict | None = None,
) -> tuple[MLPHead, dict]:
    """The +history head (the ``embedding+history`` design) and its meta, as ``userrep evaluate``
    measures it and a batch deploys it.

    It learns from the fitting users twice, with their history and as new users (represented from
    onboarding and attributes alone, no history), so it serves both. With validation users it
    stops early on the mean of their nDCG seen warm and seen cold, and the weights added to its
    logits are chosen on them: of the history score and of each collaborative score
    (``collab_models``: ``history.collaborative``'s models; None: none) for users with history, of
    the popularity prior for users without. Without validation users, no early stopping and every
    weight 0.

    fit: (x, cold_x, labels, side); valid: (x, cold_x, side, plays, recent) or None;
    score: scores of the validation users -> float (higher is better).
    """
    x, cold_x, labels, side = fit
    validate = None
    if valid is not None:
        valid_x, valid_cold, valid_side, plays, recent = valid
        none = np.zeros_like(valid_side)
        validate = lambda h: (score(scores(h, valid_x, valid_side)) + score(scores(h, valid_cold, none))) / 2  # noqa: E731
    head = fit_head(
        np.vstack([x, cold_x]), np.vstack([labels] * 2), config, np.concatenate([side, np.zeros_like(side)]), validate
    )
    warm = cold = 0.0
    collab: dict[str, float] = {}
    if valid is not None:
        warm, collab = history.best_weights(
            scores(head, valid_x, valid_side),
            history.played_scores(plays, recent, popularity),
            history.collaborative(plays, collab_models or {}),
            score,
        )
        cold = history.best_weight(scores(head, valid_cold, none), history.prior(popularity, len(valid_x)), score)
    return head, {
        "design": history.WITH_HISTORY,
        "history_weight": warm,
        "prior_weight": cold,
        "collab_weights": collab,
        # the models travel with the head only where they are used (EASE^R: K x K floats)
        "collab_models": {name: (collab_models or {})[name] for name, w in collab.items() if w},
        "popularity": np.asarray(popularity).tolist(),
    }


def scores(head: MLPHead, x: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
    return predict(head, x, side)


def ranking_rows(
    scores: np.ndarray, labels: np.ndarray, history: np.ndarray, unseen_only: bool = False
) -> dict[str, np.ndarray]:
    """Per-user nDCG@10 and recall@50, and nDCG@10_new over artists the user did not play before
    the cutoff (those are masked out of the ranking). ``unseen_only``: the first two rank unseen
    artists only as well (where users do not come back to what they played, e.g. movies)."""
    new_scores = np.where(history > 0, -np.inf, scores)
    new_labels = np.where(history > 0, 0, labels)
    main_scores, main_labels = (new_scores, new_labels) if unseen_only else (scores, labels)
    return {
        "ndcg@10": ndcg_rows(main_scores, main_labels, 10),
        "recall@50": recall_rows(main_scores, main_labels, 50),
        "ndcg@10_new": ndcg_rows(new_scores, new_labels, 10),
    }


def validation_score(scores: np.ndarray, labels: np.ndarray, history: np.ndarray, unseen_only: bool = False) -> float:
    """The one number every choice made on validation users maximizes (a head's early stopping,
    its blend weights, a baseline's settings): the mean of nDCG@10 and recall@50 over them, the
    two ranking metrics reported and compared. Either alone lets a choice trade the other away:
    on MovieLens, weights chosen on nDCG@10 alone kept ALS off and left recall@50 at 0.30
    against ALS's 0.36 (0.35 with this score, nDCG@10 level)."""
    rows = ranking_rows(scores, labels, history, unseen_only)
    found = [np.nanmean(rows[m]) if np.isfinite(rows[m]).any() else 0.0 for m in ("ndcg@10", "recall@50")]
    return float(sum(found) / 2)


def ranking_metrics(
    scores: np.ndarray, labels: np.ndarray, history: np.ndarray, unseen_only: bool = False
) -> dict[str, float]:
    """The means of ``ranking_rows`` over users with a relevant artist."""
    return {
        name: float(np.nanmean(rows)) if np.isfinite(rows).any() else float("nan")
        for name, rows in ranking_rows(scores, labels, history, unseen_only).items()
    }


def deployed_scores(
    head: MLPHead, meta: dict, x: np.ndarray, plays: np.ndarray | None = None, recent: np.ndarray | None = None
) -> np.ndarray:
    """Ranking scores of a batch's future-listening head as it was deployed (``meta``: the head's
    saved meta). An ``embedding+history`` head takes the users' ``plays`` / ``recent`` (users, K)
    over its artists; without them (or all zero) a user is scored as one without history."""
    if meta.get("design") != history.WITH_HISTORY:
        return scores(head, x)
    zeros = np.zeros((len(x), head.out.out_features), np.float32)
    plays = zeros if plays is None else np.asarray(plays, np.float32)
    recent = plays if recent is None else np.asarray(recent, np.float32)
    logits = scores(head, x, history.side_features(plays, recent))
    return history.blended(
        logits,
        plays,
        recent,
        np.asarray(meta["popularity"], np.float32),
        meta["history_weight"],
        meta["prior_weight"],
        history.collaborative(plays, meta.get("collab_models", {})),
        meta.get("collab_weights"),
    )


# -- the task (userrep.tasks.registry) ------------------------------------------------------------


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(default=10, ge=1, le=1000)


@dataclass(frozen=True)
class Recommender:
    """The deployed head of one batch: the top ``k`` of its candidate artists for a user."""

    head: MLPHead
    meta: dict

    @property
    def dim(self) -> int:
        return self.head.n_in

    @property
    def history_artists(self) -> list[str] | None:
        return self.meta["artists"] if self.meta.get("design") == history.WITH_HISTORY else None

    def answer(self, x: np.ndarray, past: tuple | None, request: RecommendRequest) -> dict:
        """Each score is the sigmoid of the ranking score (a +history head adds the history score)."""
        plays, recent = past or (None, None)
        top = deployed_scores(self.head, self.meta, x, plays, recent)[0]
        artists = self.meta["artists"]
        return {
            "artists": [
                {"artist_id": artists[i], "score": history.probability(top[i])} for i in np.argsort(-top)[: request.k]
            ]
        }


class FutureListening:
    """Which of the batch's candidate artists the user plays in the next window: a multi-label head
    over them, in the design better on the validation users (``fit_both``); nDCG@10 per user."""

    name = "future_listening"
    metric = "ndcg@10"
    columns = {
        "future_listening": ("ndcg@10", "recall@50", "ndcg@10_new"),
        "cold_start": ("ndcg@10",),
        # users held out as new, scored cold and with their first k history events back
        "handover": tuple(f"ndcg@10_after_{k}" for k in (0, *HANDOVER_EVENTS)),
    }
    has_head = True
    needs_labels = True
    route = "/recommend/artists"
    request = RecommendRequest

    def train(self, files, data, config):
        from userrep.batch.heads import save_head
        from userrep.tasks.registry import Trained

        valid = data.valid
        head, design = fit_both(data, config.head)
        designs = design.pop("validation")
        scores = deployed_scores(head, design, data.x[valid], data.plays[valid], data.recent[valid])
        metrics = ranking_metrics(scores, data.labels[valid], data.history[valid])
        meta = {**data.head_meta(self.name, config), **design, "artists": data.artists.tolist()}
        return Trained(
            metrics, [save_head(files.head(self.name), head, meta)], {"design": design["design"], "designs": designs}
        )

    def paired(self, batches, xs, window):
        return [self._per_user(batch, x, window) for batch, x in zip(batches, xs)]

    def _per_user(self, batch_dir, x: np.ndarray, window) -> np.ndarray:
        """nDCG@10 per validation user of one batch's deployed head over the window's candidate
        artists; an artist the head does not rank scores -inf for it (it could not be recommended)."""
        from userrep.batch.heads import load_head
        from userrep.batch.layout import BatchDir

        data, valid = window.data, window.data.valid
        head, meta = load_head(BatchDir(batch_dir).head(self.name))
        plays, recent = history.window_history(batch_dir, window, meta["artists"], meta.get("half_life_days"))
        scores = deployed_scores(head, meta, x[valid], plays, recent)
        where = pd.Index(meta["artists"]).get_indexer(pd.Index(data.artists))
        ranked = np.full((len(valid), len(data.artists)), -np.inf, np.float32)
        ranked[:, where >= 0] = scores[:, where[where >= 0]]
        return ranking_rows(ranked, data.labels[valid], data.history[valid])["ndcg@10"]

    def scorer(self, files):
        from userrep.batch.heads import load_head

        return Recommender(*load_head(files.head(self.name))) if files.head(self.name).exists() else None

    def evaluate(self, ctx, board, reps, cold_reps, config):
        skipped = {}
        if not ctx.warm:
            skipped[self.name] = ctx.why_not_warm
        if not ctx.cold_scorable:
            skipped["cold_start"] = ctx.why_not_cold
        if not ctx.heads_trainable:
            return skipped
        for method, x in reps.items():
            self._evaluate_head(ctx, board, method, x, config)
            if cold_reps is not None and method in cold_reps:
                self._evaluate_head(ctx, board, method + "+history", x, config, cold_reps[method])
        if cold_reps is None:  # (ablations: the representations' heads only)
            return skipped
        test = ctx.test_rows
        if ctx.warm:
            for method, scores_of in ctx.direct.items():
                rows = ranking_rows(scores_of(test), ctx.labels[test], ctx.history[test], ctx.unseen_only)
                board.add_rows(self.name, method, "test", rows)
        if ctx.cold_scorable:
            cold = ctx.cold_rows
            onboarding = ctx.onboarding_mean
            head = fit_head(
                onboarding[ctx.fit_rows],
                ctx.labels[ctx.fit_rows],
                config.head,
                validate=ctx.ranking_validation(onboarding),
            )
            cold_scores = {
                "onboarding_mean": scores(head, onboarding[cold]),
                "popularity": ctx.direct["popularity"](cold),
                "als": ctx.direct["als"](cold),
            }
            for method, found in cold_scores.items():
                board.add_rows("cold_start", method, "cold", {"ndcg@10": ndcg_rows(found, ctx.labels[cold], 10)})
        if ctx.cold_scorable and ctx.handover:  # popularity, and the user's own plays first once there are some
            labels = ctx.labels[ctx.held_out_new]
            popular = ndcg_rows(ctx.direct["popularity"](ctx.held_out_new), labels, 10)
            board.add_rows(
                "handover", "popularity", "handover", {f"ndcg@10_after_{k}": popular for k in (0, *ctx.handover)}
            )
            own = {"ndcg@10_after_0": popular}  # no plays yet: the popularity order
            for k, given in ctx.handover.items():
                own[f"ndcg@10_after_{k}"] = ndcg_rows(
                    history.history_scores(given["recent"], ctx.popularity), labels, 10
                )
            board.add_rows("handover", "history", "handover", own)
        return skipped

    def _evaluate_head(self, ctx, board, method: str, x: np.ndarray, config, cold_x: np.ndarray | None = None) -> None:
        """One representation's head, fit on the warm head-training users (early-stopped on the
        validation users), scored on test and cold users. With ``cold_x`` (the head-training
        users' cold-like representations): the +history head (``fit_with_history``)."""
        fit, test, cold, valid = ctx.fit_rows, ctx.test_rows, ctx.cold_rows, ctx.valid_rows
        side = ctx.side if cold_x is not None else None
        warm_weight = cold_weight = 0.0
        collab_weights: dict = {}
        if cold_x is None or side is None:
            head = fit_head(x[fit], ctx.labels[fit], config.head, validate=ctx.ranking_validation(x))
        else:
            cold_fit, cold_valid = (cold_x[np.searchsorted(ctx.train_rows, rows)] for rows in (fit, valid))
            checked = ctx.validated
            head, meta = fit_with_history(
                (x[fit], cold_fit, ctx.labels[fit], side[fit]),
                (x[valid], cold_valid, side[valid], _plays(side[valid]), ctx.recent[valid]) if checked else None,
                ctx.popularity,
                config.head,
                ctx.valid_score,
                ctx.collab_models,
            )
            warm_weight, cold_weight, collab_weights = (
                meta[k] for k in ("history_weight", "prior_weight", "collab_weights")
            )
            if checked:
                ctx.blends[method] = {k: meta[k] for k in ("history_weight", "prior_weight", "collab_weights")}
        weights = (warm_weight, collab_weights)
        if method == "gur+history":
            ctx.deployed = (head, weights)  # evaluation's freshness curve scores it (``run_freshness``)
        if ctx.warm:
            found = scores(head, x[test], None if side is None else side[test])
            if side is not None:
                found = found + history_terms(ctx, side[test], ctx.recent[test], weights)
            board.add_rows(
                self.name, method, "test", ranking_rows(found, ctx.labels[test], ctx.history[test], ctx.unseen_only)
            )
        if ctx.cold_scorable:
            no_history = None if side is None else np.zeros((len(cold),) + side.shape[1:], np.float32)
            found = scores(head, x[cold], no_history) + cold_weight * history.prior(ctx.popularity, len(cold))
            board.add_rows("cold_start", method, "cold", {"ndcg@10": ndcg_rows(found, ctx.labels[cold], 10)})
            self._handover(ctx, board, method, head, found[np.searchsorted(cold, ctx.held_out_new)], side, weights)

    def _handover(self, ctx, board, method: str, head, cold_found, side, weights: tuple) -> None:
        """The head on the users held out as new: seen cold (``cold_found``), then with their first
        k history events back, scored as a warm user is (the history weight too)."""
        base = method.split("+")[0]
        if not ctx.handover or base not in next(iter(ctx.handover.values()))["reps"]:
            return  # (ablations: no hand-over)
        labels = ctx.labels[ctx.held_out_new]
        after = {"ndcg@10_after_0": ndcg_rows(cold_found, labels, 10)}
        for k, given in ctx.handover.items():
            given_side = None if side is None else given["side"]
            found = scores(head, given["reps"][base], given_side)
            if given_side is not None:
                found = found + history_terms(ctx, given_side, given["recent"], weights)
            after[f"ndcg@10_after_{k}"] = ndcg_rows(found, labels, 10)
        board.add_rows("handover", method, "handover", after)


def _plays(side: np.ndarray) -> np.ndarray:
    """The play weights (users, K) back from ``history.side_features`` (its log(1 + plays))."""
    return np.expm1(side[:, :, 1])


def history_terms(ctx, side: np.ndarray, recent: np.ndarray, weights: tuple[float, dict]) -> np.ndarray:
    """What a +history head adds to its logits for users with history (``history.blended``), in
    evaluation's populations: ``weights`` = (history, {collaborative input: weight})."""
    warm, collab = weights
    plays = _plays(side)
    extra = warm * history.played_scores(plays, recent, ctx.popularity)
    if not any(collab.values()):
        return extra
    return extra + history.collab_sum(history.collaborative(plays, ctx.collab_models), collab)


def fit_both(data, config: HeadConfig) -> tuple[MLPHead, dict]:
    """Both designs on a batch's task data (the +history head: ``fit_with_history``, its
    collaborative inputs fitted on the task users' plays), each early-stopped on the validation
    users; the better one by their ``validation_score``."""
    from userrep.baselines import collaborative_models  # (scipy and implicit: not at a replica's import)

    x, cold_x, labels, train, valid, side = data.x, data.cold_x, data.labels, data.train, data.valid, data.side

    def score(found: np.ndarray) -> float:
        return validation_score(found, labels[valid], data.history[valid])

    plain = fit_head(x[train], labels[train], config, validate=lambda h: score(scores(h, x[valid])))
    models, _ = collaborative_models(data.plays, valid, x.shape[1], config.seed, score)
    both, with_history = fit_with_history(
        (x[train], cold_x[train], labels[train], side[train]),
        (x[valid], cold_x[valid], side[valid], data.plays[valid], data.recent[valid]),
        data.popularity,
        config,
        score,
        models,
    )
    validation = {
        history.EMBEDDING: score(scores(plain, x[valid])),
        history.WITH_HISTORY: score(
            deployed_scores(both, with_history, x[valid], data.plays[valid], data.recent[valid])
        ),
    }
    validation = {k: round(v, 6) for k, v in validation.items()}
    if validation[history.WITH_HISTORY] >= validation[history.EMBEDDING]:
        return both, {**with_history, "validation": validation}
    return plain, {"design": history.EMBEDDING, "validation": validation}


TASK = FutureListening()
