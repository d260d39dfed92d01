"""The events a step reads: a loaded ``Dataset``, or a dataset directory streamed on request.

The task models, their served history features and the gate need all users' ids, the events of
a sample of users, and sums over everyone's events, never the whole table at once. ``EventSource``
answers exactly those questions. Over a directory each answer is one validated pass over the
events (``load_dataset(keep=...)``) that holds only what it returns: at 1M users (134M events,
5.4 GB as arrow) a pass holds the users' first event times, a 50k-user sample's events, or the
running sums. Over a loaded ``Dataset`` the same answers are computed from memory, so the
small-data paths and the tests give the same results.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from userrep.data import Dataset, load_dataset


class EventSource:
    """What the steps ask of the events; over a directory nothing is read until asked."""

    def __init__(self, data: Dataset | str | Path):
        self._ds = data if isinstance(data, Dataset) else None
        self._path = data.path if isinstance(data, Dataset) else Path(data)  # read only without _ds
        self._subset: tuple[np.ndarray, Dataset] | None = None
        self._users: tuple[Dataset, np.ndarray, np.ndarray] | None = None

    def _firsts(self) -> tuple[Dataset, np.ndarray, np.ndarray]:
        """(the dataset without its events, user ids, their first event time in us), one pass."""
        if self._users is None:
            if self._ds is not None:
                base, firsts = self._ds, self._ds.events.group_by("user_id").aggregate([("ts", "min")])
            else:  # each batch leaves its users' first event times
                parts: list[pa.Table] = []
                base = load_dataset(
                    self._path, keep=lambda b: parts.append(b.group_by("user_id").aggregate([("ts", "min")]))
                )
                firsts = None
                if parts:
                    merged = pa.concat_tables(parts).group_by("user_id").aggregate([("ts_min", "min")])
                    # taken by name: the order of the columns is arrow's choice
                    firsts = pa.table({"user_id": merged.column("user_id"), "ts_min": merged.column("ts_min_min")})
            if firsts is None or not firsts.num_rows:
                self._users = (base, np.array([], object), np.array([], np.int64))
            else:
                self._users = (
                    base,
                    firsts.column("user_id").to_numpy(zero_copy_only=False).astype(object),
                    firsts.column("ts_min").cast(pa.int64()).to_numpy(),
                )
        return self._users

    @property
    def items(self) -> pa.Table:
        return self._ds.items if self._ds is not None else self._firsts()[0].items

    def first_time(self) -> pd.Timestamp | None:
        first = self._firsts()[2]
        return pd.Timestamp(int(first.min()), unit="us", tz="UTC") if len(first) else None

    def known_users(self, as_of: pd.Timestamp) -> np.ndarray:
        """Sorted ids of the users known at ``as_of`` (``featurize.known_users``): the users table
        plus everyone with an event before it."""
        base, ids, first = self._firsts()
        known = [ids[first < as_of.value // 1000]]
        if base.users is not None:
            known.append(base.users.column("user_id").to_numpy(zero_copy_only=False))
        return np.unique(np.concatenate(known).astype(object))

    def of_users(self, user_ids: np.ndarray) -> Dataset:
        """The dataset with the events of ``user_ids`` only (the last answer is kept: the gate asks
        twice for the same sample)."""
        user_ids = np.asarray(user_ids, object)
        if self._subset is not None and np.array_equal(self._subset[0], user_ids):
            return self._subset[1]
        wanted = pa.array(user_ids, pa.string())
        pick = lambda b: b.filter(pc.is_in(b.column("user_id"), value_set=wanted))  # noqa: E731
        ds = (
            replace(self._ds, events=pick(self._ds.events))
            if self._ds is not None
            else load_dataset(self._path, keep=pick)
        )
        self._subset = (user_ids, ds)
        return ds

    def fold(self, step, start):
        """``step(total, events)`` over the events, batch by batch from a directory (the whole table
        in one call from memory); ``start``: the initial total."""
        if self._ds is not None:
            return step(start, self._ds.events)
        total = [start]

        def keep(batch: pa.Table) -> None:
            total[0] = step(total[0], batch)

        load_dataset(self._path, keep=keep)
        return total[0]
