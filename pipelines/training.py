"""The training pipeline: one retrain = one batch, promoted only if every check passes.

0. compact the online event log into the dataset, so every acknowledged event reaches training
   (with `events_log`); tune the autoencoder and head settings on the history (Ray Tune + ASHA;
   with `tune`)
1. plan the batch id (deterministic, before the batch is built) and the batch whose space it
   continues (`spec.align_to`: the serving batch by default; userrep.continuity)
2. materialize features in Feast as of `as_of`, the encoders aligned onto that batch's
3. fit the autoencoder on Feast's point-in-time training set, continued from that batch's (Ray
   Train; local, RayCluster or RayJob)
4. backfill every user's embedding (Ray Data) and publish it online under the batch id
5. train every registered downstream task on that batch, in parallel (userrep.tasks.registry)
6. evaluate: all models present, their validation metrics
7. gate: feature/embedding drift, stability, quality vs the serving batch
8. promote if the gate passed (atomic pointer switch)
An exit handler marks the batch failed if any step fails, so it can never be promoted.
"""

from kfp import dsl

from components.batch import (
    IMAGE,
    backfill_embeddings,
    compact_events,
    drift_gate,
    evaluate_batch,
    finalize_batch,
    fit_encoder,
    materialize_features,
    plan_batch,
    promote_batch,
    train_downstream,
    tune_settings,
)
from pipelines.k8s import on_cluster
from userrep.batch.spec import BatchSpec
from userrep.tasks.registry import names

# The registered downstream tasks (userrep.tasks.registry) when the pipeline is defined: the
# parameter's default, so a compiled pipeline lists the tasks of the package it was compiled with.
# (A ParallelFor over the plan step's output would follow the registry at run time, but kfp.local
# cannot pass an upstream output into a loop: "Parent pipeline input argument ... not found".)
TASK_LIST = list(names())
# Each task model's step: the CPUs it requests and the threads it uses (userrep/threads.py: steps
# side by side with a thread per core each spun against each other, 4x slower here).
DOWNSTREAM_CPUS = 1
# The compiled default: the one set of defaults, on the cluster's volume (pipelines/k8s.py mounts it at /work).
# The one difference from BatchSpec's defaults: a cluster fits on Ray Train with 2 workers.
CLUSTER_SPEC = BatchSpec(data="/work/world", batch_root="/work/batches", feast_home="/work/feast", workers=2).to_dict()


@dsl.pipeline(name="userrep-training", description="Train, backfill, retrain downstream, gate and promote a batch.")
def training_pipeline(
    spec: dict = CLUSTER_SPEC,
    ray_address: str = "",
    rayjob_namespace: str = "",
    image: str = IMAGE,
    tasks: list = TASK_LIST,
    tune_budget_s: float = 180.0,
    events_log: str = "",
):
    """`spec`: a `userrep.batch.spec.BatchSpec` as a dict, read by every step; the rest say where the
    fit runs (and `image`, a RayJob's pods': compiled as every step's image), which downstream tasks to train (default: every registered one), the tune step's
    budget and the log to compact."""
    finalize = on_cluster(finalize_batch(spec=spec), display_name="mark the batch failed unless the run succeeded")
    with dsl.ExitHandler(finalize, name="batch"):
        compaction = on_cluster(
            compact_events(spec=spec, events_log=events_log),
            memory="4Gi",
            online_store=True,
            display_name="0. compact online events into the dataset",
        )  # (the stream's Redis)
        tuning = on_cluster(
            tune_settings(spec=spec, budget_s=tune_budget_s),
            cpu="2",
            memory="8Gi",
            display_name="0. tune settings (Ray Tune; off unless spec.tune)",
        ).after(compaction)
        plan = on_cluster(plan_batch(spec=spec), display_name="1. plan batch id").after(tuning)
        batch_id = plan.outputs["batch_id"]
        snapshot = on_cluster(
            materialize_features(spec=spec, as_of=plan.outputs["as_of"], anchor=plan.outputs["anchor"]),
            memory="4Gi",
            online_store=True,
            display_name="2. materialize features (Feast)",
        )
        fit = on_cluster(
            fit_encoder(
                spec=spec,
                as_of=plan.outputs["as_of"],
                snapshot_id=snapshot.outputs["Output"],
                batch_id=batch_id,
                anchor=plan.outputs["anchor"],
                ray_address=ray_address,
                rayjob_namespace=rayjob_namespace,
                image=image,
            ),
            cpu="2",
            memory="8Gi",
            online_store=True,
            display_name="3. fit autoencoder (Ray Train, or in-process)",
        )
        backfill = on_cluster(
            backfill_embeddings(spec=spec, batch_id=fit.outputs["Output"], model=fit.outputs["model"]),
            cpu="2",
            memory="8Gi",
            online_store=True,
            display_name="4. backfill embeddings (Ray Data, or in-process)",
        )
        with dsl.ParallelFor(tasks, name="downstream-tasks") as task:
            trained = on_cluster(
                train_downstream(
                    spec=spec, task=task, tasks=tasks, cpus=DOWNSTREAM_CPUS, embeddings=backfill.outputs["embeddings"]
                ),
                cpu=str(DOWNSTREAM_CPUS),
                memory="4Gi",
                display_name="5. train downstream model",
            )
        evaluation = on_cluster(
            evaluate_batch(
                spec=spec,
                batch_id=backfill.outputs["Output"],
                trained=dsl.Collected(trained.outputs["Output"]),
            ),
            display_name="6. evaluate batch",
        )
        gate = on_cluster(
            drift_gate(spec=spec, batch_id=backfill.outputs["Output"], after=batch_id),
            memory="4Gi",
            display_name="7. drift + stability gate (Evidently)",
        ).after(evaluation)
        with dsl.If(gate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
            on_cluster(
                promote_batch(spec=spec, batch_id=backfill.outputs["Output"]),
                display_name="8. promote batch",
            )
