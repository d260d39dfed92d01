"""KFP components of a batch: thin shells over the core (`userrep.*`), one per pipeline step.

Every body imports what it needs (KFP ships only the function's source to the step), reads
and writes the batch directory on shared storage (a PVC on a cluster, a local folder here), and
returns small outputs (ids, metrics) plus artifacts for the KFP UI. `install_kfp_package=False`:
the image (Dockerfile) has kfp installed already, and locally it saves ~0.6 s per step.

Their logic is unit-testable without a pipeline: `materialize_features.python_func(...)`.
"""

# (no `from __future__ import annotations`: KFP reads the type annotations at decoration time)

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = "userrep:0.1.0"  # replaced by `userrep pipeline compile --image`


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_batch(
    data: str,
    as_of: str,
    batch_root: str,
    feast_home: str,
    online: str,
    redis: str,
    dim: int,
    epochs: int,
    workers: int,
    label_days: int,
    tune: bool = False,
) -> NamedTuple("Plan", [("batch_id", str), ("as_of", str)]):
    """The batch id (deterministic: data fingerprint, as_of, settings, the tune step's choice)
    before the batch is built, so the exit handler knows which batch to mark failed."""
    from collections import namedtuple

    from userrep.jobs import FitSpec

    spec = FitSpec(
        data=data,
        as_of=as_of,
        batch_root=batch_root,
        feast_home=feast_home,
        online=online,
        redis=redis,
        dim=dim,
        epochs=epochs,
        workers=workers,
        label_days=label_days,
        tune=tune,
    )
    _, batch_id, as_of_iso = spec.batch_dir_and_id()
    return namedtuple("Plan", ["batch_id", "as_of"])(batch_id, as_of_iso)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compact_events(data: str, events_log: str) -> int:
    """Append the online events logged since the last compaction to the dataset (its
    events.online/ parts), so this batch trains on every acknowledged event before its as_of.
    `events_log`: a SQLite file or redis://HOST:PORT/STREAM; "" or a missing file: nothing to do.
    The compacted events are then trimmed from the log where no consumer group still needs them.
    Returns the number of events appended."""
    from pathlib import Path

    from userrep.eventlog import compact

    if not events_log or not (events_log.startswith("redis://") or Path(events_log).exists()):
        return 0
    done = compact(events_log, data)
    print(f"compacted {done['events']} events into {done['parts']}; log trimmed through {done['trimmed_through']}")
    return done["events"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune_settings(data: str, as_of: str, batch_root: str, tune: bool, budget_s: float, choice: Output[Metrics]) -> str:
    """Ray Tune (ASHA) on a validation split of the events before `as_of`: the batch's autoencoder
    and head settings (`userrep.tune`). Off (`tune=False`) it returns at once and the batch uses
    the pipeline's dim/epochs. Returns where the choice was written."""
    from userrep.jobs import FitSpec
    from userrep.tune import TuneConfig, tune_dataset

    if not tune:
        return ""
    spec = FitSpec(data=data, as_of=as_of, batch_root=batch_root, tune=True)
    path = spec.tuned_path()
    record = tune_dataset(data, path.parent, TuneConfig(budget_s=budget_s), as_of=spec.resolved_as_of())
    for name, value in record["best"].items():
        choice.log_metric(name, float(value))
    return str(path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def materialize_features(
    data: str, as_of: str, feast_home: str, online: str, redis: str, snapshot: Output[Artifact]
) -> str:
    """Fit encoders as of `as_of`, write Feast offline rows, apply, materialize online; returns the snapshot id."""
    import json
    from pathlib import Path

    from userrep.store import materialize, store_config

    snap = materialize(data, as_of, store_config(feast_home, online, redis))
    snapshot.metadata.update({"space_id": snap.space_id, "as_of": snap.as_of.isoformat(), "users": len(snap.user_ids)})
    Path(snapshot.path).write_text(json.dumps(snapshot.metadata))
    return snap.space_id


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_encoder(
    data: str,
    as_of: str,
    snapshot_id: str,
    batch_root: str,
    batch_id: str,
    feast_home: str,
    online: str,
    redis: str,
    dim: int,
    epochs: int,
    workers: int,
    label_days: int,
    ray_address: str,
    rayjob_namespace: str,
    model: Output[Model],
    tune: bool = False,
) -> str:
    """Training set from the Feast snapshot -> autoencoder (Ray Train); returns the batch id.

    `ray_address` (a RayCluster's Job Submission API) or `rayjob_namespace` (create a RayJob with
    the kubernetes client) run the fit on Kubernetes and wait; otherwise a local Ray session.
    """
    import json
    import shutil
    from pathlib import Path

    from userrep.jobs import FitSpec, run_fit
    from userrep.layout import BatchDir

    spec = FitSpec(
        data=data,
        as_of=as_of,
        snapshot_id=snapshot_id,
        batch_root=batch_root,
        batch_id=batch_id,
        feast_home=feast_home,
        online=online,
        redis=redis,
        dim=dim,
        epochs=epochs,
        workers=workers,
        label_days=label_days,
        tune=tune,
    )
    record = run_fit(spec, ray_address=ray_address, rayjob_namespace=rayjob_namespace)
    out = Path(batch_root) / record["batch_id"]
    shutil.copyfile(BatchDir(out).model, model.path)
    model.metadata.update({"batch_id": record["batch_id"], "final_loss": record["training"]["losses"][-1]})
    print(json.dumps(record["timings_s"]))
    return record["batch_id"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def backfill_embeddings(batch_root: str, batch_id: str, model: Input[Model], embeddings: Output[Dataset]) -> str:
    """Embed every user (Ray Data), publish online under the batch id, write the manifest."""
    import shutil
    from pathlib import Path

    from userrep.build import backfill_stage
    from userrep.layout import BatchDir

    manifest = backfill_stage(Path(batch_root) / batch_id)
    shutil.copyfile(BatchDir(Path(batch_root) / batch_id).embeddings, embeddings.path)
    embeddings.metadata.update({"batch_id": batch_id, "users": manifest["users"]})
    return batch_id


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_downstream(batch_root: str, task: str, embeddings: Input[Dataset], metrics: Output[Metrics]) -> str:
    """One downstream model, trained on the embeddings' own batch (the id travels with the artifact)."""
    from pathlib import Path

    from userrep.build import downstream_stage

    batch_id = embeddings.metadata["batch_id"]
    record = downstream_stage(Path(batch_root) / batch_id, tasks=[task])[task]
    if record["batch_id"] != batch_id:
        raise ValueError(f"batch_id: {task} trained on {record['batch_id']}, embeddings are of {batch_id}")
    for name, value in record["metrics"].items():
        metrics.log_metric(f"{task}/{name}", value)
    return task


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_batch(
    batch_root: str, batch_id: str, trained: list[str], metrics: Output[Metrics], summary: Output[Markdown]
):
    """Check every downstream model of the batch is there; report their validation metrics."""
    from pathlib import Path

    from userrep.batches import show

    info = show(batch_root, batch_id)
    if info["missing_tasks"]:
        raise ValueError(f"batch {batch_id}: missing downstream model(s) {info['missing_tasks']} (trained: {trained})")
    lines = [f"# batch {batch_id}", "", "| task | metric | value |", "|---|---|---|"]
    for task, values in info["downstream"].items():
        for name, value in values.items():
            metrics.log_metric(f"{task}/{name}", value)
            lines.append(f"| {task} | {name} | {value:.4f} |")
    Path(summary.path).write_text("\n".join(lines) + "\n")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def drift_gate(batch_root: str, batch_id: str, after: str, decision: Output[Metrics], report: Output[HTML]) -> bool:
    """Gate the candidate against the serving batch; writes gate.json; returns whether it passed."""
    import shutil
    from pathlib import Path

    from userrep.gate import gate_batch
    from userrep.layout import BatchDir

    record = gate_batch(batch_root, batch_id)  # on the data the candidate was built on, streamed
    candidate = Path(batch_root) / batch_id
    for name, check in record["checks"].items():
        decision.log_metric(f"{name}/passed", float(check["passed"]))
        if isinstance(check["value"], (int, float)):
            decision.log_metric(name, float(check["value"]))
    html = BatchDir(candidate).drift_report
    if html.exists():
        shutil.copyfile(html, report.path)
    else:
        Path(report.path).write_text(f"<p>first batch {batch_id}: nothing to compare against</p>")
    print("gate:", "PASS" if record["passed"] else "BLOCK", record["reasons"])
    return bool(record["passed"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_batch(batch_root: str, batch_id: str) -> str:
    """Switch serving to the batch (atomic pointer rename); returns the new serving id."""
    from userrep.batches import promote

    return promote(batch_root, batch_id)["serving"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finalize_batch(
    data: str,
    as_of: str,
    batch_root: str,
    feast_home: str,
    online: str,
    redis: str,
    dim: int,
    epochs: int,
    workers: int,
    label_days: int,
    status: dsl.PipelineTaskFinalStatus,
    tune: bool = False,
) -> str:
    """Exit handler: a run that did not succeed marks its batch failed, so it can never be promoted.

    An exit task may not consume other tasks' outputs, so it derives the (deterministic) batch id
    from the same parameters the plan step used.
    """
    from userrep.batches import mark_failed, serving_batch
    from userrep.jobs import FitSpec

    if status.state == "SUCCEEDED":
        return status.state
    spec = FitSpec(
        data=data,
        as_of=as_of,
        batch_root=batch_root,
        feast_home=feast_home,
        online=online,
        redis=redis,
        dim=dim,
        epochs=epochs,
        workers=workers,
        label_days=label_days,
        tune=tune,
    )
    try:
        out, batch_id, _ = spec.batch_dir_and_id()
    except Exception as exc:  # the data itself was unreadable: no batch was started
        print(f"no batch to mark: {exc}")
        return status.state
    if out.exists() and serving_batch(batch_root) != batch_id:
        mark_failed(batch_root, batch_id, f"pipeline {status.pipeline_job_resource_name}: {status.error_message}")
        print(f"marked {batch_id} failed")
    return status.state


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def refresh_embeddings(
    data: str, as_of: str, batch_root: str, feast_home: str, online: str, redis: str, embeddings: Output[Dataset]
) -> str:
    """Between retrains: the serving batch's encoders and model embed today's features (no retrain)."""
    import shutil

    from userrep.refresh import refresh
    from userrep.store import store_config

    result = refresh(data, as_of, batch_root, store_config(feast_home, online, redis))
    shutil.copyfile(result["path"], embeddings.path)
    embeddings.metadata.update({k: v for k, v in result.items() if k != "path"})
    return result["batch_id"]
