"""Run the pipelines embedded (kfp.local), compile them for a cluster, submit them to Kubeflow."""

import contextlib
import io
import json
import logging
import re
import sys
import time
from pathlib import Path

CHART = Path(__file__).resolve().parent.parent / "k8s" / "helm" / "userrep"


class _StepLines(io.TextIOBase):
    """Everything kfp.local prints (its task logs, executor inputs, each step's own output) goes to
    the log file; the console gets one line per finished step with its time."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")
    STARTED = re.compile(r"Executing task '([^']+)'")
    ENDED = re.compile(r"Task '([^']+)' finished with status (\w+)")

    def __init__(self, log, echo, console, on_start=None):
        # a task name's start times, first in first out: a ParallelFor's iterations share one name
        self.log, self.echo, self.console, self.started, self.on_start = log, echo, console, {}, on_start

    def write(self, text: str) -> int:
        self.log.write(text)
        plain = self.ANSI.sub("", text)
        for name in self.STARTED.findall(plain):
            self.started.setdefault(name, []).append(time.perf_counter())
            if self.on_start:
                self.on_start(name)
        for name, status in self.ENDED.findall(plain):
            starts = self.started.get(name) or [time.perf_counter()]
            took = time.perf_counter() - starts.pop(0)
            with contextlib.redirect_stdout(self.console):  # echo (print, a rich console) writes to the terminal
                self.echo(f"  {'done' if status == 'SUCCESS' else status.lower():>7}  {name}  {took:.0f}s")
        return len(text)

    def flush(self) -> None:
        self.log.flush()


@contextlib.contextmanager
def _kfp_root_logger():
    """kfp.local logs each task's lines through the root logger, swapping its handlers and level
    per task (``local_logger_context``) and ``builtins.print`` (``indented_print``). A ParallelFor's
    tasks run in threads, and each restores what it saw on entry, so the last to leave can restore
    another's state: the root level back at WARNING while a task still runs (its "finished" line
    dropped), or a handler bound to this run's output left behind for the next run. Entering with
    the root at INFO and a handler that follows ``sys.stdout`` makes every state a task can restore
    a working one; the root and ``print`` are put back as they were afterwards."""
    import builtins

    from userrep.logs import CurrentStream

    root, handler = logging.getLogger(), CurrentStream("stdout")
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
    saved = root.level, root.handlers[:], builtins.print
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        builtins.print = saved[2]


@contextlib.contextmanager
def _steps_to(log_path: Path | None, echo, on_start=None):
    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        lines = _StepLines(log, echo, sys.stdout, on_start)
        with contextlib.redirect_stdout(lines), contextlib.redirect_stderr(lines):
            yield


def run_local(
    pipeline: str, work: Path, spec, log_path: Path | None = None, echo=print, on_start=None, **params
) -> dict:
    """Execute a pipeline with kfp.local's SubprocessRunner in this interpreter. `spec`: the
    batch's `BatchSpec`; `params`: the pipeline's other parameters. With ``log_path`` the console
    shows one line per step (``echo``) and the full output goes to that file (``on_start(name)``: a
    step began); without it, kfp.local prints everything."""
    from kfp import local

    from pipelines.refresh import refresh_pipeline
    from pipelines.training import training_pipeline

    work = Path(work).resolve()
    # steps run as subprocesses: no relative paths
    spec = spec.replace(
        **{key: str(Path(getattr(spec, key)).resolve()) for key in ("data", "batch_root", "feast_home")}
    )
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "kfp"), raise_on_error=True)
    func = {"training": training_pipeline, "refresh": refresh_pipeline}[pipeline]
    with _steps_to(log_path, echo, on_start), _kfp_root_logger():
        func(spec=spec.to_dict(), **{k: v for k, v in params.items() if v is not None})
    return _outcome(Path(spec.batch_root))


def _outcome(batch_root: Path) -> dict:
    from userrep.batch.layout import BatchDir
    from userrep.batch.registry import list_batches, read_pointer

    rows = sorted(list_batches(batch_root), key=lambda r: r["created_at"])
    latest = rows[-1]["batch_id"] if rows else None
    gate_path = BatchDir(batch_root / latest).gate if latest else None
    gate = json.loads(gate_path.read_text()) if gate_path and gate_path.exists() else None
    return {"latest": latest, "serving": read_pointer(batch_root)["serving"], "gate": gate}


def compile_pipelines(out: Path, image: str | None = None, chart: dict | None = None) -> list[Path]:
    """IR YAML for both pipelines, with kfp-kubernetes settings (PVC, secret, resources) and
    ``image`` (default: the chart's, else the placeholder).

    ``chart``: the Helm values the release was installed with (``chart_values``): its image, the
    Redis password's secret, and the release's Redis and event stream as the compiled defaults,
    so that a run submitted with no parameters writes the online store and compacts the events
    the servers logged into its training data."""
    import yaml
    from kfp import compiler

    from components.batch import IMAGE  # what every step is compiled with, replaced here
    from pipelines.k8s import CHART_EVENTS_LOG, CHART_REDIS, REDIS_SECRET
    from pipelines.refresh import refresh_pipeline
    from pipelines.training import training_pipeline

    if image is None:
        image = f"{chart['image']['repository']}:{chart['image']['tag']}" if chart else IMAGE
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, func in (("training", training_pipeline), ("refresh", refresh_pipeline)):
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(func, str(path))
        if image != IMAGE:  # every step's image and the training pipeline's `image` (a RayJob's)
            path.write_text(path.read_text().replace(IMAGE, image))
        if chart is not None:
            text = path.read_text().replace(f": {REDIS_SECRET}\n", f": {chart['redis']['passwordSecret']}\n")
            pipeline, platform = yaml.safe_load_all(text)
            parameters = pipeline["root"]["inputDefinitions"]["parameters"]
            parameters["spec"]["defaultValue"].update(online="redis", redis=CHART_REDIS)
            if "events_log" in parameters:
                parameters["events_log"]["defaultValue"] = CHART_EVENTS_LOG
            path.write_text(yaml.safe_dump_all([pipeline, platform], sort_keys=False))
        paths.append(path)
    return paths


def chart_values(*files: Path) -> dict:
    """The chart's values.yaml with each file's values merged over it, as ``helm install -f`` does."""
    import yaml

    def merged(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for file in files:
        values = merged(values, yaml.safe_load(Path(file).read_text()) or {})
    return values


def submit(
    host: str, package: Path, experiment: str, arguments: dict | None = None, namespace: str | None = None
) -> str:
    """Submit a compiled pipeline to a Kubeflow Pipelines API; returns the run's URL. ``namespace``:
    where the steps run in multi-user Kubeflow (the profile's; the chart's release namespace)."""
    import kfp

    # urllib3 logs one warning per connection retry before kfp gives up; the caller reports an
    # unreachable host in one line, so those are noise. A filter, not a level: kfp's API client
    # resets the urllib3 logger's level.
    retries = logging.getLogger("urllib3.connectionpool")
    errors_only = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    retries.addFilter(errors_only)
    try:
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(
            str(package), arguments=arguments or {}, experiment_name=experiment, namespace=namespace
        )
    finally:
        retries.removeFilter(errors_only)
    return f"{host.rstrip('/')}/#/runs/details/{run.run_id}"
