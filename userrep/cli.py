"""The ``userrep`` command line: one subcommand per job.

    userrep world generate --users 20000 --out data/world
    userrep data validate data/world
    userrep data import lastfm-hetrec ../shared/data/hetrec2011-lastfm-2k data/lastfm
    userrep data import deezer ../shared/data/deezer-ro data/deezer
    userrep data thin data/lastfm data/lastfm-thin --keep 0.2
    userrep features materialize --data data/world --as-of 2026-06-01
    userrep batch list | show ID | gate ID | promote ID | rollback
    userrep demo
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from userrep.layout import MANIFEST, POINTER, manifest_path, read_manifest

app = typer.Typer(help="Generalized user representations: data, training, batches, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
world_app = typer.Typer(help="The synthetic music world.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets in the contract (docs/data.md).", no_args_is_help=True)
import_app = typer.Typer(help="Convert real datasets into the contract.", no_args_is_help=True)
features_app = typer.Typer(help="The Feast feature store (feature_repo/).", no_args_is_help=True)
batch_app = typer.Typer(help="Batches: list, show, gate, promote, roll back.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(features_app, name="features")
pipeline_app = typer.Typer(help="Kubeflow pipelines: run embedded, compile, submit.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")
events_app = typer.Typer(help="The durable log of online events.", no_args_is_help=True)
app.add_typer(events_app, name="events")

console = Console(soft_wrap=True)  # status lines stay whole (greppable); tables still fit
errors = Console(stderr=True, soft_wrap=True)


def _error(label: str, message: str) -> None:
    """One error line: the label in red, the message as plain text (never read as markup, so a
    message holding brackets prints as written)."""
    from rich.text import Text

    errors.print(Text.assemble((label, "bold red"), " ", message), highlight=False)


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


@data_app.command("thin")
def data_thin(
    src: Annotated[Path, typer.Argument(help="Dataset directory.")],
    out: Annotated[Path, typer.Argument(help="Output dataset directory.")],
    keep: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of each user's events to keep.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Keep a random share of each user's events (robustness checks on thinner data)."""
    from userrep.importers import thin_dataset

    console.print(f"wrote {_run_or_exit(lambda: thin_dataset(src, out, keep, seed))}")
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
        _error("error", f"{src}: missing source file(s) {missing}")
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
        _error("error", f"{exc}")
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
    average_every: Annotated[int, typer.Option(min=1, help="With N >= 2 workers: 1 = DDP (gradients averaged every "
                                                           "step); k = local SGD (parameters averaged every k steps).")] = 1,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in OUT/checkpoints.")] = False,
    batch_id: Annotated[str | None, typer.Option(help="Batch id; default: derived from data, as_of and settings.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    feast: Annotated[bool, typer.Option(help="Materialize to Feast, train on its point-in-time training set, "
                                             "publish embeddings online.")] = True,
    feast_home: Annotated[Path, typer.Option(help="Feast work dir (offline tables, registry, online store).")] = Path("work/feast"),
    downstream: Annotated[bool, typer.Option(help="Train the downstream task models on this batch.")] = True,
    label_days: Annotated[int, typer.Option(min=1, help="Label window of the downstream tasks (days before as_of).")] = 28,
    tuned: Annotated[Path | None, typer.Option(help="tuned.json from `userrep tune`: its autoencoder and head "
                                                    "settings replace --dim/--epochs (recorded in the manifest).")] = None,
) -> None:
    """Build a batch: features (Feast) -> autoencoder -> backfill -> publish -> downstream models."""
    from userrep.build import BuildConfig, build_batch
    from userrep.downstream import DownstreamConfig
    from userrep.features import FeatureConfig
    from userrep.model import AEConfig
    from userrep.store import StoreConfig
    from userrep.tasks._mlp import HeadConfig

    ae, head, choice = AEConfig(latent=dim, epochs=epochs, seed=seed), HeadConfig(seed=seed), None
    if tuned is not None:
        from userrep.tune import tuned_settings

        if not tuned.is_file():
            _error("error", f"--tuned {tuned}: no such file (write it with `userrep tune`)")
            raise typer.Exit(code=1)
        ae, head, choice = tuned_settings(tuned, seed)
    ae = replace(ae, average_every=average_every)
    config = BuildConfig(features=FeatureConfig(seed=seed), ae=ae, workers=workers, resume=resume,
                         feast=StoreConfig(home=feast_home) if feast else None,
                         downstream=DownstreamConfig(label_days=label_days, head=head, seed=seed) if downstream else None,
                         tuned=choice)
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
    if not manifest_path(batch).exists():
        _error("error", f"--batch {batch}: no {MANIFEST} (not a finished batch)")
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
    ablations: Annotated[bool, typer.Option(help="Also retrain without each feature group (~5 min more on 20k users).")] = False,
    split: Annotated[str, typer.Option(help="auto | time | user-time | random (docs/evaluation.md).")] = "auto",
    seeds: Annotated[int, typer.Option(min=1, help="Repeat with seeds SEED..SEED+N-1; report mean and spread.")] = 1,
    tune: Annotated[bool, typer.Option(help="First choose the autoencoder and head settings on a validation "
                                            "split of the history (userrep tune), then evaluate with them.")] = False,
) -> None:
    """Evaluate the embedding against baselines on downstream tasks; write metrics.json and report.html."""
    from userrep.evaluate import EvalConfig
    from userrep.evaluate import evaluate as run

    config = EvalConfig(cutoff=cutoff, split=split, dim=dim, seed=seed, seeds=seeds, epochs=epochs, top_k=top_k,
                        ablations=ablations)
    if tune:
        from userrep.tune import TuneConfig, tune_dataset, tuned_configs

        tuned = _run_or_exit(lambda: tune_dataset(data, out / "tuned", TuneConfig(seed=seed), split, cutoff,
                                                  log=console.print))
        ae, head = tuned_configs(tuned)
        config = replace(config, dim=ae.latent, epochs=ae.epochs, ae=ae, head=head)
    metrics = _run_or_exit(lambda: run(data, out, config, log=console.print))
    _print_metrics(metrics)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")


@app.command()
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

    record = _run_or_exit(lambda: tune_dataset(data, out, TuneConfig(trials=trials, budget_s=budget, seed=seed), split,
                                               log=console.print))
    table = Table(title=f"{len(record['trials'])} trials, best first ({record['seconds']} s)", title_justify="left")
    for name in record["trials"][0]:
        table.add_column(name, justify="right")
    for trial in record["trials"][:10]:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in trial.values()))
    console.print(table)
    console.print(f"wrote {out / 'tuned.json'}")


def _print_metrics(metrics: dict) -> None:
    """A table per task (value and 95% interval, best per column bold), then the comparisons."""
    from userrep.report import comparison_lines

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
                text = "-" if value is None else f"{value:.4f}" + ("" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")
                cells.append(f"[bold]{text}[/]" if value is not None and value == best[n] else text)
            table.add_row(f"[cyan]{method}[/]" if method.startswith("gur") else method, *cells)
        console.print(table)
    for line in comparison_lines(metrics):
        console.print(line, markup=False, highlight=False)
    for task, reason in metrics["skipped"].items():
        console.print(f"[yellow]skipped[/] {task}: {reason}", highlight=False)


@events_app.command("compact")
def events_compact(
    data: Annotated[Path, typer.Option(help="Dataset the events join (its events.online/ directory).")],
    log: Annotated[str, typer.Option(help="The online service's event log: a SQLite file, or redis://HOST:PORT/STREAM.")] = "work/online/events.sqlite",
) -> None:
    """Append the events logged since the last compaction to the dataset, so the next batch trains on them."""
    from userrep.eventlog import compact

    if not data.is_dir():
        _error("error", f"--data {data}: not a directory")
        raise typer.Exit(code=1)
    done = _run_or_exit(lambda: compact(log, data))
    console.print(f"compacted {done['events']} event(s) (log positions after {done['from']} to {done['to']}) "
                  f"into {data}/events.online ({len(done['parts'])} part(s)); log trimmed through "
                  f"{done['trimmed_through']} (a consumer group still applying holds the rest)")


def _run_or_exit(job):
    """Run a job; contract, id and value problems become a message and exit 1, not a traceback."""
    from userrep.data import DatasetError

    try:
        return job()
    except DatasetError as exc:
        _error("invalid dataset", f"{exc.path}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            errors.print(f"  - {problem}", markup=False, highlight=False)
    except (KeyError, ValueError) as exc:
        _error("error", f"{exc.args[0] if exc.args else exc}")
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


def _store_config(home: Path, online: str, redis: str):
    from userrep.store import StoreConfig

    return _run_or_exit(lambda: StoreConfig(home=home, online=online, redis=redis))


@features_app.command("materialize")
def features_materialize(
    data: Annotated[Path, typer.Option(help="Dataset directory.")],
    as_of: Annotated[str, typer.Option(help="Snapshot time (ISO-8601, UTC): features use events before it.")],
    feast_home: Annotated[Path, typer.Option(help="Feast work dir.")] = Path("work/feast"),
    online: Annotated[str, typer.Option(help="Online store: sqlite (embedded) or redis.")] = "sqlite",
    redis: Annotated[str, typer.Option(help="Redis connection string host:port[,password=...] (--online redis).")] = "127.0.0.1:6379",
) -> None:
    """Fit encoders as of --as-of, write the offline tables, feast apply, materialize online."""
    from userrep.store import materialize

    config = _store_config(feast_home, online, redis)
    snapshot = _run_or_exit(lambda: materialize(data, as_of, config, log=console.print))
    console.print(f"snapshot {snapshot.space_id}: {len(snapshot.user_ids):,} users, encoders in {snapshot.space_dir}")


ROOT_OPTION = Annotated[Path, typer.Option(help=f"Directory holding the batches and {POINTER}.")]


def _batch_call(job):
    from userrep.batches import BatchError

    try:
        return job()
    except BatchError as exc:
        _error("refused", f"{exc}")
        raise typer.Exit(code=1) from None


@batch_app.command("list")
def batch_list(root: ROOT_OPTION = Path("work/batches")) -> None:
    """Every batch with its state (serving, gated, rejected, candidate, incomplete, failed)."""
    from userrep.batches import list_batches

    table = Table(title=f"batches in {root}", title_justify="left")
    for column in ("batch_id", "as_of", "created_at", "users", "state"):
        table.add_column(column)
    for row in list_batches(root):
        style = {"serving": "bold green", "rejected": "red", "failed": "red"}.get(row["state"], "")
        table.add_row(*(str(row[c]) for c in ("batch_id", "as_of", "created_at", "users")),
                      f"[{style}]{row['state']}[/]" if style else row["state"])
    console.print(table)


@batch_app.command("show")
def batch_show(batch_id: Annotated[str, typer.Argument(help="Batch id.")], root: ROOT_OPTION = Path("work/batches")) -> None:
    """Manifest, downstream metrics, gate decision of one batch (JSON)."""
    from userrep.batches import show

    print(json.dumps(_batch_call(lambda: show(root, batch_id)), indent=2))


@batch_app.command("gate")
def batch_gate(
    batch_id: Annotated[str, typer.Argument(help="Candidate batch id.")],
    root: ROOT_OPTION = Path("work/batches"),
    data: Annotated[Path | None, typer.Option(help="Dataset directory; default: the one the batch was built on.")] = None,
) -> None:
    """Measure the candidate against the serving batch, decide, write gate.json and drift_report.html."""
    record = _gate(root, batch_id, data)
    raise typer.Exit(code=0 if record["passed"] else 3)


def _gate(root: Path, batch_id: str, data: Path | None) -> dict:
    from userrep.batches import batch_dir, serving_batch
    from userrep.gate import run_gate
    from userrep.source import EventSource

    candidate = _batch_call(lambda: batch_dir(root, batch_id))
    manifest = read_manifest(candidate)
    serving = serving_batch(root)
    serving_dir = _batch_call(lambda: batch_dir(root, serving)) if serving and serving != batch_id else None
    ds = EventSource(data or manifest["data"]["path"])  # read, and validated, as the gate needs it
    record = _run_or_exit(lambda: run_gate(candidate, serving_dir, ds, log=console.print))
    _print_gate(record)
    return record


def _print_gate(record: dict) -> None:
    verdict = "[bold green]PASS[/]" if record["passed"] else "[bold red]BLOCK[/]"
    table = Table(title=f"gate {record['candidate']} vs serving {record['serving'] or '(none)'}: {verdict}",
                  title_justify="left")
    for column in ("check", "value", "limit", "ok"):
        table.add_column(column)
    for name, check in record["checks"].items():
        value = check["value"]
        if isinstance(value, dict) and "candidate" in value:
            value = f"{value['candidate']:.4f} vs {value['serving']:.4f}"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(name, str(value), str(check["limit"]), "[green]yes[/]" if check["passed"] else "[red]no[/]")
    console.print(table)
    for reason in record["reasons"]:
        console.print(f"[red]blocked:[/] {reason}", highlight=False)


@batch_app.command("promote")
def batch_promote(batch_id: Annotated[str, typer.Argument(help="Batch id.")], root: ROOT_OPTION = Path("work/batches")) -> None:
    """Serve this batch (gate passed, all models present): one atomic pointer switch."""
    from userrep.batches import promote

    pointer = _batch_call(lambda: promote(root, batch_id))
    console.print(f"serving {pointer['serving']} (previous: {pointer['history'][-1] if pointer['history'] else 'none'})")


@batch_app.command("rollback")
def batch_rollback(root: ROOT_OPTION = Path("work/batches")) -> None:
    """Serve the previous batch again."""
    from userrep.batches import rollback

    pointer = _batch_call(lambda: rollback(root))
    console.print(f"serving {pointer['serving']} again (rolled back from {pointer['rolled_back_from']})")


@pipeline_app.command("run")
def pipeline_run(
    data: Annotated[Path, typer.Option(help="Dataset directory.")] = Path("work/world"),
    as_of: Annotated[str, typer.Option(help="Batch cut-off (ISO-8601); default: midnight after the last event.")] = "",
    work: Annotated[Path, typer.Option(help="Work dir: batches/, feast/, kfp/ (pipeline root).")] = Path("work"),
    pipeline: Annotated[str, typer.Option(help="training or refresh.")] = "training",
    dim: Annotated[int, typer.Option(min=2, help="Embedding dimension.")] = 64,
    epochs: Annotated[int, typer.Option(min=1, help="Autoencoder epochs.")] = 20,
    workers: Annotated[int, typer.Option(min=0, help="Ray Train/Data workers (0: in-process, the fastest fit on "
                                                     "one box; bench/fit_throughput.py).")] = 0,
    label_days: Annotated[int, typer.Option(min=1, help="Downstream label window (days).")] = 28,
    ray_address: Annotated[str, typer.Option(help="Ray Job Submission API of a RayCluster (fit runs there).")] = "",
    rayjob: Annotated[str, typer.Option(help="Namespace to create a KubeRay RayJob in for the fit.")] = "",
    tune: Annotated[bool, typer.Option(help="Tune the autoencoder and head settings first (Ray Tune on a validation "
                                            "split of the history; replaces --dim/--epochs; recorded in the manifest).")] = False,
    tune_budget: Annotated[float, typer.Option(min=1, help="Seconds after which the tune step starts no new trial.")] = 180.0,
    events_log: Annotated[str, typer.Option(help="The online event log to compact into the dataset first "
                                                 "(e.g. work/online/events.sqlite); '' skips it.")] = "",
) -> None:
    """Run a pipeline embedded with kfp.local (SubprocessRunner): each step's progress on the console."""
    from pipelines.runner import run_local

    if pipeline not in ("training", "refresh"):
        _error("error", f"--pipeline: expected training or refresh, got {pipeline!r}")
        raise typer.Exit(code=2)
    _validate_or_exit(data)
    params = dict(data=str(data), as_of=as_of, batch_root=str(work / "batches"), feast_home=str(work / "feast"))
    if pipeline == "training":
        params.update(dim=dim, epochs=epochs, workers=workers, label_days=label_days, ray_address=ray_address,
                      rayjob_namespace=rayjob, tune=tune, tune_budget_s=tune_budget,
                      events_log=events_log if events_log.startswith("redis://") or not events_log
                      else str(Path(events_log).resolve()))
    log_path = _pipeline_log(work, pipeline)
    console.print(f"pipeline {pipeline} (kfp.local); full log: {log_path}")
    try:
        outcome = run_local(pipeline, work, log_path=log_path, echo=console.print, **params)
    except RuntimeError as exc:  # kfp.local: a step failed
        _pipeline_failed(exc, log_path)
    if outcome["gate"]:
        _print_gate(outcome["gate"])
    console.print(f"latest batch {outcome['latest']}; serving {outcome['serving']}")


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Directory for training.yaml and refresh.yaml.")] = Path("work/pipelines"),
    image: Annotated[str, typer.Option(help="Container image of every step (the Dockerfile's).")] = "userrep:0.1.0",
) -> None:
    """Compile both pipelines to KFP IR YAML with kfp-kubernetes settings (PVC, Redis secret, resources)."""
    from pipelines.runner import compile_pipelines

    for path in compile_pipelines(out, image):
        console.print(f"wrote {path}")


@pipeline_app.command("submit")
def pipeline_submit(
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines API, e.g. http://localhost:8080.")],
    experiment: Annotated[str, typer.Option(help="Experiment name.")] = "userrep",
    package: Annotated[Path, typer.Option(help="Compiled pipeline (userrep pipeline compile).")] = Path("work/pipelines/training.yaml"),
    param: Annotated[list[str] | None, typer.Option(help="Pipeline parameter KEY=VALUE (repeatable), e.g. "
                                                         "ray_address=http://raycluster-head-svc.ray:8265")] = None,
    namespace: Annotated[str | None, typer.Option(help="Namespace the steps run in (multi-user Kubeflow: the "
                                                       "profile's); the Helm release's namespace.")] = None,
) -> None:
    """Submit a compiled pipeline with kfp.Client and print the run URL."""
    from pipelines.runner import submit

    if not package.exists():
        _error("error", f"--package {package}: not found (run `userrep pipeline compile` first)")
        raise typer.Exit(code=2)
    arguments = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _error("error", f"--param {item!r}: expected KEY=VALUE")
            raise typer.Exit(code=2)
        arguments[key] = int(value) if value.isdigit() else value
    try:
        url = submit(host, package, experiment, arguments, namespace=namespace)
    except Exception as exc:  # connection refused, auth, API errors: say which host, never a traceback
        _error("error", f"--host {host}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        raise typer.Exit(code=1) from None
    console.print(f"run: {url}")


@app.command()
def serve(
    work: Annotated[Path, typer.Option(help="Work dir: batches/, feast/, online/ (event log), bentoml/.")] = Path("work"),
    port: Annotated[int, typer.Option(help="Ray Serve port (embeddings, events).")] = 8000,
    bento_port: Annotated[int, typer.Option(help="BentoML port (recommendations, preferences).")] = 3000,
    feast: Annotated[bool, typer.Option(help="Read and write the Feast online store in WORK/feast.")] = True,
    events_log: Annotated[str, typer.Option(help="Event log: a file (default WORK/online/events.sqlite) or "
                                                 "redis://HOST:PORT/STREAM (Redis with appendonly, fsync always).")] = "",
    replicas: Annotated[int, typer.Option(min=1, help="Ray Serve replicas of the embedding API (they share the "
                                                      "per-user state through the event log).")] = 1,
    ingress: Annotated[str, typer.Option(help="haproxy (Ray Serve's HAProxy ingress; falls back to serve if it "
                                              "does not come up) or serve (Serve's own Python proxy).")] = "haproxy",
) -> None:
    """Serve the promoted batch on 127.0.0.1 until Ctrl-C: Ray Serve + BentoML, reloading on promotion."""
    from serving.launch import INGRESSES, serve_forever
    from userrep.batches import serving_batch

    if ingress not in INGRESSES:
        _error("error", f"--ingress {ingress!r}: expected one of {', '.join(INGRESSES)}")
        raise typer.Exit(code=2)

    if serving_batch(work / "batches") is None:
        _error("error", f"{work / 'batches'}: no batch is serving; run `make demo` first")
        raise typer.Exit(code=2)
    serve_forever(work / "batches", work / "feast" if feast else None, port, bento_port, work, log=console.print,
                  events_log=events_log or None, replicas=replicas, ingress=ingress)


@app.command()
def demo(
    work: Annotated[Path, typer.Option(help="Work directory for generated data and batches.")] = Path("work"),
    users: Annotated[int, typer.Option(min=1, help="Users in the synthetic world.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="Ray workers for training and backfill (0: in-process, the "
                                                     "fastest fit on one box; bench/fit_throughput.py).")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Autoencoder epochs.")] = 20,
    later_days: Annotated[int, typer.Option(min=1, help="Batch 2 sees this many more days of data than batch 1.")] = 30,
    smoke: Annotated[bool, typer.Option(help="End with a serving smoke (start both servers, new user, events).")] = True,
) -> None:
    """The lifecycle on the embedded default: world -> training pipeline for batch 1 (promoted) ->
    training pipeline for batch 2 on later data (gated against batch 1) -> decision and metrics ->
    serve the promoted batch and react to live events."""
    import pandas as pd

    from pipelines.runner import run_local
    from userrep.batches import state
    from userrep.build import dataset_as_of
    from userrep.jobs import FitSpec
    from userrep.world import WorldConfig, generate_world, world_is_current

    config = WorldConfig(users=users, seed=seed)
    world, root = work / "world", work / "batches"
    console.rule("1. synthetic world")
    if world_is_current(config, world):
        console.print(f"[dim]world {world} is current (users={users}, seed={seed}); not regenerating[/]")
    else:
        started = time.perf_counter()
        counts = generate_world(config, world)
        console.print(f"generated {world} in {time.perf_counter() - started:.1f}s: {counts}")
    _validate_or_exit(world)

    end = dataset_as_of(world)
    ids = []
    for step, (label, as_of) in enumerate([("batch 1", end - pd.Timedelta(days=later_days)),
                                           ("batch 2 on later data", end)]):
        spec = FitSpec(data=str(world), batch_root=str(root), as_of=as_of.isoformat(), feast_home=str(work / "feast"),
                       epochs=epochs, workers=workers, seed=seed)
        _, batch_id, _ = spec.batch_dir_and_id()
        ids.append(batch_id)
        console.rule(f"{2 + step}. training pipeline (kfp.local), {label}: as of {as_of:%Y-%m-%d} -> {batch_id}")
        if manifest_path(root / batch_id).exists() and state(root, batch_id) in ("serving", "previous", "rejected"):
            console.print(f"[dim]batch {batch_id} already ran through the pipeline ({state(root, batch_id)}); "
                          f"not rerunning[/]")
            continue
        started, log_path = time.perf_counter(), _pipeline_log(work, f"training-{batch_id}")
        try:
            outcome = run_local("training", work, log_path=log_path, echo=console.print, data=str(world),
                                as_of=as_of.isoformat(), batch_root=str(root), feast_home=str(work / "feast"),
                                epochs=epochs, workers=workers)
        except RuntimeError as exc:
            _pipeline_failed(exc, log_path)
        console.print(f"pipeline finished in {time.perf_counter() - started:.0f}s; serving {outcome['serving']}; "
                      f"full log: {log_path}")

    console.rule("4. gate decision for batch 2 and downstream metrics of both batches")
    gate_path = root / ids[1] / "gate.json"
    if gate_path.exists():
        _print_gate(json.loads(gate_path.read_text()))
    _print_downstream(root, ids)
    batch_list(root)
    console.print(f"reports: {root}/<batch>/drift_report.html (Evidently), gate.json; KFP run artifacts under "
                  f"{work}/kfp; rollback: userrep batch rollback --root {root}")
    if smoke:
        console.rule("5. serve the promoted batch (Ray Serve + BentoML) and react to live events")
        _smoke(work, world)


def _pipeline_log(work: Path, name: str) -> Path:
    return work / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _pipeline_failed(exc: Exception, log_path: Path):
    """A step failed: its last lines (the error) and where the whole log is."""
    tail = log_path.read_text(errors="replace").splitlines()[-25:] if log_path.exists() else []
    console.print("\n".join(tail), markup=False, highlight=False)
    _error("pipeline failed", f"{str(exc).splitlines()[0]} (full log: {log_path})")
    raise typer.Exit(code=1) from None


def _smoke(work: Path, world: Path) -> None:
    import pyarrow.compute as pc

    from serving.smoke import run_smoke
    from userrep.batches import batch_dir, serving_batch
    from userrep.data import artist_column, load_dataset
    from userrep.downstream import load_head

    root = work / "batches"
    serving = batch_dir(root, serving_batch(root))
    _, meta = load_head(serving / "downstream" / "future_listening.pt")
    artists = meta["artists"]
    items = load_dataset(world).items
    listened = artists[min(50, len(artists) - 1)]  # a mid-popularity artist the newcomer did not pick
    tracks = items.filter(pc.equal(items.column(artist_column(items)), listened)).column("item_id").to_pylist()[:5]
    as_of = read_manifest(serving)["as_of"]
    try:
        run_smoke(work, artists[:2], tracks, as_of, log=console.print)
    except (AssertionError, RuntimeError, TimeoutError) as exc:
        _error("serving smoke failed", f"{exc}")
        raise typer.Exit(code=1) from None


def _print_downstream(root: Path, ids: list[str]) -> None:
    from userrep.batches import show

    table = Table(title="downstream models (validation on the batch's own label window)", title_justify="left")
    table.add_column("task / metric")
    for batch_id in ids:
        table.add_column(batch_id, justify="right")
    infos = [show(root, b)["downstream"] if manifest_path(root / b).exists() else {} for b in ids]
    keys = sorted({(t, m) for info in infos for t, values in info.items() for m in values})
    for task, metric in keys:
        table.add_row(f"{task} {metric}", *(f"{info.get(task, {}).get(metric, float('nan')):.4f}" for info in infos))
    console.print(table)


if __name__ == "__main__":
    app()
