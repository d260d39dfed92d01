"""Evaluation splits: representation history vs. label window.

* ``time``: history = events before ``cutoff`` (default: the 80% quantile of event times),
  labels = events at or after it. The honest split for a service: the future is unseen.
* ``user-time`` (leave-last-out): each user's last 20% of events by time are held out as labels.
  Every active user is warm, even where users are active in short bursts at different times
  (rating datasets), which a global cutoff would split into history-only and label-only users.
* ``random``: each user's events shuffled, 20% held out; for data without usable time.
* ``auto`` (default): ``random`` when all events share one timestamp; else ``time`` when it
  leaves at least ``MIN_WARM_SHARE`` of the users with history warm (events on both sides)
  and at least ``MIN_WARM`` of them; else ``user-time``. The choice and why is in the note.

The training side is a ``Dataset`` whose events contain *only* history, so no label event can
reach encoders or features whatever they do with time.

New users (``hold_out_new_users``): where a split leaves few users without history but with
onboarding picks or attributes (a user-time split leaves none), a seeded sample of users with all
three loses its history, so cold start is scored on users embedded as at sign-up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from userrep.contract import split_list
from userrep.data import Dataset
from userrep.encoders import events_before
from userrep.features import to_utc
from userrep.fsio import midnight_after

SPLITS = ("auto", "time", "user-time", "random")
MIN_WARM = 100  # auto: fewer warm users than this under a time split -> user-time
MIN_WARM_SHARE = 0.25  # ... or fewer than this share of the users with any history
NEW_USERS = 200  # fewer users new at the cut-off than this: hold out users with history as new (up to it)
NEW_USER_SHARE = 0.1  # ... at most this share of the users who could be


@dataclass(frozen=True)
class Split:
    kind: str  # "time" | "user-time" | "random"
    cutoff: pd.Timestamp | None
    as_of: pd.Timestamp  # where features are computed
    train: Dataset  # history only
    future: pa.Table  # label events
    note: str


def make_split(
    ds: Dataset, cutoff=None, seed: int = 0, holdout: float = 0.2, quantile: float = 0.8, kind: str = "auto"
) -> Split:
    """Split ``ds`` by ``kind`` (one of ``SPLITS``); ``cutoff`` implies a time split."""
    if kind not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {kind!r}")
    if cutoff is not None and kind not in ("auto", "time"):
        raise ValueError(f"cutoff: only a time split has a cutoff (split is {kind!r})")
    one_time = pc.count_distinct(ds.events.column("ts")).as_py() <= 1
    if kind == "random" or (kind == "auto" and one_time):
        return _held_out_split(
            ds,
            holdout,
            _random_keys(ds, seed),
            "random",
            "timestamps cannot support a time split (one distinct time)" if one_time else "asked for",
        )
    if kind == "user-time":
        return _held_out_split(ds, holdout, _time_keys(ds, seed), "user-time", "asked for")
    split = _time_split(ds, cutoff, quantile)
    if kind == "time" or cutoff is not None:
        return split
    warm, with_history = _warm_counts(split)
    if warm >= MIN_WARM and warm >= MIN_WARM_SHARE * with_history:
        return Split(
            split.kind,
            split.cutoff,
            split.as_of,
            split.train,
            split.future,
            f"{split.note}; {warm:,} of {with_history:,} users with history are warm",
        )
    assert split.cutoff is not None  # a time split always has one
    why = (
        f"a time split at {split.cutoff.isoformat()} leaves {warm:,} of {with_history:,} users with history "
        f"warm (auto needs >= {MIN_WARM} and >= {MIN_WARM_SHARE:.0%})"
    )
    return _held_out_split(ds, holdout, _time_keys(ds, seed), "user-time", why)


def _time_split(ds: Dataset, cutoff, quantile: float) -> Split:
    ts = ds.events.column("ts")
    if cutoff is None:
        values = ts.cast(pa.int64()).to_numpy()
        cutoff = pd.Timestamp(int(np.quantile(values, quantile)), unit="us", tz="UTC")
    cutoff = to_utc(cutoff, "cutoff")
    before = pc.less(ts, pa.scalar(cutoff, pa.timestamp("us", tz="UTC")))
    train_events, future = ds.events.filter(before), ds.events.filter(pc.invert(before))
    if train_events.num_rows == 0 or future.num_rows == 0:
        raise ValueError(f"cutoff: {cutoff.isoformat()} leaves no history or no label events")
    return Split(
        "time",
        cutoff,
        cutoff,
        _with_events(ds, train_events),
        future,
        f"time split at {cutoff.isoformat()}: {train_events.num_rows:,} history / {future.num_rows:,} label events",
    )


def _warm_counts(split: Split) -> tuple[int, int]:
    history = set(pc.unique(split.train.events.column("user_id")).to_pylist())
    future = set(pc.unique(split.future.column("user_id")).to_pylist())
    return len(history & future), len(history)


def _random_keys(ds: Dataset, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(ds.events.num_rows)


def _time_keys(ds: Dataset, seed: int) -> np.ndarray:
    """Event time, ties broken at random: the largest keys of a user are its last events."""
    ts = ds.events.column("ts").cast(pa.int64()).to_numpy().astype(np.float64)
    return ts + np.random.default_rng(seed).random(len(ts)) * 0.5  # ts in us: ties only


def _held_out_split(ds: Dataset, holdout: float, keys: np.ndarray, kind: str, why: str) -> Split:
    """Hold out each user's ``holdout`` share of events with the largest ``keys`` (round half up:
    20% of 5 events is 1, of 2 events 0, so a user with one or two events keeps them as history)."""
    users = ds.events.column("user_id").to_numpy(zero_copy_only=False)
    frame = pd.DataFrame({"user": users, "key": keys})
    rank_from_end = frame.groupby("user")["key"].rank(method="first", ascending=False).to_numpy() - 1
    size = frame.groupby("user")["key"].transform("size").to_numpy()
    mask = pa.array(rank_from_end < np.floor(holdout * size + 0.5))
    as_of = midnight_after(pc.max(ds.events.column("ts")).as_py())  # as a batch's default cut-off
    train_events, future = ds.events.filter(pc.invert(mask)), ds.events.filter(mask)
    held = (
        f"each user's last {holdout:.0%} of events by time"
        if kind == "user-time"
        else f"a random {holdout:.0%} of each user's events"
    )
    note = (
        f"{kind} split ({why}): {held} held out ({future.num_rows:,} label / {train_events.num_rows:,} history events)"
    )
    return Split(kind, None, as_of, _with_events(ds, train_events), future, note)


def hold_out_new_users(split: Split, seed: int, target: int = NEW_USERS) -> tuple[Split, np.ndarray]:
    """``split`` with new users simulated where it has fewer than ``target``: users with history,
    label-window events and onboarding picks or attributes, drawn with ``seed`` (at most
    ``NEW_USER_SHARE`` of them), lose every history event. The encoders, features and baselines
    then know them as the online path knows a user at sign-up; their labels stay. Returns the split
    and those users (none: the split as it was)."""
    events, users = split.train.events, split.train.users
    if target <= 0 or users is None:
        return split, np.array([], dtype=object)
    ids = users.column("user_id").to_numpy(zero_copy_only=False).astype(object)
    static = np.zeros(len(ids), bool)
    for name in ("onboarding_artists", "onboarding_genres"):  # picks as the features read them
        if name in users.column_names:
            static |= np.diff(split_list(users.column(name)).offsets.to_numpy()) > 0
    for name in split.train.attribute_columns:
        static |= pc.is_valid(users.column(name)).to_numpy(zero_copy_only=False)
    history = pd.Index(pc.unique(events.column("user_id")).to_numpy(zero_copy_only=False))
    labelled = pd.Index(pc.unique(split.future.column("user_id")).to_numpy(zero_copy_only=False))
    has_history, has_labels = history.get_indexer(ids) >= 0, labelled.get_indexer(ids) >= 0
    natural = int((static & has_labels & ~has_history).sum())
    eligible = np.sort(ids[static & has_labels & has_history])
    n = min(target - natural, int(NEW_USER_SHARE * len(eligible)))
    if n <= 0:
        return split, np.array([], dtype=object)
    chosen = np.sort(np.random.default_rng(seed).choice(eligible, size=n, replace=False))
    held = pa.array(chosen.tolist(), events.schema.field("user_id").type)
    kept = events.filter(pc.invert(pc.is_in(events.column("user_id"), held)))
    note = f"{split.note}; {n:,} users with history held out as new users ({natural:,} were new at the cut-off)"
    return replace(split, train=_with_events(split.train, kept), note=note), chosen


def history_before(ds: Dataset, as_of) -> Dataset:
    """The dataset with its events before ``as_of`` only (what a batch as of that time may see)."""
    return _with_events(ds, events_before(ds, as_of))


def _with_events(ds: Dataset, events: pa.Table) -> Dataset:
    return Dataset(ds.path, events, ds.items, ds.users, ds.pairs, ds.notes)
