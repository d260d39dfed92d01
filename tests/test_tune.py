"""`userrep tune` (Ray Tune + ASHA on a validation split of the history) and its use by train."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from userrep.cli import app
from userrep.tune import SPACE

runner = CliRunner()


DEFAULTS = {
    "latent": 64,
    "share_weight": 32.0,
    "group_drop_rate": 0.1,
    "history_drop_rate": 0.25,
    "hidden": 256,
    "weight_decay": 1e-4,
}


def check_tuned(record: dict, most: int) -> None:
    """A tuned.json record: between 1 and ``most`` trials, best first, the defaults among them."""
    scores = [t["ndcg@10"] for t in record["trials"]]
    assert 1 <= len(scores) <= most and scores == sorted(scores, reverse=True) and 0 < scores[0] < 1
    assert all(record["best"][name] in values for name, values in SPACE.items())
    assert any(all(t[k] == v for k, v in DEFAULTS.items()) for t in record["trials"])  # the defaults ran too
    assert record["best"]["epochs"] in (5, 10, 20)


@pytest.mark.slow
def test_tune_writes_the_best_trial_and_train_records_it(small_world, tmp_path):
    """One trial (the defaults' ASHA rungs): the command and `train --tuned`. The pipeline's tune
    step runs a search of several trials (tests/test_pipelines.py)."""
    result = runner.invoke(
        app, ["tune", "--data", str(small_world), "--out", str(tmp_path / "tuned"), "--trials", "1", "--budget", "30"]
    )
    assert result.exit_code == 0, result.output
    assert "validation split of the history" in result.output and "validation nDCG@10" in result.output
    record = json.loads((tmp_path / "tuned" / "tuned.json").read_text())
    check_tuned(record, most=1)

    out = tmp_path / "batch"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(small_world),
            "--out",
            str(out),
            "--no-feast",
            "--no-downstream",
            "--tuned",
            str(tmp_path / "tuned" / "tuned.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuned"]["latent"] == record["best"]["latent"] == manifest["ae_config"]["latent"]
    assert manifest["ae_config"]["epochs"] == record["best"]["epochs"]


def test_train_with_a_missing_tuned_file_is_a_clear_error(small_world, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(small_world),
            "--out",
            str(tmp_path / "b"),
            "--no-feast",
            "--tuned",
            str(tmp_path / "nope.json"),
        ],
    )
    assert result.exit_code == 1 and "--tuned" in result.output and "no such file" in result.output
    assert "[bold" not in result.output
