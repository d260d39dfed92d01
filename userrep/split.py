"""Evaluation splits: representation history vs. label window.

* time split (default): history = events before ``cutoff`` (default: the 80% quantile of event
  times), labels = events at or after it;
* random split, when timestamps cannot support a time split (a single distinct time): each
  user's events are shuffled and 20% are held out as labels.

The training side is a ``Dataset`` whose events contain *only* history, so no label event can
reach encoders or features whatever they do with time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from userrep.data import Dataset
from userrep.features import to_utc


@dataclass(frozen=True)
class Split:
    kind: str  # "time" | "random"
    cutoff: pd.Timestamp | None
    as_of: pd.Timestamp  # where features are computed
    train: Dataset  # history only
    future: pa.Table  # label events
    note: str


def make_split(ds: Dataset, cutoff=None, seed: int = 0, holdout: float = 0.2, quantile: float = 0.8) -> Split:
    ts = ds.events.column("ts")
    if pc.count_distinct(ts).as_py() <= 1:
        return _random_split(ds, seed, holdout)
    if cutoff is None:
        values = ts.cast(pa.int64()).to_numpy()
        cutoff = pd.Timestamp(int(np.quantile(values, quantile)), unit="us", tz="UTC")
    cutoff = to_utc(cutoff, "cutoff")
    before = pc.less(ts, pa.scalar(cutoff, pa.timestamp("us", tz="UTC")))
    train_events, future = ds.events.filter(before), ds.events.filter(pc.invert(before))
    if train_events.num_rows == 0 or future.num_rows == 0:
        raise ValueError(f"cutoff {cutoff.isoformat()} leaves no history or no label events")
    return Split("time", cutoff, cutoff, _with_events(ds, train_events), future,
                 f"time split at {cutoff.isoformat()}: {train_events.num_rows:,} history / {future.num_rows:,} label events")


def _random_split(ds: Dataset, seed: int, holdout: float) -> Split:
    users = ds.events.column("user_id").to_numpy(zero_copy_only=False)
    frame = pd.DataFrame({"user": users, "key": np.random.default_rng(seed).random(len(users))})
    rank = frame.groupby("user")["key"].rank(method="first").to_numpy() - 1
    size = frame.groupby("user")["key"].transform("size").to_numpy()
    held = rank < np.floor(holdout * size + 0.5)  # round half up: 20% of 5 events is 1
    mask = pa.array(held)
    as_of = (pd.Timestamp(pc.max(ds.events.column("ts")).as_py()) + pd.Timedelta(days=1)).ceil("D")
    train_events, future = ds.events.filter(pc.invert(mask)), ds.events.filter(mask)
    note = (f"random split: timestamps cannot support a time split (one distinct time), so {holdout:.0%} of "
            f"each user's events are held out ({future.num_rows:,} label / {train_events.num_rows:,} history events)")
    return Split("random", None, as_of, _with_events(ds, train_events), future, note)


def _with_events(ds: Dataset, events: pa.Table) -> Dataset:
    return Dataset(ds.path, events, ds.items, ds.users, ds.pairs, ds.notes)
