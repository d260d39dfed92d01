"""Properties of the dataset validator (hypothesis): whatever CSV tables it is given, it accepts
them (and every row loads) or rejects them with problems that each name a column; never a
traceback. The servers' OpenAPI specs are fuzzed in tests/test_serving.py (they need the servers)."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from userrep.cli import app
from userrep.contract import KNOWN_COLUMNS
from userrep.data import DatasetError, load_dataset

GOOD = {
    "user_id": st.sampled_from(["u1", "u2", "3"]),
    "item_id": st.sampled_from(["i1", "i2"]),
    "artist_id": st.sampled_from(["a1", "a2"]),
    "ts": st.one_of(
        st.sampled_from(["2026-01-01T00:00:00Z", "2026-06-30 12:00:00", "1700000000"]),
        st.datetimes(min_value=pd.Timestamp("2000-01-01"), max_value=pd.Timestamp("2090-01-01")).map(str),
    ),
    "weight": st.sampled_from(["1", "0", "2.5"]),
}
GOOD["signup_ts"] = GOOD["ts"]
BAD = st.sampled_from(
    ["", " ", "nan", "None", "-1", "inf", "x", "yesterday", "1700000000000", "1850-01-01", "2150-01-01"]
)
COLUMNS = {
    "events": ["user_id", "item_id", "ts", "weight"],
    "items": ["item_id", "artist_id"],
    "users": ["user_id", "signup_ts"],
}


@st.composite
def datasets(draw) -> dict[str, list[dict]]:
    """Valid events + items (+ users) tables, then 0-2 faults: a column left out, or a cell set
    to a bad value (an event of an unknown item or user counts as one too)."""
    names = ["events", "items"] + (["users"] if draw(st.booleans()) else [])
    one = {c: GOOD[c] for c in COLUMNS["events"]}
    tables = {
        "events": draw(st.lists(st.fixed_dictionaries(one), min_size=1, max_size=6)),
        "items": [{"item_id": i, "artist_id": draw(GOOD["artist_id"])} for i in ("i1", "i2")],  # ids unique
    }
    if "users" in names:
        tables["users"] = [{"user_id": u, "signup_ts": draw(GOOD["signup_ts"])} for u in ("u1", "u2", "3")]
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(names))
        column = draw(st.sampled_from(COLUMNS[name]))
        if draw(st.booleans()) and len(tables[name][0]) > 1:  # (a file keeps one column at least)
            tables[name] = [{k: v for k, v in row.items() if k != column} for row in tables[name]]
        elif tables[name] and column in tables[name][0]:
            row = draw(st.integers(0, len(tables[name]) - 1))
            tables[name][row] = {**tables[name][row], column: draw(BAD)}
    return tables


def write(directory: Path, tables: dict[str, list[dict]]) -> None:
    for name, table in tables.items():
        with open(directory / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_the_validator_accepts_with_every_row_or_rejects_naming_columns(tables):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write(directory, tables)
        try:
            ds = load_dataset(directory)
        except DatasetError as exc:
            event("rejected")
            assert exc.problems
            for problem in exc.problems:  # each names a column of the file it is about
                table = Path(problem.file).stem
                assert problem.column in KNOWN_COLUMNS[table], str(problem)
            result = CliRunner().invoke(app, ["data", "validate", str(directory)])
            assert result.exit_code == 1 and "Traceback" not in result.output
            assert all(problem.column in result.output for problem in exc.problems)
        else:  # accepted: every event row is there, none dropped
            event("accepted")
            assert ds.events.num_rows == len(tables["events"])
            assert ds.items.num_rows == len(tables["items"])
