"""KFP components of a batch: thin shells over the core (`userrep.*`), one per pipeline step.

Every body imports what it needs (KFP ships only the function's source to the step), starts
with `for_step(spec)` (logging configured, the one `BatchSpec` read), reads and writes the batch
directory on shared storage (a PVC on a cluster, a local folder here), and returns small outputs
(ids, metrics) plus artifacts for the KFP UI. `install_kfp_package=False`:
the image (Dockerfile) has kfp installed already, and locally it saves ~0.6 s per step.

Their logic is unit-testable without a pipeline: `materialize_features.python_func(...)`.
"""

# (no `from __future__ import annotations`: KFP reads the type annotations at decoration time)

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = "userrep:0.1.0"  # the one placeholder: `userrep pipeline compile --image/--values` replaces it


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_batch(spec: dict) -> NamedTuple("Plan", [("batch_id", str), ("as_of", str), ("anchor", str)]):
    """The batch id (deterministic: data fingerprint, as_of, settings, the tune step's choice)
    before the batch is built, so the exit handler knows which batch to mark failed; and the batch
    whose space it continues (`spec.align_to` resolved once, for every later step), or "none"."""
    from collections import namedtuple

    from userrep.batch.registry import serving_batch
    from userrep.batch.spec import for_step

    settings = for_step(spec)
    out, batch_id, as_of_iso = settings.batch_dir_and_id()
    if serving_batch(out.parent) == batch_id:  # the run would rewrite the files being served
        raise ValueError(
            f"batch_id: {batch_id} is the serving batch (same data, cut-off and settings); nothing to retrain"
        )
    anchor = settings.anchor()
    print(f"batch {batch_id} as of {as_of_iso}, continuing the space of: {anchor}")
    return namedtuple("Plan", ["batch_id", "as_of", "anchor"])(batch_id, as_of_iso, anchor)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compact_events(spec: dict, events_log: str) -> int:
    """Append the online events logged since the last compaction to the dataset (its
    events.online/ parts), so this batch trains on every acknowledged event before its as_of.
    `events_log`: a SQLite file or redis://HOST:PORT/STREAM; "" or a missing file: nothing to do.
    The compacted events are then trimmed from the log where no consumer group still needs them.
    Returns the number of events appended."""
    from pathlib import Path

    from userrep.batch.spec import for_step
    from userrep.eventlog import compact

    data = for_step(spec).data
    if not events_log or not (events_log.startswith("redis://") or Path(events_log).exists()):
        return 0
    done = compact(events_log, data)
    print(f"compacted {done['events']} events into {done['parts']}; log trimmed through {done['trimmed_through']}")
    return done["events"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune_settings(spec: dict, budget_s: float, choice: Output[Metrics]) -> str:
    """Ray Tune (ASHA) on a validation split of the events before `as_of`: the batch's autoencoder
    and head settings (`userrep.tune`). Off (`tune=False`) it returns at once and the batch uses
    the spec's dim/epochs. Returns where the choice was written."""
    from userrep.batch.spec import for_step
    from userrep.tune import TuneConfig, tune_dataset

    settings = for_step(spec)
    if not settings.tune:
        return ""
    path = settings.tuned_path()
    record = tune_dataset(
        settings.data, path.parent, TuneConfig(budget_s=budget_s, seed=settings.seed), as_of=settings.resolved_as_of()
    )
    for name, value in record["best"].items():
        choice.log_metric(name, float(value))
    return str(path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def materialize_features(spec: dict, as_of: str, anchor: str, snapshot: Output[Artifact]) -> str:
    """Fit encoders as of `as_of` (the plan's), aligned onto the `anchor` batch's (the plan's), write
    Feast offline rows, apply, materialize online; returns the snapshot id."""
    import json
    from pathlib import Path

    from userrep.batch.spec import for_step
    from userrep.store import materialize

    settings = for_step(spec).replace(align_to=anchor)
    config = settings.build_config()
    snap = materialize(settings.data, as_of, config.feast, config.features, anchor=settings.anchor_dir())
    snapshot.metadata.update({"space_id": snap.space_id, "as_of": snap.as_of.isoformat(), "users": len(snap.user_ids)})
    Path(snapshot.path).write_text(json.dumps(snapshot.metadata))
    return snap.space_id


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fit_encoder(
    spec: dict,
    as_of: str,
    snapshot_id: str,
    batch_id: str,
    anchor: str,
    ray_address: str,
    rayjob_namespace: str,
    image: str,
    model: Output[Model],
) -> str:
    """Training set from the Feast snapshot -> autoencoder (Ray Train); returns the batch id.

    `anchor`: the batch whose space it continues (the plan's). `ray_address` (a RayCluster's Job
    Submission API) or `rayjob_namespace` (create a RayJob with the kubernetes client) run the fit
    on Kubernetes and wait; otherwise in this step. `image`: the RayJob's pods' (the pipeline's
    parameter, which `userrep pipeline compile --image` sets to every step's image).
    """
    import json
    import shutil
    from pathlib import Path

    from userrep.batch.jobs import run_fit
    from userrep.batch.layout import BatchDir
    from userrep.batch.spec import for_step

    settings = for_step(spec).replace(as_of=as_of, snapshot_id=snapshot_id, batch_id=batch_id, align_to=anchor)
    record = run_fit(settings, ray_address=ray_address, rayjob_namespace=rayjob_namespace, image=image)
    out = Path(settings.batch_root) / record["batch_id"]
    shutil.copyfile(BatchDir(out).model, model.path)
    model.metadata.update({"batch_id": record["batch_id"], "final_loss": record["training"]["losses"][-1]})
    print(json.dumps(record["timings_s"]))
    return record["batch_id"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def backfill_embeddings(spec: dict, batch_id: str, model: Input[Model], embeddings: Output[Dataset]) -> str:
    """Embed every user (Ray Data), publish online under the batch id, write the manifest."""
    import shutil
    from pathlib import Path

    from userrep.batch.build import backfill_stage
    from userrep.batch.layout import BatchDir
    from userrep.batch.spec import for_step

    out = Path(for_step(spec).batch_root) / batch_id
    manifest = backfill_stage(out)
    shutil.copyfile(BatchDir(out).embeddings, embeddings.path)
    embeddings.metadata.update({"batch_id": batch_id, "users": manifest["users"]})
    return batch_id


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_downstream(
    spec: dict, task: str, tasks: list, cpus: int, embeddings: Input[Dataset], metrics: Output[Metrics]
) -> str:
    """One downstream model, trained on the embeddings' own batch (the id travels with the artifact).
    ``tasks``: every task of the run (the first one's step also publishes the batch's online
    history, so a run of a subset publishes it too); ``cpus``: the CPUs the step was given, the
    threads it uses (the steps run side by side)."""
    from pathlib import Path

    from userrep.batch.build import downstream_stage
    from userrep.batch.spec import for_step
    from userrep.threads import limited_threads

    batch_id = embeddings.metadata["batch_id"]
    with limited_threads(cpus):
        out = Path(for_step(spec).batch_root) / batch_id
        record = downstream_stage(out, tasks=[task], publish_history=task == tasks[0])[task]
    if record["batch_id"] != batch_id:
        raise ValueError(f"batch_id: {task} trained on {record['batch_id']}, embeddings are of {batch_id}")
    for name, value in record["metrics"].items():
        metrics.log_metric(f"{task}/{name}", value)
    return task


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_batch(spec: dict, batch_id: str, trained: list[str], metrics: Output[Metrics], summary: Output[Markdown]):
    """Check every downstream model of the batch is there; report their validation metrics."""
    from pathlib import Path

    from userrep.batch.registry import show
    from userrep.batch.spec import for_step

    info = show(for_step(spec).batch_root, batch_id)
    if info["missing_tasks"]:
        raise ValueError(f"batch {batch_id}: missing downstream model(s) {info['missing_tasks']} (trained: {trained})")
    lines = [f"# batch {batch_id}", "", "| task | metric | value |", "|---|---|---|"]
    for task, values in info["downstream"].items():
        for name, value in values.items():
            metrics.log_metric(f"{task}/{name}", value)
            lines.append(f"| {task} | {name} | {value:.4f} |")
    Path(summary.path).write_text("\n".join(lines) + "\n")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def drift_gate(spec: dict, batch_id: str, after: str, decision: Output[Metrics], report: Output[HTML]) -> bool:
    """Gate the candidate against the serving batch; writes gate.json; returns whether it passed."""
    import shutil
    from pathlib import Path

    from userrep.batch.gate import gate_batch
    from userrep.batch.layout import BatchDir
    from userrep.batch.spec import for_step

    batch_root = for_step(spec).batch_root
    record = gate_batch(batch_root, batch_id)  # on the data the candidate was built on, streamed
    candidate = Path(batch_root) / batch_id
    for name, check in record["checks"].items():
        decision.log_metric(f"{name}/passed", float(check["passed"]))
        if isinstance(check["value"], (int, float)):
            decision.log_metric(name, float(check["value"]))
    shutil.copyfile(BatchDir(candidate).rollout_report, report.path)  # the decision and every number behind it
    print("gate:", "PASS" if record["passed"] else "BLOCK", record["reasons"])
    return bool(record["passed"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_batch(spec: dict, batch_id: str) -> str:
    """Switch serving to the batch (atomic pointer rename); returns the new serving id."""
    from userrep.batch.registry import promote
    from userrep.batch.spec import for_step
    from userrep.store import store_config

    settings = for_step(spec)
    # on a cluster (Redis online store) the pointer lock is a Redis lock: pods share the volume, not flock
    store = store_config(settings.feast_home, settings.online, settings.redis)
    return promote(settings.batch_root, batch_id, redis=store.redis if store.online == "redis" else None)["serving"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finalize_batch(spec: dict, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: a run that did not succeed marks its batch failed, so it can never be promoted.

    An exit task may not consume other tasks' outputs, so it derives the (deterministic) batch id
    from the same spec the plan step used.
    """
    from userrep.batch.registry import mark_failed, serving_batch
    from userrep.batch.spec import for_step

    if status.state == "SUCCEEDED":
        return status.state
    try:
        out, batch_id, _ = for_step(spec).batch_dir_and_id()
    except Exception as exc:  # the data itself was unreadable: no batch was started
        print(f"no batch to mark: {exc}")
        return status.state
    if out.exists() and serving_batch(out.parent) != batch_id:
        mark_failed(out.parent, batch_id, f"pipeline {status.pipeline_job_resource_name}: {status.error_message}")
        print(f"marked {batch_id} failed")
    return status.state


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def refresh_embeddings(spec: dict, embeddings: Output[Dataset]) -> str:
    """Between retrains: the serving batch's encoders and model embed the features as of the
    spec's as_of (no retrain)."""
    import shutil

    from userrep.batch.refresh import refresh
    from userrep.batch.spec import for_step
    from userrep.store import store_config

    settings = for_step(spec)
    store = store_config(settings.feast_home, settings.online, settings.redis)
    result = refresh(settings.data, settings.as_of, settings.batch_root, store)
    shutil.copyfile(result["path"], embeddings.path)
    embeddings.metadata.update({k: v for k, v in result.items() if k != "path"})
    return result["batch_id"]
