"""`userrep pipeline run | compile | submit`: the KFP pipelines, embedded or on a cluster."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from userrep.batch.spec import BatchSpec
from userrep.cli.batch import _print_gate
from userrep.cli.common import _error, _validate_or_exit, console

pipeline_app = typer.Typer(help="Kubeflow pipelines: run embedded, compile, submit.", no_args_is_help=True)


@pipeline_app.command("run")
def pipeline_run(
    data: Annotated[Path, typer.Option(help="Dataset directory.")] = Path("work/world"),
    as_of: Annotated[str, typer.Option(help="Batch cut-off (ISO-8601); default: midnight after the last event.")] = "",
    work: Annotated[Path, typer.Option(help="Work dir: batches/, feast/, kfp/ (pipeline root).")] = Path("work"),
    pipeline: Annotated[str, typer.Option(help="training or refresh.")] = "training",
    dim: Annotated[int, typer.Option(min=2, help="Embedding dimension.")] = BatchSpec.dim,
    epochs: Annotated[int, typer.Option(min=1, help="Autoencoder epochs.")] = BatchSpec.epochs,
    workers: Annotated[
        int,
        typer.Option(
            min=0, help="Ray Train/Data workers (0: in-process, the fastest fit on one box; bench/fit_throughput.py)."
        ),
    ] = BatchSpec.workers,
    label_days: Annotated[int, typer.Option(min=1, help="Downstream label window (days).")] = BatchSpec.label_days,
    seed: Annotated[int, typer.Option(help="Random seed.")] = BatchSpec.seed,
    ray_address: Annotated[str, typer.Option(help="Ray Job Submission API of a RayCluster (fit runs there).")] = "",
    rayjob: Annotated[str, typer.Option(help="Namespace to create a KubeRay RayJob in for the fit.")] = "",
    tune: Annotated[
        bool,
        typer.Option(
            help="Tune the autoencoder and head settings first (Ray Tune on a validation "
            "split of the history; replaces --dim/--epochs; recorded in the manifest)."
        ),
    ] = False,
    tune_budget: Annotated[
        float, typer.Option(min=1, help="Seconds after which the tune step starts no new trial.")
    ] = 180.0,
    events_log: Annotated[
        str,
        typer.Option(
            help="The online event log to compact into the dataset first (e.g. work/online/events.sqlite); '' skips it."
        ),
    ] = "",
) -> None:
    """Run a pipeline embedded with kfp.local (SubprocessRunner): each step's progress on the console."""
    from pipelines.runner import run_local

    if pipeline not in ("training", "refresh"):
        _error("error", f"--pipeline: expected training or refresh, got {pipeline!r}")
        raise typer.Exit(code=2)
    _validate_or_exit(data)
    spec = BatchSpec(
        data=str(data),
        as_of=as_of,
        batch_root=str(work / "batches"),
        feast_home=str(work / "feast"),
        dim=dim,
        epochs=epochs,
        workers=workers,
        label_days=label_days,
        seed=seed,
        tune=tune,
    )
    params: dict[str, object] = {}
    if pipeline == "training":
        params.update(
            ray_address=ray_address,
            rayjob_namespace=rayjob,
            tune_budget_s=tune_budget,
            events_log=events_log
            if events_log.startswith("redis://") or not events_log
            else str(Path(events_log).resolve()),
        )
    log_path = _pipeline_log(work, pipeline)
    console.print(f"pipeline {pipeline} (kfp.local); full log: {log_path}")
    try:
        with _step_progress() as (echo, on_start):
            outcome = run_local(pipeline, work, spec, log_path=log_path, echo=echo, on_start=on_start, **params)
    except RuntimeError as exc:  # kfp.local: a step failed
        _pipeline_failed(exc, log_path)
    if outcome["gate"]:
        _print_gate(outcome["gate"])
    console.print(f"latest batch {outcome['latest']}; serving {outcome['serving']}")


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Directory for training.yaml and refresh.yaml.")] = Path("work/pipelines"),
    image: Annotated[
        str | None,
        typer.Option(
            help="Container image of every step (the Dockerfile's; default: the --values', else userrep:0.1.0)."
        ),
    ] = None,
    values: Annotated[
        list[Path] | None,
        typer.Option(
            help="The Helm values file(s) the release was installed with: its image, Redis secret, Redis "
            "and event stream become the compiled defaults."
        ),
    ] = None,
) -> None:
    """Compile both pipelines to KFP IR YAML with kfp-kubernetes settings (PVC, Redis secret, resources)."""
    from pipelines.runner import chart_values, compile_pipelines

    for path in compile_pipelines(out, image, chart_values(*values) if values else None):
        console.print(f"wrote {path}")


@pipeline_app.command("submit")
def pipeline_submit(
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines API, e.g. http://localhost:8080.")],
    experiment: Annotated[str, typer.Option(help="Experiment name.")] = "userrep",
    package: Annotated[Path, typer.Option(help="Compiled pipeline (userrep pipeline compile).")] = Path(
        "work/pipelines/training.yaml"
    ),
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="Pipeline parameter KEY=VALUE (repeatable), e.g. ray_address=http://raycluster-head-svc.ray:8265"
        ),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            help="Namespace the steps run in (multi-user Kubeflow: the profile's); the Helm release's namespace."
        ),
    ] = None,
) -> None:
    """Submit a compiled pipeline with kfp.Client and print the run URL."""
    from pipelines.runner import submit

    if not package.exists():
        _error("error", f"--package {package}: not found (run `userrep pipeline compile` first)")
        raise typer.Exit(code=2)
    try:
        arguments = submit_arguments(package, param or [])
    except ValueError as exc:  # a malformed item or a setting the spec cannot take: usage, as before
        _error("error", str(exc))
        raise typer.Exit(code=2) from None
    try:
        url = submit(host, package, experiment, arguments, namespace=namespace)
    except Exception as exc:  # connection refused, auth, API errors: say which host, never a traceback
        _error("error", f"--host {host}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        raise typer.Exit(code=1) from None
    console.print(f"run: {url}")


def submit_arguments(package: Path, items: list[str]) -> dict:
    """The run's arguments from ``KEY=VALUE`` items: a `BatchSpec` setting changes the package's
    default `spec` (its compiled default, edited field by field); any other KEY is a pipeline parameter."""
    import yaml

    arguments: dict[str, object] = {}
    settings: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        if key in BatchSpec.names():
            settings[key] = value
        else:
            arguments[key] = int(value) if value.isdigit() else value
    if settings:
        pipeline = next(yaml.safe_load_all(package.read_text()))
        default = pipeline["root"]["inputDefinitions"]["parameters"].get("spec", {}).get("defaultValue")
        if default is None:
            raise ValueError(f"--param {next(iter(settings))}: {package} has no spec parameter")
        arguments["spec"] = BatchSpec.from_dict(default).with_text(settings).to_dict()
    return arguments


def _logs(work: Path) -> Path:
    """Where the pipelines' full logs go."""
    return work / "logs"


def _pipeline_log(work: Path, name: str) -> Path:
    return _logs(work) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


@contextlib.contextmanager
def _step_progress() -> Iterator[tuple[Callable[[str], None], Callable[[str], None]]]:
    """(echo, on_start) for ``run_local``: a spinner with its running time for each step while it
    runs (on a terminal only), its line once it is done."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # bound to the terminal now: during the run sys.stdout is the pipeline's log
    out = Console(file=sys.stdout, soft_wrap=True)
    running: dict[str, list] = {}  # a step name's progress tasks, first in first out (a ParallelFor's share a name)
    with Progress(
        SpinnerColumn(), TextColumn("  running  {task.description}"), TimeElapsedColumn(), console=out, transient=True
    ) as bars:

        def on_start(name: str) -> None:
            running.setdefault(name, []).append(bars.add_task(name, total=None))

        def echo(line: str) -> None:
            name = line.split()[1]
            if running.get(name):
                bars.remove_task(running[name].pop(0))
            out.print(line)

        yield echo, on_start


def _pipeline_failed(exc: Exception, log_path: Path):
    """A step failed: its last lines (the error) and where the whole log is."""
    tail = log_path.read_text(errors="replace").splitlines()[-25:] if log_path.exists() else []
    console.print("\n".join(tail), markup=False, highlight=False)
    _error("pipeline failed", f"{str(exc).splitlines()[0]} (full log: {log_path})")
    raise typer.Exit(code=1) from None
