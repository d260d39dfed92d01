"""The gate's decision: every threshold (``GatePolicy``), the numbers it decides on (``GateInputs``,
measured by ``userrep.batch.gate.measure``) and ``decide``, a pure function of the two (one test
per branch). Calibration: bench/gate_calibration.py (docs/batches.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GatePolicy:
    """Every threshold of the gate. Calibration: bench/gate_calibration.py (docs/batches.md)."""

    max_drift_share: float = 0.3  # share of comparable feature columns Evidently flags as drifted
    max_column_drift: float = 1.0  # any one column: Wasserstein distance in reference std units
    max_embedding_drift: float = 0.59  # domain-classifier ROC AUC, standardized aligned candidate vs serving embeddings
    min_knn_overlap: float = 0.3  # kNN@10 overlap of the same users in the serving index
    # the serving batch's heads on the candidate's embeddings / on their own, like for like (worst
    # task): as served when the candidate continues the serving space, after alignment otherwise
    min_heads_kept: float = 0.9
    max_quality_drop: float = 0.05  # candidate head metric may be at most this much (relative) worse...
    quality_z: float = 2.0  # ...or within z standard errors (metrics in [0, 1]: SE <= 0.5 / sqrt(n) per side)
    # The same quality check against the best of the last ``memory`` batches promoted before the
    # serving one (on the candidate's users and labels): losses that each pass against the batch
    # before cannot chain (0: the serving batch only).
    memory: int = 3
    sample: int = 2000  # rows per side for drift checks, queries for kNN overlap
    seed: int = 0


# Each check on one number: the GatePolicy field holding its limit, and "max" (an upper limit) or
# "min" (a floor). ``decide`` and the calibration (``userrep.batch.calibration``) read it here.
LIMITS = {
    "feature_drift": ("max_drift_share", "max"),
    "feature_column_drift": ("max_column_drift", "max"),
    "embedding_drift": ("max_embedding_drift", "max"),
    "stability_knn": ("min_knn_overlap", "min"),
    "stability_heads": ("min_heads_kept", "min"),
}


def limit_of(check: str, policy: GatePolicy) -> float:
    return getattr(policy, LIMITS[check][0])


def within(check: str, value: float, policy: GatePolicy) -> bool:
    """Whether ``value`` passes ``check``'s limit."""
    return value <= limit_of(check, policy) if LIMITS[check][1] == "max" else value >= limit_of(check, policy)


@dataclass(frozen=True)
class GateInputs:
    """The numbers ``decide`` needs (None: not measurable, e.g. no serving batch yet)."""

    candidate: str
    serving: str | None
    missing_tasks: tuple[str, ...] = ()
    integrity: tuple[str, ...] = ()  # files whose hash no longer matches the manifest
    drift_share: float | None = None
    column_drift: dict[str, float] = field(default_factory=dict)  # columns above the per-column limit
    embedding_drift: float | None = None
    knn_overlap: float | None = None
    heads_kept: float | None = None  # the worst task's share (``heads_kept_by_task``)
    heads_kept_by_task: dict[str, float] = field(default_factory=dict)
    # the candidate continues the serving batch's space (``userrep.continuity``): measured unaligned
    continues: bool = False
    space: dict[str, float] = field(default_factory=dict)  # ``userrep.batch.drift.space_stability``, shown
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {candidate, serving}
    # task -> {batch, candidate, serving (that batch's), se, n}: against the best recent batch
    memory: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    passed: bool
    reasons: tuple[str, ...]
    checks: dict


def decide(inputs: GateInputs, policy: GatePolicy = GatePolicy()) -> Decision:
    """Pure: promote only if every check that can be measured passes."""
    checks, reasons = {}, []

    def check(name: str, ok: bool, value, limit, why: str) -> None:
        checks[name] = {"passed": bool(ok), "value": value, "limit": limit}
        if not ok:
            reasons.append(f"{name}: {why}")

    check(
        "downstream_models",
        not inputs.missing_tasks,
        list(inputs.missing_tasks),
        [],
        f"missing or changed downstream model(s): {', '.join(inputs.missing_tasks)}",
    )
    check(
        "integrity",
        not inputs.integrity,
        list(inputs.integrity),
        [],
        f"files changed since the manifest: {', '.join(inputs.integrity)}",
    )
    if inputs.serving is None:
        return Decision(not reasons, tuple(reasons), checks)
    if inputs.drift_share is not None:
        check(
            "feature_drift",
            within("feature_drift", inputs.drift_share, policy),
            inputs.drift_share,
            policy.max_drift_share,
            f"{inputs.drift_share:.0%} of comparable feature columns drifted (limit {policy.max_drift_share:.0%})",
        )
        worst = sorted(inputs.column_drift.items(), key=lambda kv: -kv[1])
        check(
            "feature_column_drift",
            not worst,
            dict(worst[:10]),
            policy.max_column_drift,
            "column(s) shifted beyond the limit: " + ", ".join(f"{c} ({v:.2f})" for c, v in worst[:5]),
        )
    for name, value, why in (
        (
            "embedding_drift",
            inputs.embedding_drift,
            "domain classifier separates aligned candidate from serving embeddings (ROC AUC {:.3f})",
        ),
        ("stability_knn", inputs.knn_overlap, "kNN@10 overlap after alignment {:.3f} is below the floor"),
        (
            "stability_heads",
            inputs.heads_kept,
            "the serving batch's heads keep only {:.0%} of their quality on the candidate's embeddings"
            + (" as served" if inputs.continues else " (aligned: the candidate starts a new space)"),
        ),
    ):
        if value is not None:
            check(name, within(name, value, policy), value, limit_of(name, policy), why.format(value))
    for name, against, compared in (
        ("quality", lambda pair: "serving", inputs.quality),
        ("memory", lambda pair: f"{pair['batch']}, the best of the last {policy.memory} promoted,", inputs.memory),
    ):
        for task, pair in compared.items():
            ok, allowed = _kept_quality(pair, policy)
            same = f" on the same {pair['n']} users and labels" if "se" in pair else ""
            check(
                f"{name}_{task}",
                ok,
                pair,
                round(allowed, 4),
                f"{pair.get('metric', 'quality')} {pair['candidate']:.4f} vs {against(pair)} {pair['serving']:.4f}"
                f"{same} (allowed drop {allowed:.4f}: {policy.max_quality_drop:.0%} or {policy.quality_z:g} "
                "standard errors)",
            )
    return Decision(not reasons, tuple(reasons), checks)


def _kept_quality(pair: dict, policy: GatePolicy) -> tuple[bool, float]:
    """Whether the candidate's quality is within the tolerance of the other batch's, and the drop allowed."""
    cand, serv = pair["candidate"], pair["serving"]
    # Noise: the paired difference's standard error on the same users (``userrep.batch.quality``);
    # for a comparison of two records, each on its own users, the bound 0.5 / sqrt(n) per side.
    if math.isfinite(pair.get("se", math.nan)):
        noise = policy.quality_z * pair["se"]
    elif pair.get("n_candidate") and pair.get("n_serving"):
        noise = policy.quality_z * 0.5 * math.sqrt(1 / pair["n_candidate"] + 1 / pair["n_serving"])
    else:
        noise = 0.0
    allowed = max(policy.max_quality_drop * serv, noise)
    return math.isfinite(cand) and cand >= serv - allowed, allowed
