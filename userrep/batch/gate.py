"""The promotion gate: measure a candidate batch against the serving one, then decide.

``measure`` computes every number (slow: features, Evidently, FAISS); ``decide`` is a pure
function of those numbers and a ``GatePolicy`` (one test per branch). ``run_gate`` writes
``gate.json`` first and the Evidently HTML report after it, so the decision never waits on plots.

Two batches' embeddings live in unrelated bases (each autoencoder fit is its own space), so the
embedding checks first align the candidate onto the serving space with orthogonal Procrustes,
fitted on the same users at the same time embedded by both batches.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from userrep.backfill import load_encoder, read_embeddings
from userrep.batch import rollout
from userrep.batch.build import config_from_dict, load_features
from userrep.batch.downstream import DownstreamConfig
from userrep.batch.layout import BatchDir, read_manifest
from userrep.batch.quality import METRICS as QUALITY_METRICS
from userrep.batch.quality import on_candidate_window, recorded_quality
from userrep.batch.registry import batch_dir, missing_tasks, serving_batch
from userrep.data import Dataset
from userrep.features import FeatureSpace, to_utc
from userrep.featurize import build_user_features
from userrep.fsio import integrity_problems, write_json_atomic
from userrep.model import embed
from userrep.source import EventSource

log = logging.getLogger(__name__)

REPORT_COLUMNS = 30  # feature columns the HTML drift report shows, most drifted first (every column is measured)


@dataclass(frozen=True)
class GatePolicy:
    """Every threshold of the gate. Calibration: bench/gate_calibration.py (docs/batches.md)."""

    max_drift_share: float = 0.3  # share of comparable feature columns Evidently flags as drifted
    max_column_drift: float = 1.0  # any one column: Wasserstein distance in reference std units
    max_embedding_drift: float = 0.62  # domain-classifier ROC AUC, aligned candidate vs serving embeddings
    min_knn_overlap: float = 0.3  # kNN@10 overlap of the same users in the serving index
    min_head_auc_kept: float = 0.85  # serving AP head on aligned candidate embeddings / on its own
    max_quality_drop: float = 0.05  # candidate head metric may be at most this much (relative) worse...
    quality_z: float = 2.0  # ...or within z standard errors (metrics in [0, 1]: SE <= 0.5 / sqrt(n) per side)
    sample: int = 2000  # rows per side for drift checks, queries for kNN overlap
    seed: int = 0


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
    head_auc_kept: float | None = None
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {candidate, serving}


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
            inputs.drift_share <= policy.max_drift_share,
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
    if inputs.embedding_drift is not None:
        check(
            "embedding_drift",
            inputs.embedding_drift <= policy.max_embedding_drift,
            inputs.embedding_drift,
            policy.max_embedding_drift,
            f"domain classifier separates aligned candidate from serving embeddings "
            f"(ROC AUC {inputs.embedding_drift:.3f})",
        )
    if inputs.knn_overlap is not None:
        check(
            "stability_knn",
            inputs.knn_overlap >= policy.min_knn_overlap,
            inputs.knn_overlap,
            policy.min_knn_overlap,
            f"kNN@10 overlap after alignment {inputs.knn_overlap:.3f} is below the floor",
        )
    if inputs.head_auc_kept is not None:
        check(
            "stability_heads",
            inputs.head_auc_kept >= policy.min_head_auc_kept,
            inputs.head_auc_kept,
            policy.min_head_auc_kept,
            f"serving heads keep only {inputs.head_auc_kept:.0%} of their AUC on the aligned candidate space",
        )
    for task, pair in inputs.quality.items():
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
        ok = math.isfinite(cand) and cand >= serv - allowed
        same = f" on the same {pair['n']} users and labels" if "se" in pair else ""
        check(
            f"quality_{task}",
            ok,
            pair,
            round(allowed, 4),
            f"{QUALITY_METRICS[task]} {cand:.4f} vs serving {serv:.4f}{same} (allowed drop {allowed:.4f}: "
            f"{policy.max_quality_drop:.0%} or {policy.quality_z:g} standard errors)",
        )
    return Decision(not reasons, tuple(reasons), checks)


# ---------------------------------------------------------------------------------------------
# measuring


def comparable_frame(batch_dir: Path, rows: np.ndarray | None = None) -> pd.DataFrame:
    """The training snapshot's named (basis-independent) columns as a DataFrame."""
    space = FeatureSpace.load(BatchDir(batch_dir).encoders)
    matrix = load_features(batch_dir, rows).matrix
    names = space.column_names()
    keep = [i for i, (_, _, comparable) in enumerate(names) if comparable]
    return pd.DataFrame(matrix[:, keep], columns=[names[i][1] for i in keep])


def feature_drift(candidate: Path, serving: Path, policy: GatePolicy):
    """(drifted share, {column: score over the limit}, the two frames) on the common named columns.

    Evidently's drift calculation (what its ``DriftedColumnsCount`` and ``ValueDrift`` metrics
    compute) on every column, without building their widgets: rendering took ~0.25 s a column,
    70 s of a gate on 330 columns. ``write_report`` renders the most drifted ones."""
    from evidently.legacy.calculations.data_drift import get_drift_for_columns
    from evidently.legacy.metric_results import DatasetColumns, DatasetUtilityColumns
    from evidently.legacy.options.data_drift import DataDriftOptions

    rng = np.random.default_rng(policy.seed)
    frames = []
    for path in (candidate, serving):
        n = pq.read_metadata(BatchDir(path).features).num_rows
        frames.append(comparable_frame(path, np.sort(rng.choice(n, size=min(n, policy.sample), replace=False))))
    common = [c for c in frames[0].columns if c in set(frames[1].columns)]
    # Columns zero in both snapshots carry no signal and only slow Evidently down.
    common = [c for c in common if frames[0][c].any() or frames[1][c].any()]
    cur, ref = frames[0][common], frames[1][common]
    columns = DatasetColumns(
        utility_columns=DatasetUtilityColumns(date=None, id=None, target=None, prediction=None),
        target_type=None,
        task=None,
        num_feature_names=common,
        cat_feature_names=[],
        text_feature_names=[],
        datetime_feature_names=[],
        target_names=None,
    )
    drift = get_drift_for_columns(
        current_data=cur,
        reference_data=ref,
        dataset_columns=columns,
        data_drift_options=DataDriftOptions(),
        columns=common,
        agg_data=True,
    )
    scores = {c: float(d.drift_score) for c, d in drift.drift_by_columns.items()}
    over = {c: round(v, 4) for c, v in scores.items() if v > policy.max_column_drift}
    drifted = {c: bool(d.drift_detected) for c, d in drift.drift_by_columns.items()}
    shown = {"current": cur, "reference": ref, "column_scores": scores, "column_drifted": drifted}
    return float(drift.share_of_drifted_columns), over, shown


def write_report(frames: dict, path: Path, columns: int = REPORT_COLUMNS) -> None:
    """Evidently's data-drift report (HTML) of the ``columns`` most drifted feature columns."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cur, ref, scores = frames["current"], frames["reference"], frames["column_scores"]
    shown = sorted(scores, key=scores.get, reverse=True)[:columns]
    definition = DataDefinition(numerical_columns=shown)
    snapshot = Report([DataDriftPreset(columns=shown)]).run(
        Dataset.from_pandas(cur[shown], data_definition=definition),
        Dataset.from_pandas(ref[shown], data_definition=definition),
    )
    snapshot.save_html(str(path))


def procrustes(source: np.ndarray, target: np.ndarray):
    """A map x -> aligned x (orthogonal rotation + scale + shift) taking ``source`` rows onto ``target``."""
    from scipy.linalg import orthogonal_procrustes

    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    a, b = source - mu_s, target - mu_t
    scale_a, scale_b = np.linalg.norm(a), np.linalg.norm(b)
    rotation, _ = orthogonal_procrustes(a / max(scale_a, 1e-12), b / max(scale_b, 1e-12))
    return lambda x: ((x - mu_s) / max(scale_a, 1e-12)) @ rotation * scale_b + mu_t


def knn_overlaps(aligned: np.ndarray, reference: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query, |kNN(aligned[q]) & kNN(reference[q])| / k, both searched among ``reference`` (self excluded)."""
    import faiss

    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(np.ascontiguousarray(reference, np.float32))
    _, ours = index.search(np.ascontiguousarray(aligned[queries], np.float32), k + 1)
    _, theirs = index.search(np.ascontiguousarray(reference[queries], np.float32), k + 1)
    top = lambda found, q: set([i for i in found if i != q][:k])  # noqa: E731
    return np.array([len(top(a, q) & top(b, q)) / k for q, a, b in zip(queries, ours, theirs)])


def knn_overlap(aligned: np.ndarray, reference: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """The mean of ``knn_overlaps``: the stability check's value."""
    return float(np.mean(knn_overlaps(aligned, reference, queries, k)))


def measure(
    candidate: Path,
    serving: Path | None,
    ds: Dataset | EventSource,
    policy: GatePolicy = GatePolicy(),
    downstream: DownstreamConfig = DownstreamConfig(),
):
    """Every number of the gate; returns (GateInputs, what the reports draw or None: the drift
    frames, both batches' embeddings of the same users, each query user's kNN overlap)."""
    candidate = Path(candidate)
    manifest = read_manifest(candidate)
    base = dict(
        candidate=manifest["batch_id"],
        missing_tasks=tuple(missing_tasks(candidate)),
        integrity=tuple(integrity_problems(candidate)),
    )
    if serving is None:
        return GateInputs(serving=None, **base), None
    serving = Path(serving)
    serving_manifest = read_manifest(serving)
    share, over, frames = feature_drift(candidate, serving, policy)
    log.info(f"feature drift: {share:.1%} of columns drifted, {len(over)} beyond the per-column limit")

    # Same users, same time (the candidate's as_of), embedded by both batches -> alignment.
    rng = np.random.default_rng(policy.seed)
    ids, cand, _ = read_embeddings(BatchDir(candidate).embeddings)
    serving_ids, serving_emb, _ = read_embeddings(BatchDir(serving).embeddings)
    common = np.flatnonzero(pd.Index(serving_ids).get_indexer(pd.Index(ids)) >= 0)
    fit_rows = np.sort(rng.choice(common, size=min(len(common), 4 * policy.sample), replace=False))
    serving_space, serving_model = load_encoder(serving)
    as_of = to_utc(manifest["as_of"])
    source = ds if isinstance(ds, EventSource) else EventSource(ds)
    same_time = embed(
        serving_model,
        build_user_features(source.of_users(ids[fit_rows]), as_of, serving_space, user_ids=ids[fit_rows]).matrix,
    )
    align = procrustes(cand[fit_rows], same_time)
    queries = np.arange(min(len(fit_rows), policy.sample))
    overlaps = knn_overlaps(align(cand[fit_rows]), same_time, queries)
    overlap = float(np.mean(overlaps))
    log.info(f"stability: kNN@10 overlap after Procrustes {overlap:.3f} on {len(queries)} users")

    from evidently.metrics.embeddings import ModelDriftMethod

    pick = lambda n: np.sort(rng.choice(n, size=min(n, policy.sample), replace=False))  # noqa: E731
    cur = pd.DataFrame(align(cand[pick(len(cand))]))
    ref = pd.DataFrame(serving_emb[pick(len(serving_emb))])
    emb_drift, _, _ = ModelDriftMethod(threshold=policy.max_embedding_drift)(cur, ref)
    log.info(f"embedding drift: domain-classifier ROC AUC {emb_drift:.3f}")

    if missing_tasks(serving):  # nothing to score on the candidate's window
        kept, quality = None, recorded_quality(candidate, serving)
    else:
        kept, quality = on_candidate_window(candidate, serving, source, downstream, align)
    inputs = GateInputs(
        serving=serving_manifest["batch_id"],
        drift_share=share,
        column_drift=over,
        embedding_drift=round(float(emb_drift), 4),
        knn_overlap=round(overlap, 4),
        head_auc_kept=None if kept is None else round(float(kept), 4),
        quality=quality,
        **base,
    )
    shown = queries[: rollout.POINTS]
    return inputs, {
        **frames,
        "aligned": align(cand[fit_rows][shown]),
        "same_time": same_time[shown],
        "knn_overlaps": overlaps,
    }


def run_gate(
    candidate: Path,
    serving: Path | None,
    ds: Dataset | EventSource,
    policy: GatePolicy = GatePolicy(),
    downstream: DownstreamConfig = DownstreamConfig(),
    report: bool = True,
) -> dict:
    """Measure, decide, write ``gate.json``, then the rollout report and Evidently's drift report
    (``report``); returns the gate record."""
    candidate = Path(candidate)
    inputs, evidence = measure(candidate, serving, ds, policy, downstream)
    decision = decide(inputs, policy)
    record = {
        "candidate": inputs.candidate,
        "serving": inputs.serving,
        "passed": decision.passed,
        "reasons": list(decision.reasons),
        "checks": decision.checks,
        "inputs": asdict(inputs),
        "policy": asdict(policy),
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(BatchDir(candidate).gate, record)
    if report:
        rollout.write_rollout(BatchDir(candidate).rollout_report, record, evidence, rollout.calibration())
        if evidence is not None:
            write_report(evidence, BatchDir(candidate).drift_report)
    return record


def gate_batch(root: str | Path, batch_id: str, data: str | Path | None = None) -> dict:
    """The gate step, as `userrep batch gate` and the pipeline's drift_gate run it: the candidate
    ``batch_id`` against the batch serving under ``root`` (none: the first batch), on the data the
    candidate was built on unless ``data`` (streamed); writes gate.json and the drift report. The
    head-stability check reads the candidate's task data with the candidate's own downstream
    settings (its label window), as its task models were trained."""
    candidate = batch_dir(root, batch_id)
    serving = serving_batch(root)
    serving_dir = batch_dir(root, serving) if serving and serving != batch_id else None
    events = EventSource(data or read_manifest(candidate)["data"]["path"])
    built = config_from_dict(json.loads(BatchDir(candidate).build_record.read_text())["config"])
    return run_gate(candidate, serving_dir, events, downstream=built.downstream or DownstreamConfig())
