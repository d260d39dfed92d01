"""Similar users: nearest neighbours in representation space with FAISS, scored by nDCG@50.

Cosine similarity (inner product of L2-normalized rows). An exact index up to ``exact_max``
candidates; above it HNSW (approximate, sub-linear queries). The pipeline writes the index with
the batch; serving loads that file and keeps it current with ``LiveIndex``.
"""

from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp

from userrep.metrics import ndcg_from_gains

EXACT_MAX = 100_000


def build_index(vectors: np.ndarray, exact_max: int = EXACT_MAX) -> faiss.Index:
    x = _normalized(vectors)
    index: faiss.Index
    if len(x) <= exact_max:
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        hnsw = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 128
        index = hnsw
    index.add(x)
    return index


class LiveIndex:
    """A batch's neighbour index as the pipeline built it, kept current while the batch serves.

    The built index (exact or HNSW) is never changed: HNSW cannot remove a vector, and rebuilding
    a million-user graph per event is out of the question. Users re-embedded online go into a
    small exact index; their rows in the built one are skipped at search time by an ID selector,
    and the two result lists are merged by score. Ids: the built index's rows are 0..n-1 (the
    batch's embeddings in file order); users added online take any other id. Not thread-safe:
    the caller holds a lock around ``upsert`` and ``search``.
    """

    def __init__(self, built: faiss.Index):
        self.built = built
        self.recent = faiss.IndexIDMap2(faiss.IndexFlatIP(built.d))
        self._superseded = np.zeros(0, np.int64)  # rows of ``built`` whose user has a newer vector
        self._params = None  # search parameters excluding them; rebuilt lazily after an upsert

    @property
    def ntotal(self) -> int:
        return self.built.ntotal - len(self._superseded) + self.recent.ntotal

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64)
        self.recent.remove_ids(ids)  # type: ignore[arg-type]  # faiss's Python wrapper takes ids; its stubs say IDSelector. One pass over the small index for the whole micro-batch
        self.recent.add_with_ids(_normalized(vectors), ids)
        moved = ids[(ids >= 0) & (ids < self.built.ntotal)]
        if len(np.setdiff1d(moved, self._superseded, assume_unique=False)):
            self._superseded = np.union1d(self._superseded, moved)
            self._params = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top-k by cosine over both indexes; -1 pads short lists."""
        q = _normalized(np.atleast_2d(queries))
        scores, ids = (
            self.built.search(q, k, params=self._search_params()) if len(self._superseded) else self.built.search(q, k)
        )
        if self.recent.ntotal:
            more_scores, more_ids = self.recent.search(q, k)
            scores, ids = np.hstack([scores, more_scores]), np.hstack([ids, more_ids])
            scores = np.where(ids >= 0, scores, -np.inf)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        return scores, ids

    def _search_params(self):
        if self._params is None:
            batch = faiss.IDSelectorBatch(self._superseded)
            selector = faiss.IDSelectorNot(batch)
            if isinstance(self.built, faiss.IndexHNSW):  # keep the built efSearch (the default would be 16)
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.built.hnsw.efSearch)
            else:
                params = faiss.SearchParameters(sel=selector)
            self._params = (params, selector, batch)  # the selectors must outlive the parameters
        return self._params[0]


def neighbours(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k neighbour rows of each query row, the query itself excluded (-1 pads short lists)."""
    _, found = index.search(_normalized(vectors[queries]), k + 1)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for i, (query, row) in enumerate(zip(queries, found)):
        row = row[(row != query) & (row >= 0)][:k]
        out[i, : len(row)] = row
    return out


def ndcg_with_pairs(found: np.ndarray, queries: np.ndarray, related: sp.csr_matrix, k: int = 50) -> np.ndarray:
    """Per-query nDCG@k, binary relevance: ``related[q, c]`` > 0 when q and c are a ground-truth pair."""
    gains = np.zeros(found.shape, np.float64)
    valid = found >= 0
    gains[valid] = np.asarray(related[np.repeat(queries, found.shape[1])[valid.ravel()], found[valid]]).ravel() > 0
    n_related = np.diff(related.indptr)[queries]
    ideal = (np.arange(k)[None, :] < n_related[:, None]).astype(np.float64)
    return ndcg_from_gains(gains, ideal)


def ndcg_with_overlap(found: np.ndarray, queries: np.ndarray, artists: sp.csr_matrix, k: int = 50) -> np.ndarray:
    """Per-query nDCG@k, graded relevance: Jaccard overlap of label-window artist sets (when no
    pairs exist)."""
    binary = (artists > 0).astype(np.float32).tocsr()
    sizes = np.asarray(binary.sum(axis=1)).ravel()
    inter = (binary[queries] @ binary.T).toarray()
    union = sizes[queries][:, None] + sizes[None, :] - inter
    jaccard = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    jaccard[np.arange(len(queries)), queries] = 0.0
    gains = np.where(found >= 0, np.take_along_axis(jaccard, np.maximum(found, 0), axis=1), 0.0)
    ideal = -np.sort(-jaccard, axis=1)[:, :k]
    return ndcg_from_gains(gains, ideal)


def ndcg_with_taste(found: np.ndarray, queries: np.ndarray, taste, k: int = 50) -> np.ndarray:
    """Per-query nDCG@k, binary relevance: the k users nearest the query by cosine of their true
    taste vectors (``taste``: (users, g), dense or sparse rows), the query itself excluded. A
    representation that recovers taste finds them; one at chance finds k / users of them."""
    unit = sp.csr_matrix(taste, dtype=np.float64)
    norms = np.sqrt(np.asarray(unit.multiply(unit).sum(axis=1)).ravel())
    unit = sp.diags(1 / np.maximum(norms, 1e-12)) @ unit
    similarity = (unit[queries] @ unit.T).toarray()
    similarity[np.arange(len(queries)), queries] = -np.inf
    nearest = np.argpartition(-similarity, k, axis=1)[:, :k]
    relevant = np.zeros(similarity.shape, bool)
    np.put_along_axis(relevant, nearest, True, axis=1)
    gains = np.where(found >= 0, np.take_along_axis(relevant, np.maximum(found, 0), axis=1), False).astype(np.float64)
    return ndcg_from_gains(gains, np.ones((len(queries), k)))


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean(values: np.ndarray) -> float:
    """Mean over queries with a relevant user."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


# -- the task (userrep.tasks.registry) ------------------------------------------------------------


class SimilarUsers:
    """Nearest users by cosine: the batch's FAISS index over every user's embedding (served by
    the embedding API, kept current online by ``LiveIndex``); nDCG@50 per query user, relevance
    the overlap of label-window artists."""

    name = "similar_users"
    metric = "ndcg@50"
    # ndcg@50: against pairs, else label-window overlap; ndcg@50_taste: against true taste neighbours
    columns = {"similar_users": ("ndcg@50", "ndcg@50_taste")}
    has_head = False  # the index is rebuilt from each batch's own embeddings; no consumer model
    needs_labels = False  # the index is built even where the labels are too thin to validate it
    route = None
    request = None

    def train(self, files, data, config):
        from userrep.backfill import read_embeddings
        from userrep.tasks.registry import Trained

        ids, vectors, batch_id = read_embeddings(files.embeddings)
        if batch_id != data.batch_id:
            raise ValueError(f"embeddings.parquet: batch_id {batch_id} in batch {data.batch_id}")
        faiss.write_index(build_index(vectors), str(files.neighbour_index))
        np.save(files.neighbour_ids, ids.astype(str))
        queries = data.valid[:QUERIES]
        found = neighbours(build_index(data.x), data.x, queries, 50)
        metrics = {"ndcg@50": mean(ndcg_with_overlap(found, queries, data.window_artists))}
        return Trained(metrics, [files.neighbour_index, files.neighbour_ids])

    def paired(self, batches, xs, window):
        """Per query (the first ``QUERIES`` validation users), nDCG@50 of its neighbours among the
        window's users in each batch's embeddings."""
        queries = window.data.valid[:QUERIES]
        return [
            ndcg_with_overlap(neighbours(build_index(x), x, queries, 50), queries, window.data.window_artists)
            for x in xs
        ]

    def scorer(self, files):
        return None

    def evaluate(self, ctx, board, reps, cold_reps, config):
        if not run_similar_users(
            ctx, board, {**reps, **({"als": ctx.als_factors} if cold_reps is not None else {})}, config
        ):
            return {self.name: "no test users with pairs or label-window plays to judge neighbours by"}
        return {}


QUERIES = 1000  # validation users queried for neighbours


def run_similar_users(ctx, board, reps: dict, config) -> dict | None:
    """nDCG@50 of FAISS neighbours per representation; into ``board``, or returned when None."""
    rng = np.random.default_rng(config.seed)
    if ctx.related is not None and ctx.related.nnz:
        candidates = ctx.test_rows[np.diff(ctx.related.indptr)[ctx.test_rows] > 0]
        score = lambda found, q: ndcg_with_pairs(found, q, ctx.related)  # noqa: E731
    else:
        candidates = ctx.test_rows[np.diff(ctx.label_artists.indptr)[ctx.test_rows] > 0]
        score = lambda found, q: ndcg_with_overlap(found, q, ctx.label_artists)  # noqa: E731
    if len(candidates) == 0:
        return None
    n = min(config.similar_queries, len(candidates))
    queries = np.sort(rng.choice(candidates, size=n, replace=False))
    known, taste = true_taste(ctx)
    in_known = np.flatnonzero(np.isin(known, ctx.test_rows))
    taste_queries = np.sort(rng.choice(in_known, size=min(config.similar_queries, len(in_known)), replace=False))
    out = {}
    for method, x in reps.items():
        rows = {"ndcg@50": score(neighbours(build_index(x), x, queries, 50), queries)}
        if len(taste_queries):  # neighbours among the users whose taste is known
            found = neighbours(build_index(x[known]), x[known], taste_queries, 50)
            rows["ndcg@50_taste"] = ndcg_with_taste(found, taste_queries, taste)
        out[method] = {metric: mean(values) for metric, values in rows.items()}
        if board is not None:  # the population's first n resampling weights: queries are a sample already
            size = len(board.weights["queries"][0])
            padded = {metric: np.r_[values, np.full(size - len(values), np.nan)] for metric, values in rows.items()}
            board.add_rows("similar_users", method, "queries", padded)
    return out


def true_taste(ctx) -> tuple[np.ndarray, np.ndarray | sp.csr_matrix]:
    """(rows, taste vectors) of the users whose true taste is known: the synthetic world's hidden
    taste at the cut-off (``world.true_taste``); on real data, the held-out listening, each
    user's label-window plays over the artists (the taste a representation built from history
    should predict; users without any have none)."""
    from userrep.world import true_taste as world_taste

    hidden = world_taste(ctx.ds.path, ctx.features.user_ids, ctx.split.as_of) if ctx.ds.path else None
    if hidden is not None:
        known = np.flatnonzero(~np.isnan(hidden).any(axis=1))
        return known, hidden[known]
    known = np.flatnonzero(np.diff(ctx.label_artists.indptr) > 0)
    return known, ctx.label_artists[known]


TASK = SimilarUsers()
