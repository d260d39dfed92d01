"""The data contract's rules: the tables and columns a dataset may hold, their types, and the
checks that normalize each table and report every violation (``Problem``) by file, column and row.
``userrep.data`` reads the files and applies them; docs/data.md describes the contract."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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


def artist_column(items: pa.Table) -> str:
    """Artists are items grouped by ``artist_id``; without it every item is its own artist."""
    return "artist_id" if "artist_id" in items.column_names else "item_id"


def merged_problems(problems: list[Problem]) -> list[Problem]:
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


def row_problem(file: str, column: str, message: str, table: pa.Table, bad: np.ndarray) -> Problem:
    """A problem for the rows where ``bad`` is true, showing the first few values."""
    idx = np.flatnonzero(bad)
    shown = idx[:_SHOW_ROWS]
    values = table.column(column).take(pa.array(shown)).to_pylist() if len(shown) else []
    return Problem(file, column, message, tuple(int(i) + 1 for i in shown), tuple(str(v) for v in values), len(idx))


def true_mask(array) -> np.ndarray:
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def normalize(name: str, file: str, table: pa.Table) -> tuple[pa.Table, list[Problem], list[str]]:
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
        bad = true_mask(pc.or_kleene(pc.is_null(cols[col]), pc.equal(pc.utf8_trim_whitespace(cols[col]), "")))
        if bad.any():
            problems.append(row_problem(file, col, "missing id (null or empty)", table, bad))

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
                    row_problem(file, col, "must be finite (inf found; leave missing values empty)", table, bad)
                )
    if name == "users":
        for col in (c for c in cols if c not in KNOWN_COLUMNS["users"]):
            cols[col] = cols[col].cast(pa.string())
    if name in ("items", "users"):
        bad = _duplicates(cols[key_columns[0]])
        if bad.any() and not any(p.column == key_columns[0] for p in problems):
            problems.append(row_problem(file, key_columns[0], "duplicate key", table, bad))
    if name == "pairs" and not problems:
        bad = true_mask(pc.equal(cols["user_a"], cols["user_b"]))
        if bad.any():
            problems.append(row_problem(file, "user_a", "a user paired with itself", table, bad))

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
        bad = true_mask(
            pc.or_(pc.less(parsed, pa.scalar(_MIN_TS, TS_TYPE)), pc.greater_equal(parsed, pa.scalar(_MAX_TS, TS_TYPE)))
        )
        if not allow_null:
            bad |= true_mask(pc.is_null(raw))
        if bad.any():
            return parsed, row_problem(file, column, "null or out-of-range timestamp (1970..2100)", table, bad)
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
        bad |= true_mask(pc.is_null(raw))
    parsed = pa.chunked_array([pa.array(series.dt.as_unit("us"), type=TS_TYPE)])
    if bad.any():
        hint = "expected ISO-8601 text or epoch seconds between 1970 and 2100"
        return parsed, row_problem(file, column, f"unparseable or out-of-range timestamp ({hint})", table, bad)
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
        return weights, row_problem(
            file, "weight", "must be a finite number (missing, text, NaN or inf found)", table, bad_nan
        )
    negative = values < 0
    if negative.any():
        return weights, row_problem(file, "weight", "negative weight (must be >= 0)", table, negative)
    return weights, None


def check_references(tables: dict[str, pa.Table], files: dict[str, str], users_seen: pa.Array | None) -> list[Problem]:
    """Foreign keys besides events -> items (checked per batch): pairs -> known users (``users_seen``:
    the events' users, None when the events could not be read), onboarding artists -> catalog."""
    problems = []
    if "pairs" in tables and users_seen is not None:
        known_users = users_seen
        if "users" in tables:
            known_users = pc.unique(pa.concat_arrays([known_users, tables["users"].column("user_id").combine_chunks()]))
        pairs = tables["pairs"]
        for col in ("user_a", "user_b"):
            bad = ~true_mask(pc.is_in(pairs.column(col), value_set=known_users))
            if bad.any():
                problems.append(row_problem(files["pairs"], col, "unknown user (not in events or users)", pairs, bad))
    users, items = tables.get("users"), tables.get("items")
    if users is not None and items is not None and "onboarding_artists" in users.column_names:
        artist_col = artist_column(items)
        lists = split_list(users.column("onboarding_artists"))
        flat_bad = ~true_mask(pc.is_in(lists.flatten(), value_set=pc.unique(items.column(artist_col).combine_chunks())))
        if flat_bad.any():
            parents = pc.list_parent_indices(lists).to_numpy()
            bad = np.zeros(users.num_rows, dtype=bool)
            bad[parents[flat_bad]] = True
            problems.append(
                row_problem(
                    files["users"], "onboarding_artists", f"unknown artist (not an items.{artist_col})", users, bad
                )
            )
    return problems
