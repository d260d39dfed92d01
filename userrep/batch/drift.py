"""The gate's measurements of drift and stability between a candidate batch and the serving one.

Two batches' embeddings live in unrelated bases (each autoencoder fit is its own space), so the
embedding checks first align the candidate onto the serving space with orthogonal Procrustes,
fitted on the same users at the same time embedded by both batches (``aligned_pair``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from userrep.backfill import load_encoder, read_embeddings
from userrep.batch.build import load_features
from userrep.batch.layout import BatchDir, read_manifest
from userrep.batch.policy import GatePolicy
from userrep.features import FeatureSpace, to_utc
from userrep.featurize import build_user_features
from userrep.model import embed
from userrep.source import EventSource

NEIGHBOUR_POOL = 20_000  # users the space's within-batch neighbours are searched among
# Feature columns the HTML drift report draws, most drifted first; every column is measured and in
# gate.json. Each drawn column costs ~0.13 s of plotly: 30 took 4.5 s of a gate, 12 take 1.5 s.
REPORT_COLUMNS = 12


def comparable_frame(batch_dir: Path, rows: np.ndarray | None = None) -> pd.DataFrame:
    """The training snapshot's named (basis-independent) columns as a DataFrame."""
    space = FeatureSpace.load(BatchDir(batch_dir).encoders)
    matrix = load_features(batch_dir, rows).matrix
    names = space.column_names()
    keep = [i for i, (_, _, comparable) in enumerate(names) if comparable]
    return pd.DataFrame(matrix[:, keep], columns=[names[i][1] for i in keep])


def feature_drift(candidate: Path, serving: Path, policy: GatePolicy):
    """(drifted share, {column: score over the limit}, what the reports draw) on the named columns
    both snapshots share, ``policy.sample`` rows of each."""
    rng = np.random.default_rng(policy.seed)
    frames = []
    for path in (candidate, serving):
        n = pq.read_metadata(BatchDir(path).features).num_rows
        frames.append(comparable_frame(path, np.sort(rng.choice(n, size=min(n, policy.sample), replace=False))))
    common = [c for c in frames[0].columns if c in set(frames[1].columns)]
    # Columns zero in both snapshots carry no signal and only slow Evidently down.
    common = [c for c in common if frames[0][c].any() or frames[1][c].any()]
    return frame_drift(frames[0][common], frames[1][common], policy)


def frame_drift(cur: pd.DataFrame, ref: pd.DataFrame, policy: GatePolicy):
    """``feature_drift`` of two frames with the same columns.

    Evidently's drift calculation (what its ``DriftedColumnsCount`` and ``ValueDrift`` metrics
    compute) on every column, without building their widgets: rendering took ~0.25 s a column,
    70 s of a gate on 330 columns. ``write_report`` renders the most drifted ones."""
    from evidently.legacy.calculations.data_drift import get_drift_for_columns
    from evidently.legacy.metric_results import DatasetColumns, DatasetUtilityColumns
    from evidently.legacy.options.data_drift import DataDriftOptions

    common = list(cur.columns)
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


@dataclass(frozen=True)
class AlignedPair:
    """Both batches' embeddings, and the candidate's map onto the serving space: fitted on
    ``fit_rows`` of the candidate's users, embedded by both batches at the same time (the
    candidate's as_of), so a user's two vectors differ by the model only, not by their history."""

    candidate: np.ndarray  # every user, the candidate's embeddings (embeddings.parquet order)
    serving: np.ndarray  # every user, the serving batch's
    fit_rows: np.ndarray  # rows of ``candidate`` (users both batches know)
    same_time: np.ndarray  # the serving model's embeddings of those users as of the candidate's as_of
    align: Callable[[np.ndarray], np.ndarray]  # x -> x on the serving space (``procrustes``)

    @property
    def fitted(self) -> np.ndarray:
        return self.candidate[self.fit_rows]


def aligned_pair(candidate: Path, serving: Path, source: EventSource, policy: GatePolicy) -> AlignedPair:
    rng = np.random.default_rng(policy.seed)
    ids, cand, _ = read_embeddings(BatchDir(candidate).embeddings)
    serving_ids, serving_emb, _ = read_embeddings(BatchDir(serving).embeddings)
    common = np.flatnonzero(pd.Index(serving_ids).get_indexer(pd.Index(ids)) >= 0)
    fit_rows = np.sort(rng.choice(common, size=min(len(common), 4 * policy.sample), replace=False))
    serving_space, serving_model = load_encoder(serving)
    as_of = to_utc(read_manifest(candidate)["as_of"])
    users = ids[fit_rows]
    same_time = embed(
        serving_model, build_user_features(source.of_users(users), as_of, serving_space, user_ids=users).matrix
    )
    return AlignedPair(cand, serving_emb, fit_rows, same_time, procrustes(cand[fit_rows], same_time))


def embedding_drift(aligned: np.ndarray, serving: np.ndarray, policy: GatePolicy) -> float:
    """Evidently's domain-classifier ROC AUC, ``policy.sample`` aligned candidate rows vs serving rows.

    Both are standardized by the serving batch's mean and deviation first: Evidently fits a plain
    ``SGDClassifier``, which on raw embeddings stops short of converging, and the score of one
    planted shift then ranged 0.58-0.71 over sampling seeds (0.66-0.73 standardized) while clean
    retrains stayed at 0.49-0.53 either way (bench/gate_calibration.py)."""
    from evidently.metrics.embeddings import ModelDriftMethod

    mean, std = serving.mean(axis=0), np.maximum(serving.std(axis=0), 1e-12)
    aligned, serving = (aligned - mean) / std, (serving - mean) / std
    rng = np.random.default_rng(policy.seed + 1)
    pick = lambda x: pd.DataFrame(x[np.sort(rng.choice(len(x), size=min(len(x), policy.sample), replace=False))])  # noqa: E731
    return round(float(ModelDriftMethod(threshold=policy.max_embedding_drift)(pick(aligned), pick(serving))[0]), 4)


def space_stability(candidate: Path, serving: Path, policy: GatePolicy) -> dict:
    """How far the space moved between two batches as a consumer sees it, with no alignment:
    each user's two stored embeddings (the same-user cosine), and the kNN@10 overlap of each query
    user's neighbours searched in each batch's own embeddings, next to the same overlap of the
    batches' own feature vectors (standardized by each batch's model): what the users' data
    itself kept. Neighbours are searched by cosine among a seeded sample of at most
    ``NEIGHBOUR_POOL`` users both batches know; ``policy.sample // 2`` of them query."""
    rng = np.random.default_rng(policy.seed)
    ids, ours, _ = read_embeddings(BatchDir(candidate).embeddings)
    their_ids, theirs, _ = read_embeddings(BatchDir(serving).embeddings)
    where = pd.Index(their_ids).get_indexer(pd.Index(ids))
    common = np.flatnonzero(where >= 0)
    a, b = ours[common], theirs[where[common]]
    cosine = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    sample = np.sort(rng.choice(len(common), size=min(len(common), NEIGHBOUR_POOL), replace=False))
    queries = np.sort(rng.choice(len(sample), size=min(len(sample), policy.sample // 2), replace=False))

    def standardized(batch_dir: Path, rows: np.ndarray) -> np.ndarray:
        _, model = load_encoder(batch_dir)
        order = np.argsort(rows)  # load_features reads sorted rows
        matrix = np.empty((len(rows), model.mean.shape[0]), np.float32)
        matrix[order] = load_features(batch_dir, rows[order]).matrix
        return (matrix - model.mean.numpy()) / model.std.numpy()

    feature_rows = (common[sample], where[common[sample]])
    overlaps = {
        "embeddings": cosine_knn_overlaps(a[sample], b[sample], queries),
        "features": cosine_knn_overlaps(
            standardized(candidate, feature_rows[0]), standardized(serving, feature_rows[1]), queries
        ),
    }
    return {
        "users": int(len(common)),
        "cosine_median": round(float(np.median(cosine)), 4),
        "cosine_p10": round(float(np.percentile(cosine, 10)), 4),
        "knn_embeddings": round(float(overlaps["embeddings"].mean()), 4),
        "knn_features": round(float(overlaps["features"].mean()), 4),
        "queries": int(len(queries)),
        "per_user": {"cosine": cosine, **{f"knn_{k}": v for k, v in overlaps.items()}},
    }


def cosine_knn_overlaps(a: np.ndarray, b: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query row, |kNN_a & kNN_b| / k: its neighbours by cosine among the rows of ``a``, and
    among the same rows of ``b`` (each searched in its own space, self excluded)."""
    import faiss

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), np.float32)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return index.search(x[queries], k + 1)[1]

    found_a, found_b = neighbours(a), neighbours(b)
    top = lambda found, q: set([i for i in found if i != q][:k])  # noqa: E731
    return np.array([len(top(x, q) & top(y, q)) / k for q, x, y in zip(queries, found_a, found_b)])
