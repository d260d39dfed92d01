"""What the evaluation runs on one prepared split (``Context``): its settings, every registered
task (``userrep.tasks.registry``: each task's ``evaluate`` scores each representation), ablations
and cold -> warm convergence.
``userrep.evaluate`` prepares the context, runs these and writes the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from userrep.baselines import decayed_matrix, user_artist_matrix
from userrep.data import Dataset
from userrep.features import FeatureSpace, UserFeatures, window_name
from userrep.featurize import build_user_features
from userrep.model import AEConfig, embed
from userrep.split import NEW_USERS, Split
from userrep.tasks import future_listening, history
from userrep.tasks._mlp import HeadConfig
from userrep.tasks.registry import tasks
from userrep.train import fit_autoencoder
from userrep.uncertainty import ROUNDS, Board, interval, resample_weights, weighted_means

HEAD_METHODS = ("gur", "pca", "raw", "item_mean")
WITH_HISTORY = "+history"  # suffix of the rows whose heads also see the user's history
# the groups an ablation drops, by kind: these, each modality encoder's (between the first two), by window
ABLATION_GROUPS = ("onboarding", "artists", "demographics")
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
    # Fewer users new at the split's cut-off than this: users with history are held out as new
    # users up to it (``userrep.split.hold_out_new_users``); 0: only the split's own new users.
    new_users: int = NEW_USERS
    test_share: float = 0.2
    valid_share: float = 0.2  # of the head-training users: validation for baseline choices
    # Off by default: nine more autoencoder fits, ~5 min on 20k users; the comparison is the protocol.
    ablations: bool = False
    convergence_days: tuple[int, ...] = (0, 1, 3, 7, 30)
    convergence_users: int = 1000
    # Freshness (global time splits): days after the cut-off, the label window after each, users
    freshness_days: tuple[int, ...] = (0, 3, 7, 14)
    freshness_window: int = 7
    freshness_users: int = 1000
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
    artist_vectors: np.ndarray  # (K, d) the primary (collaborative) encoder's artist vectors
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
    collab_models: dict = field(
        default_factory=dict
    )  # the +history heads' collaborative inputs (``history.collaborative``)
    blends: dict = field(default_factory=dict)  # method -> the weights chosen for its +history head
    # the directly scored baselines (``rows -> (rows, K)`` scores, each chosen on validation users),
    # the ALS user factors (a similar-users baseline) and the onboarding-mean representation (a
    # cold-start baseline): set once the baselines are tuned
    direct: dict = field(default_factory=dict)
    space: FeatureSpace | None = None  # the split's feature space (its artists, genres)
    als_factors: np.ndarray | None = None
    onboarding_mean: np.ndarray | None = None
    held_out_new: np.ndarray = field(default_factory=lambda: np.array([], np.int64))  # cold rows with hidden history
    hidden_events: pa.Table | None = None  # their history events, hidden from the training side
    # k -> those users with their first k history events back (``future_listening.HANDOVER_EVENTS``):
    # each representation ("reps"), the +history heads' side features ("side"), decayed plays ("recent")
    handover: dict = field(default_factory=dict)
    half_life_days: float | None = None  # the recency decay of ``recent``, chosen on validation users
    # the gur+history head as a team deploys it: (head, (history weight, {collaborative input: weight}))
    deployed: tuple | None = None

    # Which tasks can run on this split, and why not: the tasks read these, never recount.
    @property
    def heads_trainable(self) -> bool:
        return len(self.fit_rows) >= MIN_TRAIN

    @property
    def warm(self) -> bool:
        return self.heads_trainable and len(self.test_rows) >= MIN_TEST

    @property
    def cold_scorable(self) -> bool:
        return self.heads_trainable and len(self.cold_rows) >= MIN_COLD

    @property
    def validated(self) -> bool:
        """Enough validation users to early-stop heads and make choices on them."""
        return len(self.valid_rows) >= MIN_TEST

    @property
    def why_no_heads(self) -> str:
        return f"too few warm users to train heads ({len(self.train_rows)})"

    @property
    def why_not_warm(self) -> str:
        return f"too few warm users with both history and labels ({len(self.train_rows) + len(self.test_rows)})"

    @property
    def why_not_cold(self) -> str:
        if len(self.cold_rows) < MIN_COLD:
            return f"only {len(self.cold_rows)} users without history but with onboarding/attributes and labels"
        return self.why_no_heads

    def history_inputs(self, events: pa.Table, users: np.ndarray, at: pd.Timestamp) -> tuple[np.ndarray, np.ndarray]:
        """(side features, decayed plays) (users, K) of ``users`` from ``events`` as of ``at``, with
        the recency decay chosen on validation users: what a +history head takes for a user whose
        state holds those events (the hand-over, the freshness curve)."""
        assert self.space is not None  # set with the tuned baselines, before either runs
        plays = user_artist_matrix(events, self.space, users)[:, self.top_cols].toarray()
        decayed = decayed_matrix(events, self.space, users, at, self.half_life_days)
        recent = decayed[:, self.top_cols].toarray().astype(np.float32)
        return history.side_features(plays, recent), recent

    def valid_score(self, scores: np.ndarray) -> float:
        """``future_listening.validation_score`` of ``scores`` (validation users x K), ranked as the
        test users are (unseen-only or not): every choice made on validation users uses this one
        number."""
        valid = self.valid_rows
        return future_listening.validation_score(scores, self.labels[valid], self.history[valid], self.unseen_only)

    def ranking_validation(self, x: np.ndarray):
        """Early-stopping score of an embedding-only future-listening head on the validation users
        (``valid_score``; None: too few validation users)."""
        if not self.validated:
            return None
        return lambda head: self.valid_score(future_listening.scores(head, x[self.valid_rows]))


def run_tasks(ctx: Context, reps: dict, cold_reps: dict, board: Board, config: EvalConfig) -> dict:
    """Every registered task (``userrep.tasks.registry``) on its own users, for each head
    representation (``HEAD_METHODS``; with ``cold_reps``: also its ``+history`` rows): a task that
    cannot run is skipped with its reason, alone."""
    heads = {m: reps[m] for m in HEAD_METHODS}
    skipped: dict[str, str] = {}
    for task in tasks().values():
        skipped.update(task.evaluate(ctx, board, heads, {m: cold_reps[m] for m in HEAD_METHODS}, config))
    return skipped


def run_ablations(ctx: Context, features: UserFeatures, ae: AEConfig, config: EvalConfig, windows) -> dict:
    """The autoencoder retrained without each group (by kind, then by window); same heads, users
    and bootstrap resamples, so each value has its interval (each task's representation rows
    only: no baselines, no +history heads)."""
    present = {name for name, _ in features.schema.groups}
    kinds = [ABLATION_GROUPS[0], *(e.name for e in ctx.space.encoders), *ABLATION_GROUPS[1:]] if ctx.space else []
    tokens = [g for g in kinds if any(n == g or n.startswith(f"{g}_") for n in present)]
    tokens += [window_name(w) for w in windows]
    populations = {
        "test": len(ctx.test_rows),
        "cold": len(ctx.cold_rows),
        "queries": min(config.similar_queries, len(ctx.test_rows)),
    }
    board = Board(populations, config.seed, config.bootstrap)
    for token in tokens:
        reduced = features.without([token])
        x = embed(fit_autoencoder(reduced, ae).model, reduced.matrix)
        for task in tasks().values():
            task.evaluate(ctx, board, {token: x}, None, config)
    out: dict[str, dict] = {token: {} for token in tokens}
    for task, methods in board.tasks().items():
        for token, values in methods.items():
            out[token][task] = values
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


def run_freshness(ctx: Context, space, model, frozen_x: np.ndarray, config: EvalConfig) -> dict:
    """Frozen against near-real-time, on a global time split: the deployed ``gur+history`` head
    scores a sample of test users on each day d after the cut-off, against their plays in
    [cutoff + d, cutoff + d + window), with the user state as of the cut-off (``frozen``: what
    serving holds without events) and as of cutoff + d (``nrt``: the events of [cutoff, cutoff + d)
    added, the features and history the online path computes from them). Per day: both means on
    the same users and nrt - frozen with its paired 95% interval. A retrained arm needs a batch
    per day: ``bench/freshness.py``."""
    split = ctx.split
    if split.cutoff is None or ctx.deployed is None or ctx.side is None or ctx.recent is None or not len(ctx.test_rows):
        return {}
    head, weights = ctx.deployed
    rows = np.sort(
        np.random.default_rng(config.seed).choice(
            ctx.test_rows, size=min(config.freshness_users, len(ctx.test_rows)), replace=False
        )
    )
    users = ctx.features.user_ids[rows]
    mine = pa.array(users.tolist(), split.train.events.schema.field("user_id").type)
    past = split.train.events.filter(pc.is_in(split.train.events.column("user_id"), mine))
    later = split.future.filter(pc.is_in(split.future.column("user_id"), mine))
    ts = later.column("ts").cast(pa.int64()).to_numpy()
    cutoff_us = split.cutoff.value // 1000
    frozen = future_listening.scores(head, frozen_x[rows], ctx.side[rows]) + future_listening.history_terms(
        ctx, ctx.side[rows], ctx.recent[rows], weights
    )
    out: dict[str, list] = {"day": [], "users": [], "frozen": [], "nrt": [], "gain_ci": []}
    for day in config.freshness_days:
        start = cutoff_us + day * 86_400_000_000
        if len(ts) == 0 or ts.max() < start + config.freshness_window * 86_400_000_000:
            break  # the data ends before this day's label window does
        at = split.cutoff + pd.Timedelta(days=day)
        in_window = (ts >= start) & (ts < start + config.freshness_window * 86_400_000_000)
        labels = (user_artist_matrix(later.filter(pa.array(in_window)), space, users)[:, ctx.top_cols] > 0).toarray()
        events = pa.concat_tables([past, later.filter(pa.array(ts < start))])
        state = Dataset(ctx.ds.path, events, ctx.ds.items, ctx.ds.users, ctx.ds.pairs)
        x = embed(model, build_user_features(state, at, space, user_ids=users).matrix)
        side, recent = ctx.history_inputs(events, users, at)
        nrt = future_listening.scores(head, x, side) + future_listening.history_terms(ctx, side, recent, weights)
        found = [
            future_listening.ranking_rows(f, labels, ctx.history[rows], ctx.unseen_only)["ndcg@10"]
            for f in (frozen, nrt)
        ]
        scored = labels.sum(axis=1) > 0
        gain = found[1][scored] - found[0][scored]
        samples = weighted_means(gain, resample_weights(len(gain), config.seed, config.bootstrap))
        out["day"].append(day)
        out["users"].append(int(scored.sum()))
        out["frozen"].append(float(found[0][scored].mean()))
        out["nrt"].append(float(found[1][scored].mean()))
        out["gain_ci"].append(interval(samples))
    return {"window_days": config.freshness_window, **out} if out["day"] else {}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
