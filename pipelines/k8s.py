"""Kubernetes settings of pipeline steps (kfp-kubernetes). Ignored by local runs, compiled for clusters."""

from __future__ import annotations

from kfp import kubernetes

from userrep.batch.jobs import pod_labels

PVC = "userrep-work"  # data, Feast home and batches (k8s/ creates it)
MOUNT = "/work"
REDIS_SECRET = "userrep-redis"  # key "password" -> REDIS_PASSWORD (the chart's redis.passwordSecret default)
# The chart's Redis (statefulset.yaml) and the event stream its RayService logs to (rayservice.yaml);
# a test renders the chart and checks both against these.
CHART_REDIS = "userrep-redis:6379"
CHART_EVENTS_LOG = f"redis://{CHART_REDIS}/userrep:events"
# Every step's pod: the chart's NetworkPolicies admit this component to Redis and to the training
# cluster's Job Submission API (k8s/helm/userrep/templates/networkpolicy.yaml).
POD_LABELS = pod_labels("pipeline-step")


def on_cluster(task, cpu: str = "1", memory: str = "2Gi", online_store: bool = False, display_name: str = ""):
    """Mount the shared volume, request resources, and (for online-store writers) the Redis password."""
    kubernetes.mount_pvc(task, pvc_name=PVC, mount_path=MOUNT)
    for key, value in POD_LABELS.items():
        kubernetes.add_pod_label(task, key, value)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    if online_store:
        kubernetes.use_secret_as_env(
            task, secret_name=REDIS_SECRET, secret_key_to_env={"password": "REDIS_PASSWORD"}, optional=True
        )
    if display_name:
        task.set_display_name(display_name)
    task.set_caching_options(False)  # every step reads/writes shared storage: never replay from cache
    return task
