"""Freshness: a batch's deployed future-listening head scored day by day after its ``as_of`` with
a frozen, a near-real-time and a retrained user state (``bench/freshness.py`` runs it).

The near-real-time arm replays the later events through the online path's own code
(``userrep.state``: the incremental features the event consumer updates, then the batch's
autoencoder and the +history inputs from the same state), so what is measured is what serves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from userrep.backfill import load_encoder
from userrep.baselines import user_artist_matrix
from userrep.batch.heads import load_head
from userrep.batch.layout import BatchDir, read_manifest
from userrep.data import Dataset
from userrep.features import to_utc
from userrep.model import embed
from userrep.state import FeatureState, apply_events, artist_history, state_features, state_from_dataset
from userrep.tasks.future_listening import deployed_scores, ranking_rows

TASK = "future_listening"


def head_scores(batch_dir: Path, state: FeatureState, users: np.ndarray, at, artists: np.ndarray) -> np.ndarray:
    """One batch's deployed head on ``users`` as of ``at`` from ``state`` (in that batch's space),
    over ``artists`` (ids; -inf where the head does not rank one: it could not recommend it)."""
    space, model = load_encoder(batch_dir)
    head, meta = load_head(BatchDir(batch_dir).head(TASK))
    x = embed(model, state_features(state, users, at).matrix)
    plays, recent = artist_history(
        state, users, at, space.artist_index(np.asarray(meta["artists"], object)), meta.get("half_life_days")
    )
    found = deployed_scores(head, meta, x, plays, recent)
    where = pd.Index(meta["artists"]).get_indexer(pd.Index(artists))
    out = np.full((len(users), len(artists)), -np.inf, np.float32)
    out[:, where >= 0] = found[:, where[where >= 0]]
    return out


def ndcg(found: np.ndarray, labels: np.ndarray) -> float:
    """Mean nDCG@10 over every candidate artist (music: artists played before count)."""
    return float(np.nanmean(ranking_rows(found, labels, np.zeros_like(labels))["ndcg@10"]))


def curve(
    ds: Dataset, frozen: Path, days: int, window: int, retrained: Callable[[int, pd.Timestamp], Path | None]
) -> tuple[list[dict], dict]:
    """Per day d = 0..``days`` after the ``frozen`` batch's as_of T: nDCG@10 of its head on the
    users with history at T who play a candidate in [T + d, T + d + ``window`` days), with the
    state as of T (``frozen``), after replaying the events of [T, T + d) (``nrt``), and, where
    ``retrained(d, T + d)`` gives a batch, that batch's own head on its own state as of T + d
    (``retrained``; ``recovered`` = the share of the frozen-to-retrained gap nrt closes). Also
    returns what was replayed: events whose item the batch's space lacks have no vectors and are
    counted, not applied (the online path rejects them the same way)."""
    space, _ = load_encoder(frozen)
    start = to_utc(read_manifest(frozen)["as_of"])
    artists = np.asarray(load_head(BatchDir(frozen).head(TASK))[1]["artists"], object)
    cols = space.artist_index(artists)
    still, state = state_from_dataset(space, ds, start), state_from_dataset(space, ds, start)
    later = ds.events.filter(pc.greater_equal(ds.events.column("ts"), start.to_pydatetime())).to_pandas()
    known = later["item_id"].astype(str).isin(set(space.item_ids))
    replay = later[known].sort_values("ts", kind="stable")
    warm = np.array(sorted(u for u, s in still.users.items() if len(s.day)), object)
    rows = []
    for d in range(days + 1):
        at = start + pd.Timedelta(days=d)
        if d:
            apply_events(state, replay[(replay["ts"] >= at - pd.Timedelta(days=1)) & (replay["ts"] < at)])
        ts = ds.events.column("ts")
        window_events = ds.events.filter(
            pc.and_(
                pc.greater_equal(ts, at.to_pydatetime()),
                pc.less(ts, (at + pd.Timedelta(days=window)).to_pydatetime()),
            )
        )
        labels = (user_artist_matrix(window_events, space, warm)[:, cols] > 0).toarray().astype(np.float32)
        active = labels.sum(axis=1) > 0
        users, labels = warm[active], labels[active]
        row: dict = {
            "day": d,
            "users": int(len(users)),
            "frozen": ndcg(head_scores(frozen, still, users, start, artists), labels),
            "nrt": ndcg(head_scores(frozen, state, users, at, artists), labels),
        }
        fresh = retrained(d, at)
        if fresh is not None:
            fresh_state = state_from_dataset(load_encoder(fresh)[0], ds, at)
            row["retrained"] = ndcg(head_scores(fresh, fresh_state, users, at, artists), labels)
            gap = row["retrained"] - row["frozen"]
            row["recovered"] = (row["nrt"] - row["frozen"]) / gap if gap > 1e-4 else None
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return rows, {
        "as_of": start.isoformat(),
        "replayed_events": int(known.sum()),
        "unknown_item_events": int((~known).sum()),
    }
