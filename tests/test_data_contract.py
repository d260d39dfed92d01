"""The dataset contract: normalization of valid input, one clear message per kind of bad input."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from tests.conftest import write_dataset
from userrep.cli import app
from userrep.data import DatasetError, load_dataset, split_list, summarize

runner = CliRunner()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_valid_dataset_is_normalized(tmp_path, tiny_tables, fmt):
    ds = load_dataset(write_dataset(tmp_path, fmt, **tiny_tables))
    assert ds.events.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    ts = ds.events.column("ts").to_pylist()
    # "+02:00" is converted to UTC; a bare date is midnight UTC.
    assert ts[1].isoformat() == "2026-01-02T09:00:00+00:00"
    assert ts[2].isoformat() == "2026-01-03T00:00:00+00:00"
    assert ds.events.column("weight").to_pylist() == [1.0, 3.0, 2.0, 0.0]
    assert ds.attribute_columns == ["country"]
    assert ds.content_columns == ["content_energy"]
    assert ds.artist_column == "artist_id"


def test_weight_defaults_to_one_and_numeric_ids_become_strings(tmp_path):
    write_dataset(
        tmp_path,
        events=pd.DataFrame({"user_id": [7, 7], "item_id": ["007", "8"], "ts": [1767225600, 1767225660]}),
        items=pd.DataFrame({"item_id": ["007", "8"]}),
    )
    ds = load_dataset(tmp_path)
    assert ds.events.column("weight").to_pylist() == [1.0, 1.0]
    # Leading zeros survive: ids are text even when they look like numbers.
    assert ds.events.column("item_id").to_pylist() == ["007", "8"]
    assert ds.events.column("user_id").to_pylist() == ["7", "7"]
    assert ds.events.column("ts").to_pylist()[0].isoformat() == "2026-01-01T00:00:00+00:00"
    assert ds.artist_column == "item_id"


def test_parquet_timestamps_naive_aware_and_null(tmp_path, tiny_tables):
    instants = pd.to_datetime(["2026-01-01 10:00", "2026-01-02 09:00", "2026-01-03 00:00", "2026-01-04 00:00"])
    tiny_tables["events"]["ts"] = instants  # naive: taken as UTC
    naive = load_dataset(write_dataset(tmp_path / "naive", "parquet", **tiny_tables))
    tiny_tables["events"]["ts"] = instants.tz_localize("UTC").tz_convert("Europe/Stockholm")
    aware = load_dataset(write_dataset(tmp_path / "aware", "parquet", **tiny_tables))
    assert naive.events.column("ts").equals(aware.events.column("ts"))
    assert naive.events.column("ts").to_pylist()[0].isoformat() == "2026-01-01T10:00:00+00:00"
    tiny_tables["events"]["ts"] = [instants[0], pd.NaT, instants[2], instants[3]]
    _, problems = _invalid(tmp_path / "null", tiny_tables, fmt="parquet")
    assert problems[0].column == "ts" and problems[0].rows == (2,)


def test_summary_counts(tmp_path, tiny_tables):
    summary = summarize(load_dataset(write_dataset(tmp_path, **tiny_tables)))
    assert summary["events"] == 4
    assert summary["users_with_events"] == 3
    assert summary["artists"] == 2
    assert summary["genres"] == 3
    assert summary["users_without_events"] == 1
    assert summary["coverage"]["items.genres"] == 1.0
    assert summary["coverage"]["users.onboarding_artists"] == 0.5


def _invalid(tmp_path, tables, fmt="csv"):
    write_dataset(tmp_path, fmt, **tables)
    result = runner.invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 1, result.output
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    return result.output, info.value.problems


def test_rejects_missing_user_id_column(tmp_path, tiny_tables):
    tiny_tables["events"] = tiny_tables["events"].drop(columns=["user_id"])
    output, problems = _invalid(tmp_path, tiny_tables)
    assert "events.csv: column 'user_id': required column 'user_id' is missing" in output
    assert [p.column for p in problems] == ["user_id"]


def test_rejects_negative_weight(tmp_path, tiny_tables):
    tiny_tables["events"].loc[2, "weight"] = -1.5
    output, problems = _invalid(tmp_path, tiny_tables)
    assert "column 'weight': negative weight" in output
    assert problems[0].rows == (3,) and problems[0].values == ("-1.5",)


def test_rejects_unknown_item_id(tmp_path, tiny_tables):
    tiny_tables["events"].loc[1, "item_id"] = "t404"
    output, problems = _invalid(tmp_path, tiny_tables)
    assert "events.csv: column 'item_id': unknown item_id" in output
    assert "row 2 ('t404')" in output


def test_rejects_unparseable_ts(tmp_path, tiny_tables):
    tiny_tables["events"].loc[0, "ts"] = "yesterday-ish"
    tiny_tables["events"].loc[3, "ts"] = "2026-13-45"
    output, problems = _invalid(tmp_path, tiny_tables)
    assert "column 'ts': unparseable" in output
    assert problems[0].rows == (1, 4)


def test_rejects_epoch_milliseconds_as_out_of_range(tmp_path, tiny_tables):
    tiny_tables["events"]["ts"] = [1238536800000, 1238536800000, 1238536800, 1238536800]
    _, problems = _invalid(tmp_path, tiny_tables, fmt="parquet")
    assert problems[0].column == "ts" and problems[0].rows == (1, 2)


@pytest.mark.parametrize(
    "mutate, column, message",
    [
        (lambda t: t["items"].loc.__setitem__((2, "item_id"), "t1"), "item_id", "duplicate key"),
        (lambda t: t["users"].loc.__setitem__((3, "user_id"), "u1"), "user_id", "duplicate key"),
        (lambda t: t["events"].loc.__setitem__((0, "weight"), float("nan")), "weight", "finite"),
        (lambda t: t["events"].__setitem__("weight", ["lots", 3.0, 2.0, 0.0]), "weight", "finite"),
        (lambda t: t["events"].loc.__setitem__((0, "user_id"), None), "user_id", "missing id"),
        (lambda t: t["pairs"].loc.__setitem__((0, "user_b"), "ghost"), "user_b", "unknown user"),
        (lambda t: t["pairs"].loc.__setitem__((0, "user_b"), "u1"), "user_a", "paired with itself"),
        (
            lambda t: t["users"].loc.__setitem__((0, "onboarding_artists"), "a1|zz"),
            "onboarding_artists",
            "unknown artist",
        ),
        (lambda t: t["items"].loc.__setitem__((0, "content_energy"), float("inf")), "content_energy", "finite"),
        (lambda t: t["users"].loc.__setitem__((0, "signup_ts"), "not a date"), "signup_ts", "unparseable"),
    ],
)
def test_rejects_with_named_column(tmp_path, tiny_tables, mutate, column, message):
    mutate(tiny_tables)
    output, problems = _invalid(tmp_path, tiny_tables)
    assert any(p.column == column and message in p.message for p in problems), problems
    assert f"column '{column}'" in output


def test_reports_every_problem_at_once(tmp_path, tiny_tables):
    tiny_tables["events"].loc[0, "weight"] = -1
    tiny_tables["events"].loc[1, "item_id"] = "t404"
    _, problems = _invalid(tmp_path, tiny_tables)
    assert {p.column for p in problems} == {"weight", "item_id"}


def test_rejects_missing_items_table_and_ambiguous_formats(tmp_path, tiny_tables):
    write_dataset(tmp_path, "csv", events=tiny_tables["events"])
    write_dataset(tmp_path, "parquet", events=tiny_tables["events"])
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    text = str(info.value)
    assert "required table 'items' is missing" in text
    assert "both events.parquet and events.csv exist" in text


def test_rejects_float_ids_without_crashing(tmp_path, tiny_tables):
    tiny_tables["items"]["item_id"] = [1.5, 2.5, 3.5]
    output, problems = _invalid(tmp_path, tiny_tables, fmt="parquet")
    assert [p.column for p in problems] == ["item_id"]
    assert "must be text or integer ids, got double" in output


def test_rejects_empty_events_table(tmp_path, tiny_tables):
    tiny_tables["events"] = tiny_tables["events"].iloc[:0]
    output, problems = _invalid(tmp_path, tiny_tables, fmt="parquet")
    assert "events.parquet: table 'events' has no rows" in output


def test_valid_dataset_prints_summary_and_exits_zero(tmp_path, tiny_tables):
    write_dataset(tmp_path, **tiny_tables)
    result = runner.invoke(app, ["data", "validate", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"events": 4' in result.output


def test_split_list_trims_and_drops_empty_entries():
    lists = split_list(pa.chunked_array([["rock| indie", None, "", "|jazz|"]]))
    assert lists.to_pylist() == [["rock", "indie"], [], [], ["jazz"]]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_events_are_checked_in_batches_with_the_files_own_row_numbers(tmp_path, tiny_tables, fmt, monkeypatch):
    import userrep.data

    n = 40
    events = pd.DataFrame(
        {
            "user_id": [f"u{1 + i % 3}" for i in range(n)],
            "item_id": ["t1"] * n,
            "ts": ["2026-01-01T10:00:00Z"] * n,
            "weight": [1.0] * n,
        }
    )
    write_dataset(tmp_path / "good", fmt, **{**tiny_tables, "events": events})
    whole = load_dataset(tmp_path / "good")
    monkeypatch.setattr(userrep.data, "EVENT_BATCH_ROWS", 7)  # six batches
    assert load_dataset(tmp_path / "good").events.equals(whole.events)
    bad = events.copy()
    bad.loc[[3, 10, 11, 25, 30, 31, 39], "weight"] = -1.0  # in five of the six batches
    write_dataset(tmp_path / "bad", fmt, **{**tiny_tables, "events": bad})
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "bad")
    [problem] = info.value.problems
    assert problem.column == "weight" and problem.count == 7
    assert problem.rows == (4, 11, 12, 26, 31)  # 1-based data rows of the file, the first five
