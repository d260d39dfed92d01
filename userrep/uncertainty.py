"""Bootstrap confidence intervals over users, paired across methods.

One set of resampling weights per user population (test users, cold users, similar-user
queries): every method is scored under the *same* resamples, so the difference between two
methods has its own interval (a paired bootstrap) and "A beats B" can be told from noise even
when the two intervals overlap. Resampling users, not pairs or items, because users are the unit
that varies between deployments; a user's pairs (artist preference) move together.

Weights are multinomial counts (a resample of n users drawn with replacement is a count per
user), so a resample's mean is a weighted mean and nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUNDS = 1000
LEVEL = 0.95
LEVELS = 1024  # score levels of the AUC bootstrap (see weighted_aucs)


def resample_weights(n: int, seed: int, rounds: int = ROUNDS) -> np.ndarray:
    """(rounds, n) counts: how often each of n users is drawn in each bootstrap resample."""
    if n == 0:
        return np.zeros((rounds, 0), np.float32)
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(np.float32)


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-resample mean of per-user ``values`` (NaN = user not scored, left out)."""
    valid = ~np.isnan(values)
    w = weights[:, valid]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ values[valid].astype(np.float64)) / w.sum(axis=1)


def weighted_aucs(
    labels: np.ndarray, scores: np.ndarray, pair_users: np.ndarray, user_weights: np.ndarray, levels: int = LEVELS
) -> np.ndarray:
    """Per-resample ROC AUC where each pair counts with its user's weight (ties count half).

    ``user_weights`` (rounds, users); ``pair_users`` the user of each pair. Pairs are grouped by
    score level and user, so all resamples are two matrix products over (levels x users) instead of
    a pass over every pair per resample (300k pairs of 4,000 users x 1000 resamples: 7 s -> 0.25 s). Exact
    when the scores take at most ``levels`` distinct values; else scores are binned at their
    quantiles and a positive and a negative in the same bin count half (the point estimate
    elsewhere is always exact; this only shapes the interval).
    """
    labels = np.asarray(labels).astype(bool)
    distinct, level = np.unique(scores, return_inverse=True)  # ties share a level
    if len(distinct) > levels:
        level = np.minimum((np.argsort(np.argsort(scores, kind="stable")) * levels) // len(scores), levels - 1)
    m, n = int(level.max()) + 1 if len(level) else 0, user_weights.shape[1]
    cell = level.astype(np.int64) * n + pair_users
    pos = np.bincount(cell[labels], minlength=m * n).reshape(m, n).astype(np.float32) @ user_weights.T
    neg = np.bincount(cell[~labels], minlength=m * n).reshape(m, n).astype(np.float32) @ user_weights.T
    below = np.cumsum(neg, axis=0) - neg
    denominator = pos.sum(axis=0) * neg.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (pos * (below + 0.5 * neg)).sum(axis=0) / denominator, np.nan)


def interval(samples: np.ndarray) -> list[float]:
    """The central ``LEVEL`` percentile interval of bootstrap samples."""
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    tail = (1 - LEVEL) / 2 * 100
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


@dataclass(frozen=True)
class Comparison:
    ours: str
    baseline: str
    diff: float  # ours - baseline, point estimate
    diff_ci: list[float]
    significant: bool  # the interval of the difference excludes 0

    def to_dict(self) -> dict:
        return {
            "ours": self.ours,
            "baseline": self.baseline,
            "diff": self.diff,
            "diff_ci": self.diff_ci,
            "significant": self.significant,
        }


def compare(values: dict[str, float], samples: dict[str, np.ndarray], is_ours) -> Comparison | None:
    """Our best row against the best baseline row, with the paired interval of the difference."""
    ours = [m for m in values if is_ours(m) and np.isfinite(values[m])]
    theirs = [m for m in values if not is_ours(m) and np.isfinite(values[m])]
    if not ours or not theirs:
        return None
    best_ours = max(ours, key=lambda m: values[m])
    best_theirs = max(theirs, key=lambda m: values[m])
    lo, hi = interval(samples[best_ours] - samples[best_theirs])
    return Comparison(best_ours, best_theirs, values[best_ours] - values[best_theirs], [lo, hi], bool(lo > 0 or hi < 0))


class Board:
    """Every (task, method, metric): the value, its bootstrap interval and the bootstrap samples.

    ``populations`` names the user rows a task is scored on (``test``, ``cold``, ``queries``);
    each gets one set of resampling weights that every method shares.
    """

    def __init__(self, populations: dict[str, int], seed: int, rounds: int = ROUNDS):
        self.weights = {name: resample_weights(n, seed + i, rounds) for i, (name, n) in enumerate(populations.items())}
        self.values: dict[str, dict[str, dict]] = {}
        self.samples: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def _put(self, task: str, method: str, metric: str, value: float, samples: np.ndarray) -> None:
        self.values.setdefault(task, {}).setdefault(method, {})[metric] = value
        self.values[task][method][f"{metric}_ci"] = interval(samples)
        self.samples.setdefault((task, metric), {})[method] = samples

    def add_rows(self, task: str, method: str, population: str, per_user: dict[str, np.ndarray]) -> None:
        """Metrics given per user of ``population`` (NaN: user not scored)."""
        for metric, values in per_user.items():
            value = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            self._put(task, method, metric, value, weighted_means(values, self.weights[population]))

    def add_auc(
        self, task: str, method: str, population: str, pair_users: np.ndarray, labels: np.ndarray, scores: np.ndarray
    ) -> None:
        """AUC over (user, artist) pairs; ``pair_users`` index the users of ``population``."""
        from userrep.metrics import auc

        samples = weighted_aucs(labels, scores, pair_users, self.weights[population])
        self._put(task, method, "auc", auc(labels, scores), samples)

    def tasks(self) -> dict:
        return self.values

    def comparisons(self, is_ours) -> dict:
        """Per task and metric: our best row against the best baseline (paired difference)."""
        out: dict[str, dict] = {}
        for (task, metric), samples in self.samples.items():
            values = {m: v[metric] for m, v in self.values[task].items() if metric in v}
            found = compare(values, samples, is_ours)
            if found:
                out.setdefault(task, {})[metric] = found.to_dict()
        return out
