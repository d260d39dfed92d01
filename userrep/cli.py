"""The ``userrep`` command line: one subcommand per job.

    userrep world generate --users 20000 --out data/world
    userrep data validate data/world
    userrep data import lastfm-hetrec ../shared/data/hetrec2011-lastfm-2k data/lastfm
    userrep data import deezer ../shared/data/deezer-ro data/deezer
    userrep demo
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Generalized user representations: data, training, batches, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
world_app = typer.Typer(help="The synthetic music world.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets in the contract (docs/data.md).", no_args_is_help=True)
import_app = typer.Typer(help="Convert real datasets into the contract.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")

console = Console(soft_wrap=True)  # status lines stay whole (greppable); tables still fit
errors = Console(stderr=True, soft_wrap=True)


def _validate_or_exit(directory: Path, as_json: bool = False) -> dict:
    """Load a dataset; on problems print each one and exit 1; else print and return the summary."""
    from userrep.data import load_dataset, summarize

    summary = _run_or_exit(lambda: summarize(load_dataset(directory)))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return summary


def _short_ts(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


def _print_summary(summary: dict) -> None:
    table = Table(title=f"dataset {summary['path']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [
        ("events", f"{summary['events']:,} (total weight {summary['total_weight']:,.0f})"),
        ("users with events", f"{summary['users_with_events']:,} (median {summary['events_per_user_median']:.0f} events)"),
        ("items", f"{summary['items']:,} ({summary['items_with_events']:,} played)"),
        ("artists / genres", f"{summary['artists']:,} / {summary['genres']:,}"),
        ("time range (UTC)", f"{_short_ts(summary['ts_min'])} .. {_short_ts(summary['ts_max'])} "
                             f"({summary['distinct_ts']:,} distinct)"),
        ("users table", f"{summary['users_table']:,} rows" + (
            f", {summary['users_without_events']:,} without events" if summary["users_table"] else "")),
        ("pairs", f"{summary['pairs']:,}"),
    ]
    if summary.get("attributes"):
        rows.append(("attributes", ", ".join(f"{k} ({v})" for k, v in summary["attributes"].items())))
    rows.append(("coverage", ", ".join(f"{k} {v:.0%}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in summary["coverage"].items())))
    rows += [("note", note) for note in summary["notes"]]
    for row in rows:
        table.add_row(*row)
    console.print(table)


@data_app.command("validate")
def data_validate(
    directory: Annotated[Path, typer.Argument(help="Dataset directory (events, items, users, pairs).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Check a dataset against the contract; print a summary or every problem (exit 1)."""
    _validate_or_exit(directory, as_json)


@import_app.command("lastfm-hetrec")
def import_lastfm(
    src: Annotated[Path, typer.Argument(help="Folder with the HetRec 2011 Last.fm 2K .dat files.")],
    out: Annotated[Path, typer.Argument(help="Output dataset directory.")],
) -> None:
    """Import HetRec 2011 Last.fm 2K (plays, friends, dated tags)."""
    from userrep.importers import import_lastfm_hetrec

    _require_files(src, ["user_artists.dat", "artists.dat", "tags.dat", "user_taggedartists.dat", "user_friends.dat"])
    console.print(f"wrote {import_lastfm_hetrec(src, out)}")
    _validate_or_exit(out)


@import_app.command("deezer")
def import_deezer_cmd(
    src: Annotated[Path, typer.Argument(help="Folder with the Deezer social network files.")],
    out: Annotated[Path, typer.Argument(help="Output dataset directory.")],
    country: Annotated[str, typer.Option(help="Country prefix of the files (RO, HR, HU).")] = "RO",
) -> None:
    """Import a Deezer social network (friendships, liked genres)."""
    from userrep.importers import import_deezer

    _require_files(src, [f"{country}_genres.json", f"{country}_edges.csv"])
    console.print(f"wrote {import_deezer(src, out, country)}")
    _validate_or_exit(out)


def _require_files(src: Path, names: list[str]) -> None:
    missing = [n for n in names if not (src / n).exists()]
    if missing:
        errors.print(f"[bold red]error[/] {src}: missing source file(s) {missing}")
        raise typer.Exit(code=2)


@world_app.command("generate")
def world_generate(
    out: Annotated[Path, typer.Option(help="Output dataset directory.")] = Path("data/world"),
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same world).")] = 0,
    days: Annotated[int, typer.Option(min=1, help="Length of the listening window in days.")] = 180,
    start: Annotated[str, typer.Option(help="First day of the window (UTC, ISO-8601).")] = "2026-01-01",
    chunk_users: Annotated[int, typer.Option(min=100, help="Users per streamed chunk (bounds memory).")] = 5_000,
) -> None:
    """Generate a synthetic music world (a valid dataset plus truth.parquet)."""
    from userrep.world import WorldConfig, generate_world

    try:
        config = WorldConfig(users=users, seed=seed, days=days, start=start, chunk_users=chunk_users)
    except ValueError as exc:
        errors.print(f"[bold red]error[/] {exc}")
        raise typer.Exit(code=2) from None
    started = time.perf_counter()
    counts = generate_world(config, out)
    console.print(f"world written to {out} in {time.perf_counter() - started:.1f}s: {counts}")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    out: Annotated[Path, typer.Option(help="Batch directory to write.")],
    as_of: Annotated[str | None, typer.Option(help="Feature cut-off (ISO-8601, UTC); default: midnight after the last event.")] = None,
    dim: Annotated[int, typer.Option(min=2, help="Embedding dimension.")] = 64,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 20,
    workers: Annotated[int, typer.Option(min=0, help="0: in-process; N: Ray Train + Ray Data with N workers.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in OUT/checkpoints.")] = False,
    batch_id: Annotated[str | None, typer.Option(help="Batch id; default: derived from data, as_of and settings.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Build a batch: encoders -> features -> autoencoder -> backfill -> manifest."""
    from userrep.build import BuildConfig, build_batch
    from userrep.features import FeatureConfig
    from userrep.model import AEConfig

    config = BuildConfig(features=FeatureConfig(seed=seed), ae=AEConfig(latent=dim, epochs=epochs, seed=seed),
                         workers=workers, resume=resume)
    manifest = _run_or_exit(lambda: build_batch(data, out, as_of, config, batch_id, log=console.print,
                                                progress=_epoch_printer(epochs)))
    _print_manifest(manifest, out)


@app.command()
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
    if not (batch / "manifest.json").exists():
        errors.print(f"[bold red]error[/] --batch {batch}: no manifest.json (not a finished batch)")
        raise typer.Exit(code=2)
    vectors, batch_id = _run_or_exit(lambda: embed_users(batch, load_dataset(data), ids, as_of))
    for user_id, vector in zip(ids, vectors):
        print(json.dumps({"user_id": user_id, "batch_id": batch_id, "embedding": [round(float(v), 6) for v in vector]}))


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    out: Annotated[Path, typer.Option(help="Output directory for metrics.json and report.html.")],
    cutoff: Annotated[str | None, typer.Option(help="Time split (ISO-8601); default: 80% quantile of event times.")] = None,
    dim: Annotated[int, typer.Option(min=2, help="Embedding dimension (and PCA/ALS dimension).")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Autoencoder epochs.")] = 20,
    top_k: Annotated[int, typer.Option(min=1, help="Artists ranked by the future-listening head.")] = 1000,
    ablations: Annotated[bool, typer.Option(help="Retrain without each feature group.")] = True,
) -> None:
    """Evaluate the embedding against baselines on downstream tasks; write metrics.json and report.html."""
    from userrep.evaluate import EvalConfig, evaluate as run

    config = EvalConfig(cutoff=cutoff, dim=dim, seed=seed, epochs=epochs, top_k=top_k, ablations=ablations)
    metrics = _run_or_exit(lambda: run(data, out, config, log=console.print))
    _print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")


def _print_metrics(metrics: dict) -> None:
    for task, methods in metrics["tasks"].items():
        names = list(next(iter(methods.values())))
        table = Table(title=task, title_justify="left")
        table.add_column("method")
        for name in names:
            table.add_column(name, justify="right")
        best = {n: max((v.get(n) or -1) for v in methods.values()) for n in names}
        for method, values in methods.items():
            cells = [f"[bold]{values[n]:.4f}[/]" if values[n] == best[n] else f"{values[n]:.4f}" for n in names]
            table.add_row(f"[bold cyan]{method}[/]" if method == "gur" else method, *cells)
        console.print(table)
    for task, reason in metrics["skipped"].items():
        console.print(f"[yellow]skipped[/] {task}: {reason}")


def _run_or_exit(job):
    """Run a job; contract, id and value problems become a message and exit 1, not a traceback."""
    from userrep.data import DatasetError

    try:
        return job()
    except DatasetError as exc:
        errors.print(f"[bold red]invalid dataset[/] {exc.path}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            errors.print(f"  - {problem}", markup=False, highlight=False)
    except (KeyError, ValueError) as exc:
        errors.print(f"[bold red]error[/] {exc.args[0] if exc.args else exc}", markup=False, highlight=False)
    raise typer.Exit(code=1)


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


@app.command()
def demo(
    work: Annotated[Path, typer.Option(help="Work directory for generated data and batches.")] = Path("work"),
    users: Annotated[int, typer.Option(min=1, help="Users in the synthetic world.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="Ray workers for training and backfill (0: in-process).")] = 2,
    epochs: Annotated[int, typer.Option(min=1, help="Autoencoder epochs.")] = 20,
) -> None:
    """The main job on the embedded default: world (if absent) -> train and backfill a batch."""
    from userrep.world import WorldConfig, generate_world, world_is_current

    from userrep.build import BuildConfig, build_batch, data_fingerprint, default_as_of, default_batch_id
    from userrep.data import load_dataset
    from userrep.features import FeatureConfig
    from userrep.model import AEConfig

    config = WorldConfig(users=users, seed=seed)
    world = work / "world"
    console.rule("1. synthetic world")
    if world_is_current(config, world):
        console.print(f"[dim]world {world} is current (users={users}, seed={seed}); not regenerating[/]")
    else:
        started = time.perf_counter()
        counts = generate_world(config, world)
        console.print(f"generated {world} in {time.perf_counter() - started:.1f}s: {counts}")
    _validate_or_exit(world)

    console.rule(f"2. batch: encoders -> features -> autoencoder -> backfill ({workers} Ray workers)")
    build = BuildConfig(features=FeatureConfig(seed=seed), ae=AEConfig(epochs=epochs, seed=seed), workers=workers)
    as_of = default_as_of(load_dataset(world))
    batch_id = default_batch_id(as_of, data_fingerprint(world), build)
    out = work / "batches" / batch_id
    if (out / "manifest.json").exists():
        console.print(f"[dim]batch {batch_id} already built; not retraining[/]")
        manifest = json.loads((out / "manifest.json").read_text())
    else:
        manifest = _run_or_exit(lambda: build_batch(world, out, as_of, build, batch_id, log=console.print,
                                                    progress=_epoch_printer(epochs)))
    _print_manifest(manifest, out)


if __name__ == "__main__":
    app()
