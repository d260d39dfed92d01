"""Freshness: the deployed head scored day by day after a batch with frozen, replayed and retrained state."""

from __future__ import annotations

import pytest

from userrep.data import load_dataset
from userrep.freshness import curve


@pytest.mark.slow  # the session's two trained batches; the curve itself takes seconds
def test_the_curve_replays_later_events_and_scores_every_arm_on_the_same_users(small_world, two_batches):
    """b1 (as of May 1) frozen; its events of May 1-2 replayed through the online state. On day 0
    all arms are one state, so they score alike; once events are replayed the near-real-time arm
    moves away from the frozen one. b2 stands in for a retrained batch on day 2: its head ranks
    its own candidates, mapped onto b1's."""
    root = two_batches / "batches"
    ds = load_dataset(small_world)
    rows, replayed = curve(ds, root / "b1", 2, 7, lambda d, at: {0: root / "b1", 2: root / "b2"}.get(d))
    assert [r["day"] for r in rows] == [0, 1, 2] and replayed["as_of"].startswith("2026-05-01")
    assert replayed["replayed_events"] > 0 and all(r["users"] > 50 for r in rows)
    first, last = rows[0], rows[-1]
    assert first["frozen"] == first["nrt"] == first["retrained"] and first["recovered"] is None
    assert last["nrt"] != last["frozen"] and "retrained" not in rows[1]
    assert 0 < last["retrained"] <= 1 and "recovered" in last
