"""The gate's decision function: one test per branch (pure, no batches needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from userrep.batch.drift import knn_overlap, procrustes
from userrep.batch.policy import GateInputs, GatePolicy, decide

POLICY = GatePolicy()
QUALITY = {
    "future_listening": {"candidate": 0.50, "serving": 0.49},
    "artist_preference": {"candidate": 0.75, "serving": 0.76},
    "similar_users": {"candidate": 0.40, "serving": 0.40},
}


def healthy(**changes) -> GateInputs:
    base = dict(
        candidate="b2",
        serving="b1",
        drift_share=0.1,
        column_drift={},
        embedding_drift=0.55,
        knn_overlap=0.7,
        heads_kept=0.98,
        quality=QUALITY,
    )
    return GateInputs(**{**base, **changes})


def test_a_healthy_candidate_passes_every_check():
    decision = decide(healthy(), POLICY)
    assert decision.passed and decision.reasons == ()
    assert all(check["passed"] for check in decision.checks.values())
    assert {"feature_drift", "embedding_drift", "stability_knn", "stability_heads", "quality_future_listening"} <= set(
        decision.checks
    )


def test_first_batch_without_serving_is_judged_on_completeness_only():
    decision = decide(GateInputs(candidate="b1", serving=None), POLICY)
    assert decision.passed and set(decision.checks) == {"downstream_models", "integrity"}


def test_missing_downstream_model_blocks_even_the_first_batch():
    decision = decide(GateInputs(candidate="b1", serving=None, missing_tasks=("artist_preference",)), POLICY)
    assert not decision.passed
    assert decision.reasons[0].startswith("downstream_models") and "artist_preference" in decision.reasons[0]


def test_changed_files_block():
    decision = decide(healthy(integrity=("embeddings.parquet",)), POLICY)
    assert not decision.passed and "embeddings.parquet" in decision.reasons[0]


def test_feature_drift_share_over_policy_blocks():
    decision = decide(healthy(drift_share=0.8), POLICY)
    assert [r.split(":")[0] for r in decision.reasons] == ["feature_drift"]


def test_one_column_far_beyond_the_limit_blocks_and_is_named():
    decision = decide(healthy(column_drift={"activity_7d:log_plays": 4.2}), POLICY)
    assert not decision.passed
    assert decision.reasons == (
        "feature_column_drift: column(s) shifted beyond the limit: activity_7d:log_plays (4.20)",
    )


def test_embedding_drift_over_threshold_blocks():
    decision = decide(healthy(embedding_drift=0.9), POLICY)
    assert [r.split(":")[0] for r in decision.reasons] == ["embedding_drift"]


def test_unstable_neighbourhoods_block():
    decision = decide(healthy(knn_overlap=0.02), POLICY)
    assert [r.split(":")[0] for r in decision.reasons] == ["stability_knn"]


def test_heads_losing_auc_on_the_aligned_space_block():
    decision = decide(healthy(heads_kept=0.6), POLICY)
    assert [r.split(":")[0] for r in decision.reasons] == ["stability_heads"]


@pytest.mark.parametrize("candidate, passed", [(0.49 * 0.96, True), (0.49 * 0.94, False), (math.nan, False)])
def test_quality_tolerance_is_relative_and_nan_never_passes(candidate, passed):
    quality = {**QUALITY, "future_listening": {"candidate": candidate, "serving": 0.49}}
    decision = decide(healthy(quality=quality), POLICY)
    assert decision.passed is passed
    assert decision.checks["quality_future_listening"]["passed"] is passed


def test_every_failing_check_is_reported_not_just_the_first():
    decision = decide(healthy(drift_share=0.9, knn_overlap=0.0, missing_tasks=("similar_users",)), POLICY)
    assert {r.split(":")[0] for r in decision.reasons} == {"downstream_models", "feature_drift", "stability_knn"}


def test_procrustes_recovers_a_rotation_and_knn_overlap_is_then_perfect():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(300, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    source = (target @ rotation.T) * 3.0 + 5.0  # rotated, scaled, shifted copy
    align = procrustes(source, target)
    assert np.abs(align(source) - target).max() < 1e-8
    queries = np.arange(50)
    assert knn_overlap(align(source), target, queries) == 1.0
    shuffled = source[rng.permutation(len(source))]
    assert knn_overlap(procrustes(shuffled, target)(shuffled), target, queries) < 0.2


def test_a_drop_within_sampling_error_of_small_validation_sets_passes():
    small = {**QUALITY, "similar_users": {"candidate": 0.43, "serving": 0.46, "n_candidate": 120, "n_serving": 120}}
    assert decide(healthy(quality=small), POLICY).passed  # 0.03 < 2 x 0.5 x sqrt(2/120) = 0.129
    large = {**QUALITY, "similar_users": {"candidate": 0.43, "serving": 0.46, "n_candidate": 4000, "n_serving": 4000}}
    decision = decide(healthy(quality=large), POLICY)  # allowance max(0.023, 0.022): 0.03 is a real drop
    assert not decision.passed and decision.reasons[0].startswith("quality_similar_users")


def _records(batch, **tasks):
    """Downstream registration records as train_task writes them (metrics empty when skipped)."""
    import json

    (batch / "downstream").mkdir(parents=True)
    for task, auc in tasks.items():
        record = {"metrics": {} if auc is None else {"auc": auc}, "n_valid": 0 if auc is None else 400}
        (batch / "downstream" / f"{task}.json").write_text(json.dumps(record))


def test_a_task_skipped_by_both_batches_is_absent_and_one_skipped_by_the_candidate_blocks(tmp_path):
    from userrep.batch.quality import recorded_quality

    _records(tmp_path / "serving", artist_preference=None)
    _records(tmp_path / "both", artist_preference=None)
    assert recorded_quality(tmp_path / "both", tmp_path / "serving") == {}  # nothing to regress from
    assert decide(healthy(quality={})).passed

    _records(tmp_path / "was_trained", artist_preference=0.8)
    _records(tmp_path / "now_skipped", artist_preference=None)
    quality = recorded_quality(tmp_path / "now_skipped", tmp_path / "was_trained")
    assert math.isnan(quality["artist_preference"]["candidate"])
    decision = decide(healthy(quality=quality))
    assert not decision.passed and "quality_artist_preference" in decision.reasons[0]


def test_a_chain_of_small_losses_is_blocked_against_the_best_recent_batch():
    """Five retrains in a row, each planted 4% worse than the batch it replaces: every one is
    within the 5% tolerance of the serving batch, so without memory all five pass (18% lost in
    all). Against the best of the last K promoted, the chain stops by the third batch, and the
    reason names the batch it was measured against."""

    def pair(candidate: float, other: float, **more) -> dict:
        return {"metric": "ndcg@10", "candidate": candidate, "serving": other, "se": 0.002, "n": 2000, **more}

    for memory, blocked_by in ((0, None), (POLICY.memory, 2)):
        policy = GatePolicy(memory=memory)
        promoted = [("b0", 0.60)]  # (batch, its quality on the candidates' users and labels)
        blocked, reasons = None, ()
        for step in range(1, 6):
            quality = 0.60 * 0.96**step
            serving, before = promoted[-1], promoted[:-1][-memory:] if memory else []
            best = max(before, key=lambda b: b[1], default=None)
            inputs = healthy(
                candidate=f"b{step}",
                serving=serving[0],
                quality={"future_listening": pair(quality, serving[1])},
                memory={"future_listening": pair(quality, best[1], batch=best[0])} if best else {},
            )
            decision = decide(inputs, policy)
            if not decision.passed:
                blocked, reasons = step, decision.reasons
                break
            promoted.append((f"b{step}", quality))
        assert blocked == blocked_by, memory
    assert reasons[0].startswith("memory_future_listening") and "b0, the best of the last 3 promoted" in reasons[0]
