"""What the evaluation runs on one prepared split (``Context``): its settings, the heads of each
representation on every task, similar users, ablations and cold -> warm convergence.
``userrep.evaluate`` prepares the context, runs these and writes the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from userrep.data import Dataset
from userrep.features import UserFeatures, window_name
from userrep.featurize import build_user_features
from userrep.metrics import auc, ndcg_rows
from userrep.model import AEConfig, embed
from userrep.split import Split
from userrep.tasks import artist_preference, future_listening, history, similar_users
from userrep.tasks._mlp import HeadConfig
from userrep.train import fit_autoencoder
from userrep.uncertainty import ROUNDS, Board

HEAD_METHODS = ("gur", "pca", "raw", "item_mean")
WITH_HISTORY = "+history"  # suffix of the rows whose heads also see the user's history
ABLATION_GROUPS = ("onboarding", "collab", "content", "artists", "demographics")
MIN_COLD = 5  # fewer cold users with labels than this: the cold-start task is skipped
MIN_TRAIN, MIN_TEST = 10, 5  # warm users needed to train heads / to score warm tasks
# Below this share of label-window plays on artists already played, ranking seen artists is
# pointless (a rating is not given twice): rank unseen artists only.
REPEAT_NEAR_ZERO = 0.05


@dataclass(frozen=True)
class EvalConfig:
    cutoff: str | None = None
    split: str = "auto"
    dim: int = 64
    seed: int = 0
    seeds: int = 1  # repeat the protocol with seeds seed .. seed + seeds - 1
    top_k: int = 1000  # artists the future-listening head ranks
    epochs: int = 20
    head: HeadConfig = field(default_factory=HeadConfig)
    ae: AEConfig | None = None  # the autoencoder's settings (e.g. tuned); None: defaults with dim and epochs
    test_share: float = 0.2
    valid_share: float = 0.2  # of the head-training users: validation for baseline choices
    # Off by default: nine more autoencoder fits, ~5 min on 20k users; the comparison is the protocol.
    ablations: bool = False
    convergence_days: tuple[int, ...] = (0, 1, 3, 7, 30)
    convergence_users: int = 1000
    similar_queries: int = 1000
    bootstrap: int = ROUNDS


@dataclass
class Context:
    """Everything the tasks share for one split."""

    ds: Dataset
    split: Split
    features: UserFeatures
    labels: np.ndarray  # (users, K) label-window plays of the top-K artists
    history: np.ndarray  # (users, K) pre-cutoff plays of the same artists
    popularity: np.ndarray  # (K,) pre-cutoff play weight
    artist_vectors: np.ndarray  # (K, d) collaborative artist vectors
    train_rows: np.ndarray  # head-training users: fit_rows + valid_rows
    test_rows: np.ndarray
    fit_rows: np.ndarray  # what heads are fitted on
    valid_rows: np.ndarray  # validation: baseline choices, heads' early stopping
    cold_rows: np.ndarray
    related: sp.csr_matrix | None  # (users, users) ground-truth pairs
    label_artists: sp.csr_matrix  # (users, all artists) label-window plays
    history_artists: sp.csr_matrix  # (users, all artists) pre-cutoff plays
    top_cols: np.ndarray  # (K,) column of each top-K artist among all artists
    fit_pairs: tuple  # artist-preference pairs, rows relative to fit_rows
    valid_pairs: tuple  # ... relative to valid_rows
    test_pairs: tuple  # ... relative to test_rows
    repeat_rate: float  # share of label-window plays on artists the user played before
    unseen_only: bool  # rank unseen artists only (repeat_rate below REPEAT_NEAR_ZERO)
    recent: np.ndarray | None = None  # (users, K) pre-cutoff plays with the chosen recency decay
    side: np.ndarray | None = None  # (users, K, 3) ``history.side_features``, set with ``recent``
    blends: dict = field(default_factory=dict)  # method -> the history/prior weights chosen for +history heads


def valid_ndcg(ctx: Context, scores: np.ndarray) -> float:
    """nDCG@10 of ``scores`` (validation users x K) as the test users are scored (unseen-only or not):
    every choice made on validation users uses this one number."""
    valid = ctx.valid_rows
    return float(
        np.nanmean(
            future_listening.ranking_rows(scores, ctx.labels[valid], ctx.history[valid], ctx.unseen_only)["ndcg@10"]
        )
    )


def _ranking_validation(ctx: Context, x: np.ndarray):
    """Early-stopping score of an embedding-only future-listening head: the validation users' nDCG@10."""
    valid = ctx.valid_rows
    if len(valid) < MIN_TEST:
        return None
    return lambda head: valid_ndcg(ctx, future_listening.scores(head, x[valid]))


def _head_tasks(
    ctx: Context,
    board: Board,
    method: str,
    x: np.ndarray,
    config: EvalConfig,
    cold_x: np.ndarray | None = None,
    warm: bool = True,
    preference: bool = True,
) -> None:
    """Heads for one representation, fit on warm head-training users (early-stopped on the
    validation users), scored on test and cold users.

    With ``cold_x`` (the head-training users' cold-like representations) the heads also see the
    user's history of each candidate (row ``METHOD+history``), and the future-listening head
    learns from the fitting users twice: with their history, and as cold-like users (no history).
    """
    fit, test, cold, valid = ctx.fit_rows, ctx.test_rows, ctx.cold_rows, ctx.valid_rows
    side = ctx.side if cold_x is not None else None
    warm_weight = cold_weight = 0.0
    if cold_x is None:
        head = future_listening.fit_head(x[fit], ctx.labels[fit], config.head, validate=_ranking_validation(ctx, x))
    else:
        assert side is not None and ctx.recent is not None, "history features are set with cold_x"
        cold_fit, cold_valid = (cold_x[np.searchsorted(ctx.train_rows, rows)] for rows in (fit, valid))
        checked = len(valid) >= MIN_TEST
        head, meta = future_listening.fit_with_history(
            (x[fit], cold_fit, ctx.labels[fit], side[fit]),
            (x[valid], cold_valid, side[valid], side[valid, :, 0], ctx.recent[valid]) if checked else None,
            ctx.popularity,
            config.head,
            lambda scores: valid_ndcg(ctx, scores),
        )
        warm_weight, cold_weight = meta["history_weight"], meta["prior_weight"]
        if checked:
            ctx.blends[method] = {"history_weight": warm_weight, "prior_weight": cold_weight}
    if warm:
        scores = future_listening.scores(head, x[test], None if side is None else side[test])
        if warm_weight:
            scores = scores + warm_weight * _played_scores(ctx, test)
        board.add_rows(
            "future_listening",
            method,
            "test",
            future_listening.ranking_rows(scores, ctx.labels[test], ctx.history[test], ctx.unseen_only),
        )
    if warm and preference:
        pick = lambda rows: None if side is None else side[rows]  # noqa: E731
        check = (
            None
            if len(valid) < MIN_TEST
            else (
                lambda h: auc(
                    ctx.valid_pairs[2],
                    artist_preference.scores(h, x[valid], ctx.artist_vectors, ctx.valid_pairs, pick(valid)),
                )
            )
        )
        pair_config = artist_preference.pair_config(config.head, len(ctx.fit_pairs[0]))
        pref = artist_preference.fit_head(x[fit], ctx.artist_vectors, ctx.fit_pairs, pair_config, pick(fit), check)
        users, _, y = ctx.test_pairs
        board.add_auc(
            "artist_preference",
            method,
            "test",
            users,
            y,
            artist_preference.scores(pref, x[test], ctx.artist_vectors, ctx.test_pairs, pick(test)),
        )
    if len(cold) >= MIN_COLD:
        no_history = None if side is None else np.zeros((len(cold),) + side.shape[1:], np.float32)
        prior = history.prior(ctx.popularity, len(cold))
        scores = future_listening.scores(head, x[cold], no_history) + cold_weight * prior
        board.add_rows("cold_start", method, "cold", {"ndcg@10": ndcg_rows(scores, ctx.labels[cold], 10)})


def _played_scores(ctx: Context, rows: np.ndarray) -> np.ndarray:
    assert ctx.side is not None and ctx.recent is not None, "history features are not set"
    return history.played_scores(ctx.side[rows, :, 0], ctx.recent[rows], ctx.popularity)


def run_tasks(
    ctx: Context, reps: dict, cold_reps: dict, direct: dict, als_factors: np.ndarray, board: Board, config: EvalConfig
) -> dict:
    """Every task on its own users: a task that cannot run is skipped with its reason, alone."""
    train, test, cold = ctx.train_rows, ctx.test_rows, ctx.cold_rows
    skipped: dict[str, str] = {}
    heads = len(ctx.fit_rows) >= MIN_TRAIN
    warm = heads and len(test) >= MIN_TEST
    if not warm:
        reason = f"too few warm users with both history and labels ({len(train) + len(test)})"
        skipped.update({"future_listening": reason, "artist_preference": reason})
    if len(cold) < MIN_COLD or not heads:
        skipped["cold_start"] = (
            f"only {len(cold)} users without history but with onboarding/attributes and labels"
            if len(cold) < MIN_COLD
            else f"too few warm users to train heads ({len(train)})"
        )
    if heads:
        for method in HEAD_METHODS:
            _head_tasks(ctx, board, method, reps[method], config, warm=warm)
            _head_tasks(ctx, board, method + WITH_HISTORY, reps[method], config, cold_x=cold_reps[method], warm=warm)
    if warm:
        users, artists, y = ctx.test_pairs
        for method, scores_of in direct.items():
            scores = scores_of(test)
            board.add_rows(
                "future_listening",
                method,
                "test",
                future_listening.ranking_rows(scores, ctx.labels[test], ctx.history[test], ctx.unseen_only),
            )
            board.add_auc("artist_preference", method, "test", users, y, np.asarray(scores)[users, artists])
    if "cold_start" not in skipped:
        onboarding = reps["onboarding_mean"]
        onboarding_head = future_listening.fit_head(
            onboarding[ctx.fit_rows],
            ctx.labels[ctx.fit_rows],
            config.head,
            validate=_ranking_validation(ctx, onboarding),
        )
        cold_scores = {
            "onboarding_mean": future_listening.scores(onboarding_head, onboarding[cold]),
            "popularity": direct["popularity"](cold),
            "als": direct["als"](cold),
        }
        for method, scores in cold_scores.items():
            board.add_rows("cold_start", method, "cold", {"ndcg@10": ndcg_rows(scores, ctx.labels[cold], 10)})
    if not run_similar_users(ctx, board, {**{m: reps[m] for m in HEAD_METHODS}, "als": als_factors}, config):
        skipped["similar_users"] = "no test users with pairs or label-window plays to judge neighbours by"
    return skipped


def run_similar_users(ctx: Context, board: Board | None, reps: dict, config: EvalConfig) -> dict | None:
    """nDCG@50 of FAISS neighbours per representation; into ``board``, or returned when None."""
    rng = np.random.default_rng(config.seed)
    if ctx.related is not None and ctx.related.nnz:
        candidates = ctx.test_rows[np.diff(ctx.related.indptr)[ctx.test_rows] > 0]
        score = lambda found, q: similar_users.ndcg_with_pairs(found, q, ctx.related)  # noqa: E731
    else:
        candidates = ctx.test_rows[np.diff(ctx.label_artists.indptr)[ctx.test_rows] > 0]
        score = lambda found, q: similar_users.ndcg_with_overlap(found, q, ctx.label_artists)  # noqa: E731
    if len(candidates) == 0:
        return None
    n = min(config.similar_queries, len(candidates))
    queries = np.sort(rng.choice(candidates, size=n, replace=False))
    out = {}
    for method, x in reps.items():
        rows = score(similar_users.neighbours(similar_users.build_index(x), x, queries, 50), queries)
        out[method] = {"ndcg@50": similar_users.mean(rows)}
        if board is not None:  # the population's first n resampling weights: queries are a sample already
            padded = np.full(len(board.weights["queries"][0]), np.nan)
            padded[:n] = rows
            board.add_rows("similar_users", method, "queries", {"ndcg@50": padded})
    return out


def run_ablations(ctx: Context, features: UserFeatures, ae: AEConfig, config: EvalConfig, windows) -> dict:
    """The autoencoder retrained without each group (by kind, then by window); same heads and users."""
    present = {name for name, _ in features.schema.groups}
    tokens = [g for g in ABLATION_GROUPS if any(n == g or n.startswith(f"{g}_") for n in present)]
    tokens += [window_name(w) for w in windows]
    board = Board({"test": len(ctx.test_rows), "cold": len(ctx.cold_rows)}, config.seed, rounds=1)
    similar = {}
    for token in tokens:
        reduced = features.without([token])
        x = embed(fit_autoencoder(reduced, ae).model, reduced.matrix)
        _head_tasks(ctx, board, token, x, config, preference=False)  # the pair head: the slowest, least telling
        similar.update(run_similar_users(ctx, None, {token: x}, config) or {})
    out: dict[str, dict] = {token: {} for token in tokens}
    for task, methods in board.tasks().items():
        for token, values in methods.items():
            out[token][task] = {k: v for k, v in values.items() if not k.endswith("_ci")}
    for token, values in similar.items():
        out[token]["similar_users"] = values
    return out


def run_convergence(ctx: Context, space, model, full: np.ndarray, config: EvalConfig) -> dict:
    """Mean cosine between a warm user's embedding from only its first d days and from all history."""
    rng = np.random.default_rng(config.seed)
    warm = np.r_[ctx.train_rows, ctx.test_rows]
    rows = np.sort(rng.choice(warm, size=min(config.convergence_users, len(warm)), replace=False))
    users = ctx.features.user_ids[rows]
    events = ctx.split.train.events
    frame = pd.DataFrame(
        {
            "user": events.column("user_id").to_numpy(zero_copy_only=False),
            "ts": events.column("ts").cast("int64").to_numpy(),
        }
    )
    first = frame.groupby("user")["ts"].min()
    start = first.reindex(frame["user"]).to_numpy()
    sampled = frame["user"].isin(set(users)).to_numpy()
    ts = frame["ts"].to_numpy()
    out = {}
    for days in config.convergence_days:
        keep = sampled & (ts < start + days * 86_400_000_000)
        partial = Dataset(ctx.ds.path, events.filter(keep), ctx.ds.items, ctx.ds.users, ctx.ds.pairs)
        x = embed(model, build_user_features(partial, ctx.split.as_of, space, user_ids=users).matrix)
        out[str(days)] = float(np.mean(_cosine(x, full[rows])))
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
