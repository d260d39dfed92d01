"""`userrep train | embed | evaluate | tune`, `userrep features`: build a batch, embed users, evaluate, tune, materialize."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from userrep.batch.layout import MANIFEST, manifest_path
from userrep.batch.spec import BatchSpec
from userrep.cli.common import _error, _run_or_exit, console

features_app = typer.Typer(help="The Feast feature store (feature_repo/).", no_args_is_help=True)


def train(
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    out: Annotated[Path, typer.Option(help="Batch directory to write.")],
    as_of: Annotated[
        str | None, typer.Option(help="Feature cut-off (ISO-8601, UTC); default: midnight after the last event.")
    ] = None,
    dim: Annotated[int, typer.Option(min=2, help="Embedding dimension.")] = BatchSpec.dim,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = BatchSpec.epochs,
    workers: Annotated[
        int, typer.Option(min=0, help="0: in-process; N: Ray Train + Ray Data with N workers.")
    ] = BatchSpec.workers,
    average_every: Annotated[
        int,
        typer.Option(
            min=1,
            help="With N >= 2 workers: 1 = DDP (gradients averaged every "
            "step); k = local SGD (parameters averaged every k steps).",
        ),
    ] = BatchSpec.average_every,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in OUT/checkpoints.")] = False,
    batch_id: Annotated[
        str | None, typer.Option(help="Batch id; default: derived from data, as_of and settings.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = BatchSpec.seed,
    feast: Annotated[
        bool,
        typer.Option(help="Materialize to Feast, train on its point-in-time training set, publish embeddings online."),
    ] = True,
    feast_home: Annotated[Path, typer.Option(help="Feast work dir (offline tables, registry, online store).")] = Path(
        "work/feast"
    ),
    downstream: Annotated[bool, typer.Option(help="Train the downstream task models on this batch.")] = True,
    label_days: Annotated[
        int, typer.Option(min=1, help="Label window of the downstream tasks (days before as_of).")
    ] = BatchSpec.label_days,
    tuned: Annotated[
        Path | None,
        typer.Option(
            help="tuned.json from `userrep tune`: its autoencoder and head "
            "settings replace --dim/--epochs (recorded in the manifest)."
        ),
    ] = None,
    align_to: Annotated[
        str,
        typer.Option(
            help="The batch whose space this one continues (docs/batches.md): serving (the batch serving "
            "under OUT's parent, if any), a batch id there, or none (a new space)."
        ),
    ] = BatchSpec.align_to,
) -> None:
    """Build a batch: features (Feast) -> autoencoder -> backfill -> publish -> downstream models."""
    from userrep.batch.build import build_batch

    if tuned is not None and not tuned.is_file():
        _error("error", f"--tuned {tuned}: no such file (write it with `userrep tune`)")
        raise typer.Exit(code=1)
    spec = BatchSpec(
        data=str(data),
        batch_root=str(out.parent),
        as_of=as_of or "",
        batch_id=batch_id or "",
        feast_home=str(feast_home),
        dim=dim,
        epochs=epochs,
        workers=workers,
        average_every=average_every,
        label_days=label_days,
        seed=seed,
        tuned=str(tuned or ""),
        align_to=align_to,
    )
    config = spec.build_config()
    anchor = _run_or_exit(spec.anchor_dir)
    config = replace(
        config,
        resume=resume,
        feast=config.feast if feast else None,
        downstream=config.downstream if downstream else None,
    )
    manifest = _run_or_exit(
        lambda: build_batch(
            data, out, as_of, config, batch_id, progress=_epoch_printer(epochs), spec=spec.to_dict(), anchor=anchor
        )
    )
    _print_manifest(manifest, out)


def embed(
    batch: Annotated[Path, typer.Option(help="Batch directory (from `userrep train`).")],
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    users: Annotated[str, typer.Option(help="Comma-separated user ids.")],
    as_of: Annotated[str | None, typer.Option(help="Feature cut-off; default: the batch's as_of.")] = None,
) -> None:
    """Print embeddings (JSON lines) for users, cold-start users included."""
    from userrep.backfill import embed_users
    from userrep.data import load_dataset

    ids = list(dict.fromkeys(u.strip() for u in users.split(",") if u.strip()))
    if not manifest_path(batch).exists():
        _error("error", f"--batch {batch}: no {MANIFEST} (not a finished batch)")
        raise typer.Exit(code=2)
    vectors, batch_id = _run_or_exit(lambda: embed_users(batch, load_dataset(data), ids, as_of))
    for user_id, vector in zip(ids, vectors):
        print(json.dumps({"user_id": user_id, "batch_id": batch_id, "embedding": [round(float(v), 6) for v in vector]}))


def evaluate(
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    out: Annotated[Path, typer.Option(help="Output directory for metrics.json and report.html.")],
    cutoff: Annotated[
        str | None, typer.Option(help="Time split (ISO-8601); default: 80% quantile of event times.")
    ] = None,
    dim: Annotated[int, typer.Option(min=2, help="Embedding dimension (and PCA/ALS dimension).")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Autoencoder epochs.")] = 20,
    top_k: Annotated[int, typer.Option(min=1, help="Artists ranked by the future-listening head.")] = 1000,
    ablations: Annotated[
        bool, typer.Option(help="Also retrain without each feature group (~5 min more on 20k users).")
    ] = False,
    split: Annotated[str, typer.Option(help="auto | time | user-time | random (docs/evaluation.md).")] = "auto",
    seeds: Annotated[int, typer.Option(min=1, help="Repeat with seeds SEED..SEED+N-1; report mean and spread.")] = 1,
    tune: Annotated[
        bool,
        typer.Option(
            help="First choose the autoencoder and head settings on a validation "
            "split of the history (userrep tune), then evaluate with them."
        ),
    ] = False,
) -> None:
    """Evaluate the embedding against baselines on downstream tasks; write metrics.json and report.html."""
    from userrep.evaluate import EvalConfig
    from userrep.evaluate import evaluate as run

    config = EvalConfig(
        cutoff=cutoff, split=split, dim=dim, seed=seed, seeds=seeds, epochs=epochs, top_k=top_k, ablations=ablations
    )
    if tune:
        from userrep.tune import TuneConfig, tune_dataset, tuned_configs

        tuned = _run_or_exit(lambda: tune_dataset(data, out / "tuned", TuneConfig(seed=seed), split, cutoff))
        ae, head = tuned_configs(tuned)
        config = replace(config, dim=ae.latent, epochs=ae.epochs, ae=ae, head=head)
    metrics = _run_or_exit(lambda: run(data, out, config))
    _print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")


def tune(
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    out: Annotated[Path, typer.Option(help="Output directory for tuned.json (and Ray Tune's trial logs).")],
    trials: Annotated[int, typer.Option(min=1, help="Trials sampled from the space (ASHA stops the weak ones).")] = 12,
    budget: Annotated[float, typer.Option(min=10, help="Seconds after which no new trial starts.")] = 180.0,
    split: Annotated[str, typer.Option(help="auto | time | user-time | random: as `evaluate` will split.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Choose autoencoder and head settings on a validation split of the history (Ray Tune, ASHA)."""
    from userrep.tune import TuneConfig, tune_dataset

    record = _run_or_exit(lambda: tune_dataset(data, out, TuneConfig(trials=trials, budget_s=budget, seed=seed), split))
    table = Table(title=f"{len(record['trials'])} trials, best first ({record['seconds']} s)", title_justify="left")
    for name in record["trials"][0]:
        table.add_column(name, justify="right")
    for trial in record["trials"][:10]:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in trial.values()))
    console.print(table)
    console.print(f"wrote {out / 'tuned.json'}")


def _print_metrics(metrics: dict) -> None:
    """A table per task (value and 95% interval, best per column bold), then the comparisons."""
    from userrep.report import comparison_lines, is_best

    for task, methods in metrics["tasks"].items():
        names = list(dict.fromkeys(k for v in methods.values() for k in v if not k.endswith("_ci")))
        table = Table(title=task, title_justify="left")
        table.add_column("method")
        for name in names:
            table.add_column(f"{name} [95% CI]", justify="right")
        best = {n: max((v[n] for v in methods.values() if v.get(n) is not None), default=None) for n in names}
        for method, values in methods.items():
            cells = []
            for n in names:
                value, ci = values.get(n), values.get(f"{n}_ci") or [None, None]
                text = (
                    "-" if value is None else f"{value:.4f}" + ("" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")
                )
                cells.append(f"[bold]{text}[/]" if is_best(value, best[n], 4) else text)
            table.add_row(f"[cyan]{method}[/]" if method.startswith("gur") else method, *cells)
        console.print(table)
    for line in comparison_lines(metrics):
        console.print(line, markup=False, highlight=False)
    for task, reason in metrics["skipped"].items():
        console.print(f"[yellow]skipped[/] {task}: {reason}", highlight=False)


def _epoch_printer(epochs: int):
    def report(epoch: int, total: int, loss: float) -> None:
        console.print(f"    epoch {epoch:>3}/{total}  loss {loss:.4f}")

    return report


def _print_manifest(manifest: dict, out: Path) -> None:
    table = Table(title=f"batch {manifest['batch_id']} -> {out}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    losses = manifest["training"]["losses"]
    groups = manifest["feature_schema"]
    table.add_row("as_of", manifest["as_of"])
    table.add_row("users embedded", f"{manifest['users']:,} x {manifest['ae_config']['latent']} dims")
    table.add_row("features", f"{manifest['n_features']} in {len(groups)} groups")
    table.add_row("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} epochs")
    table.add_row("timings (s)", ", ".join(f"{k} {v}" for k, v in manifest["timings_s"].items()))
    console.print(table)


def _store_config(home: Path, online: str, redis: str):
    from userrep.store import StoreConfig

    return _run_or_exit(lambda: StoreConfig(home=home, online=online, redis=redis))


@features_app.command("materialize")
def features_materialize(
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    as_of: Annotated[str, typer.Option(help="Snapshot time (ISO-8601, UTC): features use events before it.")],
    feast_home: Annotated[Path, typer.Option(help="Feast work dir.")] = Path("work/feast"),
    online: Annotated[str, typer.Option(help="Online store: sqlite (embedded) or redis.")] = "sqlite",
    redis: Annotated[
        str, typer.Option(help="Redis connection string host:port[,password=...] (--online redis).")
    ] = "127.0.0.1:6379",
) -> None:
    """Fit encoders as of --as-of, write the offline tables, feast apply, materialize online."""
    from userrep.store import materialize

    config = _store_config(feast_home, online, redis)
    snapshot = _run_or_exit(lambda: materialize(data, as_of, config))
    console.print(f"snapshot {snapshot.space_id}: {len(snapshot.user_ids):,} users, encoders in {snapshot.space_dir}")
