"""KFP: the compiled DAGs, the components' logic without a pipeline, and full local runs."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from components.batch import finalize_batch, plan_batch, tune_settings
from pipelines.runner import compile_pipelines, run_local
from pipelines.training import CLUSTER_SPEC
from userrep.batch import registry as batches
from userrep.batch.jobs import rayjob_manifest, run_fit, submit_rayjob
from userrep.batch.spec import BatchSpec
from userrep.tasks import registry


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    paths = compile_pipelines(out, image="registry.example/userrep:1.2.3")
    return {p.stem: list(yaml.safe_load_all(p.read_text())) for p in paths}


def test_training_dag_wires_every_step_in_order(compiled):
    spec, platform = compiled["training"]
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finalize-batch"}
    exit_task = spec["root"]["dag"]["tasks"]["finalize-batch"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs even after a failure
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps["materialize-features"] == {"plan-batch"}
    assert deps["fit-encoder"] == {"materialize-features", "plan-batch"}
    assert deps["backfill-embeddings"] == {"fit-encoder"}
    assert deps["for-loop-2"] == {"backfill-embeddings"}
    assert {"for-loop-2", "backfill-embeddings"} <= deps["evaluate-batch"]
    assert "evaluate-batch" in deps["drift-gate"]
    assert "drift-gate" in deps["condition-3"]
    condition = tasks["condition-3"]["triggerPolicy"]["condition"]
    assert "drift-gate-Output" in condition and "true" in condition
    assert tasks["for-loop-2"]["parameterIterator"]["itemInput"].endswith("tasks-loop-item")
    promote = spec["components"]["comp-condition-3"]["dag"]["tasks"]
    assert list(promote) == ["promote-batch"]
    assert all(
        task["taskInfo"]["name"][0].isdigit() or name.startswith(("condition", "for-loop"))
        for name, task in tasks.items()
    )  # display names on every step
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"spec", "ray_address", "rayjob_namespace", "tasks"} <= set(params)
    assert params["tasks"]["defaultValue"] == list(registry.names())  # the registered tasks
    assert {"data", "as_of", "dim", "epochs", "workers", "label_days"} <= set(params["spec"]["defaultValue"])
    for name, task in tasks.items():  # every step reads its settings from the one spec parameter
        if not name.startswith(("condition", "for-loop")):
            assert task["inputs"]["parameters"]["spec"]["componentInputParameter"].endswith("spec"), name
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    fit = executors["exec-fit-encoder"]
    assert fit["pvcMount"][0]["mountPath"] == "/work"
    assert fit["secretAsEnv"][0]["keyToEnv"][0]["envVar"] == "REDIS_PASSWORD"
    resources = spec["deploymentSpec"]["executors"]["exec-fit-encoder"]["container"]["resources"]
    assert resources["cpuRequest"] == 2 and resources["memoryLimit"] > 0
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/userrep:1.2.3"}


def test_refresh_dag_is_one_step_with_the_volume(compiled):
    spec, platform = compiled["refresh"]
    assert list(spec["root"]["dag"]["tasks"]) == ["refresh-embeddings"]
    assert "exec-refresh-embeddings" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_plan_step_gives_the_deterministic_batch_id(small_world, tmp_path):
    settings = dict(
        data=str(small_world),
        as_of="2026-05-01",
        batch_root=str(tmp_path),
        feast_home=str(tmp_path / "f"),
        online="sqlite",
        redis="127.0.0.1:6379",
        dim=16,
        epochs=3,
        workers=0,
        label_days=28,
    )
    plan = plan_batch.python_func(spec=settings)
    again = plan_batch.python_func(spec=settings)
    assert plan.batch_id == again.batch_id and plan.batch_id.startswith("20260501-")
    assert plan.as_of == "2026-05-01T00:00:00+00:00"
    assert plan_batch.python_func(spec={**settings, "epochs": 4}).batch_id != plan.batch_id
    # the task models are part of a batch: their settings are part of its id
    assert plan_batch.python_func(spec={**settings, "label_days": 400}).batch_id != plan.batch_id
    # a run that would rebuild the serving batch (same inputs) stops at the plan: its files are never rewritten
    (tmp_path / "SERVING.json").write_text(json.dumps({"serving": plan.batch_id, "history": [], "updated_at": None}))
    with pytest.raises(ValueError, match="is the serving batch"):
        plan_batch.python_func(spec=settings)


def test_exit_handler_marks_only_unsuccessful_runs_failed(small_world, tmp_path):
    settings = dict(
        data=str(small_world),
        as_of="2026-05-01",
        batch_root=str(tmp_path),
        feast_home=str(tmp_path / "f"),
        online="sqlite",
        redis="127.0.0.1:6379",
        dim=16,
        epochs=3,
        workers=0,
        label_days=28,
    )
    _, batch_id, _ = BatchSpec(**{k: v for k, v in settings.items()}).batch_dir_and_id()
    (tmp_path / batch_id).mkdir()
    ok = SimpleNamespace(state="SUCCEEDED", error_message="", pipeline_job_resource_name="run-1")
    assert finalize_batch.python_func(spec=settings, status=ok) == "SUCCEEDED"
    assert not (tmp_path / batch_id / "FAILED.json").exists()
    failed = SimpleNamespace(state="FAILED", error_message="fit-encoder: OOM", pipeline_job_resource_name="run-2")
    finalize_batch.python_func(spec=settings, status=failed)
    assert "fit-encoder: OOM" in json.loads((tmp_path / batch_id / "FAILED.json").read_text())["reason"]


def test_rayjob_manifest_and_submission_against_a_fake_api(small_world, tmp_path, userrep_log):
    """The Kubernetes API server cannot run here: a fake CustomObjectsApi stands in for it."""
    spec = BatchSpec(data="/work/world", batch_root="/work/batches", as_of="2026-05-01", workers=2)
    manifest = rayjob_manifest("userrep-fit-x", "ml", spec, image="reg/userrep:1")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    job = manifest["spec"]
    assert job["entrypoint"].startswith("python -m userrep.batch.jobs fit --spec ")
    assert json.loads(job["entrypoint"].split("--spec ", 1)[1].strip("'")) == {**spec.__dict__}
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "HTTPMode"
    cluster = job["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        container = pod["spec"]["containers"][0]
        assert container["image"] == "reg/userrep:1" and container["volumeMounts"][0]["mountPath"] == "/work"
        assert container["resources"]["requests"] and pod["spec"]["securityContext"]["runAsNonRoot"]

    class FakeApi:
        def __init__(self):
            self.created, self.polls = [], 0

        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            self.created.append((group, version, namespace, plural, body))

        def get_namespaced_custom_object(self, group, version, namespace, plural, name):
            self.polls += 1
            states = [("Initializing", None), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]
            return {"status": dict(zip(("jobDeploymentStatus", "jobStatus"), states[min(self.polls, 3) - 1]))}

    api, lines = FakeApi(), userrep_log
    local = BatchSpec(data=str(small_world), batch_root=str(tmp_path), as_of="2026-05-01", workers=2)
    status = submit_rayjob("ml", local, "reg/userrep:7", poll_s=0, api=api)
    assert status["jobStatus"] == "SUCCEEDED" and api.polls == 3
    assert api.created[0][:4] == ("ray.io", "v1", "ml", "rayjobs")
    sent = api.created[0][4]["spec"]["rayClusterSpec"]  # the image actually sent, on every pod
    pods = [sent["headGroupSpec"]["template"], *(g["template"] for g in sent["workerGroupSpecs"])]
    assert {c["image"] for pod in pods for c in pod["spec"]["containers"]} == {"reg/userrep:7"}
    with pytest.raises(ValueError, match="image: a RayJob needs"):
        run_fit(local, rayjob_namespace="ml")
    assert any("Running" in line for line in lines)


@pytest.mark.slow
def test_training_pipeline_runs_locally_and_promotes_then_a_failed_run_is_marked(demo_run, tmp_path):
    """The demo's two training-pipeline runs (kfp.local, the ``demo_run`` fixture): each batch
    complete and gated, the later one promoted over the first. Then, on a copy, a run that cannot
    finish is marked failed and never served."""
    from tests.conftest import copy_work
    from userrep.batch.layout import BatchDir

    demo, _, result = demo_run
    assert result.exit_code == 0, result.output
    assert (demo / "kfp").is_dir()
    work = tmp_path / "work"
    copy_work(demo, work)
    root = work / "batches"
    rows = sorted(batches.list_batches(root), key=lambda r: r["created_at"])
    assert [r["state"] for r in rows] == ["previous", "serving"]
    for row in rows:
        info = batches.show(root, row["batch_id"])
        assert not info["missing_tasks"]
        assert set(info["downstream"]) == set(registry.names())
        assert json.loads(BatchDir(root / row["batch_id"]).gate.read_text())["passed"]
    serving = rows[-1]["batch_id"]
    assert batches.serving_batch(root) == serving
    # A run whose downstream step cannot work (label window longer than the data) fails as a whole:
    spec = BatchSpec(
        data=str(work / "world"),
        batch_root=str(root),
        feast_home=str(work / "feast"),
        as_of="2026-06-30",
        epochs=2,
        label_days=400,
    )
    with pytest.raises(RuntimeError, match="finished with status"):
        run_local("training", work, spec)
    failed = [b for b in batches.list_batches(root) if b["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["as_of"].startswith("2026-06-30")
    with pytest.raises(batches.BatchError, match="marked failed"):
        batches.promote(root, failed[0]["batch_id"])
    assert batches.serving_batch(root) == serving


def test_submit_posts_the_compiled_pipeline_to_a_kfp_api(compiled, tmp_path):
    """No Kubeflow here: a fake KFP v2beta1 API on 127.0.0.1 records what `pipeline submit` sends."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from typer.testing import CliRunner

    from userrep.cli import app

    seen = []

    class FakeKfp(BaseHTTPRequestHandler):
        def _reply(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            seen.append(("GET", self.path.split("?")[0], None))
            self._reply({"multi_user": False} if "healthz" in self.path else {"experiments": []})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(("POST", self.path, body))
            self._reply(
                {"experiment_id": "exp-1", "display_name": body.get("display_name")}
                if self.path.endswith("/experiments")
                else {"run_id": "run-42", "experiment_id": "exp-1"}
            )

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    package = tmp_path / "training.yaml"
    compile_pipelines(tmp_path)
    try:
        result = CliRunner().invoke(
            app,
            [
                "pipeline",
                "submit",
                "--host",
                host,
                "--experiment",
                "nightly",
                "--package",
                str(package),
                "--param",
                "as_of=2026-06-30",
                "--param",
                "epochs=5",
            ],
        )
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert f"run: {host}/#/runs/details/run-42" in result.output
    runs = [body for method, path, body in seen if method == "POST" and path.endswith("/runs")]
    assert len(runs) == 1
    sent = runs[0]["pipeline_spec"]  # the IR and its kubernetes platform spec, as compiled
    assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "userrep-training"
    assert "exec-fit-encoder" in sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    sent_spec = runs[0]["runtime_config"]["parameters"]["spec"]  # the compiled default, two settings changed
    assert set(runs[0]["runtime_config"]["parameters"]) == {"spec"}
    assert sent_spec == {**CLUSTER_SPEC, "as_of": "2026-06-30", "epochs": 5}
    assert any(
        path.endswith("/experiments") and body["display_name"] == "nightly"
        for method, path, body in seen
        if method == "POST"
    )


def test_submit_to_an_unreachable_host_is_a_clear_error(compiled, tmp_path):
    from typer.testing import CliRunner

    from userrep.cli import app

    compile_pipelines(tmp_path)
    # What an earlier in-process CLI call can leave behind (seen in CI): a root handler on a closed
    # stream. urllib3's retry warnings then printed "--- Logging error ---" tracebacks.
    stale = io.StringIO()
    handler = logging.StreamHandler(stale)
    stale.close()
    logging.getLogger().addHandler(handler)
    try:
        result = CliRunner().invoke(
            app, ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--package", str(tmp_path / "training.yaml")]
        )
    finally:
        logging.getLogger().removeHandler(handler)
    assert result.exit_code == 1 and "--host http://127.0.0.1:9" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_fit_on_a_ray_cluster_through_the_job_submission_api(small_world, tmp_path, userrep_log):
    """A real Ray head (started here, stopped by its process group) stands in for a RayCluster."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    from serving.smoke import free_port

    bin_dir = Path(sys.executable).parent
    port, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ur-rj-")  # short: Ray's unix socket paths must stay < 108 bytes
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=1",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", dashboard), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.5)
        spec = BatchSpec(
            data=str(small_world),
            batch_root=str(tmp_path / "batches"),
            as_of="2026-05-01",
            feast_home=str(tmp_path / "feast"),
            dim=8,
            epochs=2,
            workers=0,
        )
        lines = userrep_log
        record = run_fit(spec, ray_address=address, poll_s=1.0)
        assert any("SUCCEEDED" in line for line in lines), lines
        assert record["batch_id"] == spec.batch_dir_and_id()[1] and len(record["training"]["losses"]) == 2
        assert (tmp_path / "batches" / record["batch_id"] / "model.pt").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ours only: never `ray stop`
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_the_tune_step_chooses_settings_that_plan_fit_and_exit_handler_all_use(small_world, tmp_path):
    from kfp.dsl import Metrics

    from tests.test_tune import check_tuned
    from userrep.tune import TuneConfig

    settings = dict(
        data=str(small_world),
        as_of="2026-05-01",
        batch_root=str(tmp_path),
        feast_home=str(tmp_path / "f"),
        online="sqlite",
        redis="127.0.0.1:6379",
        dim=16,
        epochs=3,
        workers=0,
        label_days=28,
    )
    off = tune_settings.python_func(
        spec={**settings, "tune": False},
        budget_s=10.0,
        choice=Metrics(name="c", uri=str(tmp_path / "c0")),
    )
    assert off == "" and not (tmp_path / "_tuning").exists()
    choice = Metrics(name="c", uri=str(tmp_path / "c1"))
    # 30 s: Ray Tune's budget also covers its trial actors' start, and at 10 s a slow or busy box
    # ended the budget before any trial had reported (the wiring is under test here, not tuning)
    path = Path(tune_settings.python_func(spec={**settings, "tune": True}, budget_s=30.0, choice=choice))
    record = json.loads(path.read_text())
    check_tuned(record, most=TuneConfig().trials)  # the budget may stop the search sooner
    validation = record["validation"]  # every score came from events before the batch's as_of
    assert validation["history_before"] == "2026-05-01T00:00:00+00:00"
    assert pd.Timestamp(validation["newest_event"]) < pd.Timestamp("2026-05-01", tz="UTC")
    assert choice.metadata["latent"] == record["best"]["latent"]
    spec = BatchSpec(**settings, tune=True)
    config = spec.build_config()
    assert config.ae.latent == record["best"]["latent"] and config.downstream.head.hidden == record["best"]["hidden"]
    assert config.tuned["from"] == str(path)
    tuned_plan = plan_batch.python_func(spec={**settings, "tune": True})
    assert tuned_plan.batch_id == spec.batch_dir_and_id()[1] != plan_batch.python_func(spec=settings).batch_id
    (tmp_path / tuned_plan.batch_id).mkdir()
    failed = SimpleNamespace(state="FAILED", error_message="fit-encoder: OOM", pipeline_job_resource_name="run-3")
    finalize_batch.python_func(spec={**settings, "tune": True}, status=failed)  # the exit handler finds the same batch
    assert (tmp_path / tuned_plan.batch_id / "FAILED.json").exists()


def test_step_lines_survive_parallel_tasks_restoring_each_others_logging(tmp_path):
    """kfp.local's ParallelFor runs tasks in threads, each swapping the root logger on entry and
    restoring what it saw on exit. Forced into the order that lost a line (A enters, B enters, A
    leaves, B logs its end): every task's line still reaches the console, and after the run the
    root logger is as it was (no handler left on the run's closed log)."""
    import threading

    from kfp.local.logging_utils import local_logger_context

    from pipelines.runner import _kfp_root_logger, _steps_to

    echoed, root = [], logging.getLogger()
    before = root.level, root.handlers[:]
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def task_a():
        with local_logger_context():
            logging.info("Executing task 'a'")
            a_in.set()
            b_in.wait(5)
            logging.info("Task 'a' finished with status SUCCESS")
        a_out.set()

    def task_b():
        a_in.wait(5)
        with local_logger_context():
            logging.info("Executing task 'b'")
            b_in.set()
            a_out.wait(5)
            logging.info("Task 'b' finished with status SUCCESS")

    root.setLevel(logging.WARNING)  # Python's default, what a CLI run starts from
    try:
        with _steps_to(tmp_path / "run.log", echoed.append), _kfp_root_logger():
            threads = [threading.Thread(target=task_a), threading.Thread(target=task_b)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
        assert [line.split()[:2] for line in echoed] == [["done", "a"], ["done", "b"]]
        assert "Task 'b' finished" in (tmp_path / "run.log").read_text()
        assert (root.level, root.handlers) == (logging.WARNING, before[1])
    finally:
        root.setLevel(before[0])
