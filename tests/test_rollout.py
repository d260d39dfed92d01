"""The rollout decision on real batches: quality compared like for like (both batches' heads on the
same users and labels), and the rollout report a reviewer reads, rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from tests.conftest import copy_work
from userrep.batch.gate import gate_batch
from userrep.batch.layout import BatchDir
from userrep.tasks import registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gated(two_batches, tmp_path_factory):
    """A copy of the two batches with b2 gated against b1 (serving)."""
    work = tmp_path_factory.mktemp("rollout") / "work"
    copy_work(two_batches, work)
    root = work / "batches"
    return root, gate_batch(root, "b2")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("chromium not installed (apt-get install -y chromium; .ci/run does it)")


def test_the_rollout_report_renders_the_decision_and_every_number(gated):
    root, record = gated
    path = BatchDir(root / "b2").rollout_report
    assert record["passed"] and path.exists() and path.stat().st_size < 6e6
    dom = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    assert '<p class="decision"><span class="pass">PASS</span></p>' in dom
    assert dom.count('class="main-svg"') >= 5  # plotly ran, offline, and drew the figures
    for name in record["checks"]:
        assert f"<td>{name}</td>" in dom
    quality = record["inputs"]["quality"]
    assert set(quality) == set(registry.names())
    for pair in quality.values():  # both batches on the same users and labels, with the paired error
        assert pair["n"] > 0 and pair["se"] >= 0 and f"{pair['candidate']:.4g}" in dom


def test_the_cli_names_the_report(gated):
    from typer.testing import CliRunner

    from userrep.cli import app

    root, _ = gated
    shown = json.loads(CliRunner().invoke(app, ["batch", "show", "b2", "--root", str(root)]).output)
    assert shown["rollout_report"] == str(BatchDir(root / "b2").rollout_report)


def test_a_candidate_whose_heads_are_worse_on_the_same_labels_is_blocked(two_batches, tmp_path):
    """The candidate's artist-preference head is planted inverted (its output negated), its record
    kept: by the records (each batch on its own window) it looks as good as before; scored on the
    same users and labels as the serving head, it is far worse."""
    from userrep.batch.registry import missing_tasks
    from userrep.fsio import sha256

    work = tmp_path / "work"
    copy_work(two_batches, work)
    root = work / "batches"
    files = BatchDir(root / "b2")
    blob = torch.load(files.head("artist_preference"), weights_only=False)
    blob["state"] = {k: -v if k.startswith("out.") else v for k, v in blob["state"].items()}
    torch.save(blob, files.head("artist_preference"))
    record_path = files.task_record("artist_preference")
    task = json.loads(record_path.read_text())
    task["files"] = {name: sha256(files.downstream / name) for name in task["files"]}
    record_path.write_text(json.dumps(task))
    assert missing_tasks(root / "b2") == []  # a complete, intact batch

    record = gate_batch(root, "b2")
    pair = record["inputs"]["quality"]["artist_preference"]
    assert pair["recorded"]["candidate"] == task["metrics"]["auc"]  # what the records alone compared
    assert not record["passed"] and record["reasons"][0].startswith("quality_artist_preference")
    assert pair["candidate"] < 0.5 < pair["serving"] and "same" in record["reasons"][0]


def test_the_gates_memory_scores_recent_batches_on_the_candidates_users(gated, small_world):
    """The memory runs the same like-for-like scoring against each recent batch: with the serving
    batch itself as the only recent one, it must find exactly the serving batch's numbers. The
    recent batches come from the pointer's history, newest first, still on disk."""
    from userrep.batch.gate import recent_batches, run_gate
    from userrep.batch.layout import pointer_path
    from userrep.batch.registry import read_pointer
    from userrep.data import load_dataset

    root, _ = gated
    record = run_gate(root / "b2", root / "b1", load_dataset(small_world), report=False, recent=[root / "b1"])
    quality, memory = record["inputs"]["quality"], record["inputs"]["memory"]
    assert set(memory) == {t for t, spec in registry.tasks().items() if spec.has_head}
    for task, pair in memory.items():
        assert pair["batch"] == "b1" and pair["serving"] == quality[task]["serving"]
        assert pair["candidate"] == quality[task]["candidate"] and record["checks"][f"memory_{task}"]["passed"]
    from userrep.batch.rollout import checks_table

    assert f"memory_{next(iter(memory))}" in checks_table(record) and " vs b1 " in checks_table(record)
    assert recent_batches(root, 3) == [] and read_pointer(root)["history"] == []  # b1 is the first served
    pointer = pointer_path(root)
    saved = pointer.read_text()
    try:
        pointer.write_text(json.dumps({**json.loads(saved), "history": ["b2", "gone", "b1"]}))
        assert recent_batches(root, 3) == [root / "b1", root / "b2"]  # newest first, "gone" pruned
        assert recent_batches(root, 1) == [root / "b1"] and recent_batches(root, 3, skip="b2") == [root / "b1"]
    finally:
        pointer.write_text(saved)


def test_the_calibrated_limits_pass_a_clean_retrain_and_block_each_planted_shift(gated):
    from userrep.batch.calibration import PLANTED, holds, scores
    from userrep.batch.layout import read_manifest
    from userrep.source import EventSource

    root, _ = gated
    result = scores(root / "b2", root / "b1", EventSource(read_manifest(root / "b2")["data"]["path"]))
    assert set(result["planted"]) == set(PLANTED)
    assert holds(result) == {"clean": True, **dict.fromkeys(PLANTED, True)}, result
