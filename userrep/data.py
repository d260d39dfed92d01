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
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

TABLES = ("events", "items", "users", "pairs")
REQUIRED_TABLES = ("events", "items")
REQUIRED_COLUMNS = {
    "events": ("user_id", "item_id", "ts"),
    "items": ("item_id",),
    "users": ("user_id",),
    "pairs": ("user_a", "user_b"),
}
# Columns read as strings whatever their file type says ("2" and 2 are the same id).
STRING_COLUMNS = {
    "events": ("user_id", "item_id"),
    "items": ("item_id", "artist_id", "name", "genres"),
    "users": ("user_id", "onboarding_artists", "onboarding_genres"),
    "pairs": ("user_a", "user_b"),
}
KNOWN_COLUMNS = {
    "events": ("user_id", "item_id", "ts", "weight"),
    "items": ("item_id", "artist_id", "name", "genres"),
    "users": ("user_id", "signup_ts", "onboarding_artists", "onboarding_genres"),
    "pairs": ("user_a", "user_b"),
}
LIST_SEPARATOR = "|"
CONTENT_PREFIX = "content_"
TS_TYPE = pa.timestamp("us", tz="UTC")
EVENT_COLUMNS = ["user_id", "item_id", "ts", "weight"]
EVENT_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("ts", TS_TYPE), ("weight", pa.float64())]
)
# Epoch seconds outside this range are almost always milliseconds or garbage.
_MIN_TS = pd.Timestamp("1970-01-01", tz="UTC")
_MAX_TS = pd.Timestamp("2100-01-01", tz="UTC")
_SHOW_ROWS = 5
EVENT_BATCH_ROWS = 1 << 20  # events normalized at a time (load_dataset's peak is about the table plus one batch)


@dataclass(frozen=True)
class Problem:
    """One contract violation: where it is and the first offending rows (1-based data rows)."""

    file: str
    column: str | None
    message: str
    rows: tuple[int, ...] = ()
    values: tuple[str, ...] = ()
    count: int = 0

    def __str__(self) -> str:
        where = f"{self.file}: column '{self.column}'" if self.column else self.file
        text = f"{where}: {self.message}"
        if self.rows:
            shown = ", ".join(f"row {r} ({v!r})" for r, v in zip(self.rows, self.values))
            text += f" [{self.count} bad row(s); first: {shown}]"
        return text


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


def artist_column(items: pa.Table) -> str:
    """Artists are items grouped by ``artist_id``; without it every item is its own artist."""
    return "artist_id" if "artist_id" in items.column_names else "item_id"


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
    known = {f"{n}{s}" for n in TABLES for s in (".parquet", ".csv")}
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
        tables[name], table_problems, table_notes = _normalize(name, files[name], table)
        problems += table_problems
        notes += table_notes
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
            directory, files["events"], catalog, keep, collect_users="pairs" in tables
        )
        problems += event_problems
        notes += event_notes
    if ids_are_text:  # else the type problems say it all
        problems += _check_references(tables, files, users_seen)
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


def _read_events(directory: Path, file: str, catalog: pa.Array | None, keep, collect_users: bool):
    """Read, normalize and check the events batch by batch, so the checks' temporary copies are one
    batch's, not the whole table's; problems name each file's own row numbers. Returns (the
    events ``keep`` held, or None after a problem; the distinct user ids when ``collect_users``;
    problems; notes). ``catalog``: the item ids every event must reference (None: not checked)."""
    problems: list[Problem] = []
    notes: list[str] = []
    held: list[pa.Table] = []
    users: list[pa.Array] = []
    for name, batches in _event_sources(directory, file):
        offset = 0
        try:
            for batch in batches:
                missing = [c for c in REQUIRED_COLUMNS["events"] if c not in batch.column_names]
                if missing:
                    problems += [Problem(name, c, f"required column '{c}' is missing") for c in missing]
                    break
                table, found, batch_notes = _normalize("events", name, batch)
                if catalog is not None and not any(p.column == "item_id" for p in found):
                    bad = ~_mask(pc.is_in(table.column("item_id"), value_set=catalog))
                    if bad.any():
                        found.append(_problem(name, "item_id", "unknown item_id (not in items)", table, bad))
                problems += [replace(p, rows=tuple(r + offset for r in p.rows)) for p in found]
                notes += [n for n in batch_notes if n not in notes]
                offset += batch.num_rows
                if problems:  # the load fails: nothing more is held or passed on
                    continue
                table = table.select(EVENT_COLUMNS).cast(EVENT_SCHEMA)
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
        return None, None, _merged(problems), notes
    events = pa.concat_tables(held) if held else EVENT_SCHEMA.empty_table()
    seen = pc.unique(pa.chunked_array(users, pa.string())) if collect_users else None
    return events, seen, [], notes


def _merged(problems: list[Problem]) -> list[Problem]:
    """One problem per (file, column, message), counts summed, the first rows shown."""
    merged: dict[tuple, Problem] = {}
    for p in problems:
        key = (p.file, p.column, p.message)
        if key in merged:
            q = merged[key]
            merged[key] = replace(
                q,
                rows=(q.rows + p.rows)[:_SHOW_ROWS],
                values=(q.values + p.values)[:_SHOW_ROWS],
                count=q.count + p.count,
            )
        else:
            merged[key] = p
    return list(merged.values())


def split_list(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``'a|b'`` -> ``['a', 'b']`` (nulls and empty strings -> empty list)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    filled = pc.fill_null(column, "")
    lists = pc.split_pattern(pc.utf8_trim_whitespace(filled), LIST_SEPARATOR)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    keep = pc.not_equal(flat, "")
    parents = pc.list_parent_indices(lists)
    counts = np.bincount(parents.to_numpy()[keep.to_numpy(zero_copy_only=False)], minlength=len(lists))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pc.filter(flat, keep))


def _problem(file: str, column: str, message: str, table: pa.Table, bad: np.ndarray) -> Problem:
    """A problem for the rows where ``bad`` is true, showing the first few values."""
    idx = np.flatnonzero(bad)
    shown = idx[:_SHOW_ROWS]
    values = table.column(column).take(pa.array(shown)).to_pylist() if len(shown) else []
    return Problem(file, column, message, tuple(int(i) + 1 for i in shown), tuple(str(v) for v in values), len(idx))


def _mask(array) -> np.ndarray:
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _normalize(name: str, file: str, table: pa.Table) -> tuple[pa.Table, list[Problem], list[str]]:
    problems: list[Problem] = []
    notes: list[str] = []
    cols = {c: table.column(c) for c in table.column_names}

    for col in STRING_COLUMNS[name]:
        if col not in cols:
            continue
        kind = cols[col].type
        kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (
            pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_integer(kind)
            or pa.types.is_null(kind)
        ):
            problems.append(Problem(file, col, f"must be text or integer ids, got {kind}"))
            continue
        cols[col] = cols[col].cast(pa.string())
    table = pa.table(cols)

    key_columns = [c for c in REQUIRED_COLUMNS[name] if c != "ts"]
    for col in key_columns:
        if any(p.column == col for p in problems):
            continue
        bad = _mask(pc.or_kleene(pc.is_null(cols[col]), pc.equal(pc.utf8_trim_whitespace(cols[col]), "")))
        if bad.any():
            problems.append(_problem(file, col, "missing id (null or empty)", table, bad))

    if name == "events":
        cols["ts"], ts_problem = _parse_ts(file, "ts", table, allow_null=False)
        problems += [ts_problem] if ts_problem else []
        if "weight" in cols:
            cols["weight"], weight_problem = _parse_weight(file, table)
            problems += [weight_problem] if weight_problem else []
        else:
            cols["weight"] = pa.chunked_array([np.ones(table.num_rows)], pa.float64())
    if name == "users" and "signup_ts" in cols:
        cols["signup_ts"], ts_problem = _parse_ts(file, "signup_ts", table, allow_null=True)
        problems += [ts_problem] if ts_problem else []
    if name == "items":
        for col in [c for c in cols if c.startswith(CONTENT_PREFIX)]:
            if not (
                pa.types.is_integer(cols[col].type)
                or pa.types.is_floating(cols[col].type)
                or pa.types.is_null(cols[col].type)
            ):
                problems.append(Problem(file, col, f"content columns must be numeric, got {cols[col].type}"))
                continue
            cols[col] = cols[col].cast(pa.float64())
            values = cols[col].to_numpy()
            bad = ~np.isfinite(values) & ~np.isnan(values)
            if bad.any():
                problems.append(
                    _problem(file, col, "must be finite (inf found; leave missing values empty)", table, bad)
                )
    if name == "users":
        for col in (c for c in cols if c not in KNOWN_COLUMNS["users"]):
            cols[col] = cols[col].cast(pa.string())
    if name in ("items", "users"):
        bad = _duplicates(cols[key_columns[0]])
        if bad.any() and not any(p.column == key_columns[0] for p in problems):
            problems.append(_problem(file, key_columns[0], "duplicate key", table, bad))
    if name == "pairs" and not problems:
        bad = _mask(pc.equal(cols["user_a"], cols["user_b"]))
        if bad.any():
            problems.append(_problem(file, "user_a", "a user paired with itself", table, bad))

    if name != "users":  # users keep every column: the unknown ones are attributes

        def kept(c: str) -> bool:
            return c in KNOWN_COLUMNS[name] or (name == "items" and c.startswith(CONTENT_PREFIX))

        ignored = [c for c in cols if not kept(c)]
        if ignored:
            notes.append(f"{file}: ignored columns {ignored}")
        cols = {c: v for c, v in cols.items() if kept(c)}
    return pa.table(cols), problems, notes


def _duplicates(column: pa.ChunkedArray) -> np.ndarray:
    """True for every row whose value occurs more than once."""
    values = column.to_pandas()
    return values.duplicated(keep=False).to_numpy()


def _parse_ts(file: str, column: str, table: pa.Table, *, allow_null: bool):
    """Timestamps: parquet timestamp/date, epoch seconds (numbers) or ISO-8601 text, all -> UTC."""
    raw = table.column(column)
    kind = raw.type
    if pa.types.is_timestamp(kind):
        # Arrow-native: naive timestamps are taken as UTC, aware ones keep their instant.
        parsed = pc.cast(raw, TS_TYPE, safe=False)
        bad = _mask(
            pc.or_(pc.less(parsed, pa.scalar(_MIN_TS, TS_TYPE)), pc.greater_equal(parsed, pa.scalar(_MAX_TS, TS_TYPE)))
        )
        if not allow_null:
            bad |= _mask(pc.is_null(raw))
        if bad.any():
            return parsed, _problem(file, column, "null or out-of-range timestamp (1970..2100)", table, bad)
        return parsed, None
    if pa.types.is_date(kind):
        series = pd.to_datetime(raw.to_pandas(), utc=True)
        bad_parse = np.zeros(len(series), dtype=bool)
    else:
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind):
            numeric = raw.cast(pa.float64()).to_pandas()
            text = pd.Series([None] * len(numeric), dtype=object)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            text = raw.to_pandas()
            numeric = pd.to_numeric(text, errors="coerce")
        else:
            return raw, Problem(file, column, f"must be a timestamp, epoch seconds or ISO-8601 text, got {kind}")
        numeric = numeric.where(np.isfinite(numeric.to_numpy(dtype=float, na_value=np.nan)))
        in_range = numeric.between(_MIN_TS.timestamp(), _MAX_TS.timestamp())
        # Only the in-range numbers are converted: pandas' unit conversion of a column holding NaN
        # raised "overflow encountered in multiply" now and then (ISO-text timestamps in parquet).
        from_epoch = pd.Series(pd.NaT, index=numeric.index, dtype="datetime64[ns, UTC]")
        if in_range.any():
            from_epoch[in_range] = pd.to_datetime(numeric[in_range], unit="s", utc=True)
        from_text = pd.to_datetime(text.where(numeric.isna()), utc=True, errors="coerce", format="ISO8601")
        series = from_epoch.fillna(from_text)
        bad_parse = (series.isna() & (text.notna() | numeric.notna())).to_numpy()
    bad = bad_parse | ((series < _MIN_TS) | (series >= _MAX_TS)).to_numpy()
    if not allow_null:
        bad |= _mask(pc.is_null(raw))
    parsed = pa.chunked_array([pa.array(series.dt.as_unit("us"), type=TS_TYPE)])
    if bad.any():
        hint = "expected ISO-8601 text or epoch seconds between 1970 and 2100"
        return parsed, _problem(file, column, f"unparseable or out-of-range timestamp ({hint})", table, bad)
    return parsed, None


def _parse_weight(file: str, table: pa.Table):
    raw = table.column("weight")
    if pa.types.is_integer(raw.type) or pa.types.is_floating(raw.type):
        values = raw.cast(pa.float64()).to_numpy()
    elif pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type):
        values = pd.to_numeric(raw.to_pandas(), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    else:
        return raw, Problem(file, "weight", f"must be a number >= 0, got {raw.type}")
    weights = pa.chunked_array([pa.array(values, pa.float64())])
    bad_nan = ~np.isfinite(values)
    if bad_nan.any():
        return weights, _problem(
            file, "weight", "must be a finite number (missing, text, NaN or inf found)", table, bad_nan
        )
    negative = values < 0
    if negative.any():
        return weights, _problem(file, "weight", "negative weight (must be >= 0)", table, negative)
    return weights, None


def _check_references(tables: dict[str, pa.Table], files: dict[str, str], users_seen: pa.Array | None) -> list[Problem]:
    """Foreign keys besides events -> items (checked per batch): pairs -> known users (``users_seen``:
    the events' users, None when the events could not be read), onboarding artists -> catalog."""
    problems = []
    if "pairs" in tables and users_seen is not None:
        known_users = users_seen
        if "users" in tables:
            known_users = pc.unique(pa.concat_arrays([known_users, tables["users"].column("user_id").combine_chunks()]))
        pairs = tables["pairs"]
        for col in ("user_a", "user_b"):
            bad = ~_mask(pc.is_in(pairs.column(col), value_set=known_users))
            if bad.any():
                problems.append(_problem(files["pairs"], col, "unknown user (not in events or users)", pairs, bad))
    users, items = tables.get("users"), tables.get("items")
    if users is not None and items is not None and "onboarding_artists" in users.column_names:
        artist_col = artist_column(items)
        lists = split_list(users.column("onboarding_artists"))
        flat_bad = ~_mask(pc.is_in(lists.flatten(), value_set=pc.unique(items.column(artist_col).combine_chunks())))
        if flat_bad.any():
            parents = pc.list_parent_indices(lists).to_numpy()
            bad = np.zeros(users.num_rows, dtype=bool)
            bad[parents[flat_bad]] = True
            problems.append(
                _problem(
                    files["users"], "onboarding_artists", f"unknown artist (not an items.{artist_col})", users, bad
                )
            )
    return problems


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
            (~_mask(pc.is_in(ds.users.column("user_id"), value_set=events.column("user_id").combine_chunks()))).sum()
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
