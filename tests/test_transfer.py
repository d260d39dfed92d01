"""The cost claim's mechanism: one shared embedding against per-team models on raw features."""

from __future__ import annotations

from dataclasses import replace

import pytest

from userrep.batch.downstream import DownstreamConfig
from userrep.batch.heads import load_head
from userrep.batch.layout import BatchDir
from userrep.model import AEConfig
from userrep.tasks._mlp import HeadConfig
from userrep.transfer import TASKS, compare


@pytest.mark.slow  # two arms built and scored on 1,500 users (~1 min)
def test_both_arms_serve_every_task_and_only_the_team_arm_grows_with_n(small_world, tmp_path):
    config = DownstreamConfig(top_k=200, max_users=600, head=replace(HeadConfig(), epochs=3))
    found = compare(small_world, tmp_path, config, AEConfig(epochs=4), requests=20)
    # Each arm's heads take what it serves from: the 64-d embedding, or the team's raw features.
    shared_head, _ = load_head(BatchDir(tmp_path / "shared").head("future_listening"))
    team_head, _ = load_head(BatchDir(tmp_path / "team").head("future_listening"))
    assert shared_head.n_in == 64 and team_head.n_in == found["n_features"] > 64
    # Every task is scored for both arms on the same test users, with an interval around the ratio.
    assert set(found["quality"]) == set(TASKS)
    for task, q in found["quality"].items():
        low, high = q["ratio_ci"]
        assert q["units"] > 0 and low <= q["ratio"] <= high, task
    assert found["quality"]["future_listening"]["units"] == found["test_users"]
    # Only the shared arm fits an autoencoder; each team pays its own pipeline.
    cost, by_n = found["cpu_s"], found["by_n"]
    assert cost["shared"]["pipeline"] > cost["team"]["pipeline"] > 0
    assert list(by_n) == ["1", "3", "6"] and by_n["6"]["tasks"] == list(TASKS)
    assert by_n["6"]["cpu_s"]["team"] >= 6 * cost["team"]["pipeline"]
    # Online: one embedding (and one history row) for every task; a vector per team.
    online = [by_n[n]["online_bytes_per_user"] for n in ("1", "3", "6")]
    assert len({o["shared"] for o in online}) == 1
    assert online[0]["team"] < online[1]["team"] < online[2]["team"]
    assert all(
        found["latency"][arm][t]["p99_ms"] >= found["latency"][arm][t]["p50_ms"] > 0
        for arm in ("shared", "team")
        for t in TASKS
    )
