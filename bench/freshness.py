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

import pandas as pd

from userrep.batch.build import BuildConfig, build_batch, dataset_as_of
from userrep.data import load_dataset
from userrep.features import to_utc
from userrep.freshness import curve


def batch(data: Path, work: Path, name: str, as_of: pd.Timestamp) -> Path:
    out = work / name
    if not (out / "downstream" / "future_listening.json").exists():
        build_batch(data, out, as_of, BuildConfig(), batch_id=name)
    return out


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
    retrain_days = {int(d) for d in args.retrain_days.split(",") if d}

    def built(name: str, as_of: pd.Timestamp) -> Path:
        began = time.perf_counter()
        out = batch(data, work, name, as_of)
        timings[name] = round(time.perf_counter() - began, 1)
        return out

    frozen = built("d0", start)
    rows, replayed = curve(
        ds,
        frozen,
        args.days,
        args.window,
        lambda d, at: (frozen if d == 0 else built(f"d{d}", at)) if d in retrain_days else None,
    )
    result = {"data": str(data), **replayed, "window_days": args.window, "days": rows, "build_s": timings}
    print(json.dumps(result, indent=2))
    if args.html:
        import plotly.graph_objects as go

        fig = go.Figure()
        for arm in ("frozen", "nrt", "retrained"):
            points = [(r["day"], r[arm]) for r in rows if arm in r]
            fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], name=arm, mode="lines+markers")
        fig.update_layout(
            title=f"future listening nDCG@10 of the next {args.window} days, batch as of {result['as_of'][:10]}",
            xaxis_title="days after the batch's as_of",
            yaxis_title="nDCG@10",
        )
        fig.write_html(args.html, include_plotlyjs=True)


if __name__ == "__main__":
    main()
