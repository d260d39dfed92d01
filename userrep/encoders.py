"""Modality encoders: item vectors from co-listening (collaborative) and from content/genres.

Both share one small interface — ``fit(dataset, as_of) -> ItemVectors`` — and are fitted only
on events strictly before ``as_of``. ``ItemVectors`` saves/loads its table as parquet and derives
artist vectors as the mean of the artist's item vectors.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from userrep.data import Dataset, artist_column, split_list

log = logging.getLogger(__name__)

# Power iterations of the collaborative encoder's randomized SVD. With 4, two seeds gave the same
# items vectors at median cosine 0.946 after alignment (p10 0.85): a retrain with another seed
# moved every feature. With 16, 0.9997 (p10 0.999), for 0.3 s more per fit on the demo's 10k
# users: a batch's space depends on its data, not its seed (docs/batches.md, "One space").
SVD_ITERATIONS = 16


@dataclass(frozen=True)
class ItemVectors:
    """One vector per catalog item (rows aligned with ``item_ids``)."""

    name: str
    item_ids: np.ndarray  # (n,) object
    vectors: np.ndarray  # (n, d) float32

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def save(self, path: str | Path) -> None:
        table = pa.table(
            {
                "item_id": pa.array(self.item_ids, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(self.vectors.ravel(), pa.float32()), self.dim),
            }
        )
        pq.write_table(table.replace_schema_metadata({"encoder": self.name}), path)

    @classmethod
    def load(cls, path: str | Path) -> ItemVectors:
        table = pq.read_table(path)
        vectors = table.column("vector").combine_chunks()
        dim = vectors.type.list_size
        flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return cls(
            table.schema.metadata[b"encoder"].decode(),
            np.asarray(table.column("item_id").to_pylist(), object),
            flat.reshape(-1, dim),
        )

    @cached_property
    def _index(self) -> pd.Index:  # built once: hashing 20k ids again on every lookup cost ~1 ms an event write
        return pd.Index(self.item_ids)

    def lookup(self, item_ids) -> np.ndarray:
        """Row index of each id in this table (-1 for unknown)."""
        return self._index.get_indexer(pd.Index(item_ids))

    def artist_vectors(self, items: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(artist_ids, vectors): each artist's vector is the mean of its items' vectors."""
        col = artist_column(items)
        rows = self.lookup(items.column("item_id").to_numpy(zero_copy_only=False))
        artists, inverse = np.unique(
            items.column(col).to_numpy(zero_copy_only=False).astype(object), return_inverse=True
        )
        sums = np.zeros((len(artists), self.dim), np.float64)
        np.add.at(sums, inverse[rows >= 0], self.vectors[rows[rows >= 0]])
        counts = np.bincount(inverse[rows >= 0], minlength=len(artists))[:, None]
        return artists, (sums / np.maximum(counts, 1)).astype(np.float32)


@dataclass(frozen=True)
class CollaborativeEncoder:
    """Co-listening vectors: truncated SVD of the user x item matrix (LSA-style).

    Cells are log(1 + plays) scaled by item IDF, rows L2-normalized so heavy users do not
    dominate; items listened by the same users get similar right singular vectors. Randomized
    SVD keeps 50k+ items well under a minute on 2 cores. Items unplayed before ``as_of`` take
    their artist's mean vector when the artist has played items, else zeros.
    """

    dim: int = 32
    seed: int = 0
    name: str = "collab"
    method = "randomized SVD of log(1+plays) x IDF user-item matrix, rows L2-normalized"  # (the manifest's)

    def fit(self, ds: Dataset, as_of) -> ItemVectors:
        _, matrix = user_item_matrix(events_before(ds, as_of), ds.items)
        return self.fit_matrix(matrix, ds.items)

    def fit_matrix(self, matrix: sp.csr_matrix, items: pa.Table) -> ItemVectors:
        """Fit on the (users x items) summed play weights (``user_item_matrix``), which is
        transformed in place: at 1M users the matrix is about 1 GB, and each copy as much."""
        item_ids = items.column("item_id").to_numpy(zero_copy_only=False).astype(object)
        matrix.data = np.log1p(matrix.data)
        df = np.bincount(matrix.indices, minlength=len(item_ids))
        idf = np.log((1 + matrix.shape[0]) / (1 + df)) + 1.0
        matrix.data *= idf[matrix.indices]
        squares = sp.csr_matrix((matrix.data**2, matrix.indices, matrix.indptr), shape=matrix.shape)
        norms = np.sqrt(squares @ np.ones(matrix.shape[1]))
        del squares
        matrix.data *= np.repeat(1.0 / np.maximum(norms, 1e-12), np.diff(matrix.indptr))
        k = max(1, min(self.dim, min(matrix.shape) - 1))
        from sklearn.utils.extmath import randomized_svd  # here: sklearn is 0.6 s of a serving replica's start

        _, s, vt = randomized_svd(matrix, n_components=k, random_state=self.seed, n_iter=SVD_ITERATIONS)
        vectors = np.zeros((len(item_ids), self.dim), np.float32)
        vectors[:, :k] = (vt.T * np.sqrt(s)).astype(np.float32)
        vectors = _fill_unplayed_from_artist(items, vectors, played=df > 0)
        return ItemVectors(self.name, item_ids, vectors)


def user_item_matrix(events: pa.Table, items: pa.Table) -> tuple[np.ndarray, sp.csr_matrix]:
    """(sorted user ids, their (users x items) summed play weights) of ``events``. A user's row
    depends on that user's events only (in their order), so the rows of user partitions stacked
    in user order equal this matrix of the whole table (``userrep.partitions``)."""
    users, user_idx = sorted_codes(events.column("user_id"))
    item_idx = index_in(events.column("item_id"), items.column("item_id"))
    matrix = sp.csr_matrix(
        (events.column("weight").to_numpy(), (user_idx, item_idx)), shape=(len(users), items.num_rows)
    )
    matrix.sum_duplicates()
    return users, matrix


@dataclass(frozen=True)
class ContentEncoder:
    """Content vectors: z-scored ``content_*`` columns plus genre multi-hot, reduced by PCA.

    Items without content columns (or with missing values) still get a vector from their genres
    alone; a catalog with neither gets zeros. Genres beyond the ``max_genres`` most frequent are
    folded away (long tag tails are noise). Uses only the catalog, which is known at any ``as_of``.
    """

    dim: int = 16
    max_genres: int = 64
    name: str = "content"
    method = "PCA of z-scored content_* columns and genre multi-hot"  # (the manifest's)

    def fit(self, ds: Dataset, as_of=None) -> ItemVectors:
        items = ds.items
        item_ids = items.column("item_id").to_numpy(zero_copy_only=False).astype(object)
        blocks = []
        if ds.content_columns:
            content = np.column_stack([items.column(c).to_numpy(zero_copy_only=False) for c in ds.content_columns])
            mean, std = np.nanmean(content, axis=0), np.nanstd(content, axis=0)
            z = (content - np.nan_to_num(mean)) / np.where(np.nan_to_num(std) > 0, std, 1.0)
            blocks.append(np.nan_to_num(z))
        vocabulary = genre_vocabulary(items, self.max_genres)
        if vocabulary:
            blocks.append(genre_matrix(items, vocabulary) * 2.0)  # genres weigh about as much as content
        vectors = np.zeros((len(item_ids), self.dim), np.float32)
        if blocks:
            x = np.hstack(blocks)
            x = x - x.mean(axis=0)
            k = max(1, min(self.dim, x.shape[1], x.shape[0] - 1))
            from sklearn.utils.extmath import randomized_svd  # as above

            u, s, _ = randomized_svd(x, n_components=k, random_state=0)
            vectors[:, :k] = (u * s / np.sqrt(len(x))).astype(np.float32)
        return ItemVectors(self.name, item_ids, vectors)


def index_in(column: pa.ChunkedArray | pa.Array, values) -> np.ndarray:
    """Position of each row's value in ``values`` (-1 when absent), hashed in arrow: no Python
    string per row (13M event ids as objects took 0.9 GB and most of an encoder fit's time)."""
    values = (
        values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(values, object), pa.string())
    )
    return pc.fill_null(pc.index_in(column, value_set=values), -1).to_numpy()  # int32


def sorted_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_inverse=True)`` computed in arrow: the sorted distinct ids (UTF-8
    byte order is code point order, as Python sorts them) and each row's position among them."""
    unique = pc.unique(column)
    unique = unique.take(pc.sort_indices(unique))
    return unique.to_numpy(zero_copy_only=False).astype(object), index_in(column, unique)


def events_before(events: Dataset | pa.Table, as_of) -> pa.Table:
    """Events strictly before ``as_of`` (point-in-time correctness starts here): a dataset's, or
    those of a table of events (a streamed part). The one place that cut is written."""
    events = events.events if isinstance(events, Dataset) else events
    cutoff = pa.scalar(
        pd.Timestamp(as_of).tz_convert("UTC") if pd.Timestamp(as_of).tzinfo else pd.Timestamp(as_of, tz="UTC"),
        pa.timestamp("us", tz="UTC"),
    )
    if events.num_rows and pc.less(pc.max(events.column("ts")), cutoff).as_py():
        return events  # every event is before: no copy (5.4 GB at 1M users, the default as_of)
    return events.filter(pc.less(events.column("ts"), cutoff))


def genre_vocabulary(items: pa.Table, max_genres: int) -> list[str]:
    """The ``max_genres`` most frequent genres over the catalog (ties broken by name)."""
    if "genres" not in items.column_names:
        return []
    counts = pc.value_counts(split_list(items.column("genres")).flatten())
    frame = pd.DataFrame({"genre": counts.field("values").to_pylist(), "n": counts.field("counts").to_numpy()})
    return frame.sort_values(["n", "genre"], ascending=[False, True])["genre"].head(max_genres).tolist()


def genre_matrix(items: pa.Table, vocabulary: list[str]) -> np.ndarray:
    """(items, genres) rows summing to 1 over the item's known genres (zeros when none)."""
    lists = split_list(items.column("genres"))
    flat = pd.Index(vocabulary).get_indexer(lists.flatten().to_numpy(zero_copy_only=False))
    parents = pc.list_parent_indices(lists).to_numpy()
    keep = flat >= 0
    out = np.zeros((items.num_rows, len(vocabulary)), np.float32)
    np.add.at(out, (parents[keep], flat[keep]), 1.0)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1.0)


def _fill_unplayed_from_artist(items: pa.Table, vectors: np.ndarray, played: np.ndarray) -> np.ndarray:
    artists = items.column(artist_column(items)).to_numpy(zero_copy_only=False).astype(object)
    _, inverse = np.unique(artists, return_inverse=True)
    sums = np.zeros((inverse.max() + 1, vectors.shape[1]), np.float64)
    np.add.at(sums, inverse[played], vectors[played])
    counts = np.bincount(inverse[played], minlength=len(sums))[:, None]
    means = (sums / np.maximum(counts, 1)).astype(np.float32)
    return np.where(played[:, None], vectors, means[inverse])


def rotation_onto(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal matrix R minimizing ||source @ R - target|| (orthogonal Procrustes)."""
    from scipy.linalg import orthogonal_procrustes

    rotation, _ = orthogonal_procrustes(np.asarray(source, np.float64), np.asarray(target, np.float64))
    return rotation


def align_vectors(new: ItemVectors, anchor: ItemVectors) -> ItemVectors:
    """``new`` rotated onto ``anchor`` on the items both give a vector, so that a batch's feature
    columns keep the meaning they had in the batch it continues (``userrep.continuity``); a new
    item keeps where its own fit put it, in that basis. Unchanged when they share fewer items than
    dimensions, or the dimensions differ (a rotation changes no distance: nothing else moves)."""
    rows = anchor.lookup(new.item_ids)
    both = rows >= 0
    both[both] = (np.abs(new.vectors[both]).sum(axis=1) > 0) & (np.abs(anchor.vectors[rows[both]]).sum(axis=1) > 0)
    if new.dim != anchor.dim or both.sum() < new.dim:
        log.warning(f"encoder {new.name}: {both.sum()} items shared with the anchor; its vectors are not aligned")
        return new
    rotation = rotation_onto(new.vectors[both], anchor.vectors[rows[both]])
    return ItemVectors(new.name, new.item_ids, (new.vectors @ rotation).astype(np.float32))


# -- the encoders of a feature space --------------------------------------------------------------


def _encoders(config) -> tuple:
    """The modality encoders a feature space is built from, in column order; ``config``: a
    ``userrep.features.FeatureConfig`` (its dims, seed, genre vocabulary size). The one place
    that lists them: every other module reads ``FeatureSpace.encoders`` and their names."""
    return (
        CollaborativeEncoder(dim=config.collab_dim, seed=config.seed),
        ContentEncoder(dim=config.content_dim, max_genres=config.max_genres),
    )


def fit_encoders(ds: Dataset, as_of, config, matrix: sp.csr_matrix) -> tuple[ItemVectors, ...]:
    """Every encoder fitted on data before ``as_of``; ``matrix``: the (users x items) play weights
    before ``as_of`` (``user_item_matrix``), which an encoder fitting on it may transform in place."""
    return tuple(
        encoder.fit_matrix(matrix, ds.items) if hasattr(encoder, "fit_matrix") else encoder.fit(ds, as_of)
        for encoder in _encoders(config)
    )


def describe_encoders(config) -> dict[str, dict]:
    """Each encoder's settings and method, as a batch's manifest records them."""
    return {e.name: {**asdict(e), "method": e.method} for e in _encoders(config)}
