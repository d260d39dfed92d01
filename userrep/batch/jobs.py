"""Where the autoencoder fit runs: here (local Ray), on a RayCluster, or as a KubeRay RayJob.

The fit is the same function everywhere (`userrep.batch.build.fit_stage`); a cluster runs it as

    python -m userrep.batch.jobs fit --spec '{"data": ..., "batch_root": ..., ...}'

with the data and batch root on shared storage (the PVC the pipeline mounts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from userrep.batch.layout import BatchDir
from userrep.batch.spec import BatchSpec

log = logging.getLogger(__name__)

RAYJOB_API = ("ray.io", "v1", "rayjobs")


def fit_here(spec: BatchSpec) -> dict:
    from userrep.batch.build import fit_stage

    out, batch_id, as_of = spec.batch_dir_and_id()
    return fit_stage(
        spec.data,
        out,
        as_of,
        spec.build_config(),
        batch_id,
        spec.snapshot_id or None,
        spec=spec.to_dict(),
        anchor=spec.anchor_dir(),
    )


def entrypoint(spec: BatchSpec, python: str = "python") -> str:
    return f"{python} -m userrep.batch.jobs fit --spec '{json.dumps(spec.to_dict())}'"


def run_fit(
    spec: BatchSpec, ray_address: str = "", rayjob_namespace: str = "", image: str = "", poll_s: float = 5.0
) -> dict:
    """Fit locally, or submit to Ray on Kubernetes and wait; returns the batch's build record.
    ``image``: the RayJob's pods' (the pipeline step's own, so the fit runs the code the step does)."""
    out, _, _ = spec.batch_dir_and_id()
    if ray_address:
        submit_to_cluster(ray_address, spec, poll_s=poll_s)
    elif rayjob_namespace:
        if not image:
            raise ValueError("image: a RayJob needs the image its pods run (the pipeline's --image)")
        submit_rayjob(rayjob_namespace, spec, image, poll_s=poll_s)
    else:
        return fit_here(spec)
    return json.loads(BatchDir(out).build_record.read_text())  # written by the job on the shared volume


def submit_to_cluster(address: str, spec: BatchSpec, poll_s: float = 5.0, timeout_s: float = 3600) -> str:
    """Ray Job Submission API (KubeRay's recommended path); streams status until the job ends."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint(spec), runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    log.info(f"submitted {job_id} to {address}")
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status != last:
            log.info(f"ray job {job_id}: {status}")
            last = status
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(poll_s)
    if last != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job_id)[-2000:]
        raise RuntimeError(f"ray job {job_id} ended {last}:\n{logs}")
    return job_id


# The fit's pods: the chart's NetworkPolicies admit traffic between pods of one component
# (k8s/helm/userrep/templates/networkpolicy.yaml).
PART_OF = {"app.kubernetes.io/part-of": "userrep"}  # every object this project creates on a cluster


def pod_labels(component: str) -> dict[str, str]:
    """The labels of a pod of one component (``fit``, ``pipeline-step``): what the chart's
    NetworkPolicies select on. The one place they are spelled in Python."""
    return {**PART_OF, "app.kubernetes.io/component": component}


FIT_POD_LABELS = pod_labels("fit")


def rayjob_manifest(
    name: str,
    namespace: str,
    spec: BatchSpec,
    image: str,
    pvc: str = "userrep-work",
    mount: str = "/work",
    worker_replicas: int = 2,
    cpu: str = "2",
    memory: str = "4Gi",
) -> dict:
    """A ray.io/v1 RayJob that runs the fit on a fresh RayCluster and tears it down after. The
    operator submits the job to the head over HTTP (no submitter pod to admit)."""
    volume = [{"name": "work", "persistentVolumeClaim": {"claimName": pvc}}, {"name": "tmp", "emptyDir": {}}]
    mounts = [{"name": "work", "mountPath": mount}, {"name": "tmp", "mountPath": "/tmp"}]  # Ray's session dir
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    security = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}

    def pod(container_name: str) -> dict:
        return {
            "metadata": {"labels": dict(FIT_POD_LABELS)},
            "spec": {
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 10001,
                    "fsGroup": 10001,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumes": volume,
                "containers": [
                    {
                        "name": container_name,
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "resources": resources,
                        "volumeMounts": mounts,
                        "securityContext": security,
                        "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}],
                    }
                ],
            },
        }

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(PART_OF)},
        "spec": {
            "entrypoint": entrypoint(spec),
            "submissionMode": "HTTPMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": pod("ray-head")},
                "workerGroupSpecs": [
                    {
                        "groupName": "train",
                        "replicas": worker_replicas,
                        "minReplicas": worker_replicas,
                        "maxReplicas": worker_replicas,
                        "rayStartParams": {},
                        "template": pod("ray-worker"),
                    }
                ],
            },
        },
    }


def submit_rayjob(
    namespace: str, spec: BatchSpec, image: str, poll_s: float = 5.0, timeout_s: float = 3600, api=None
) -> dict:
    """Create the RayJob (its pods running ``image``) with the kubernetes client and wait for
    `jobStatus` to end."""
    from kubernetes import client, config

    if api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    _, batch_id, _ = spec.batch_dir_and_id()
    name = f"userrep-fit-{batch_id.lower().replace('_', '-')}"[:63]
    group, version, plural = RAYJOB_API
    api.create_namespaced_custom_object(
        group, version, namespace, plural, rayjob_manifest(name, namespace, spec, image)
    )
    log.info(f"created RayJob {namespace}/{name}")
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        status = api.get_namespaced_custom_object(group, version, namespace, plural, name).get("status", {})
        state = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if state != last:
            log.info(f"RayJob {name}: deployment {state[0]}, job {state[1]}")
            last = state
        if state[1] in ("SUCCEEDED", "FAILED", "STOPPED") or state[0] == "Failed":
            break
        time.sleep(poll_s)
    if last is None or last[1] != "SUCCEEDED":
        raise RuntimeError(f"RayJob {namespace}/{name} ended with {last}")
    return status


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m userrep.batch.jobs")
    parser.add_argument("job", choices=["fit"])
    parser.add_argument("--spec", required=True, help="BatchSpec as JSON (userrep.batch.spec)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from userrep.logs import configure

    configure()
    record = fit_here(BatchSpec.from_dict(json.loads(args.spec)))
    print(json.dumps({"batch_id": record["batch_id"], "timings_s": record["timings_s"]}))


if __name__ == "__main__":
    main()
