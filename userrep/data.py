"""The dataset contract: load, normalize and validate a dataset directory.

A dataset is a directory holding one file per table, ``NAME.parquet`` or ``NAME.csv``
(see docs/data.md). ``load_dataset`` reads every table columnar (pyarrow), normalizes
types (ids -> string, ``ts`` -> timestamp[us, UTC], ``weight`` -> float64) and collects
*every* problem before raising one ``DatasetError`` that names file, column and the
first bad rows. Nothing is dropped silently: a row is either accepted as-is or reported.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from userrep.contract import (
    CONTENT_PREFIX,
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    KNOWN_COLUMNS,
    REQUIRED_COLUMNS,
    REQUIRED_TABLES,
    STRING_COLUMNS,
    TABLES,
    Problem,
    artist_column,
    check_references,
    merged_problems,
    normalize,
    row_problem,
    split_list,
    true_mask,
)
from userrep.erasure import ERASURES, USER_COLUMNS, drop_erased, read_erasures

EVENT_BATCH_ROWS = 1 << 20  # events normalized at a time (load_dataset's peak is about the table plus one batch)


class DatasetError(ValueError):
    """Raised by ``load_dataset`` with every problem found, not only the first."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"dataset {self.path} is invalid ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class Dataset:
    """A validated dataset. Tables are pyarrow Tables with normalized column types."""

    path: Path
    events: pa.Table
    items: pa.Table
    users: pa.Table | None = None
    pairs: pa.Table | None = None
    notes: tuple[str, ...] = ()

    @property
    def content_columns(self) -> list[str]:
        return [c for c in self.items.column_names if c.startswith(CONTENT_PREFIX)]

    @property
    def attribute_columns(self) -> list[str]:
        """Categorical user attributes: every users column the contract does not name."""
        if self.users is None:
            return []
        return [c for c in self.users.column_names if c not in KNOWN_COLUMNS["users"]]

    @property
    def artist_column(self) -> str:
        return artist_column(self.items)


def table_path(directory: Path, name: str) -> Path | None:
    """The file holding table ``name`` in ``directory`` (parquet preferred), or None."""
    for suffix in (".parquet", ".csv"):
        candidate = Path(directory) / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    return None


def read_table(path: Path, name: str) -> pa.Table:
    """Read one table file columnar; id-like columns are forced to string for CSV."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path)
    with open(path, newline="", encoding="utf-8") as fh:  # header only; the body is read once, below
        header = next(csv.reader(fh), [])
    forced = {c: pa.string() for c in STRING_COLUMNS.get(name, ()) if c in header}
    if name == "users":  # categorical attributes are labels, never numbers
        forced.update({c: pa.string() for c in header if c not in KNOWN_COLUMNS["users"]})
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=forced))


def load_dataset(directory: str | Path, keep: Callable[[pa.Table], pa.Table | None] | None = None) -> Dataset:
    """Load, normalize and validate a dataset directory.

    ``keep``: called with each normalized, checked batch of events (the events file's batches,
    then those of the online parts compacted into it); it returns the rows the ``Dataset`` holds
    (None: none of them). Every row is validated whatever it returns, so a step that needs only
    some users' events, only the latest time, or writes the events elsewhere (``userrep.
    partitions``) reads a dataset of any size without holding it. Default: every event.

    Raises:
        DatasetError: listing every problem (file, column, first bad rows).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(directory, [Problem(str(directory), None, "not a directory")])
    problems: list[Problem] = []
    notes: list[str] = []
    tables: dict[str, pa.Table] = {}
    files: dict[str, str] = {}
    erased = read_erasures(directory)  # users erased from this dataset (``userrep.erasure``): left out
    for name in TABLES:
        if (directory / f"{name}.parquet").exists() and (directory / f"{name}.csv").exists():
            problems.append(Problem(f"{name}.*", None, f"both {name}.parquet and {name}.csv exist; keep one"))
            continue
        path = table_path(directory, name)
        if path is None:
            if name in REQUIRED_TABLES:
                problems.append(Problem(f"{name}.parquet|csv", None, f"required table '{name}' is missing"))
            continue
        files[name] = path.name
        if name == "events":  # the big one: streamed batch by batch (below)
            continue
        try:
            tables[name] = read_table(path, name)
        except (pa.ArrowInvalid, OSError) as exc:
            problems.append(Problem(path.name, None, f"cannot be read: {exc}"))
    known = {f"{n}{s}" for n in TABLES for s in (".parquet", ".csv")} | {ERASURES}
    for extra in sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in known):
        notes.append(f"ignored {extra} (not a contract table)")

    for name, table in list(tables.items()):
        missing = [c for c in REQUIRED_COLUMNS[name] if c not in table.column_names]
        for col in missing:
            problems.append(Problem(files[name], col, f"required column '{col}' is missing"))
        if missing:
            del tables[name]
            continue
        if table.num_rows == 0 and name in REQUIRED_TABLES:
            problems.append(Problem(files[name], None, f"table '{name}' has no rows"))
        tables[name], table_problems, table_notes = normalize(name, files[name], table)
        problems += table_problems
        notes += table_notes
        if name in USER_COLUMNS and not table_problems:
            tables[name], dropped = drop_erased(tables[name], erased, USER_COLUMNS[name])
            notes += [f"{files[name]}: left out {dropped} row(s) of erased users ({ERASURES})"] if dropped else []
    ids_are_text = all(
        pa.types.is_string(t.schema.field(c).type)
        for name, t in tables.items()
        for c in STRING_COLUMNS[name]
        if c in t.column_names
    )
    catalog = tables["items"].column("item_id").combine_chunks() if "items" in tables and ids_are_text else None

    events, users_seen = None, None
    if "events" in files:
        events, users_seen, event_problems, event_notes = _read_events(
            directory, files["events"], catalog, keep, collect_users="pairs" in tables, erased=erased
        )
        problems += event_problems
        notes += event_notes
    if ids_are_text:  # else the type problems say it all
        problems += check_references(tables, files, users_seen)
    if problems:
        raise DatasetError(directory, problems)
    return Dataset(
        path=directory,
        events=events,
        items=tables["items"],
        users=tables.get("users"),
        pairs=tables.get("pairs"),
        notes=tuple(notes),
    )


def _event_batches(path: Path, rows: int, columns: list[str] | None = None):
    """An events file in batches of ``rows``: parquet streamed row group by row group; CSV read
    whole first (a streaming CSV reader fixes column types from its first block, and a later
    block that disagrees fails the read)."""
    if path.suffix == ".parquet":
        parquet = pq.ParquetFile(path)
        empty = True
        for batch in parquet.iter_batches(batch_size=rows, columns=columns):
            empty = False
            yield pa.Table.from_batches([batch])
        if empty:
            yield parquet.schema_arrow.empty_table()
        return
    table = read_table(path, "events")
    yield from (pa.Table.from_batches([b], table.schema) for b in table.to_batches(rows)) if table.num_rows else [table]


def _event_sources(directory: Path, file: str):
    """(file name, its batches): the events file, then the online events compacted into the
    dataset (``events.online/``, ``userrep.eventlog``), each part checked by the same rules."""
    from userrep.eventlog import part_files

    yield file, _event_batches(directory / file, EVENT_BATCH_ROWS)
    for path in part_files(directory):
        yield str(path.relative_to(directory)), _event_batches(path, EVENT_BATCH_ROWS, EVENT_COLUMNS)


def _read_events(directory: Path, file: str, catalog: pa.Array | None, keep, collect_users: bool, erased=()):
    """Read, normalize and check the events batch by batch, so the checks' temporary copies are one
    batch's, not the whole table's; problems name each file's own row numbers. Returns (the
    events ``keep`` held, or None after a problem; the distinct user ids when ``collect_users``;
    problems; notes). ``catalog``: the item ids every event must reference (None: not checked);
    ``erased``: hashes of erased users, whose events are left out (counted in a note)."""
    problems: list[Problem] = []
    notes: list[str] = []
    held: list[pa.Table] = []
    users: list[pa.Array] = []
    left_out = 0
    for name, batches in _event_sources(directory, file):
        offset = 0
        try:
            for batch in batches:
                missing = [c for c in REQUIRED_COLUMNS["events"] if c not in batch.column_names]
                if missing:
                    problems += [Problem(name, c, f"required column '{c}' is missing") for c in missing]
                    break
                table, found, batch_notes = normalize("events", name, batch)
                if catalog is not None and not any(p.column == "item_id" for p in found):
                    bad = ~true_mask(pc.is_in(table.column("item_id"), value_set=catalog))
                    if bad.any():
                        found.append(row_problem(name, "item_id", "unknown item_id (not in items)", table, bad))
                problems += [replace(p, rows=tuple(r + offset for r in p.rows)) for p in found]
                notes += [n for n in batch_notes if n not in notes]
                offset += batch.num_rows
                if problems:  # the load fails: nothing more is held or passed on
                    continue
                table, dropped = drop_erased(table.select(EVENT_COLUMNS).cast(EVENT_SCHEMA), erased, ["user_id"])
                left_out += dropped
                if collect_users:
                    users.append(pc.unique(table.column("user_id")))
                kept = table if keep is None else keep(table)
                if kept is not None and kept.num_rows:
                    held.append(kept)
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            problems.append(Problem(name, None, f"cannot be read: {exc}"))
            continue
        if offset == 0 and name == file and not any(p.file == file for p in problems):
            problems.append(Problem(file, None, "table 'events' has no rows"))
    if problems:
        return None, None, merged_problems(problems), notes
    notes += [f"events: left out {left_out} row(s) of erased users ({ERASURES})"] if left_out else []
    events = pa.concat_tables(held) if held else EVENT_SCHEMA.empty_table()
    seen = pc.unique(pa.chunked_array(users, pa.string())) if collect_users else None
    return events, seen, [], notes


def summarize(ds: Dataset) -> dict:
    """A one-screen summary: counts, time range, coverage of optional columns."""
    events, items = ds.events, ds.items
    per_user = pc.value_counts(events.column("user_id").combine_chunks()).field("counts").to_numpy()
    ts_min, ts_max = pc.min_max(events.column("ts")).values()
    users_total = pc.count_distinct(events.column("user_id")).as_py()
    summary = {
        "path": str(ds.path),
        "events": events.num_rows,
        "total_weight": float(pc.sum(events.column("weight")).as_py() or 0.0),
        "users_with_events": users_total,
        "events_per_user_median": float(np.median(per_user)) if len(per_user) else 0.0,
        "items": items.num_rows,
        "items_with_events": pc.count_distinct(events.column("item_id")).as_py(),
        "artists": pc.count_distinct(items.column(ds.artist_column)).as_py(),
        "ts_min": ts_min.as_py().isoformat() if ts_min.is_valid else None,
        "ts_max": ts_max.as_py().isoformat() if ts_max.is_valid else None,
        "distinct_ts": pc.count_distinct(events.column("ts")).as_py(),
        "coverage": {
            "items.artist_id": _coverage(items, "artist_id"),
            "items.genres": _coverage(items, "genres"),
            "items.content_*": len(ds.content_columns),
        },
        "genres": len(_vocabulary(items, "genres")),
        "users_table": ds.users.num_rows if ds.users is not None else 0,
        "pairs": ds.pairs.num_rows if ds.pairs is not None else 0,
        "notes": list(ds.notes),
    }
    if ds.users is not None:
        for col in ("signup_ts", "onboarding_artists", "onboarding_genres"):
            summary["coverage"][f"users.{col}"] = _coverage(ds.users, col)
        summary["attributes"] = {c: pc.count_distinct(ds.users.column(c)).as_py() for c in ds.attribute_columns}
        summary["users_without_events"] = int(
            (
                ~true_mask(pc.is_in(ds.users.column("user_id"), value_set=events.column("user_id").combine_chunks()))
            ).sum()
        )
    return summary


def _coverage(table: pa.Table, column: str) -> float:
    """Share of rows with a non-empty value (0 when the column is absent)."""
    if column not in table.column_names or table.num_rows == 0:
        return 0.0
    col = table.column(column)
    present = pc.invert(pc.is_null(col))
    if pa.types.is_string(col.type):
        present = pc.and_(present, pc.not_equal(pc.fill_null(col, ""), ""))
    return round(float(pc.sum(present.cast(pa.int64())).as_py()) / table.num_rows, 4)


def _vocabulary(table: pa.Table, column: str) -> list[str]:
    if column not in table.column_names:
        return []
    return sorted(pc.unique(split_list(table.column(column)).flatten()).to_pylist())
