"""The evaluation protocol: one split, every method, every task, ablations, convergence.

    userrep evaluate --data work/world --out reports/world

1. Split (``userrep.split``): history before the cutoff, labels after it (or a random per-user
   hold-out when there is no usable time). Encoders, features and the autoencoder see history only.
2. Users: *warm* = history and labels, split 80/20 by user into head-training and test users;
   *cold* = no history, onboarding picks or attributes, and labels.
3. Methods (``userrep.baselines``): ``gur`` (our embedding), ``pca``, ``raw``, ``item_mean``,
   ``onboarding_mean`` (cold start), ``als`` and ``popularity`` (scored directly). Every
   representation gets the same task heads, trained on the same users.
4. Tasks (``userrep.tasks``): future listening (nDCG@10, recall@50, nDCG@10 on new artists), artist
   preference (AUC), similar users (nDCG@50 against pairs, else label-window artist overlap),
   cold start (future-listening nDCG@10 on cold users).
5. Ablations: the autoencoder retrained without each feature group; convergence: warm users
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
from userrep.metrics import auc, ndcg_at_k
from userrep.features import (FeatureConfig, UserFeatures, build_user_features, fit_feature_space, static_inputs,
                              window_name)
from userrep.model import AEConfig, embed
from userrep.split import Split, make_split
from userrep.tasks import artist_preference, future_listening, similar_users
from userrep.tasks._mlp import HeadConfig
from userrep.timing import Stopwatch
from userrep.train import fit_autoencoder

HEAD_METHODS = ("gur", "pca", "raw", "item_mean")
ABLATION_GROUPS = ("onboarding", "collab", "content", "artists", "demographics")
MIN_COLD = 5  # fewer cold users with labels than this: the cold-start task is skipped
PAIR_SAMPLES = 2_500_000  # training budget of the artist-preference head (pairs x epochs)


@dataclass(frozen=True)
class EvalConfig:
    cutoff: str | None = None
    dim: int = 64
    seed: int = 0
    top_k: int = 1000  # artists the future-listening head ranks
    epochs: int = 20
    head: HeadConfig = field(default_factory=HeadConfig)
    test_share: float = 0.2
    ablations: bool = True
    convergence_days: tuple[int, ...] = (0, 1, 3, 7, 30)
    convergence_users: int = 1000
    similar_queries: int = 1000


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
    train_rows: np.ndarray
    test_rows: np.ndarray
    cold_rows: np.ndarray
    related: sp.csr_matrix | None  # (users, users) ground-truth pairs
    label_artists: sp.csr_matrix  # (users, all artists) label-window plays
    history_artists: sp.csr_matrix  # (users, all artists) pre-cutoff plays
    top_cols: np.ndarray  # (K,) column of each top-K artist among all artists
    train_pairs: tuple  # artist-preference pairs, rows relative to train_rows
    test_pairs: tuple  # ... relative to test_rows


def evaluate(data: str | Path, out: str | Path, config: EvalConfig = EvalConfig(), log=print) -> dict:
    watch = Stopwatch(log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data)
    ctx, space = prepare(ds, config)
    split, features = ctx.split, ctx.features
    log(split.note)
    watch.done("split + features")
    ae = AEConfig(latent=config.dim, epochs=config.epochs, seed=config.seed)
    gur_model = fit_autoencoder(features, ae).model
    reps = {
        "gur": embed(gur_model, features.matrix),
        "pca": baselines.pca_representation(features, ctx.train_rows, config.dim, config.seed),
        "raw": baselines.raw_representation(features),
        "item_mean": baselines.item_mean_representation(features),
        "onboarding_mean": baselines.onboarding_mean_representation(features, space.collab.dim),
    }
    als = baselines.fit_als(ctx.history_artists, config.dim, config.seed, _onboarding_matrix(split.train, features, space))
    watch.done("representations")

    tasks, skipped = _run_tasks(ctx, reps, als, config)
    watch.done("tasks")
    ablations = _ablations(ctx, features, ae, config, space.config.windows) if config.ablations and tasks else {}
    watch.done("ablations")
    convergence = _convergence(ctx, space, gur_model, reps["gur"], config)
    watch.done("convergence")
    metrics = {
        "dataset": Path(data).resolve().name,
        "split": split.kind,
        "cutoff": split.cutoff.isoformat() if split.cutoff is not None else None,
        "n_users": int(len(features.user_ids)),
        "tasks": tasks,
        "ablations": ablations,
        "convergence": convergence,
        "skipped": skipped,
        "note": split.note,
        "counts": {"warm_train": len(ctx.train_rows), "warm_test": len(ctx.test_rows), "cold": len(ctx.cold_rows),
                   "top_k_artists": int(ctx.labels.shape[1])},
        "config": asdict(config),
        "timings_s": watch.finish(),
    }
    (out / "metrics.json").write_text(json.dumps(_rounded(metrics), indent=2))
    from userrep.report import markdown_summary, write_report

    write_report(metrics, ctx, reps["gur"], space.genres, Path(data), out / "report.html")
    (out / "summary.md").write_text(markdown_summary(_rounded(metrics)))
    return metrics


def prepare(ds: Dataset, config: EvalConfig):
    """Split, fit the feature space on history, build features and the shared task context."""
    split = make_split(ds, config.cutoff, config.seed)
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
    artist_ids, artist_vecs = space.collab.artist_vectors(ds.items)
    vectors = artist_vecs[pd.Index(artist_ids).get_indexer(space.artists[top])]
    train, test = np.sort(warm[n_test:]), np.sort(warm[:n_test])
    return Context(ds, split, features, labels, history, weight[top], vectors, train, test,
                   np.flatnonzero(~has_history & has_static & has_labels), _related(ds, users), future_all,
                   history_all, top,
                   artist_preference.sample_pairs(labels[train], weight[top], config.seed),
                   artist_preference.sample_pairs(labels[test], weight[top], config.seed + 1))


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
    return sp.csr_matrix((np.ones(ok.sum()), (static.artist_parent[ok], artist[ok])),
                         shape=(len(features.user_ids), len(space.artists)))


def _head_tasks(ctx: Context, x: np.ndarray, config: EvalConfig) -> dict[str, dict]:
    """The head-based tasks for one representation: fit on warm training users, score the rest."""
    train, test, cold = ctx.train_rows, ctx.test_rows, ctx.cold_rows
    head = future_listening.fit_head(x[train], ctx.labels[train], config.head)
    out = {"future_listening": future_listening.ranking_metrics(
        future_listening.scores(head, x[test]), ctx.labels[test], ctx.history[test])}
    # Pairs outnumber users ~20x: larger batches, and at most PAIR_SAMPLES pairs seen in training
    # (8 epochs instead of 15 on the default world: 12 s instead of 25 s per head, validation AUC
    # -0.004 for every method; small datasets keep all their epochs).
    n_pairs = max(len(ctx.train_pairs[0]), 1)
    pair_config = replace(config.head, batch_size=max(config.head.batch_size, 1024),
                          epochs=max(1, min(config.head.epochs, round(PAIR_SAMPLES / n_pairs))))
    pref = artist_preference.fit_head(x[train], ctx.artist_vectors, ctx.train_pairs, pair_config)
    out["artist_preference"] = {"auc": artist_preference.evaluate(pref, x[test], ctx.artist_vectors, ctx.test_pairs)}
    if len(cold) >= MIN_COLD:
        out["cold_start"] = {"ndcg@10": ndcg_at_k(future_listening.scores(head, x[cold]), ctx.labels[cold], 10)}
    return out


def _run_tasks(ctx: Context, reps: dict, als, config: EvalConfig) -> tuple[dict, dict]:
    train, test, cold = ctx.train_rows, ctx.test_rows, ctx.cold_rows
    if len(train) < 10 or len(test) < 5:
        return {}, {"all": f"too few warm users with both history and labels ({len(train) + len(test)})"}
    tasks: dict[str, dict] = {"future_listening": {}, "artist_preference": {}, "similar_users": {}, "cold_start": {}}
    skipped: dict[str, str] = {}
    for method in HEAD_METHODS:
        for task, values in _head_tasks(ctx, reps[method], config).items():
            tasks[task][method] = values
    popularity = lambda rows: np.broadcast_to(ctx.popularity, (len(rows), len(ctx.popularity)))  # noqa: E731
    tasks["future_listening"]["popularity"] = future_listening.ranking_metrics(
        popularity(test), ctx.labels[test], ctx.history[test])
    tasks["future_listening"]["als"] = future_listening.ranking_metrics(
        als.scores(test, ctx.top_cols), ctx.labels[test], ctx.history[test])
    users, artists, y = ctx.test_pairs
    tasks["artist_preference"]["popularity"] = {"auc": auc(y, ctx.popularity[artists])}
    als_pairs = np.einsum("ij,ij->i", als.user_factors[test[users]], als.artist_factors[ctx.top_cols[artists]])
    tasks["artist_preference"]["als"] = {"auc": auc(y, als_pairs)}
    similar = _similar_users(ctx, {**{m: reps[m] for m in HEAD_METHODS}, "als": als.user_factors}, config)
    if similar is None:
        skipped["similar_users"] = "no pairs and no label-window overlap to judge neighbours by"
        del tasks["similar_users"]
    else:
        tasks["similar_users"] = similar
    if len(cold) < MIN_COLD:
        skipped["cold_start"] = f"only {len(cold)} users without history but with onboarding/attributes and labels"
        del tasks["cold_start"]
    else:
        onboarding_head = future_listening.fit_head(reps["onboarding_mean"][train], ctx.labels[train], config.head)
        cold_scores = {"onboarding_mean": future_listening.scores(onboarding_head, reps["onboarding_mean"][cold]),
                       "popularity": popularity(cold), "als": als.scores(cold, ctx.top_cols)}
        for method, scores in cold_scores.items():
            tasks["cold_start"][method] = {"ndcg@10": ndcg_at_k(scores, ctx.labels[cold], 10)}
    return tasks, skipped


def _similar_users(ctx: Context, reps: dict, config: EvalConfig) -> dict | None:
    rng = np.random.default_rng(config.seed)
    if ctx.related is not None and ctx.related.nnz:
        candidates = ctx.test_rows[np.diff(ctx.related.indptr)[ctx.test_rows] > 0]
        score = lambda found, q: similar_users.ndcg_with_pairs(found, q, ctx.related)  # noqa: E731
    else:
        candidates = ctx.test_rows[np.diff(ctx.label_artists.indptr)[ctx.test_rows] > 0]
        score = lambda found, q: similar_users.ndcg_with_overlap(found, q, ctx.label_artists)  # noqa: E731
    if len(candidates) == 0:
        return None
    queries = np.sort(rng.choice(candidates, size=min(config.similar_queries, len(candidates)), replace=False))
    out = {}
    for method, x in reps.items():
        index = similar_users.build_index(x)
        out[method] = {"ndcg@50": score(similar_users.neighbours(index, x, queries, 50), queries)}
    return out


def _ablations(ctx: Context, features: UserFeatures, ae: AEConfig, config: EvalConfig, windows) -> dict:
    """The autoencoder retrained without each group (by kind, then by window); same heads and users."""
    present = {name for name, _ in features.schema.groups}
    tokens = [g for g in ABLATION_GROUPS if any(n == g or n.startswith(f"{g}_") for n in present)]
    tokens += [window_name(w) for w in windows]
    out = {}
    for token in tokens:
        reduced = features.without([token])
        x = embed(fit_autoencoder(reduced, ae).model, reduced.matrix)
        out[token] = _head_tasks(ctx, x, config)
        similar = _similar_users(ctx, {"x": x}, config)
        if similar:
            out[token]["similar_users"] = similar["x"]
    return out


def _convergence(ctx: Context, space, model, full: np.ndarray, config: EvalConfig) -> dict:
    """Mean cosine between a warm user's embedding from only its first d days and from all history."""
    rng = np.random.default_rng(config.seed)
    warm = np.r_[ctx.train_rows, ctx.test_rows]
    rows = np.sort(rng.choice(warm, size=min(config.convergence_users, len(warm)), replace=False))
    users = ctx.features.user_ids[rows]
    events = ctx.split.train.events
    frame = pd.DataFrame({"user": events.column("user_id").to_numpy(zero_copy_only=False),
                          "ts": events.column("ts").cast("int64").to_numpy()})
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
