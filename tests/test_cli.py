"""The installed ``userrep`` entry point and the demo job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from userrep.cli import app

runner = CliRunner()


def test_entry_point_is_installed_and_lists_jobs():
    exe = Path(sys.executable).parent / "userrep"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for job in ("world", "data", "demo"):
        assert job in result.stdout
    result = subprocess.run([str(exe), "data", "--help"], capture_output=True, text=True, check=True)
    assert "validate" in result.stdout and "import" in result.stdout


@pytest.mark.slow
def test_demo_runs_the_pipeline_twice_then_reuses(demo_run):
    tmp_path, args, first = demo_run
    assert first.exit_code == 0, first.output
    assert "generated" in first.output and "users with events" in first.output
    built = sorted(p.parent.name for p in (tmp_path / "batches").glob("*/manifest.json"))
    assert len(built) == 2 and first.output.count("pipeline finished") == 2
    assert f"gate {built[1]} vs serving {built[0]}" in first.output  # batch 2 gated against batch 1
    assert "downstream models" in first.output and (tmp_path / "kfp").is_dir()
    # one line per step on the console; kfp.local's own output only in the logs the console names
    assert first.output.count("done  fit-encoder") == 2 and "Executing task" not in first.output
    logs = sorted((tmp_path / "logs").glob("training-*.log"))
    assert len(logs) == 2 and all("Executing task" in log.read_text() for log in logs)
    assert all(str(log) in first.output for log in logs)
    pointer = json.loads((tmp_path / "batches" / "SERVING.json").read_text())
    gate = json.loads((tmp_path / "batches" / built[1] / "gate.json").read_text())
    assert pointer["serving"] == (built[1] if gate["passed"] else built[0])
    # the smoke's servers start on batch 1 while batch 2 trains and serve batch 2 once it is promoted
    assert f"started the servers in the background on batch {built[0]}" in first.output
    assert f"servers serving {pointer['serving']}" in first.output
    assert f"cold-start embedding of batch {pointer['serving']}" in first.output
    assert ("switched on promotion" in first.output) == gate["passed"]
    assert "servers stopped" in first.output
    logs_line, last = first.output.strip().splitlines()[-2:]  # the full logs, then batch 2's rollout report
    assert logs_line.startswith("full logs:") and str(tmp_path / "logs") in logs_line and "serve.log" in logs_line
    report = tmp_path / "batches" / built[1] / "rollout.html"
    assert last.startswith("rollout report of batch 2") and last.endswith(str(report)) and report.exists()
    second = runner.invoke(app, [*args, "--no-smoke"])
    assert second.exit_code == 0 and "is current" in second.output
    assert second.output.count("not rerunning") == 2
    assert json.loads((tmp_path / "batches" / "SERVING.json").read_text())["serving"] == pointer["serving"]


def test_validate_missing_directory_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "not a directory" in result.output


def test_world_generate_rejects_bad_options_by_name(tmp_path):
    result = runner.invoke(app, ["world", "generate", "--users", "10", "--start", "garbage", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "start must be an ISO-8601 date" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["world", "generate", "--users", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "users" in result.output
