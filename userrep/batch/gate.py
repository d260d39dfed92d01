"""The promotion gate: measure a candidate batch against the serving one, then decide.

``measure`` computes every number (slow: features, Evidently, FAISS; ``userrep.batch.drift``,
``userrep.batch.quality``); ``decide`` (``userrep.batch.policy``) is a pure function of those
numbers and a ``GatePolicy``. ``run_gate`` writes ``gate.json`` first, then the rollout report and
Evidently's drift report, so the decision never waits on plots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from userrep.batch import rollout
from userrep.batch.build import config_from_dict
from userrep.batch.downstream import DownstreamConfig
from userrep.batch.drift import (
    aligned_pair,
    embedding_drift,
    feature_drift,
    knn_overlaps,
    space_stability,
    write_report,
)
from userrep.batch.layout import BatchDir, manifest_path, read_manifest
from userrep.batch.policy import GateInputs, GatePolicy, decide
from userrep.batch.quality import on_candidate_window, recorded_quality
from userrep.batch.registry import (
    batch_dir,
    batch_tasks,
    missing_tasks,
    read_pointer,
    served_tasks,
    serving_batch,
)
from userrep.data import Dataset
from userrep.fsio import integrity_problems, write_json_atomic
from userrep.source import EventSource

log = logging.getLogger(__name__)

__all__ = ["GateInputs", "GatePolicy", "decide", "gate_batch", "measure", "run_gate"]


def measure(
    candidate: Path,
    serving: Path | None,
    ds: Dataset | EventSource,
    policy: GatePolicy = GatePolicy(),
    downstream: DownstreamConfig = DownstreamConfig(),
    recent: Sequence[Path] = (),
):
    """Every number of the gate; returns (GateInputs, what the reports draw or None: the drift
    frames, both batches' embeddings of the same users, each query user's kNN overlap).
    ``recent``: the batches promoted before the serving one that its memory compares with."""
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
    # a task the serving batch serves that the candidate is not built with: its consumers would lose it
    dropped = [t for t in served_tasks(serving) if t not in batch_tasks(candidate)]
    base["missing_tasks"] = base["missing_tasks"] + tuple(dropped)
    share, over, frames = feature_drift(candidate, serving, policy)
    log.info(f"feature drift: {share:.1%} of columns drifted, {len(over)} beyond the per-column limit")

    source = ds if isinstance(ds, EventSource) else EventSource(ds)
    pair = aligned_pair(candidate, serving, source, policy)
    queries = np.arange(min(len(pair.fit_rows), policy.sample))
    overlaps = knn_overlaps(pair.align(pair.fitted), pair.same_time, queries)
    overlap = float(np.mean(overlaps))
    log.info(f"stability: kNN@10 overlap after Procrustes {overlap:.3f} on {len(queries)} users")
    emb_drift = embedding_drift(pair.align(pair.candidate), pair.serving, policy)
    log.info(f"embedding drift: domain-classifier ROC AUC {emb_drift:.3f}")
    align = pair.align
    continues = (manifest.get("aligned_to") or {}).get("batch_id") == serving_manifest["batch_id"]
    space = space_stability(candidate, serving, policy)
    log.info(
        f"space: same-user cosine {space['cosine_median']:.3f} (median, unaligned), kNN@10 overlap "
        f"{space['knn_embeddings']:.3f} (embeddings) vs {space['knn_features']:.3f} (features)"
    )

    memory: dict[str, dict] = {}
    if missing_tasks(serving):  # nothing to score on the candidate's window
        kept, quality = None, recorded_quality(candidate, serving)
    else:
        kept, quality, memory = on_candidate_window(candidate, serving, source, downstream, align, continues, recent)
    inputs = GateInputs(
        serving=serving_manifest["batch_id"],
        drift_share=share,
        column_drift=over,
        embedding_drift=emb_drift,
        knn_overlap=round(overlap, 4),
        heads_kept=min(kept.values()) if kept else None,
        heads_kept_by_task=kept or {},
        continues=continues,
        space={k: v for k, v in space.items() if k != "per_user"},
        quality=quality,
        memory=memory,
        **base,
    )
    shown = queries[: rollout.POINTS]
    return inputs, {
        **frames,
        "aligned": align(pair.fitted[shown]),
        "same_time": pair.same_time[shown],
        "knn_overlaps": overlaps,
        "space": space["per_user"],
    }


def run_gate(
    candidate: Path,
    serving: Path | None,
    ds: Dataset | EventSource,
    policy: GatePolicy = GatePolicy(),
    downstream: DownstreamConfig = DownstreamConfig(),
    report: bool = True,
    recent: Sequence[Path] = (),
) -> dict:
    """Measure, decide, write ``gate.json``, then the rollout report and Evidently's drift report
    (``report``); returns the gate record. ``recent``: see ``measure``."""
    candidate = Path(candidate)
    inputs, evidence = measure(candidate, serving, ds, policy, downstream, recent)
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
    return run_gate(
        candidate,
        serving_dir,
        events,
        downstream=built.downstream or DownstreamConfig(),
        recent=recent_batches(root, GatePolicy().memory, skip=batch_id),
    )


def recent_batches(root: str | Path, memory: int, skip: str | None = None) -> list[Path]:
    """The last ``memory`` batches promoted before the serving one that are still on disk (a
    pruned batch is gone from the comparison), newest first."""
    found: list[Path] = []
    for batch_id in reversed(read_pointer(root)["history"]):
        if len(found) >= memory:
            break
        if batch_id != skip and manifest_path(Path(root) / batch_id).exists():
            found.append(batch_dir(root, batch_id))
    return found
