"""Shared by the command modules: the consoles, error reporting (bad input is one line, a bug keeps its traceback), the dataset check and its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from userrep.batch.layout import POINTER

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
        (
            "users with events",
            f"{summary['users_with_events']:,} (median {summary['events_per_user_median']:.0f} events)",
        ),
        ("items", f"{summary['items']:,} ({summary['items_with_events']:,} played)"),
        ("artists / genres", f"{summary['artists']:,} / {summary['genres']:,}"),
        (
            "time range (UTC)",
            f"{_short_ts(summary['ts_min'])} .. {_short_ts(summary['ts_max'])} ({summary['distinct_ts']:,} distinct)",
        ),
        (
            "users table",
            f"{summary['users_table']:,} rows"
            + (f", {summary['users_without_events']:,} without events" if summary["users_table"] else ""),
        ),
        ("pairs", f"{summary['pairs']:,}"),
    ]
    if summary.get("attributes"):
        rows.append(("attributes", ", ".join(f"{k} ({v})" for k, v in summary["attributes"].items())))
    rows.append(
        (
            "coverage",
            ", ".join(f"{k} {v:.0%}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["coverage"].items()),
        )
    )
    rows += [("note", note) for note in summary["notes"]]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _run_or_exit(job):
    """Run a job; contract, id and value problems become a message and exit 1, not a traceback.
    Anything else (a KeyError, a TypeError) is a bug and keeps its traceback."""
    from userrep.data import DatasetError

    try:
        return job()
    except DatasetError as exc:
        _error("invalid dataset", f"{exc.path}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            errors.print(f"  - {problem}", markup=False, highlight=False)
    except ValueError as exc:
        _error("error", f"{exc.args[0] if exc.args else exc}")
    raise typer.Exit(code=1)


ROOT_OPTION = Annotated[Path, typer.Option(help=f"Directory holding the batches and {POINTER}.")]


def _batch_call(job):
    from userrep.batch.registry import BatchError

    try:
        return job()
    except BatchError as exc:
        _error("refused", f"{exc}")
        raise typer.Exit(code=1) from None
