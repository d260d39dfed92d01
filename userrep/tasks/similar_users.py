"""Similar users: nearest neighbours in representation space with FAISS, scored by nDCG@50.

Cosine similarity (inner product of L2-normalized rows). An exact index up to ``exact_max``
candidates; above it HNSW (approximate, sub-linear queries).
"""

from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp

from userrep.metrics import ndcg_from_gains

EXACT_MAX = 100_000


def build_index(vectors: np.ndarray, exact_max: int = EXACT_MAX) -> faiss.Index:
    x = _normalized(vectors)
    if len(x) <= exact_max:
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    index.add(x)
    return index


def neighbours(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k neighbour rows of each query row, the query itself excluded (-1 pads short lists)."""
    _, found = index.search(_normalized(vectors[queries]), k + 1)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for i, (query, row) in enumerate(zip(queries, found)):
        row = row[(row != query) & (row >= 0)][:k]
        out[i, :len(row)] = row
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


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mean(values: np.ndarray) -> float:
    """Mean over queries with a relevant user."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
