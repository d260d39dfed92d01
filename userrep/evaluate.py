"""The evaluation protocol: one split, every method, every task, with intervals.

    userrep evaluate --data work/world --out reports/world [--split auto] [--seeds 3]

1. Split (``userrep.split``): ``auto`` picks a global time split, each user's last 20%
   (``user-time``) or a random 20% and says why. Encoders, features and the autoencoder see
   history only.
2. Users: *warm* = history and labels, split 80/20 by user into head-training and test users;
   a share of the head-training users validates every choice a baseline makes (never test users);
   *cold* = no history, onboarding picks or attributes, and labels.
3. Methods. Representations with the same heads (``gur``, ``pca``, ``raw``, ``item_mean``;
   ``onboarding_mean`` for cold start), each also with a head that adds the user's own history of
   each candidate (``gur+history``, ...: what a team would deploy); scored directly:
   ``history``, ``ease``, ``als`` and ``popularity`` (``userrep.baselines``). Rows of our method
   start with ``gur``.
4. Tasks (``userrep.tasks``): future listening (nDCG@10, recall@50, nDCG@10 on new artists; ranked
   over unseen artists only where users do not repeat, see ``REPEAT_NEAR_ZERO``), artist
   preference (AUC), similar users (nDCG@50 against pairs, else label-window artist overlap),
   cold start (future-listening nDCG@10 on cold users). Each task runs when its own users exist.
5. Every value has a 95% bootstrap interval over users (``userrep.uncertainty``); our best row is
   compared with the best baseline by a paired bootstrap (``comparisons``). ``seeds`` > 1 repeats
   the whole protocol and reports mean and spread.
6. Ablations: the autoencoder retrained without each feature group; convergence: warm users
   embedded from their first d days only, cosine to their full-history embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from userrep import baselines
from userrep.data import Dataset, load_dataset
from userrep.features import (
    FeatureConfig,
    FeatureSpace,
    UserFeatures,
    build_user_features,
    fit_feature_space,
    static_inputs,
    window_name,
)
from userrep.metrics import auc, ndcg_rows
from userrep.model import AEConfig, embed
from userrep.split import Split, make_split
from userrep.tasks import artist_preference, future_listening, history, similar_users
from userrep.tasks._mlp import HeadConfig
from userrep.timing import Stopwatch
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


def evaluate(data: str | Path, out: str | Path, config: EvalConfig = EvalConfig(), log=print) -> dict:
    """Run the protocol (``config.seeds`` times); write metrics.json, report.html, summary.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data)
    runs = []
    for i in range(config.seeds):
        seeded = replace(config, seed=config.seed + i)
        if config.seeds > 1:
            log(f"seed {seeded.seed} ({i + 1}/{config.seeds})")
        metrics, ctx, gur, space = _evaluate_once(ds, seeded, log)
        metrics["dataset"] = Path(data).resolve().name
        if config.seeds > 1:
            (out / f"seed_{seeded.seed}").mkdir(exist_ok=True)
            (out / f"seed_{seeded.seed}" / "metrics.json").write_text(json.dumps(_rounded(metrics), indent=2))
        if i == 0:
            first = (metrics, ctx, gur, space)
        runs.append(metrics)
    metrics, ctx, gur, space = first
    if config.seeds > 1:
        metrics["over_seeds"] = _over_seeds(runs)
    (out / "metrics.json").write_text(json.dumps(_rounded(metrics), indent=2))
    from userrep.report import markdown_summary, write_report

    write_report(metrics, ctx, gur, space.genres, Path(data), out / "report.html")
    (out / "summary.md").write_text(markdown_summary(_rounded(metrics)))
    return metrics


def _evaluate_once(ds: Dataset, config: EvalConfig, log) -> tuple[dict, Context, np.ndarray, FeatureSpace]:
    watch = Stopwatch(log)
    ctx, space = prepare(ds, config)
    split, features = ctx.split, ctx.features
    log(split.note)
    log(f"repeat rate {ctx.repeat_rate:.3f}: ranking {'unseen artists only' if ctx.unseen_only else 'all artists'}")
    watch.done("split + features")
    ae = replace(config.ae or AEConfig(latent=config.dim, epochs=config.epochs), seed=config.seed)
    gur_model = fit_autoencoder(features, ae).model
    encoders = {
        "gur": lambda matrix: embed(gur_model, matrix),
        "pca": baselines.pca_encoder(features, ctx.train_rows, config.dim, config.seed),
        "raw": baselines.raw_encoder(features),
        "item_mean": baselines.item_mean_encoder(features),
    }
    reps = {name: encode(features.matrix) for name, encode in encoders.items()}
    reps["onboarding_mean"] = baselines.onboarding_mean_representation(features, space.collab.dim)
    # Head-training users seen through onboarding and attributes alone: what a cold user looks like
    # (rows follow ctx.train_rows).
    cold_like = features.cold_like(ctx.train_rows)
    cold_reps = {name: encode(cold_like) for name, encode in encoders.items()}
    watch.done("representations")
    direct, choices, als = _tuned_baselines(ctx, space, config)
    watch.done("baselines (tuned on validation users)")
    board = Board(
        {
            "test": len(ctx.test_rows),
            "cold": len(ctx.cold_rows),
            "queries": min(config.similar_queries, len(ctx.test_rows)),
        },
        config.seed,
        config.bootstrap,
    )
    skipped = _run_tasks(ctx, reps, cold_reps, direct, als.user_factors, board, config)
    watch.done("tasks")
    ablations = (
        _ablations(ctx, features, ae, config, space.config.windows)
        if config.ablations and "future_listening" in board.tasks()
        else {}
    )
    watch.done("ablations")
    convergence = _convergence(ctx, space, gur_model, reps["gur"], config)
    watch.done("convergence")
    metrics = {
        "split": split.kind,
        "cutoff": split.cutoff.isoformat() if split.cutoff is not None else None,
        "n_users": int(len(features.user_ids)),
        "repeat_rate": ctx.repeat_rate,
        "ranking": "unseen" if ctx.unseen_only else "all",
        "tasks": board.tasks(),
        "comparisons": board.comparisons(lambda method: method.startswith("gur")),
        "baselines": choices,
        "history_blend": ctx.blends,
        "ablations": ablations,
        "convergence": convergence,
        "skipped": skipped,
        "note": split.note,
        "counts": {
            "warm_train": len(ctx.train_rows),
            "warm_test": len(ctx.test_rows),
            "cold": len(ctx.cold_rows),
            "validation": len(ctx.valid_rows),
            "top_k_artists": int(ctx.labels.shape[1]),
        },
        "config": asdict(config),
        "timings_s": watch.finish(),
    }
    return metrics, ctx, reps["gur"], space


def prepare(ds: Dataset, config: EvalConfig):
    """Split, fit the feature space on history, build features and the shared task context."""
    split = make_split(ds, config.cutoff, config.seed, kind=config.split)
    space = fit_feature_space(split.train, split.as_of, FeatureConfig(seed=config.seed))
    features = build_user_features(split.train, split.as_of, space)
    return _context(ds, split, space, features, config), space


def _context(ds: Dataset, split: Split, space, features: UserFeatures, config: EvalConfig) -> Context:
    users = features.user_ids
    history_all = baselines.user_artist_matrix(split.train.events, space, users)
    future_all = baselines.user_artist_matrix(split.future, space, users)
    weight = np.asarray(history_all.sum(axis=0)).ravel()
    played = np.flatnonzero(weight > 0)
    top = played[np.argsort(-weight[played], kind="stable")][: config.top_k]
    labels = (future_all[:, top] > 0).toarray().astype(np.float32)
    history = (history_all[:, top] > 0).toarray().astype(np.float32)
    has_history = np.diff(history_all.indptr) > 0
    has_labels = labels.sum(axis=1) > 0
    slices = features.schema.slices()
    has_static = features.matrix[:, slices["onboarding"]][:, -1] > 0
    if "demographics" in slices:
        has_static |= features.matrix[:, slices["demographics"]].sum(axis=1) > 0
    warm = np.flatnonzero(has_history & has_labels)
    rng = np.random.default_rng(config.seed)
    warm = rng.permutation(warm)
    n_test = int(round(config.test_share * len(warm)))
    train, test = warm[n_test:], warm[:n_test]
    n_valid = int(round(config.valid_share * len(train)))
    fit, valid = np.sort(train[n_valid:]), np.sort(train[:n_valid])
    repeat = future_all.multiply(history_all > 0).sum() / max(float(future_all[has_history].sum()), 1e-12)
    artist_ids, artist_vecs = space.collab.artist_vectors(ds.items)
    vectors = artist_vecs[pd.Index(artist_ids).get_indexer(space.artists[top])]
    train, test = np.sort(train), np.sort(test)
    pairs = lambda rows, seed: artist_preference.sample_pairs(labels[rows], weight[top], seed)  # noqa: E731
    return Context(
        ds,
        split,
        features,
        labels,
        history,
        weight[top],
        vectors,
        train,
        test,
        fit,
        valid,
        np.flatnonzero(~has_history & has_static & has_labels),
        _related(ds, users),
        future_all,
        history_all,
        top,
        pairs(fit, config.seed),
        pairs(valid, config.seed + 2),
        pairs(test, config.seed + 1),
        float(repeat),
        bool(repeat < REPEAT_NEAR_ZERO),
    )


def _tuned_baselines(ctx: Context, space, config: EvalConfig) -> tuple[dict, dict, baselines.ALSModel]:
    """The directly scored baselines as ``rows -> (rows, K) scores``, each choice made on the
    validation users' future-listening nDCG@10; also sets ``ctx.side`` (with the chosen decay)."""
    valid, users = ctx.valid_rows, ctx.features.user_ids
    events, as_of = ctx.split.train.events, ctx.split.as_of

    def score(scores_of) -> float:
        return _valid_ndcg(ctx, scores_of(valid)) if len(valid) else 0.0

    half_life, decayed, by_decay = baselines.choose(
        history.HALF_LIVES,
        lambda h: baselines.decayed_matrix(events, space, users, as_of, h),
        lambda m: score(lambda rows: history.history_scores(m[rows][:, ctx.top_cols], ctx.popularity)),
    )
    ctx.recent = decayed[:, ctx.top_cols].toarray().astype(np.float32)
    ctx.side = history.side_features(ctx.history_artists[:, ctx.top_cols].toarray(), ctx.recent)
    history_scores = lambda rows: history.history_scores(ctx.recent[rows], ctx.popularity)  # noqa: E731
    binary = (ctx.history_artists[:, ctx.top_cols] > 0).astype(np.float32).toarray()
    ease, ease_choice = baselines.tune_ease(binary, lambda b: score(lambda rows: binary[rows] @ b))
    onboarding = _onboarding_matrix(ctx.split.train, ctx.features, space)
    als, als_choice = baselines.tune_als(
        ctx.history_artists,
        config.dim,
        config.seed,
        onboarding,
        lambda m: score(lambda rows: m.scores(rows, ctx.top_cols)),
    )
    direct = {
        "popularity": lambda rows: np.broadcast_to(ctx.popularity, (len(rows), len(ctx.popularity))),
        "history": history_scores,
        "ease": lambda rows: binary[rows] @ ease,
        "als": lambda rows: als.scores(rows, ctx.top_cols),
    }
    choices = {
        "history": {"half_life_days": half_life, "validation": by_decay},
        "ease": ease_choice,
        "als": als_choice,
        "validation_users": int(len(valid)),
    }
    return direct, choices, als


def _related(ds: Dataset, users: np.ndarray) -> sp.csr_matrix | None:
    if ds.pairs is None:
        return None
    index = pd.Index(users)
    a = index.get_indexer(ds.pairs.column("user_a").to_numpy(zero_copy_only=False))
    b = index.get_indexer(ds.pairs.column("user_b").to_numpy(zero_copy_only=False))
    keep = (a >= 0) & (b >= 0)
    a, b = a[keep], b[keep]
    related = sp.csr_matrix((np.ones(2 * len(a)), (np.r_[a, b], np.r_[b, a])), shape=(len(users), len(users)))
    related.data[:] = 1.0  # both directions listed once or twice: still one relation
    return related


def _onboarding_matrix(train: Dataset, features: UserFeatures, space) -> sp.csr_matrix:
    static = static_inputs(train, features.user_ids)
    artist = space.artist_index(static.artist_ids) if len(static.artist_ids) else np.array([], int)
    ok = artist >= 0
    return sp.csr_matrix(
        (np.ones(ok.sum()), (static.artist_parent[ok], artist[ok])), shape=(len(features.user_ids), len(space.artists))
    )


def _valid_ndcg(ctx: Context, scores: np.ndarray) -> float:
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
    return lambda head: _valid_ndcg(ctx, future_listening.scores(head, x[valid]))


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
            lambda scores: _valid_ndcg(ctx, scores),
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


def _run_tasks(
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
    if not _similar_users(ctx, board, {**{m: reps[m] for m in HEAD_METHODS}, "als": als_factors}, config):
        skipped["similar_users"] = "no test users with pairs or label-window plays to judge neighbours by"
    return skipped


def _similar_users(ctx: Context, board: Board | None, reps: dict, config: EvalConfig) -> dict | None:
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


def _ablations(ctx: Context, features: UserFeatures, ae: AEConfig, config: EvalConfig, windows) -> dict:
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
        similar.update(_similar_users(ctx, None, {token: x}, config) or {})
    out: dict[str, dict] = {token: {} for token in tokens}
    for task, methods in board.tasks().items():
        for token, values in methods.items():
            out[token][task] = {k: v for k, v in values.items() if not k.endswith("_ci")}
    for token, values in similar.items():
        out[token]["similar_users"] = values
    return out


def _convergence(ctx: Context, space, model, full: np.ndarray, config: EvalConfig) -> dict:
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


def _rounded(value):
    if isinstance(value, float):
        return round(value, 5) if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _over_seeds(runs: list[dict]) -> dict:
    """Mean, standard deviation and the values of every task metric over the seeds' runs."""
    out: dict[str, dict] = {}
    for task, methods in runs[0]["tasks"].items():
        for method, values in methods.items():
            for metric in (k for k in values if not k.endswith("_ci")):
                got = [r["tasks"].get(task, {}).get(method, {}).get(metric) for r in runs]
                found = np.array([np.nan if v is None else v for v in got], dtype=float)
                out.setdefault(task, {}).setdefault(method, {})[metric] = {
                    "mean": float(np.nanmean(found)),
                    "std": float(np.nanstd(found)),
                    "values": found.tolist(),
                }
    return out
