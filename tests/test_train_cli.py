"""`userrep train` and `userrep embed` end to end on the small world (in-process)."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from userrep.cli import app
from userrep.tasks import registry

runner = CliRunner()


@pytest.fixture(scope="module")
def batch(small_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("batch")
    out = work / "b1"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(small_world),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--dim",
            "16",
            "--as-of",
            "2026-05-01",
            "--feast-home",
            str(work / "feast"),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow  # the module's trained batch / evaluation: tens of seconds
def test_train_writes_manifest_and_embeddings_for_every_user(batch, small_world):
    manifest = json.loads((batch / "manifest.json").read_text())
    assert manifest["as_of"] == "2026-05-01T00:00:00+00:00"
    assert {"load", "materialize", "features", "fit", "backfill", "publish", "downstream", "total"} <= set(
        manifest["timings_s"]
    )
    records = {p.stem: json.loads(p.read_text()) for p in (batch / "downstream").glob("*.json")}
    assert set(records) == set(registry.names())
    assert all(r["batch_id"] == manifest["batch_id"] for r in records.values())
    assert len(manifest["training"]["losses"]) == 3
    assert sum(size for _, size in manifest["feature_schema"]) == manifest["n_features"]
    assert set(manifest["data"]["fingerprint"]) == {"events.parquet", "items.parquet", "users.parquet", "pairs.parquet"}
    table = pq.read_table(batch / "embeddings.parquet")
    assert table.schema.field("user_id").type == "string"
    assert table.column("batch_id").unique().to_pylist() == [manifest["batch_id"]]
    users = pd.read_parquet(small_world / "users.parquet")["user_id"]
    assert set(table.column("user_id").to_pylist()) == set(users)  # cold ones included
    assert len(table.column("embedding")[0]) == 16


@pytest.mark.slow  # the module's trained batch / evaluation: tens of seconds
def test_batch_id_is_deterministic_and_feast_changes_nothing(batch, small_world, tmp_path):
    """Same settings without Feast (features computed in-process): same id, bit-identical embeddings."""
    again = tmp_path / "again"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(small_world),
            "--out",
            str(again),
            "--epochs",
            "3",
            "--dim",
            "16",
            "--as-of",
            "2026-05-01",
            "--no-feast",  # the task models stay: their settings are part of the id
        ],
    )
    assert result.exit_code == 0, result.output
    first = json.loads((batch / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first["batch_id"] == second["batch_id"]
    assert first["files"]["embeddings.parquet"] == second["files"]["embeddings.parquet"]


@pytest.mark.slow  # the module's trained batch / evaluation: tens of seconds
def test_embed_prints_cold_and_warm_users(batch, small_world):
    users = pd.read_parquet(small_world / "users.parquet")
    cold = users[users["signup_ts"] > pd.Timestamp("2026-05-01", tz="UTC")]["user_id"].iloc[0]
    warm = pd.read_parquet(small_world / "events.parquet")["user_id"].iloc[0]
    result = runner.invoke(
        app, ["embed", "--batch", str(batch), "--data", str(small_world), "--users", f"{warm},{cold}"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["user_id"] for r in rows] == [warm, cold]
    assert all(len(r["embedding"]) == 16 for r in rows)
    backfilled = pq.read_table(batch / "embeddings.parquet").to_pandas().set_index("user_id")
    assert backfilled.loc[warm, "embedding"][:3] == pytest.approx(rows[0]["embedding"][:3], abs=1e-5)


@pytest.mark.slow  # the module's trained batch / evaluation: tens of seconds
def test_embed_unknown_user_is_a_clear_error(batch, small_world):
    result = runner.invoke(app, ["embed", "--batch", str(batch), "--data", str(small_world), "--users", "nobody"])
    assert result.exit_code == 1
    assert "unknown user_id(s) ['nobody']" in result.output and "Traceback" not in result.output


def test_materialize_bad_as_of_is_a_clear_error(small_world, tmp_path):
    result = runner.invoke(
        app,
        ["features", "materialize", "--data", str(small_world), "--as-of", "someday", "--feast-home", str(tmp_path)],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "as_of: not an ISO-8601 time: 'someday'" in result.output


def _thinned_world(small_world, directory, keep_recent_users: int):
    """The small world with the last 56 days' events kept for only ``keep_recent_users`` users."""
    from tests.conftest import write_dataset
    from userrep.data import load_dataset

    ds = load_dataset(small_world)
    events = ds.events.to_pandas()
    end = events["ts"].max()
    recent_users = sorted(events["user_id"].unique())[:keep_recent_users]
    keep = (events["ts"] < end - pd.Timedelta(days=56)) | events["user_id"].isin(recent_users)
    return write_dataset(
        directory, "parquet", events=events[keep], items=ds.items.to_pandas(), users=ds.users.to_pandas()
    )


@pytest.mark.slow
def test_train_on_thin_data_widens_the_label_window_or_skips_with_the_reason(small_world, tmp_path):
    from userrep.batch.registry import missing_tasks

    widened = _thinned_world(small_world, tmp_path / "widened", keep_recent_users=10)
    out = tmp_path / "b-widened"
    result = runner.invoke(
        app, ["train", "--data", str(widened), "--out", str(out), "--epochs", "2", "--dim", "8", "--no-feast"]
    )
    assert result.exit_code == 0, result.output
    downstream = json.loads((out / "manifest.json").read_text())["downstream"]
    # 28 days: <= 10 users with labels; 56: the same; 112 days reach back into the full history.
    assert {task: d["label_days"] for task, d in downstream.items()} == dict.fromkeys(downstream, 112)
    assert all("metrics" in d for d in downstream.values())

    thin = _thinned_world(small_world, tmp_path / "thin", keep_recent_users=10)
    events = pd.read_parquet(thin / "events.parquet")
    events[events["user_id"].isin(sorted(events["user_id"].unique())[:12])].to_parquet(  # 12 users in all
        thin / "events.parquet", index=False
    )
    out = tmp_path / "b-thin"
    result = runner.invoke(
        app, ["train", "--data", str(thin), "--out", str(out), "--epochs", "2", "--dim", "8", "--no-feast"]
    )
    assert result.exit_code == 0, result.output
    assert "[bold" not in result.output and "skipped: label_days: only" in result.output
    downstream = json.loads((out / "manifest.json").read_text())["downstream"]
    for task in ("future_listening", "artist_preference"):
        assert "at least 20 are needed" in downstream[task]["skipped"]
    assert "metrics" in downstream["similar_users"]  # the neighbour index needs no labels
    assert missing_tasks(out) == []  # skipped is registered, not missing: the batch is complete
