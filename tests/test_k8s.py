"""Kubernetes, validated offline (no API server runs here). The Helm chart is the one deploy
source: every values file lints, renders, and its objects pass kubernetes-validate --strict (core
kinds), the KubeRay v1.4.2 CRD schemas (ray.io/v1 kinds, as the operator installs them, read from
../shared/kuberay-crds), our policy and checkov. The RayJob the pipeline submits and the compiled
pipelines' Kubernetes settings are checked against their schemas too. The NetworkPolicies are
evaluated for every connection the system needs, and for every other one.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VALIDATE = REPO / ".tools" / "bin" / "kubernetes-validate"
CHECKOV = REPO / ".tools" / "bin" / "checkov"
CHART = REPO / "k8s" / "helm" / "userrep"
VALUES_FILES = sorted(CHART.glob("values-*.yaml"))
KIND = CHART / "values-kind.yaml"
NAMESPACE = "kubeflow"  # the release's namespace: where the pipeline steps run (standalone KFP)
WORKLOADS = ("Deployment", "StatefulSet")
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


# -- rendering and validators ----------------------------------------------------------------------


def helm(values: dict | None, tmp_path: Path, base: Path | None = KIND, namespace: str = NAMESPACE) -> dict:
    """Lint, schema-check and render the chart with Helm's own library (from the .tools venv)."""
    merged = yaml.safe_load(base.read_text()) if base else {}
    for key, value in (values or {}).items():  # dotted keys: "tasks.autoscaling.enabled"
        node, *path, leaf = [merged] + key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(merged))
    python = REPO / ".tools" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} missing: `make test` creates the .tools venv (tools-requirements.txt)")
    done = subprocess.run(
        [str(python), str(REPO / "tests" / "_helm.py"), str(CHART), str(path), namespace],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    out["objects"] = [d for text in (out["rendered"] or {}).values() for d in yaml.safe_load_all(text) if d]
    return out


def validate(objects: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    if not VALIDATE.exists():
        pytest.fail(f"{VALIDATE} missing: `make test` creates the .tools venv (tools-requirements.txt)")
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return subprocess.run(
        [str(VALIDATE), "--strict", "--kubernetes-version", "1.32.0", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def checkov(*args: str) -> subprocess.CompletedProcess:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} missing: `make test` creates the .tools venv (tools-requirements.txt)")
    return subprocess.run(
        [str(CHECKOV), *args, "--compact", "--quiet", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def _strict(node):
    """An object schema with named properties and no rule for others admits no others: what
    `kubectl apply` (strict field validation, the default) does with an unknown field."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(value) for value in node]
    return node


@functools.cache
def kuberay_validator(kind: str):
    import jsonschema

    directory = Path(os.environ.get("USERREP_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
    path = directory / CRD_FILES[kind]
    if not path.is_file():
        message = f"KubeRay CRD {path} missing (set USERREP_KUBERAY_CRDS)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    crd = yaml.safe_load(path.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


def kuberay_problems(obj: dict) -> list[str]:
    """Where a ray.io/v1 object breaks the KubeRay v1.4.2 schema of its kind."""
    assert obj["apiVersion"] == "ray.io/v1", obj["apiVersion"]
    return [
        f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in kuberay_validator(obj["kind"]).iter_errors(obj)
    ]


def core(objects: list[dict]) -> list[dict]:
    return [o for o in objects if not o["apiVersion"].startswith("ray.io/")]


def rays(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["apiVersion"].startswith("ray.io/")]


def containers(obj: dict) -> list[dict]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(name, pod template) of every pod an object makes: workloads, and Ray heads and worker groups."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] in WORKLOADS:
        return [(name, obj["spec"]["template"])]
    if obj["apiVersion"].startswith("ray.io/"):
        spec = obj["spec"]
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
        return [(f"{name}/head", cluster["headGroupSpec"]["template"])] + [
            (f"{name}/{g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])
        ]
    return []


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
    return {
        c["image"]
        for obj in objects
        for _, template in pod_templates(obj)
        for c in template["spec"]["containers"]
        if not c["image"].startswith("redis:")
    }


def compiled_executors(tmp_path: Path) -> dict[str, dict]:
    """Each compiled pipeline step's Kubernetes settings (kfp-kubernetes platform spec)."""
    from pipelines.runner import compile_pipelines

    executors = {}
    for path in compile_pipelines(tmp_path / "compiled"):
        docs = path.read_text().split("\n---\n")
        platform = yaml.safe_load(docs[1])["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        executors.update({f"{path.stem}/{name}": spec for name, spec in platform.items()})
    return executors


def fit_rayjob(namespace: str = NAMESPACE, image: str | None = None) -> dict:
    """The RayJob the fit step creates, its pods on ``image`` (default: the compiled pipeline's)."""
    from components.batch import IMAGE
    from userrep.batch.jobs import rayjob_manifest
    from userrep.batch.spec import BatchSpec

    spec = BatchSpec(data="/work/world", batch_root="/work/batches")
    return rayjob_manifest("userrep-fit-x", namespace, spec, image or IMAGE)


@pytest.fixture(scope="module")
def kind_objects(tmp_path_factory) -> list[dict]:
    """The chart rendered with values-kind.yaml, once per module (tests copy before changing it)."""
    return helm(None, tmp_path_factory.mktemp("kind"))["objects"]


# -- the chart, every values file ------------------------------------------------------------------


@pytest.mark.slow  # kubernetes-validate and checkov: seconds each
@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.stem)
def test_chart_renders_objects_every_validator_accepts(values_file, tmp_path):
    out = helm(None, tmp_path, base=values_file)
    assert "'errors': []" in out["lint"] and out["schema_error"] is None, (out["lint"], out["schema_error"])
    objects = out["objects"]
    assert {
        "PersistentVolumeClaim",
        "StatefulSet",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "RayCluster",
        "RayService",
    } <= {o["kind"] for o in objects}
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in objects)
    done = validate(core(objects), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p for o in rays(objects) for p in kuberay_problems(o)] == []
    assert policy_problems(objects) == []
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    (rendered / "all.yaml").write_text(yaml.safe_dump_all(objects))
    scan = checkov("-d", str(rendered), "--framework", "kubernetes")
    assert scan.returncode == 0, scan.stdout[-3000:]


def test_the_rayjob_the_pipeline_submits_passes_the_kuberay_schema_and_matches_the_chart(kind_objects, tmp_path):
    from pipelines.runner import compile_pipelines

    job = fit_rayjob()
    assert kuberay_problems(job) == []
    chart = kind_objects
    assert project_images([job]) == project_images(chart)  # the image the chart deploys
    # Compiled for another image, the pipeline hands the fit step that image for its RayJob.
    training = next(
        p for p in compile_pipelines(tmp_path, image="registry.example/userrep:2.0") if p.stem == "training"
    )
    image = yaml.safe_load(training.read_text().split("\n---\n")[0])["root"]["inputDefinitions"]["parameters"]["image"]
    assert project_images([fit_rayjob(image=image["defaultValue"])]) == {"registry.example/userrep:2.0"}
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for _, t in pod_templates(job)
        for v in t["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {o["metadata"]["name"] for o in chart if o["kind"] == "PersistentVolumeClaim"}


def test_pipelines_compiled_from_the_charts_values_log_where_its_servers_log(tmp_path):
    """`userrep pipeline compile --values`: the runbook's submit, with no parameters, writes the
    release's Redis and compacts the events its RayService logged, with the release's password
    secret and image (here values-kind.yaml with a secret and tag of its own)."""
    from pipelines.runner import chart_values, compile_pipelines

    (tmp_path / "mine.yaml").write_text(
        yaml.safe_dump({"redis": {"passwordSecret": "my-redis"}, "image": {"tag": "9.9"}})
    )
    values = chart_values(KIND, tmp_path / "mine.yaml")
    rendered = helm({"redis.passwordSecret": "my-redis", "image.tag": "9.9"}, tmp_path)["objects"]
    service = next(o for o in rendered if o["kind"] == "RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    compiled = {p.stem: p.read_text() for p in compile_pipelines(tmp_path / "compiled", chart=values)}
    training, platform = yaml.safe_load_all(compiled["training"])
    parameters = training["root"]["inputDefinitions"]["parameters"]
    assert parameters["events_log"]["defaultValue"] == served["events_log"]
    assert parameters["spec"]["defaultValue"]["online"] == served["online"] == "redis"
    assert parameters["spec"]["defaultValue"]["redis"] == served["redis"]
    assert parameters["image"]["defaultValue"] == "userrep:9.9" and project_images(rendered) == {"userrep:9.9"}
    for text in compiled.values():
        executors = list(yaml.safe_load_all(text))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        secrets = {s["secretName"] for e in executors.values() for s in e.get("secretAsEnv", [])}
        assert secrets == {"my-redis"}  # the release's, on every step that writes the online store
        assert "image: userrep:9.9" in text and "userrep:0.1.0" not in text


def _set(obj: dict, path: str, value) -> dict:
    obj = json.loads(json.dumps(obj))
    node, *keys, leaf = [obj] + [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys:
        node = node[key]
    node[leaf] = value
    return obj


@pytest.mark.parametrize(
    "kind, path, value, expected",
    [
        ("RayCluster", "spec.workerGroupSpecs.0.replicas", "two", "'two' is not of type 'integer'"),
        ("RayCluster", "spec.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always", "imagePullPolicyy"),
        ("RayService", "spec.rayClusterConfig.enableInTreeAutoscaling", "yes", "'yes' is not of type 'boolean'"),
        ("RayService", "spec.serveConfigV3", "x", "serveConfigV3"),
        ("RayJob", "spec.shutdownAfterJobFinishes", "true", "'true' is not of type 'boolean'"),
        ("RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.template.metadata.labelz", {}, "labelz"),
    ],
)
def test_a_wrong_type_or_an_unknown_field_in_a_ray_object_fails(kind, path, value, expected, kind_objects):
    objects = [fit_rayjob()] + rays(kind_objects)
    obj = next(o for o in objects if o["kind"] == kind)
    assert kuberay_problems(obj) == []
    problems = kuberay_problems(_set(obj, path, value))
    assert any(expected in p for p in problems), problems


def test_compiled_pipeline_steps_have_a_valid_kubernetes_spec_and_the_volume_and_labels(tmp_path):
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    from pipelines.k8s import MOUNT, POD_LABELS, PVC

    executors = compiled_executors(tmp_path)
    assert len(executors) >= 8
    for name, spec in executors.items():
        json_format.ParseDict(spec, pb.KubernetesExecutorConfig())  # unknown fields or wrong types raise
        assert spec["podMetadata"]["labels"] == POD_LABELS, name
        assert [(m["constant"], m["mountPath"]) for m in spec["pvcMount"]] == [(PVC, MOUNT)], name
    with pytest.raises(json_format.ParseError, match="pvcMounts"):
        json_format.ParseDict({**spec, "pvcMounts": []}, pb.KubernetesExecutorConfig())


# -- network policies ------------------------------------------------------------------------------


class Pod(NamedTuple):
    name: str
    component: str  # what the pod is (ROLES), or what an outside pod is
    namespace: str
    labels: dict


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); {} selects everything."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e.get("values", []),
            "NotIn": value not in e.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def admitted(policies: list[dict], src: Pod, dst: Pod, port: int) -> bool:
    """NetworkPolicy ingress semantics: a pod no policy selects takes anything; a selected one
    takes only what some rule of a selecting policy admits (peer and port)."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], dst.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("from") or [{"namespaceSelector": {}, "podSelector": {}}]:
                same_namespace = src.namespace == policy["metadata"]["namespace"]
                namespace_ok = (
                    _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src.namespace})
                    if "namespaceSelector" in peer
                    else same_namespace
                )
                if namespace_ok and _selects(peer.get("podSelector", {}), src.labels):
                    return True
    return False


COMPONENT = "app.kubernetes.io/component"
# What each pod is, whatever its labels say (the labels are what the test checks).
ROLES = {
    "StatefulSet": "online-store",
    "Deployment": "tasks",
    "RayCluster": "train",
    "RayService": "serve",
    "RayJob": "fit",
}
PORTS = (6379, 8265, 8000, 3000, 10001)  # Redis, Ray dashboard/jobs, Serve, tasks, Ray client (a Ray-internal port)
# Every connection the system needs: (from, to, port); None = any port (a Ray cluster's own traffic).
NEEDED = (
    {
        ("serve", "online-store", 6379),
        ("tasks", "online-store", 6379),
        ("pipeline-step", "online-store", 6379),
        ("pipeline-step", "train", 8265),
        ("ingress-controller", "serve", 8000),
        ("ingress-controller", "tasks", 3000),
    }
    | {("kuberay-operator", ray, 8265) for ray in ("train", "serve", "fit")}
    | {(ray, ray, None) for ray in ("train", "serve", "fit")}
)


def system_pods(objects: list[dict], executors: dict[str, dict], rayjob: dict) -> list[Pod]:
    """Our pods (chart, pipeline steps, the fit's RayJob) and the outside ones that talk to them."""
    pods = [
        Pod(name, ROLES[obj["kind"]], obj["metadata"]["namespace"], t["metadata"].get("labels", {}))
        for obj in objects + [rayjob]
        for name, t in pod_templates(obj)
    ]
    pods += [
        Pod(f"pipeline/{name}", "pipeline-step", NAMESPACE, spec.get("podMetadata", {}).get("labels", {}))
        for name, spec in executors.items()
    ]
    return pods + [
        Pod("ingress-nginx-controller", "ingress-controller", "ingress-nginx", {"app": "ingress-nginx"}),
        Pod("kuberay-operator", "kuberay-operator", "kuberay-system", {"app": "kuberay-operator"}),
        Pod("ml-pipeline (KFP's own)", "other-in-namespace", NAMESPACE, {"app": "ml-pipeline"}),
        Pod(
            "a pod elsewhere",
            "other-namespace",
            "default",
            {"app.kubernetes.io/part-of": "userrep", COMPONENT: "serve"},
        ),
    ]


def connection_report(policies: list[dict], pods: list[Pod]) -> tuple[set, list[str]]:
    """(admitted connections as (from, to, port) of components, needed connections blocked)."""
    ours = [p for p in pods if p.labels.get("app.kubernetes.io/part-of") == "userrep" and p.namespace == NAMESPACE]
    allowed, blocked = set(), []
    for src in pods:
        for dst in ours:
            for port in PORTS:
                need = {(src.component, dst.component, port), (src.component, dst.component, None)} & NEEDED
                if admitted(policies, src, dst, port):
                    allowed.add(
                        (src.component, dst.component, None if need == {(src.component, dst.component, None)} else port)
                    )
                elif need:
                    blocked.append(f"{src.name} -> {dst.name}:{port}")
    return allowed, blocked


@pytest.fixture(scope="module")
def rendered_system(kind_objects, tmp_path_factory):
    return kind_objects, compiled_executors(tmp_path_factory.mktemp("netpol")), fit_rayjob()


def test_network_policies_admit_every_needed_connection_and_nothing_else(rendered_system):
    objects, executors, rayjob = rendered_system
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    allowed, blocked = connection_report(policies, system_pods(objects, executors, rayjob))
    assert blocked == []
    assert allowed == NEEDED, {"admitted, not needed": allowed - NEEDED, "needed, not admitted": NEEDED - allowed}


def test_a_pod_that_must_reach_redis_without_the_admitted_label_is_caught(rendered_system):
    objects, executors, rayjob = rendered_system
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    unlabelled = json.loads(json.dumps(objects))
    tasks = next(o for o in unlabelled if o["kind"] == "Deployment")
    del tasks["spec"]["template"]["metadata"]["labels"][COMPONENT]
    _, blocked = connection_report(policies, system_pods(unlabelled, executors, rayjob))
    assert any(b.startswith("Deployment/userrep-tasks -> StatefulSet/userrep-redis:6379") for b in blocked), blocked


# -- one volume, one namespace ---------------------------------------------------------------------


def volume_problems(objects: list[dict], executor_namespace: dict[str, str], executors: dict[str, dict]) -> list[str]:
    """Every pod that mounts a claim must run in the claim's namespace (a PVC cannot be mounted
    across namespaces), and a claim shared by several pods must be ReadWriteMany."""
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    mounts = [
        (f"{o['kind']}/{o['metadata']['name']}", o["metadata"]["namespace"], v["persistentVolumeClaim"]["claimName"])
        for o in objects
        for _, t in pod_templates(o)
        for v in t["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    ]
    mounts += [
        (f"pipeline/{name}", executor_namespace[name], m["constant"])
        for name, spec in executors.items()
        for m in spec.get("pvcMount", [])
    ]
    problems = []
    for who, namespace, claim in mounts:
        pvc = claims.get(claim)
        if pvc is None:
            problems.append(f"{who} mounts {claim}, which the chart does not create")
        elif pvc["metadata"]["namespace"] != namespace:
            problems.append(
                f"{who} in namespace {namespace} mounts {claim} of namespace {pvc['metadata']['namespace']}"
            )
    problems += [
        f"PersistentVolumeClaim/{name}: accessModes {pvc['spec']['accessModes']}, not ReadWriteMany"
        for name, pvc in claims.items()
        if pvc["spec"]["accessModes"] != ["ReadWriteMany"]
    ]
    return problems


def test_every_pod_mounting_the_work_volume_runs_in_its_namespace(rendered_system):
    objects, executors, rayjob = rendered_system
    steps_here = {name: NAMESPACE for name in executors}
    assert volume_problems(objects + [rayjob], steps_here, executors) == []
    # the faults this guards against: steps or the fit's RayJob in another namespace, a RWO claim
    elsewhere = {name: "userrep" for name in executors}
    assert any(
        "namespace userrep mounts userrep-work of namespace kubeflow" in p
        for p in volume_problems(objects, elsewhere, executors)
    )
    assert any(
        p.startswith("RayJob/userrep-fit-x in namespace userrep")
        for p in volume_problems(objects + [fit_rayjob("userrep")], steps_here, executors)
    )
    rwo = [
        _set(o, "spec.accessModes", ["ReadWriteOnce"]) if o["kind"] == "PersistentVolumeClaim" else o for o in objects
    ]
    assert any("not ReadWriteMany" in p for p in volume_problems(rwo, steps_here, executors))


# -- Helm cases: every value that changes a rendered object ----------------------------------------


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    return next(o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


def _pods_of(objects: list[dict], kind: str) -> list[dict]:
    return [t for o in objects if o["kind"] == kind for _, t in pod_templates(o)]


def _secret_volumes(objs: list[dict], volume: str) -> set[str]:
    """The Secrets mounted as ``volume`` by any pod."""
    return {
        v["secret"]["secretName"]
        for o in objs
        for _, t in pod_templates(o)
        for v in t["spec"].get("volumes", [])
        if v["name"] == volume and "secret" in v
    }


def _token_env(objs: list[dict], kind: str) -> set[str]:
    """The token variables the pods of ``kind`` get (every container of every pod template)."""
    return {
        e["name"]
        for o in objs
        if o["kind"] == kind
        for _, t in pod_templates(o)
        for c in t["spec"]["containers"]
        for e in c.get("env", [])
        if e["name"].startswith("USERREP_") and "TOKEN" in e["name"]
    }


RES = {"requests": {"cpu": "3", "memory": "5Gi"}, "limits": {"cpu": "3", "memory": "5Gi"}}
HELM_CASES = {
    "image.repository": ("reg.example/userrep", lambda objs: project_images(objs) == {"reg.example/userrep:0.1.0"}),
    "image.tag": ("0.2.0-rc1", lambda objs: project_images(objs) == {"userrep:0.2.0-rc1"}),
    "image.pullPolicy": (
        "Always",
        lambda objs: (
            {
                c["imagePullPolicy"]
                for o in objs
                for _, t in pod_templates(o)
                for c in t["spec"]["containers"]
                if not c["image"].startswith("redis:")
            }
            == {"Always"}
        ),
    ),
    "storage.size": (
        "99Gi",
        lambda objs: _one(objs, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] == "99Gi",
    ),
    "storage.storageClassName": (
        "cephfs",
        lambda objs: _one(objs, "PersistentVolumeClaim")["spec"]["storageClassName"] == "cephfs",
    ),
    "networkPolicy.ingressNamespace": (
        "gateway",
        lambda objs: (
            _one(objs, "NetworkPolicy", "userrep-tasks-from-ingress")["spec"]["ingress"][0]["from"][0][
                "namespaceSelector"
            ]["matchLabels"]
            == {"kubernetes.io/metadata.name": "gateway"}
        ),
    ),
    "networkPolicy.operatorNamespace": (
        "ray-system",
        lambda objs: (
            _one(objs, "NetworkPolicy", "userrep-ray-from-operator")["spec"]["ingress"][0]["from"][0][
                "namespaceSelector"
            ]["matchLabels"]
            == {"kubernetes.io/metadata.name": "ray-system"}
        ),
    ),
    "redis.image": (
        "redis:7.4.0-alpine",
        lambda objs: containers(_one(objs, "StatefulSet"))[0]["image"] == "redis:7.4.0-alpine",
    ),
    "redis.passwordSecret": ("vault-redis", lambda objs: _secret_volumes(objs, "redis-auth") == {"vault-redis"}),
    "api.tokenSecret": ("vault-api", lambda objs: _secret_volumes(objs, "api-auth") == {"vault-api"}),
    "api.protectReads": (  # the kind values protect reads; off, only the write token is wired
        False,
        lambda objs: (
            _token_env(objs, "Deployment") == set()
            and _token_env(objs, "RayService") == {"USERREP_WRITE_TOKEN_FILE"}
            and _secret_volumes(objs, "api-auth") == {"userrep-api-tokens"}
        ),
    ),
    "api.livePrevious": (  # both servers keep the same batches live
        3,
        lambda objs: (
            "live_previous: 3" in _one(objs, "RayService")["spec"]["serveConfigV2"]
            and {"name": "USERREP_LIVE_PREVIOUS", "value": "3"} in containers(_one(objs, "Deployment"))[0]["env"]
        ),
    ),
    "redis.storage": (
        "7Gi",
        lambda objs: (
            _one(objs, "StatefulSet")["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            == "7Gi"
        ),
    ),
    "redis.resources": (RES, lambda objs: containers(_one(objs, "StatefulSet"))[0]["resources"] == RES),
    "tasks.replicas": (
        3,
        lambda objs: (
            _one(objs, "Deployment")["spec"]["replicas"] == 3
            and _one(objs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
        ),
    ),
    "tasks.resources": (RES, lambda objs: containers(_one(objs, "Deployment"))[0]["resources"] == RES),
    "tasks.autoscaling.enabled": (
        False,
        lambda objs: not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"] and _one(objs, "Deployment"),
    ),
    "tasks.autoscaling.maxReplicas": (
        9,
        lambda objs: _one(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 9,
    ),
    "tasks.autoscaling.targetCPUUtilizationPercentage": (
        55,
        lambda objs: (
            _one(objs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"]
            == 55
        ),
    ),
    "training.enabled": (
        False,
        lambda objs: not [o for o in objs if o["kind"] == "RayCluster"] and _one(objs, "RayService"),
    ),
    "training.workers": (5, lambda objs: _one(objs, "RayCluster")["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 5),
    "training.workerResources": (
        RES,
        lambda objs: _pods_of(objs, "RayCluster")[1]["spec"]["containers"][0]["resources"] == RES,
    ),
    "embeddings.enabled": (
        False,
        lambda objs: not [o for o in objs if o["kind"] == "RayService"] and _one(objs, "RayCluster"),
    ),
    "embeddings.autoscaling.minReplicas": (
        3,
        lambda objs: "min_replicas: 3" in _one(objs, "RayService")["spec"]["serveConfigV2"],
    ),
    "embeddings.autoscaling.maxReplicas": (
        12,
        lambda objs: "max_replicas: 12" in _one(objs, "RayService")["spec"]["serveConfigV2"],
    ),
    "embeddings.autoscaling.targetOngoingRequests": (
        32,
        lambda objs: "target_ongoing_requests: 32" in _one(objs, "RayService")["spec"]["serveConfigV2"],
    ),
    "embeddings.autoscaling.maxWorkers": (
        6,
        lambda objs: _one(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 6,
    ),
    "embeddings.resources": (
        RES,
        lambda objs: all(t["spec"]["containers"][0]["resources"] == RES for t in _pods_of(objs, "RayService")),
    ),
}


def _leaves(values: dict, prefix: str = "") -> set[str]:
    """Dotted keys of values.yaml, a resources block counted as one value."""
    keys = set()
    for key, value in values.items():
        if isinstance(value, dict) and not {"requests", "limits"} <= set(value):
            keys |= _leaves(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def test_every_value_has_a_helm_case():
    assert _leaves(yaml.safe_load((CHART / "values.yaml").read_text())) == set(HELM_CASES)


@pytest.mark.parametrize("key", sorted(HELM_CASES))
def test_chart_should_change_what_the_value_names_when_it_is_set(key, kind_objects, tmp_path):
    value, check = HELM_CASES[key]
    changed = helm({key: value}, tmp_path)
    assert changed["schema_error"] is None, changed["schema_error"]
    assert not check(kind_objects), f"the case for {key} holds without setting it"
    assert check(changed["objects"]), f"setting {key} did not change what it should"


@pytest.mark.parametrize(
    "values, field",
    [
        ({"tasks.replicas": "two"}, "replicas"),
        ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
        ({"storage.storageClassName": ""}, "storageClassName"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_chart_values_schema_rejects_bad_values(values, field, tmp_path):
    out = helm(values, tmp_path)
    assert out["schema_error"] and field in out["schema_error"]


def test_the_chart_refuses_to_install_without_a_storage_class(tmp_path):
    out = helm(None, tmp_path, base=None)  # values.yaml alone: no ReadWriteMany class chosen
    assert out["schema_error"] and "storageClassName" in out["schema_error"]


# -- images, Redis durability, checkov wiring ------------------------------------------------------


def test_every_image_is_the_one_the_pipelines_compile_with(kind_objects, tmp_path):
    from components.batch import IMAGE
    from pipelines.runner import compile_pipelines

    images = project_images(kind_objects) | project_images([fit_rayjob()])
    assert images == {IMAGE}
    compiled = yaml.safe_load(compile_pipelines(tmp_path)[0].read_text().split("\n---\n")[0])
    assert {e["container"]["image"] for e in compiled["deploymentSpec"]["executors"].values()} == images


@pytest.mark.slow  # kubernetes-validate and checkov: seconds each
def test_the_validators_are_wired_a_broken_manifest_fails(kind_objects, tmp_path):
    objects = kind_objects
    broken = [dict(o) for o in core(objects)]
    deployment = next(o for o in broken if o["kind"] == "Deployment")
    deployment["spec"] = {**deployment["spec"], "replicas": "two"}  # wrong type
    done = validate(broken, tmp_path)
    assert done.returncode != 0 and "replicas" in done.stdout + done.stderr
    no_limits = yaml.safe_load(yaml.safe_dump(next(o for o in objects if o["kind"] == "Deployment")))
    del no_limits["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert any("resources.limits" in p for p in policy_problems([no_limits]))
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(no_limits))
    scan = checkov("-f", str(tmp_path / "broken.yaml"), "--framework", "kubernetes")
    assert scan.returncode != 0 and "CKV_K8S_11" in scan.stdout  # CPU limits


@pytest.mark.slow  # kubernetes-validate and checkov: seconds each
def test_checkov_finds_nothing_in_the_dockerfile():
    done = checkov("-f", "Dockerfile", "--framework", "dockerfile")
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_redis_holding_the_event_stream_fsyncs_every_write(kind_objects):
    """Acknowledged events are durable only if Redis writes its append-only file before replying;
    the chart must start it as the tests and benches do (userrep.eventlog)."""
    from userrep.redislog import REDIS_DURABLE_ARGS

    redis = _one(kind_objects, "StatefulSet", "userrep-redis")
    command = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in containers(redis))
    assert " ".join(REDIS_DURABLE_ARGS) in command, command


def test_ray_objects_run_this_ray_and_the_serve_app_this_repo_defines(kind_objects):
    import ray

    from serving.ray_app import EmbeddingService

    objects = rays(kind_objects) + [fit_rayjob()]
    assert {o["kind"] for o in objects} == {"RayCluster", "RayService", "RayJob"}
    for obj in objects:
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"].get("rayClusterSpec") or obj["spec"]
        assert cluster["rayVersion"] == ray.__version__
    service = _one(objects, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["applications"][0]["import_path"] == "serving.ray_app:application"
    # the replica override must name the deployment serving/ray_app.py defines, or Serve rejects it
    override = config["applications"][0]["deployments"][0]
    assert override["name"] == EmbeddingService.name and override["autoscaling_config"]["min_replicas"] >= 2
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_every_container_runs_as_non_root_on_a_read_only_root_filesystem(kind_objects):
    """The chart's pods and the RayJob the pipeline submits: non-root, a read-only root filesystem,
    no privilege escalation, no capabilities, and a writable /tmp (Ray's session dir, BentoML's home)
    wherever our image runs."""
    templates = [t for o in [*kind_objects, fit_rayjob()] for t in pod_templates(o)]
    assert len(templates) >= 6
    for name, template in templates:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
            if container["image"].startswith("userrep"):
                tmp = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"}
                assert tmp and all("emptyDir" in v for v in spec["volumes"] if v["name"] in tmp), (name, "/tmp")


def test_the_image_installs_only_hash_pinned_files_of_the_pinned_versions():
    """requirements.lock names constraints.txt's version of each package userrep needs at run time,
    each with a hash (`make image-lock` after `make lock`), and the Dockerfile installs only those,
    on a base image pinned by digest, as a non-root user."""
    import re

    pins = dict(
        line.lower().replace("_", "-").split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    lock = (REPO / "requirements.lock").read_text()
    locked = dict(re.findall(r"^([a-z0-9-]+)==(\S+) \\\n    --hash=sha256:[0-9a-f]{64}$", lock, flags=re.M))
    assert len(locked) == lock.count("--hash=") > 150
    stale = {n: (v, pins.get(n)) for n, v in locked.items() if n in pins and pins[n] != v.removesuffix("+cpu")}
    assert stale == {}, "run `make image-lock`"
    assert {"torch", "ray", "feast", "bentoml", "setuptools"} <= set(locked) and "pytest" not in locked
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.count("FROM python:3.11.7-slim-bookworm@${PYTHON_DIGEST}") == 2
    assert (
        "--require-hashes" in dockerfile and "-r requirements.lock" in dockerfile and "-c constraints" not in dockerfile
    )
    assert re.search(r"^USER 10001$", dockerfile, flags=re.M)
