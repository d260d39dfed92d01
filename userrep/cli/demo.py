"""`userrep serve`, `userrep demo`: the served batch, and the whole lifecycle on the embedded default."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from userrep.batch.layout import BatchDir
from userrep.batch.registry import LIVE_PREVIOUS
from userrep.batch.spec import BatchSpec
from userrep.cli.batch import _print_downstream, _print_gate, batch_list
from userrep.cli.common import _error, _validate_or_exit, console
from userrep.cli.pipeline import _logs, _pipeline_failed, _pipeline_log, _step_progress
from userrep.demo import DemoSettings


def serve(
    work: Annotated[Path, typer.Option(help="Work dir: batches/, feast/, online/ (event log), bentoml/.")] = Path(
        "work"
    ),
    port: Annotated[int, typer.Option(help="Ray Serve port (embeddings, events).")] = 8000,
    bento_port: Annotated[int, typer.Option(help="BentoML port (recommendations, preferences).")] = 3000,
    feast: Annotated[bool, typer.Option(help="Read and write the Feast online store in WORK/feast.")] = True,
    events_log: Annotated[
        str,
        typer.Option(
            help="Event log: a file (default WORK/online/events.sqlite) or "
            "redis://HOST:PORT/STREAM (Redis with appendonly, fsync always)."
        ),
    ] = "",
    replicas: Annotated[
        int,
        typer.Option(
            min=1, help="Ray Serve replicas of the embedding API (they share the per-user state through the event log)."
        ),
    ] = 1,
    ingress: Annotated[
        str,
        typer.Option(
            help="haproxy (Ray Serve's HAProxy ingress; falls back to serve if it "
            "does not come up) or serve (Serve's own Python proxy)."
        ),
    ] = "haproxy",
    live_previous: Annotated[
        int,
        typer.Option(
            min=0,
            help="Batches served before the serving one that stay live (reads name them with batch_id; "
            "events update them); pinned batches stay live too.",
        ),
    ] = LIVE_PREVIOUS,
) -> None:
    """Serve the promoted batch on 127.0.0.1 until Ctrl-C: Ray Serve + BentoML, reloading on promotion."""
    from serving.launch import INGRESSES, serve_forever
    from userrep.batch.registry import serving_batch

    if ingress not in INGRESSES:
        _error("error", f"--ingress {ingress!r}: expected one of {', '.join(INGRESSES)}")
        raise typer.Exit(code=2)

    if serving_batch(work / "batches") is None:
        _error("error", f"{work / 'batches'}: no batch is serving; run `make demo` first")
        raise typer.Exit(code=2)
    _check_tokens()
    serve_forever(
        work / "batches",
        work / "feast" if feast else None,
        port,
        bento_port,
        work,
        events_log=events_log or None,
        replicas=replicas,
        ingress=ingress,
        live_previous=live_previous,
    )


def demo(
    work: Annotated[Path, typer.Option(help="Work directory for generated data and batches.")] = Path("work"),
    users: Annotated[int, typer.Option(min=1, help="Users in the synthetic world.")] = DemoSettings.users,
    seed: Annotated[int, typer.Option(help="Random seed.")] = DemoSettings.seed,
    workers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Ray workers for training and backfill (0: in-process, the "
            "fastest fit on one box; bench/fit_throughput.py).",
        ),
    ] = BatchSpec.workers,
    epochs: Annotated[int, typer.Option(min=1, help="Autoencoder epochs.")] = BatchSpec.epochs,
    later_days: Annotated[
        int, typer.Option(min=1, help="Batch 2 sees this many more days of data than batch 1.")
    ] = DemoSettings.later_days,
    smoke: Annotated[
        bool, typer.Option(help="End with a serving smoke (start both servers, new user, events).")
    ] = True,
) -> None:
    """The lifecycle on the embedded default: world -> training pipeline for batch 1 (promoted) ->
    training pipeline for batch 2 on later data (gated against batch 1) -> decision and metrics ->
    serve the promoted batch and react to live events."""
    from userrep.batch.registry import serving_batch
    from userrep.demo import ensure_world, plan_batches

    settings = DemoSettings(users=users, seed=seed, workers=workers, epochs=epochs, later_days=later_days)
    world, root = work / "world", work / "batches"
    console.rule("1. synthetic world")
    started = time.perf_counter()
    counts = ensure_world(work, settings)
    if counts is None:
        console.print(f"[dim]world {world} is current (users={users}, seed={seed}); not regenerating[/]")
    else:
        console.print(f"generated {world} in {time.perf_counter() - started:.1f}s: {counts}")
    _validate_or_exit(world)

    planned = plan_batches(work, settings)
    servers = None  # the smoke's servers, started while the last batch trains
    try:
        for step, batch in enumerate(planned):
            console.rule(
                f"{2 + step}. training pipeline (kfp.local), {batch.label}: as of {batch.as_of:%Y-%m-%d} -> {batch.batch_id}"
            )
            if smoke and step == len(planned) - 1 and serving_batch(root) is not None:
                servers = _launch_servers(work)
            if batch.done:
                console.print(
                    f"[dim]batch {batch.batch_id} already ran through the pipeline ({batch.done}); not rerunning[/]"
                )
                continue
            _run_pipeline(work, batch)

        console.rule("4. gate decision for batch 2 and downstream metrics of both batches")
        ids = [batch.batch_id for batch in planned]
        gate_path = BatchDir(root / ids[1]).gate
        if gate_path.exists():
            _print_gate(json.loads(gate_path.read_text()))
        _print_downstream(root, ids)
        batch_list(root)
        console.print(
            f"reports: {root}/<batch>/rollout.html, drift_report.html (Evidently), gate.json; KFP run artifacts "
            f"under {work}/kfp; rollback: userrep batch rollback --root {root}"
        )
        if smoke:
            console.rule("5. serve the promoted batch (Ray Serve + BentoML) and react to live events")
            _smoke(work, servers)
            servers = None  # the smoke stopped them
        from serving.smoke import SERVE_LOG

        servers_log = f", {work / SERVE_LOG} (the servers)" if smoke else ""
        console.print(f"full logs: {_logs(work)} (the pipelines){servers_log}")
        rollout = BatchDir(root / ids[1]).rollout_report
        if rollout.exists():
            console.print(f"rollout report of batch 2 ({ids[1]}), the decision and every number behind it: {rollout}")
    finally:
        if servers is not None:
            from serving.smoke import stop

            stop(servers.proc)


def _check_tokens() -> None:
    """A token variable that names a missing file or holds nothing: one line, before anything starts."""
    from serving.auth import Tokens

    try:
        Tokens.from_env()
    except ValueError as exc:
        _error("error", f"{exc}")
        raise typer.Exit(code=2) from None


def _launch_servers(work: Path):
    """Both servers, started now on the serving batch so they are up when the smoke needs them
    (they reload when the next batch is promoted); the smoke waits for them and checks the switch."""
    from serving.smoke import launch_servers

    _check_tokens()

    servers = launch_servers(work)
    console.print(
        f"[dim]started the servers in the background on batch {servers.serving_at_launch} for the smoke "
        f"(log {servers.log_path})[/]"
    )
    return servers


def _run_pipeline(work: Path, batch) -> None:
    from pipelines.runner import run_local

    started, log_path = time.perf_counter(), _pipeline_log(work, f"training-{batch.batch_id}")
    try:
        with _step_progress() as (echo, on_start):
            outcome = run_local("training", work, batch.spec, log_path=log_path, echo=echo, on_start=on_start)
    except RuntimeError as exc:
        _pipeline_failed(exc, log_path)
    console.print(
        f"pipeline finished in {time.perf_counter() - started:.0f}s; serving {outcome['serving']}; full log: {log_path}"
    )


def _smoke(work: Path, servers) -> None:
    from serving.smoke import run_smoke
    from userrep.demo import smoke_inputs

    try:
        artists, tracks, as_of = smoke_inputs(work)
    except ValueError as exc:  # the gate rejected batch 1
        _error("serving smoke skipped", f"{exc}")
        raise typer.Exit(code=1) from None
    try:
        run_smoke(work, artists, tracks, as_of, servers=servers)
    except (AssertionError, RuntimeError, TimeoutError) as exc:
        _error("serving smoke failed", f"{exc}")
        raise typer.Exit(code=1) from None
