"""Freshness as a claim: how much of what a stale batch loses does the near-real-time path win back?

A batch is built as of T. The events after T are replayed day by day through the online path's
own code (``userrep.state``: the incremental features the event consumer updates, then the
batch's autoencoder and the +history inputs from the same state). For each day d = 0..D the
batch's deployed future-listening head scores the users active in the next ``--window`` days
[T + d, T + d + window), with three embeddings (and the history inputs that go with them):

* ``frozen``: as of T, what serving holds for a user who sends no events;
* ``nrt``: as of T + d, after the replayed events of [T, T + d);
* ``retrained``: a new batch built as of T + d with its own heads (days in ``--retrain-days``),
  the upper bound.

All three are scored on the same users and the same labels (the frozen batch's candidate artists;
an artist a retrained head does not rank scores -inf). ``recovered`` = (nrt - frozen) /
(retrained - frozen) where the retrained arm ran. JSON on stdout; ``--html`` writes a plot.

    python bench/freshness.py --data data/world-10k --work bench-out/freshness --html freshness.html
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from userrep.backfill import load_encoder
from userrep.baselines import user_artist_matrix
from userrep.batch.build import BuildConfig, build_batch, dataset_as_of
from userrep.batch.heads import load_head
from userrep.batch.layout import BatchDir
from userrep.data import load_dataset
from userrep.features import to_utc
from userrep.model import embed
from userrep.state import apply_events, artist_history, state_features, state_from_dataset
from userrep.tasks.future_listening import deployed_scores, ranking_rows

TASK = "future_listening"


def batch(data: Path, work: Path, name: str, as_of: pd.Timestamp) -> Path:
    out = work / name
    if not (out / "downstream" / f"{TASK}.json").exists():
        build_batch(data, out, as_of, BuildConfig(), batch_id=name)
    return out


def scores_of(batch_dir: Path, state, users: np.ndarray, at: pd.Timestamp, artists: np.ndarray) -> np.ndarray:
    """One batch's deployed head on ``users`` as of ``at`` from ``state`` (that batch's space),
    over ``artists`` (ids; -inf where the head does not rank one)."""
    space, model = load_encoder(batch_dir)
    head, meta = load_head(BatchDir(batch_dir).head(TASK))
    x = embed(model, state_features(state, users, at).matrix)
    cols = space.artist_index(np.asarray(meta["artists"], object))
    plays, recent = artist_history(state, users, at, cols, meta.get("half_life_days"))
    found = deployed_scores(head, meta, x, plays, recent)
    where = pd.Index(meta["artists"]).get_indexer(pd.Index(artists))
    out = np.full((len(users), len(artists)), -np.inf, np.float32)
    out[:, where >= 0] = found[:, where[where >= 0]]
    return out


def ndcg(found: np.ndarray, labels: np.ndarray) -> float:
    """Mean nDCG@10 over all candidate artists (music: played ones count)."""
    return float(np.nanmean(ranking_rows(found, labels, np.zeros_like(labels))["ndcg@10"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: a 10k-user world, seed 0)")
    parser.add_argument("--as-of", default=None, help="the batch's T (default: the data's end - days - window)")
    parser.add_argument("--days", type=int, default=14, help="days replayed after T")
    parser.add_argument("--window", type=int, default=7, help="label window after each day, in days")
    parser.add_argument("--retrain-days", default="0,3,7,14", help="days at which a fresh batch is built")
    parser.add_argument("--work", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    parser.add_argument("--html", type=Path, default=None, help="write a plot of nDCG@10 by day here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="freshness-"))
    data = args.data
    if data is None:
        from userrep.world import WorldConfig, generate_world

        data = work / "world"
        if not (data / "world.json").exists():
            generate_world(WorldConfig(users=10_000, seed=0), data, progress=False)
    end = dataset_as_of(data)
    start = to_utc(args.as_of) if args.as_of else end - pd.Timedelta(days=args.days + args.window)
    ds = load_dataset(data)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    frozen_dir = batch(data, work, "d0", start)
    timings["batch_d0"] = round(time.perf_counter() - started, 1)
    space, _ = load_encoder(frozen_dir)
    artists = np.asarray(load_head(BatchDir(frozen_dir).head(TASK))[1]["artists"], object)
    state = state_from_dataset(space, ds, start)
    frozen_state = state_from_dataset(space, ds, start)  # never replayed: what a silent user keeps
    events = ds.events.filter(pc.greater_equal(ds.events.column("ts"), start.to_pydatetime()))
    events = events.to_pandas().sort_values("ts", kind="stable")
    known = events["item_id"].astype(str).isin(set(space.item_ids))
    replay, unknown = events[known], int((~known).sum())  # items new since T have no vectors in the batch's space
    warm = np.array(sorted(u for u, s in frozen_state.users.items() if len(s.day)), object)
    retrain_days = {int(d) for d in args.retrain_days.split(",") if d}
    rows = []
    for d in range(args.days + 1):
        at = start + pd.Timedelta(days=d)
        if d:
            apply_events(state, replay[(replay["ts"] >= at - pd.Timedelta(days=1)) & (replay["ts"] < at)])
        window = ds.events.filter(
            pc.and_(
                pc.greater_equal(ds.events.column("ts"), at.to_pydatetime()),
                pc.less(ds.events.column("ts"), (at + pd.Timedelta(days=args.window)).to_pydatetime()),
            )
        )
        cols = space.artist_index(artists)
        labels = (user_artist_matrix(window, space, warm)[:, cols] > 0).toarray().astype(np.float32)
        users = warm[labels.sum(axis=1) > 0]
        labels = labels[labels.sum(axis=1) > 0]
        row = {
            "day": d,
            "users": int(len(users)),
            "frozen": ndcg(scores_of(frozen_dir, frozen_state, users, start, artists), labels),
            "nrt": ndcg(scores_of(frozen_dir, state, users, at, artists), labels),
        }
        if d in retrain_days:
            began = time.perf_counter()
            fresh = frozen_dir if d == 0 else batch(data, work, f"d{d}", at)
            if d:
                timings[f"batch_d{d}"] = round(time.perf_counter() - began, 1)
            fresh_space, _ = load_encoder(fresh)
            row["retrained"] = ndcg(
                scores_of(fresh, state_from_dataset(fresh_space, ds, at), users, at, artists), labels
            )
            gap = row["retrained"] - row["frozen"]
            row["recovered"] = (row["nrt"] - row["frozen"]) / gap if gap > 1e-4 else None
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "data": str(data),
        "as_of": start.isoformat(),
        "window_days": args.window,
        "replayed_events": int(len(replay)),
        "unknown_item_events": unknown,
        "days": rows,
        "build_s": timings,
    }
    print(json.dumps(result, indent=2))
    if args.html:
        import plotly.graph_objects as go

        fig = go.Figure()
        for arm in ("frozen", "nrt", "retrained"):
            points = [(r["day"], r[arm]) for r in rows if arm in r]
            fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], name=arm, mode="lines+markers")
        fig.update_layout(
            title=f"future listening nDCG@10 of the next {args.window} days, batch as of {start.date()}",
            xaxis_title="days after the batch's as_of",
            yaxis_title="nDCG@10",
        )
        fig.write_html(args.html, include_plotlyjs=True)


if __name__ == "__main__":
    main()
