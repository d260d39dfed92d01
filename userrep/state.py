"""Near-real-time features: a per-user state of (day, item, weight) buckets updated by events.

The state holds exactly what ``build_user_features`` aggregates in batch, and features are
derived by the same ``features_from_buckets``; so applying a user's events one by one gives the
batch vector (float tolerance). Without an all-history window, buckets older than the longest
window (relative to the user's latest event) can never be read again and are pruned on update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from userrep.data import Dataset, load_dataset, split_list
from userrep.encoders import events_before
from userrep.features import FeatureSpace, UserFeatures, to_utc
from userrep.featurize import StaticInputs, bucket_events, day_index, features_from_buckets


@dataclass
class UserState:
    """One user's mutable buckets (sorted by day, item) and static sign-up information."""

    day: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    item: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    weight: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    onboarding_artists: tuple[str, ...] = ()
    onboarding_genres: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class FeatureState:
    space: FeatureSpace
    users: dict[str, UserState] = field(default_factory=dict)


def register_user(
    state: FeatureState, user_id: str, onboarding_artists=(), onboarding_genres=(), attributes: dict | None = None
) -> UserState:
    """Create (or update the sign-up information of) a user; history is kept."""
    user = state.users.setdefault(str(user_id), UserState())
    user.onboarding_artists = tuple(onboarding_artists)
    user.onboarding_genres = tuple(onboarding_genres)
    user.attributes = dict(attributes or {})
    return user


def apply_events(state: FeatureState, events: pd.DataFrame) -> list[str]:
    """Add events (``user_id``, ``item_id``, ``ts``, optional ``weight``) to the state.

    Returns the touched user ids. Raises ValueError naming ``item_id`` for items the state's
    feature space does not know (they have no vectors), before changing anything.
    """
    items = events["item_id"].astype(str).to_numpy(dtype=object)
    item_index = state.space.item_index(items)
    unknown = np.flatnonzero(item_index < 0)
    if unknown.size:
        raise ValueError(f"item_id: unknown item(s) {sorted(set(items[unknown]))[:5]}")
    weight = (
        pd.to_numeric(events["weight"], errors="coerce").to_numpy(np.float64)
        if "weight" in events
        else np.ones(len(events))
    )
    if not (np.isfinite(weight) & (weight >= 0)).all():
        raise ValueError("weight: must be a finite number >= 0")
    ts = pd.to_datetime(events["ts"], utc=True, errors="coerce", format="ISO8601")
    if ts.isna().any():
        raise ValueError(f"ts: unparseable timestamp(s) {list(events['ts'][ts.isna()].astype(str))[:3]}")
    ts_us = ts.dt.as_unit("us").astype("int64").to_numpy()
    user_ids = events["user_id"].astype(str).to_numpy(dtype=object)
    user_index, touched = pd.factorize(user_ids, sort=True)  # hashing: 2.6M ids in a fraction of np.unique's sort
    user, day, item, weight = bucket_events(user_index, ts_us, item_index, weight)
    bounds = np.searchsorted(user, np.arange(len(touched) + 1))
    windows = state.space.config.windows
    horizon = None if 0 in windows else max(windows)  # an all-history window needs every bucket
    for k, user_id in enumerate(touched):
        rows = slice(bounds[k], bounds[k + 1])
        current = state.users.setdefault(user_id, UserState())
        _merge(current, day[rows], item[rows], weight[rows], horizon)
    return list(touched)


def _merge(user: UserState, day: np.ndarray, item: np.ndarray, weight: np.ndarray, horizon: int | None) -> None:
    if not len(user.day):  # a user's first buckets are already sorted and unique (bucket_events)
        keep = np.ones(len(day), bool) if horizon is None or not len(day) else day >= day.max() - horizon - 1
        user.day, user.item, user.weight = day[keep].astype(np.int32), item[keep].astype(np.int32), weight[keep]
        return
    day = np.concatenate([user.day, day])
    item = np.concatenate([user.item, item])
    weight = np.concatenate([user.weight, weight])
    key = day.astype(np.int64) * (1 << 32) + item
    uniq, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=weight, minlength=len(uniq))
    if horizon is None or not len(uniq):
        keep = np.ones(len(uniq), bool)
    else:
        keep = (uniq >> 32) >= (uniq[-1] >> 32) - horizon - 1
    user.day, user.item, user.weight = (
        (uniq[keep] >> 32).astype(np.int32),
        (uniq[keep] & 0xFFFFFFFF).astype(np.int32),
        summed[keep],
    )


def state_features(state: FeatureState, user_ids, as_of) -> UserFeatures:
    """Features of ``user_ids`` at ``as_of`` from the state (unknown users: all-zero history)."""
    user_ids = np.asarray([str(u) for u in user_ids], dtype=object)
    users = [state.users.get(u, UserState()) for u in user_ids]
    sizes = [len(u.day) for u in users]
    buckets = (
        np.repeat(np.arange(len(users)), sizes),
        np.concatenate([u.day for u in users] + [np.zeros(0, np.int32)]),
        np.concatenate([u.item for u in users] + [np.zeros(0, np.int32)]),
        np.concatenate([u.weight for u in users] + [np.zeros(0)]),
    )
    artists = [(i, a) for i, u in enumerate(users) for a in u.onboarding_artists]
    genres = [(i, g) for i, u in enumerate(users) for g in u.onboarding_genres]
    static = StaticInputs(
        np.array([i for i, _ in artists], np.int64),
        np.array([a for _, a in artists], object),
        np.array([i for i, _ in genres], np.int64),
        np.array([g for _, g in genres], object),
        {col: np.array([u.attributes.get(col) for u in users], object) for col in state.space.attributes},
    )
    matrix = features_from_buckets(state.space, len(users), buckets, day_index(to_utc(as_of)), static)
    return UserFeatures(user_ids, matrix, state.space.schema)


def user_clocks(state: FeatureState, user_ids, as_of) -> list[pd.Timestamp]:
    """Where each user's feature windows end online: the later of ``as_of`` (the batch's) and the
    midnight after the user's own newest event, which is what a batch recomputation of that
    user's history at that time gives. Per user: one client's events move only their own user."""
    as_of = to_utc(as_of)
    clocks = []
    for user_id in user_ids:
        user = state.users.get(str(user_id))
        newest = (
            None if user is None or not len(user.day) else pd.Timestamp(int(user.day.max()) + 1, unit="D", tz="UTC")
        )
        clocks.append(as_of if newest is None or newest <= as_of else newest)
    return clocks


def state_features_at(state: FeatureState, user_ids, clocks) -> UserFeatures:
    """``state_features`` with each user's own time (``clocks``, one per user)."""
    user_ids = np.asarray([str(u) for u in user_ids], dtype=object)
    clocks = pd.DatetimeIndex([to_utc(c) for c in clocks])
    matrix = np.zeros((len(user_ids), state.space.schema.n_features), np.float32)
    for clock in clocks.unique():
        rows = np.flatnonzero(clocks == clock)
        matrix[rows] = state_features(state, user_ids[rows], clock).matrix
    return UserFeatures(user_ids, matrix, state.space.schema)


def state_from_dataset(space: FeatureSpace, data: Dataset | str | Path, as_of) -> FeatureState:
    """Bootstrap the online state from a dataset: sign-up info of every user, buckets before ``as_of``.
    ``data``: a loaded dataset, or its directory, streamed: each batch of events is added to the
    state as it is read and validated, so the state is held, never the events table too."""
    state = FeatureState(space)
    as_of = to_utc(as_of)

    def add(events: pa.Table) -> None:  # buckets merge, so adding batch by batch equals adding all at once
        events = events_before(events, as_of).select(["user_id", "item_id", "ts", "weight"])
        if events.num_rows:
            apply_events(state, events.to_pandas())

    if isinstance(data, Dataset):
        ds = data
        add(ds.events)
    else:
        ds = load_dataset(data, keep=add)
    if ds.users is not None:
        users = ds.users
        artists = (
            split_list(users.column("onboarding_artists")).to_pylist()
            if "onboarding_artists" in users.column_names
            else None
        )
        genres = (
            split_list(users.column("onboarding_genres")).to_pylist()
            if "onboarding_genres" in users.column_names
            else None
        )
        attrs = {c: users.column(c).to_pylist() for c in ds.attribute_columns}
        for i, user_id in enumerate(users.column("user_id").to_pylist()):
            register_user(
                state,
                user_id,
                artists[i] if artists else (),
                genres[i] if genres else (),
                {c: v[i] for c, v in attrs.items() if v[i] is not None},
            )
    return state


def artist_history(
    state: FeatureState, user_ids, as_of, artists: np.ndarray, half_life_days: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(plays, recent) (users, K): each user's play weight of ``artists`` (K artist indices of the
    space), and the same with each play weighted 0.5 ** (age in days / half-life): the task
    features of a batch's +history heads (``userrep.tasks.history``). Ages count whole days from
    a play's day bucket; the batch computes them from timestamps (under a day apart). ``as_of``:
    one time, or one per user (``user_clocks``)."""
    column = np.full(len(state.space.artists), -1, np.int64)
    column[np.asarray(artists, np.int64)] = np.arange(len(artists))
    times = as_of if isinstance(as_of, (list, tuple, np.ndarray, pd.Index)) else [as_of] * len(user_ids)
    todays = [day_index(to_utc(t)) for t in times]
    plays = np.zeros((len(user_ids), len(artists)), np.float64)
    recent = np.zeros_like(plays)
    for i, (user_id, today) in enumerate(zip(user_ids, todays)):
        user = state.users.get(str(user_id))
        if user is None or not len(user.item):
            continue
        cols = column[state.space.item_artist[user.item]]
        keep = cols >= 0
        weight = user.weight[keep]
        np.add.at(plays[i], cols[keep], weight)
        if half_life_days is not None:
            weight = weight * np.power(0.5, np.maximum(today - user.day[keep], 0) / half_life_days)
        np.add.at(recent[i], cols[keep], weight)
    return plays.astype(np.float32), recent.astype(np.float32)


def encode_user(user: UserState, vector: np.ndarray | None = None, updated_at: str | None = None) -> bytes:
    """One user's state (and newest online embedding) as bytes for the shared state store: a JSON
    header, then the buckets and the vector as raw little-endian arrays (no pickle: the store is
    shared, and its bytes must never be code)."""
    vector = None if vector is None else np.asarray(vector, "<f4")
    header = json.dumps(
        {
            "n": len(user.day),
            "d": 0 if vector is None else len(vector),
            "updated_at": updated_at,
            "onboarding_artists": list(user.onboarding_artists),
            "onboarding_genres": list(user.onboarding_genres),
            "attributes": user.attributes,
        }
    ).encode()
    parts = [
        len(header).to_bytes(4, "little"),
        header,
        np.asarray(user.day, "<i4").tobytes(),
        np.asarray(user.item, "<i4").tobytes(),
        np.asarray(user.weight, "<f8").tobytes(),
    ]
    return b"".join(parts + ([vector.tobytes()] if vector is not None else []))


def decode_user(blob: bytes) -> tuple[UserState, np.ndarray | None, str | None]:
    """(state, newest online embedding or None, its time or None) from ``encode_user``'s bytes."""
    size = int.from_bytes(blob[:4], "little")
    header = json.loads(blob[4 : 4 + size])
    n, at = header["n"], 4 + size
    day = np.frombuffer(blob, "<i4", n, at).astype(np.int32)
    item = np.frombuffer(blob, "<i4", n, at + 4 * n).astype(np.int32)
    weight = np.frombuffer(blob, "<f8", n, at + 8 * n).astype(np.float64)
    vector = np.frombuffer(blob, "<f4", header["d"], at + 16 * n).copy() if header["d"] else None
    user = UserState(
        day,
        item,
        weight,
        tuple(header["onboarding_artists"]),
        tuple(header["onboarding_genres"]),
        dict(header["attributes"]),
    )
    return user, vector, header["updated_at"]
