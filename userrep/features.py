"""Point-in-time user features, in batch and incrementally, derived by one shared function.

A ``FeatureSpace`` holds everything fitted before ``as_of`` (the item vectors of each modality
encoder, ``userrep.encoders.fit_encoders``; the genre vocabulary, attribute categories). Features for a user at ``as_of`` come from two parts:

* history: the user's (day, item, weight) buckets for events with ``ts < as_of``; window ``w``
  covers bucket days ``>= day(as_of) - w`` (w whole days plus the part of as_of's own day);
* static: onboarding picks and categorical attributes (known from sign-up).

``build_user_features`` aggregates a dataset into buckets with vectorized pandas/scipy;
``FeatureState`` keeps the same buckets per user and ``apply_events`` updates them online. Both
call ``features_from_buckets`` so their vectors agree to float tolerance.

Groups (each encoder's per window, named ``<encoder>_<window>``; ``genres_180d``, ``activity_7d``,
``artists_all``, ``onboarding``, ``demographics``) are contiguous column ranges, so ablations drop
whole groups by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import scipy.sparse as sp

from userrep.data import Dataset, artist_column
from userrep.encoders import (
    ItemVectors,
    align_vectors,
    events_before,
    fit_encoders,
    genre_matrix,
    genre_vocabulary,
    user_item_matrix,
)

PROFILE_GROUPS = ("onboarding", "demographics")  # the groups that are not history (Feast view user_profile)
ACTIVITY = ("log_plays", "log_distinct_artists", "active_day_share", "has_history")  # "all": log active days


@dataclass(frozen=True)
class FeatureConfig:
    # Days before as_of; 0 = all history (long, sparse histories live mostly outside 180 days).
    windows: tuple[int, ...] = (7, 30, 180, 0)
    collab_dim: int = 32
    content_dim: int = 16
    max_genres: int = 32
    max_categories: int = 16  # per categorical attribute; the rest share an "other" slot
    # Play shares of the most played artists over the longest window: keeps *which* artists a
    # user plays, which the mean vectors blur. The autoencoder reconstructs them as a
    # distribution (model.py); 256 vs 128: synthetic-world validation recall@50 +0.015.
    top_artists: int = 256
    seed: int = 0


@dataclass(frozen=True)
class FeatureSchema:
    """Ordered (group, size) pairs; a group is a contiguous column range."""

    groups: tuple[tuple[str, int], ...]

    @property
    def n_features(self) -> int:
        return sum(size for _, size in self.groups)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in self.groups:
            out[name] = slice(start, start + size)
            start += size
        return out

    def history_groups(self) -> list[str]:
        return [name for name, _ in self.groups if name not in PROFILE_GROUPS]

    def without(self, drop: list[str] | tuple[str, ...]) -> tuple[FeatureSchema, np.ndarray]:
        """The schema minus the groups matched by ``drop`` and the column indices kept.

        A token matches a group by full name (``genres_7d``), kind (``genres``, or an encoder's
        name) or window (``7d``).
        """
        unknown = [d for d in drop if not any(_matches(n, d) for n, _ in self.groups)]
        if unknown:
            raise ValueError(f"unknown feature group(s) {unknown}; groups: {[n for n, _ in self.groups]}")
        slices = self.slices()
        keep = [n for n, _ in self.groups if not any(_matches(n, d) for d in drop)]
        cols = [np.arange(slices[n].start, slices[n].stop) for n in keep]
        return FeatureSchema(tuple(g for g in self.groups if g[0] in keep)), np.concatenate(cols or [np.array([], int)])


def _matches(name: str, token: str) -> bool:
    return name == token or name.startswith(f"{token}_") or name.endswith(f"_{token}")


def window_name(days: int) -> str:
    """``7`` -> ``7d``; ``0`` (all history) -> ``all``."""
    return f"{days}d" if days > 0 else "all"


def longest_window(windows: tuple[int, ...]) -> int:
    return 0 if 0 in windows else max(windows)


@dataclass(frozen=True)
class FeatureSpace:
    """What turns raw data into feature vectors; fitted on data before ``as_of`` only."""

    config: FeatureConfig
    as_of: str
    # the modality encoders' item vectors, in column order (``userrep.encoders.fit_encoders``);
    # each names its own columns and files
    encoders: tuple[ItemVectors, ...]
    genres: tuple[str, ...]
    attributes: dict[str, tuple[str, ...]]
    item_artist: np.ndarray  # (items,) artist index
    artists: np.ndarray  # (artists,) artist ids
    item_genres: np.ndarray = field(repr=False)  # (items, genres)
    top_artists: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # artist indices

    @property
    def item_ids(self) -> np.ndarray:
        return self.primary.item_ids

    @property
    def primary(self) -> ItemVectors:
        """The first encoder: its artist vectors are what the pair heads and the onboarding-mean
        baseline take, its all-history columns the item-mean baseline."""
        return self.encoders[0]

    def encoder(self, name: str) -> ItemVectors:
        """The encoder called ``name``; a ValueError naming ``encoder`` otherwise."""
        for vectors in self.encoders:
            if vectors.name == name:
                return vectors
        raise ValueError(f"encoder: expected one of {', '.join(e.name for e in self.encoders)}, got {name!r}")

    @property
    def longest_window(self) -> int:
        return longest_window(self.config.windows)

    @cached_property  # (233k name tuples on the demo world: recomputing it cost the event path 0.1 s a call)
    def schema(self) -> FeatureSchema:
        names = self.column_names()
        sizes = {group: sum(1 for g, _, _ in names if g == group) for group, _, _ in names}
        return FeatureSchema(tuple(sizes.items()))

    @cached_property
    def artist_means(self) -> tuple[np.ndarray, ...]:
        """Each encoder's mean vector of each artist's items (what onboarding picks contribute);
        computed once per space, not per request."""
        counts = np.maximum(np.bincount(self.item_artist, minlength=len(self.artists)), 1)[:, None]
        means = []
        for encoder in self.encoders:
            sums = np.zeros((len(self.artists), encoder.dim))
            np.add.at(sums, self.item_artist, encoder.vectors)
            means.append(sums / counts)
        return tuple(means)

    def column_names(self) -> list[tuple[str, str, bool]]:
        """(group, column, comparable) for every feature column, in matrix order.

        ``comparable`` is False for coordinates of a fitted basis (the encoders' vectors): two
        encoder fits give unrelated coordinates, so only named columns (genre and artist shares,
        activity counts, onboarding genres, demographics) can be compared across batches.
        """
        out = []
        for w in self.config.windows:
            tag = window_name(w)
            for e in self.encoders:
                out += [(f"{e.name}_{tag}", f"{e.name}_{tag}[{i}]", False) for i in range(e.dim)]
            out += [(f"genres_{tag}", f"genres_{tag}:{g}", True) for g in self.genres]
            out += [(f"activity_{tag}", f"activity_{tag}:{a}", True) for a in ACTIVITY]
        tag = window_name(self.longest_window)
        out += [(f"artists_{tag}", f"artists_{tag}:{self.artists[a]}", True) for a in self.top_artists]
        for e in self.encoders:
            out += [("onboarding", f"onboarding:{e.name}[{i}]", False) for i in range(e.dim)]
        out += [("onboarding", f"onboarding:genre:{g}", True) for g in self.genres]
        out.append(("onboarding", "onboarding:has_picks", True))
        for col, categories in self.attributes.items():
            out += [("demographics", f"{col}={c}", True) for c in categories] + [("demographics", f"{col}=other", True)]
        return out

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for encoder in self.encoders:
            encoder.save(directory / f"{encoder.name}.parquet")
        np.savez_compressed(
            directory / "space.npz",
            item_artist=self.item_artist,
            artists=self.artists.astype(str),
            item_genres=self.item_genres,
            top_artists=self.top_artists,
        )
        meta = {
            "config": asdict(self.config),
            "as_of": self.as_of,
            "encoders": [e.name for e in self.encoders],
            "genres": list(self.genres),
            "attributes": {k: list(v) for k, v in self.attributes.items()},
        }
        (directory / "space.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> FeatureSpace:
        directory = Path(directory)
        meta = json.loads((directory / "space.json").read_text())
        arrays = np.load(directory / "space.npz")
        config = FeatureConfig(**{**meta["config"], "windows": tuple(meta["config"]["windows"])})
        return cls(
            config,
            meta["as_of"],
            # (spaces saved before the list was: their files, in name order, were that order)
            tuple(
                ItemVectors.load(directory / f"{name}.parquet")
                for name in meta.get("encoders") or [p.stem for p in sorted(directory.glob("*.parquet"))]
            ),
            tuple(meta["genres"]),
            {k: tuple(v) for k, v in meta["attributes"].items()},
            arrays["item_artist"],
            arrays["artists"].astype(object),
            arrays["item_genres"],
            arrays["top_artists"],
        )

    @cached_property
    def _artist_index(self) -> pd.Index:  # built once, as ItemVectors._index
        return pd.Index(self.artists)

    @cached_property
    def _attribute_indexes(self) -> dict[str, pd.Index]:  # built once, as ItemVectors._index
        return {col: pd.Index(categories) for col, categories in self.attributes.items()}

    def artist_index(self, artist_ids) -> np.ndarray:
        return self._artist_index.get_indexer(pd.Index(artist_ids))

    def item_index(self, item_ids) -> np.ndarray:
        return self.primary.lookup(item_ids)


@dataclass(frozen=True)
class UserFeatures:
    user_ids: np.ndarray  # (users,) object
    matrix: np.ndarray  # (users, features) float32
    schema: FeatureSchema

    def rows(self, rows: slice | np.ndarray) -> UserFeatures:
        return UserFeatures(self.user_ids[rows], self.matrix[rows], self.schema)

    def without(self, drop) -> UserFeatures:
        schema, cols = self.schema.without(drop)
        return UserFeatures(self.user_ids, self.matrix[:, cols], schema)

    def cold_like(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Feature rows (all, or ``rows``) with every history group at a raw 0: the users as a new
        user without history looks, through onboarding picks and attributes alone."""
        matrix = (self.matrix if rows is None else self.matrix[rows]).copy()
        slices = self.schema.slices()
        for name in self.schema.history_groups():
            matrix[:, slices[name]] = 0.0
        return matrix


def to_utc(ts, field: str = "as_of") -> pd.Timestamp:
    """A UTC timestamp; naive values are taken as UTC. Bad input names ``field``."""
    try:
        ts = pd.Timestamp(ts)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: not an ISO-8601 time: {ts!r}") from None
    if pd.isna(ts):
        raise ValueError(f"{field}: missing time")
    return ts.tz_convert("UTC") if ts.tzinfo else ts.tz_localize("UTC")


def fit_feature_space(
    ds: Dataset,
    as_of,
    config: FeatureConfig = FeatureConfig(),
    interactions: tuple[np.ndarray, sp.csr_matrix] | None = None,
    anchor: FeatureSpace | None = None,
) -> FeatureSpace:
    """Fit the modality encoders (``userrep.encoders.fit_encoders``) and the vocabularies on data
    strictly before ``as_of``.

    ``interactions``: ``user_item_matrix`` of the events before ``as_of`` where the caller built
    it without holding the events (``userrep.partitions``); it is consumed. Default: built from
    ``ds.events``. ``anchor``: the space of the batch this one continues; every encoder's item
    vectors are rotated onto its (``userrep.encoders.align_vectors``).
    """
    as_of = to_utc(as_of)
    _, matrix = interactions if interactions is not None else user_item_matrix(events_before(ds, as_of), ds.items)
    item_plays = np.bincount(matrix.indices, weights=matrix.data, minlength=ds.items.num_rows)
    encoders = fit_encoders(ds, as_of, config, matrix)
    del matrix
    genres = tuple(genre_vocabulary(ds.items, config.max_genres))
    attributes = {}
    if ds.users is not None:
        for col in ds.attribute_columns:
            counts = pc.value_counts(pc.drop_null(ds.users.column(col)).combine_chunks())
            frame = pd.DataFrame({"v": counts.field("values").to_pylist(), "n": counts.field("counts").to_numpy()})
            attributes[col] = tuple(
                frame.sort_values(["n", "v"], ascending=[False, True])["v"].head(config.max_categories)
            )
    artist_ids = ds.items.column(artist_column(ds.items)).to_numpy(zero_copy_only=False).astype(object)
    artists, item_artist = np.unique(artist_ids, return_inverse=True)
    item_genres = genre_matrix(ds.items, list(genres)) if genres else np.zeros((ds.items.num_rows, 0), np.float32)
    # Most played artists before as_of (by play weight; ties by artist id).
    plays = np.bincount(item_artist, weights=item_plays, minlength=len(artists))
    played = np.flatnonzero(plays > 0)
    top = played[np.lexsort((played, -plays[played]))][: config.top_artists]
    space = FeatureSpace(
        config,
        as_of.isoformat(),
        encoders,
        genres,
        attributes,
        item_artist.astype(np.int32),
        artists,
        item_genres,
        top.astype(np.int64),
    )
    if anchor is None:
        return space
    theirs = {e.name: e for e in anchor.encoders}
    return replace(space, encoders=tuple(align_vectors(e, theirs[e.name]) if e.name in theirs else e for e in encoders))
