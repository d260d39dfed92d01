"""A batch: one retrain's encoders, autoencoder, embeddings and downstream models, switched together.

spec        BatchSpec, the one settings object of a retrain (CLI, pipeline steps, Ray job, manifest)
layout      every file name of a batch directory (BatchDir) and the serving pointer's
build       a batch in stages: fit, backfill, downstream (what the pipeline steps call)
jobs        where the fit runs: in-process, a RayCluster's Job Submission API, or a RayJob
downstream  the task models of a batch (their code: ``userrep.tasks``), heads (their files),
            predict (a batch's heads as one predictor)
gate        measure a candidate against the serving batch and decide: policy (the limits and the
            pure decision), drift (feature and embedding drift, stability; Evidently), quality
            (both batches' heads on the same users and labels), rollout (the report a reviewer reads),
            calibration (the gate's scores on a clean retrain and on planted shifts)
registry    the batches under a root: state, promote, roll back, task records
refresh     the serving batch's encoders applied to newer features (no retrain)
"""
