"""Kubernetes manifests, validated offline: kustomize renders, core objects pass
kubernetes-validate --strict, and our own policy (limits, non-root, probes) holds.

KubeRay objects are checked structurally only: the KubeRay CRD schemas are not vendored yet
(see k8s/README.md).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VALIDATE = REPO / ".tools" / "bin" / "kubernetes-validate"
OVERLAYS = ["kind", "minikube"]
WORKLOADS = ("Deployment", "StatefulSet")


def kustomize(directory: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl not found (it is on the machine image; `kubectl kustomize` renders offline)")
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def validate(objects: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    if not VALIDATE.exists():
        pytest.fail(f"{VALIDATE} missing: `make test` creates the .tools venv (tools-requirements.txt)")
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return subprocess.run([str(VALIDATE), "--strict", "--kubernetes-version", "1.32.0", str(path)],
                          capture_output=True, text=True, timeout=300)


def core(objects: list[dict]) -> list[dict]:
    return [o for o in objects if not o["apiVersion"].startswith("ray.io/")]


def containers(obj: dict) -> list[dict]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def policy_problems(objects: list[dict]) -> list[str]:
    """Our rules for every workload: limits on every container, non-root, no privilege
    escalation, dropped capabilities, probes on long-running servers."""
    problems = []
    for obj in objects:
        if obj["kind"] not in WORKLOADS:
            continue
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = obj["spec"]["template"]["spec"]
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{name}: pod securityContext.runAsNonRoot")
        for c in containers(obj):
            limits = c.get("resources", {}).get("limits", {})
            if not {"cpu", "memory"} <= set(limits):
                problems.append(f"{name}/{c['name']}: resources.limits cpu and memory")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}/{c['name']}: securityContext (no privilege escalation, drop ALL)")
            if "readinessProbe" not in c or "livenessProbe" not in c:
                problems.append(f"{name}/{c['name']}: readiness and liveness probes")
    return problems


def project_images(objects: list[dict]) -> set[str]:
    """Images of every workload and Ray pod, Redis (a third-party image) left out."""
    images = set()
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            images |= {c["image"] for c in containers(obj) if not c["image"].startswith("redis:")}
        if obj["apiVersion"].startswith("ray.io/"):
            cluster = obj["spec"].get("rayClusterConfig", obj["spec"])
            groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
            images |= {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    return images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_core_objects_pass_strict_validation(overlay, tmp_path):
    objects = kustomize(REPO / "k8s" / "overlays" / overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "PersistentVolumeClaim", "StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler",
            "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding", "Secret", "RayCluster", "RayService"} <= kinds
    assert all(o["metadata"].get("namespace", "userrep") == "userrep" for o in objects if o["kind"] != "Namespace")
    done = validate(core(objects), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert policy_problems(objects) == []


def test_the_validators_are_wired_a_broken_manifest_fails(tmp_path):
    objects = kustomize(REPO / "k8s" / "overlays" / "kind")
    broken = [dict(o) for o in core(objects)]
    deployment = next(o for o in broken if o["kind"] == "Deployment")
    deployment["spec"] = {**deployment["spec"], "replicas": "two"}  # wrong type
    done = validate(broken, tmp_path)
    assert done.returncode != 0 and "replicas" in done.stdout + done.stderr
    no_limits = yaml.safe_load(yaml.safe_dump(next(o for o in objects if o["kind"] == "Deployment")))
    del no_limits["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert any("resources.limits" in p for p in policy_problems([no_limits]))


def test_every_image_is_the_one_the_pipelines_compile_with(tmp_path):
    from pipelines.runner import IMAGE_PLACEHOLDER, compile_pipelines

    objects = kustomize(REPO / "k8s" / "overlays" / "kind")
    images = project_images(objects)
    assert images == {IMAGE_PLACEHOLDER}
    compiled = yaml.safe_load(compile_pipelines(tmp_path)[0].read_text().split("\n---\n")[0])
    assert {e["container"]["image"] for e in compiled["deploymentSpec"]["executors"].values()} == images


def test_ray_objects_have_the_fields_kuberay_requires():
    """Structural until the CRD schemas are vendored: apiVersion, head group, ray version = package."""
    import ray

    objects = kustomize(REPO / "k8s" / "overlays" / "kind")
    rays = [o for o in objects if o["apiVersion"].startswith("ray.io/")]
    assert {o["kind"] for o in rays} == {"RayCluster", "RayService"} and all(o["apiVersion"] == "ray.io/v1" for o in rays)
    for obj in rays:
        cluster = obj["spec"].get("rayClusterConfig", obj["spec"])
        assert cluster["rayVersion"] == ray.__version__
        assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    service = next(o for o in rays if o["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["applications"][0]["import_path"] == "serving.ray_app:application"
    # the replica override must name the deployment serving/ray_app.py defines, or Serve rejects it
    from serving.ray_app import EmbeddingService

    override = config["applications"][0]["deployments"][0]
    assert override["name"] == EmbeddingService.name and override["autoscaling_config"]["min_replicas"] >= 2
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


CHECKOV = REPO / ".tools" / "bin" / "checkov"


def checkov(*args: str) -> subprocess.CompletedProcess:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} missing: `make test` creates the .tools venv (tools-requirements.txt)")
    return subprocess.run([str(CHECKOV), *args, "--compact", "--quiet", "--skip-download"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_in_the_rendered_overlay(overlay):
    done = checkov("-d", f"k8s/overlays/{overlay}", "--framework", "kustomize")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Failed checks: 0" in done.stdout


def test_checkov_finds_nothing_in_the_dockerfile():
    done = checkov("-f", "Dockerfile", "--framework", "dockerfile")
    assert done.returncode == 0, done.stdout[-3000:]


def test_checkov_is_wired_a_deployment_without_limits_fails(tmp_path):
    objects = kustomize(REPO / "k8s" / "overlays" / "kind")
    deployment = yaml.safe_load(yaml.safe_dump(next(o for o in objects if o["kind"] == "Deployment")))
    del deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(deployment))
    done = checkov("-f", str(tmp_path / "broken.yaml"), "--framework", "kubernetes")
    assert done.returncode != 0 and "CKV_K8S_11" in done.stdout  # CPU limits


CHART = REPO / "k8s" / "helm" / "userrep"
CI_VALUES = CHART / "ci" / "ci-values.yaml"


def helm(values: dict | None, tmp_path: Path, base: Path | None = CI_VALUES) -> dict:
    """Lint, schema-check and render the chart with Helm's own library (from the .tools venv)."""
    import json

    merged = yaml.safe_load(base.read_text()) if base else {}
    for key, value in (values or {}).items():  # dotted keys: "tasks.autoscaling.enabled"
        node, *path, leaf = [merged] + key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(merged))
    python = REPO / ".tools" / "bin" / "python"
    done = subprocess.run([str(python), str(REPO / "tests" / "_helm.py"), str(CHART), str(path), "userrep"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    out["objects"] = [d for text in (out["rendered"] or {}).values() for d in yaml.safe_load_all(text) if d]
    return out


def test_chart_lints_and_ci_values_render_valid_objects(tmp_path):
    out = helm(None, tmp_path)
    assert "'errors': []" in out["lint"] and out["schema_error"] is None
    objects = out["objects"]
    assert {"PersistentVolumeClaim", "StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler",
            "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding", "RayCluster", "RayService"} <= {o["kind"] for o in objects}
    done = validate(core(objects), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert policy_problems(objects) == []
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    (rendered / "all.yaml").write_text(yaml.safe_dump_all(objects))
    scan = checkov("-d", str(rendered), "--framework", "kubernetes")
    assert scan.returncode == 0, scan.stdout[-3000:]


def test_chart_should_drop_the_hpa_when_autoscaling_is_disabled(tmp_path):
    kinds = {o["kind"] for o in helm({"tasks.autoscaling.enabled": False}, tmp_path)["objects"]}
    assert "HorizontalPodAutoscaler" not in kinds and "Deployment" in kinds


def test_chart_should_use_the_image_tag_everywhere_when_it_is_set(tmp_path):
    objects = helm({"image.tag": "0.2.0-rc1"}, tmp_path)["objects"]
    images = project_images(objects)
    assert images == {"userrep:0.2.0-rc1"}


def test_chart_should_omit_ray_objects_when_disabled_and_set_the_storage_class(tmp_path):
    objects = helm({"training.enabled": False, "embeddings.enabled": False, "storage.storageClassName": "fast"},
                   tmp_path)["objects"]
    assert not [o for o in objects if o["apiVersion"].startswith("ray.io/")]
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast"


@pytest.mark.parametrize("values, field", [({"tasks.replicas": "two"}, "replicas"),
                                           ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
                                           ({"surprise": 1}, "surprise")])
def test_chart_values_schema_rejects_bad_values(values, field, tmp_path):
    out = helm(values, tmp_path)
    assert out["schema_error"] and field in out["schema_error"]


def test_the_redis_holding_the_event_stream_fsyncs_every_write(tmp_path):
    """Acknowledged events are durable only if Redis writes its append-only file before replying;
    both deploy sources must start it as the tests and benches do (userrep.eventlog)."""
    from userrep.eventlog import REDIS_DURABLE_ARGS

    for objects in (kustomize(REPO / "k8s" / "overlays" / "kind"), helm(None, tmp_path)["objects"]):
        redis = next(o for o in objects if o["kind"] == "StatefulSet" and "redis" in o["metadata"]["name"])
        command = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in containers(redis))
        assert " ".join(REDIS_DURABLE_ARGS) in command, command
