"""The evaluation protocol: one split, every method, every task, with intervals.

    userrep evaluate --data work/world --out reports/world [--split auto] [--seeds 3]

1. Split (``userrep.split``): ``auto`` picks a global time split, each user's last 20%
   (``user-time``) or a random 20% and says why. Encoders, features and the autoencoder see
   history only.
2. Users: *warm* = history and labels, split 80/20 by user into head-training and test users;
   a share of the head-training users validates every choice a baseline makes (never test users);
   *cold* = no history, onboarding picks or attributes, and labels: new at the cut-off, and where
   fewer than ``EvalConfig.new_users`` are, users with history held out as new (their history
   hidden from encoders, features and baselines; ``userrep.split.hold_out_new_users``).
3. Methods. Representations with the same heads (``gur``, ``pca``, ``raw``, ``item_mean``;
   ``onboarding_mean`` for cold start), each also with a head that adds the user's own history of
   each candidate (``gur+history``, ...: what a team would deploy); scored directly:
   ``history``, ``ease``, ``als`` and ``popularity`` (``userrep.baselines``). Rows of our method
   start with ``gur``.
4. Tasks (``userrep.tasks``): future listening (nDCG@10, recall@50, nDCG@10 on new artists; ranked
   over unseen artists only where users do not repeat, see ``REPEAT_NEAR_ZERO``), artist
   preference (AUC), similar users (nDCG@50 against pairs, else label-window artist overlap),
   cold start (future-listening nDCG@10 on cold users), the hand-over (users held out as new, with
   their first 1, 3, 10 events back). Each task runs when its own users exist.
5. Every value has a 95% bootstrap interval over users (``userrep.uncertainty``); our best row is
   compared with the best baseline by a paired bootstrap (``comparisons``). ``seeds`` > 1 repeats
   the whole protocol and reports mean and spread.
6. Ablations: the autoencoder retrained without each feature group; convergence: warm users
   embedded from their first d days only, cosine to their full-history embedding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from userrep import baselines
from userrep.data import Dataset, load_dataset
from userrep.evaltasks import (
    REPEAT_NEAR_ZERO,
    Context,
    EvalConfig,
    run_ablations,
    run_convergence,
    run_freshness,
    run_tasks,
)
from userrep.features import FeatureConfig, FeatureSpace, UserFeatures, fit_feature_space
from userrep.featurize import build_user_features, static_inputs
from userrep.model import AEConfig, embed
from userrep.split import Split, hold_out_new_users, make_split
from userrep.tasks import artist_preference, history
from userrep.tasks.future_listening import HANDOVER_EVENTS
from userrep.timing import Stopwatch
from userrep.train import fit_autoencoder
from userrep.uncertainty import Board

log = logging.getLogger(__name__)


def evaluate(data: str | Path, out: str | Path, config: EvalConfig = EvalConfig()) -> dict:
    """Run the protocol (``config.seeds`` times); write metrics.json, report.html, summary.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data)
    runs = []
    for i in range(config.seeds):
        seeded = replace(config, seed=config.seed + i)
        if config.seeds > 1:
            log.info(f"seed {seeded.seed} ({i + 1}/{config.seeds})")
        metrics, ctx, gur, space = _evaluate_once(ds, seeded)
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


def _evaluate_once(ds: Dataset, config: EvalConfig) -> tuple[dict, Context, np.ndarray, FeatureSpace]:
    watch = Stopwatch()
    ctx, space = prepare(ds, config)
    split, features = ctx.split, ctx.features
    log.info(split.note)
    log.info(
        f"repeat rate {ctx.repeat_rate:.3f}: ranking {'unseen artists only' if ctx.unseen_only else 'all artists'}"
    )
    watch.done("split + features")
    ae = replace(config.ae or AEConfig(latent=config.dim, epochs=config.epochs), seed=config.seed)
    gur_model = fit_autoencoder(features, ae).model
    encoders = {
        "gur": lambda matrix: embed(gur_model, matrix),
        "pca": baselines.pca_encoder(features, ctx.train_rows, config.dim, config.seed),
        "raw": baselines.raw_encoder(features),
        "item_mean": baselines.item_mean_encoder(features, space.primary.name),
    }
    reps = {name: encode(features.matrix) for name, encode in encoders.items()}
    reps["onboarding_mean"] = baselines.onboarding_mean_representation(features, space.primary.dim)
    # Head-training users seen through onboarding and attributes alone: what a cold user looks like
    # (rows follow ctx.train_rows).
    cold_like = features.cold_like(ctx.train_rows)
    cold_reps = {name: encode(cold_like) for name, encode in encoders.items()}
    watch.done("representations")
    ctx.direct, choices, als = _tuned_baselines(ctx, space, config)
    ctx.als_factors, ctx.onboarding_mean, ctx.space = als.user_factors, reps["onboarding_mean"], space
    watch.done("baselines (tuned on validation users)")
    ctx.handover = _handover(ctx, space, encoders)
    board = Board(
        {
            "test": len(ctx.test_rows),
            "cold": len(ctx.cold_rows),
            "queries": min(config.similar_queries, len(ctx.test_rows)),
            "handover": len(ctx.held_out_new),
        },
        config.seed,
        config.bootstrap,
    )
    skipped = run_tasks(ctx, reps, cold_reps, board, config)
    watch.done("tasks")
    ablations = (
        run_ablations(ctx, features, ae, config, space.config.windows)
        if config.ablations and "future_listening" in board.tasks()
        else {}
    )
    watch.done("ablations")
    convergence = run_convergence(ctx, space, gur_model, reps["gur"], config)
    watch.done("convergence")
    freshness = run_freshness(ctx, space, gur_model, reps["gur"], config)
    watch.done("freshness")
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
        "freshness": freshness,
        "skipped": skipped,
        "note": split.note,
        "counts": {
            "warm_train": len(ctx.train_rows),
            "warm_test": len(ctx.test_rows),
            "cold": len(ctx.cold_rows),
            "cold_held_out": len(ctx.held_out_new),
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
    before = split.train.events
    split, new_users = hold_out_new_users(split, config.seed, config.new_users)
    space = fit_feature_space(split.train, split.as_of, FeatureConfig(seed=config.seed))
    features = build_user_features(split.train, split.as_of, space)
    ctx = _context(ds, split, space, features, config)
    ctx.held_out_new = np.intersect1d(ctx.cold_rows, pd.Index(features.user_ids).get_indexer(pd.Index(new_users)))
    held = pa.array(features.user_ids[ctx.held_out_new].tolist(), before.schema.field("user_id").type)
    ctx.hidden_events = before.filter(pc.is_in(before.column("user_id"), held))
    return ctx, space


def _handover(ctx: Context, space: FeatureSpace, encoders: dict) -> dict:
    """``Context.handover``: per k in ``HANDOVER_EVENTS``, the users held out as new as of the
    cut-off with their first k history events back (onboarding picks and attributes as before).
    The k events are moved in time to end just before the cut-off, their gaps kept: a new user's
    first plays are recent, and left where they were (often months earlier under a user-time
    split) they fall outside every window but the longest."""
    hidden = ctx.hidden_events
    if not len(ctx.held_out_new) or hidden is None or hidden.num_rows == 0:
        return {}
    users = ctx.features.user_ids[ctx.held_out_new]
    frame = pd.DataFrame(
        {
            "user": hidden.column("user_id").to_numpy(zero_copy_only=False),
            "ts": hidden.column("ts").cast("int64").to_numpy(),
        }
    )
    rank = frame.sort_values(["user", "ts"], kind="stable").groupby("user").cumcount().sort_index().to_numpy()
    train, out = ctx.split.train, {}
    cut = ctx.split.as_of.value // 1000 - 1_000_000  # us, a second before the cut-off
    for k in HANDOVER_EVENTS:
        first = rank < k
        ts = frame["ts"][first]
        moved = ts + (cut - ts.groupby(frame["user"][first]).transform("max"))
        events = hidden.filter(pa.array(first))
        events = events.set_column(
            events.schema.get_field_index("ts"),
            "ts",
            pa.array(moved.to_numpy(), pa.int64()).cast(events.schema.field("ts").type),
        )
        partial = Dataset(train.path, events, train.items, train.users, train.pairs)
        matrix = build_user_features(partial, ctx.split.as_of, space, user_ids=users).matrix
        side, recent = ctx.history_inputs(events, users, ctx.split.as_of)
        out[k] = {"reps": {name: encode(matrix) for name, encode in encoders.items()}, "side": side, "recent": recent}
    return out


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
    artist_ids, artist_vecs = space.primary.artist_vectors(ds.items)
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
    validation users' future-listening score (``Context.valid_score``); also sets ``ctx.side``
    (with the chosen decay) and the +history heads' collaborative inputs."""
    valid, users = ctx.valid_rows, ctx.features.user_ids
    events, as_of = ctx.split.train.events, ctx.split.as_of

    def score(scores_of) -> float:
        return ctx.valid_score(scores_of(valid)) if len(valid) else 0.0

    half_life, decayed, by_decay = baselines.choose(
        history.HALF_LIVES,
        lambda h: baselines.decayed_matrix(events, space, users, as_of, h),
        lambda m: score(lambda rows: history.history_scores(m[rows][:, ctx.top_cols], ctx.popularity)),
    )
    ctx.recent = decayed[:, ctx.top_cols].toarray().astype(np.float32)
    ctx.half_life_days = half_life
    ctx.side = history.side_features(ctx.history_artists[:, ctx.top_cols].toarray(), ctx.recent)
    history_scores = lambda rows: history.history_scores(ctx.recent[rows], ctx.popularity)  # noqa: E731
    plays = ctx.history_artists[:, ctx.top_cols].toarray().astype(np.float32)
    binary = (plays > 0).astype(np.float32)
    # The +history heads' collaborative inputs; their EASE^R is the ease baseline (the same choice).
    ctx.collab_models, collab_choices = baselines.collaborative_models(
        plays, valid, config.dim, config.seed, lambda found: ctx.valid_score(found) if len(valid) else 0.0
    )
    ease, ease_choice = ctx.collab_models["ease"], collab_choices["ease"]
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
        "collaborative_als": collab_choices["als"],
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
