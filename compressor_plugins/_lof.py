"""Local Outlier Factor on 1-D values: the outlier fraction that text-guided recovery sizes its sets with.

The released Recoverable-Compression code calls scikit-learn's
``LocalOutlierFactor(n_neighbors=k, contamination='auto').fit_predict`` on a column of float32
values and uses the fraction labelled -1. This module computes the same number with numpy
alone, following scikit-learn 1.9 step by step (its ``fit`` and ``kneighbors``):

- ``k`` is clamped to ``max(1, min(k, n - 1))``, as scikit-learn does (it warns when ``k > n``);
  fewer than two values have no neighbours, so no outliers (scikit-learn raises there);
- the neighbours of a point are its ``k`` nearest *other* points; distances are computed in
  float64 and stored as float32, because scikit-learn casts them back to the input's dtype;
- reachability distance = max(k-distance of the neighbour, distance); local reachability density
  = 1 / (mean reachability distance + 1e-10); LOF = mean(neighbour lrd) / own lrd, every step in
  float32 with numpy's own ``mean``, on rows ordered by distance as scikit-learn's are;
- ``contamination='auto'`` labels a point an outlier when LOF > 1.5.

Where two *different* values are exactly as far from a point and only one fits in its ``k``
nearest, the choice is made by patch index here and by kd-tree traversal order in scikit-learn,
so the two can differ in that case (ties between *equal* values never matter: equal values have
equal k-distances and densities). The unit tests compare this with scikit-learn when it is
installed; the golden data of ``shared/oracles/recoverable_compression`` match exactly.
"""

from __future__ import annotations

import numpy as np

OUTLIER_LOF = 1.5  # contamination='auto': scikit-learn's fixed offset


def lof_scores(values: np.ndarray, n_neighbors: int) -> np.ndarray:
    """The local outlier factor of every value ([n] float32; all 1.0 when n < 2)."""
    x = np.asarray(values, dtype=np.float32).reshape(-1)  # [n]
    n = x.shape[0]
    if n < 2:
        return np.ones(n, dtype=np.float32)
    k = max(1, min(int(n_neighbors), n - 1))
    neighbours, distances = _k_nearest(x.astype(np.float64), k)  # [n, k] each, nearest first

    distances = distances.astype(np.float32)  # [n, k] scikit-learn keeps float32 input's distances float32
    k_distance = distances[:, k - 1]  # [n] distance to the k-th neighbour
    reach = np.maximum(distances, k_distance[neighbours])  # [n, k]
    lrd = 1.0 / (np.mean(reach, axis=1) + 1e-10)  # [n] float32; 1e-10 keeps duplicates finite
    return np.mean(lrd[neighbours] / lrd[:, None], axis=1)  # [n]


def lof_outlier_fraction(values: np.ndarray, n_neighbors: int) -> float:
    """Fraction of the values that LOF (``contamination='auto'``) labels outliers, in [0, 1]."""
    scores = lof_scores(values, n_neighbors)  # [n]
    if scores.shape[0] == 0:
        return 0.0
    # Written as scikit-learn decides it: negative_outlier_factor_ < offset_ (-1.5).
    return int(np.count_nonzero(-scores < -OUTLIER_LOF)) / scores.shape[0]


def _k_nearest(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other points of every 1-D point: indices and distances, each [n, k].

    In 1-D the k nearest points of the value at sorted rank r lie within ranks r - k .. r + k,
    so only those 2k candidates are examined (O(n k) instead of O(n^2)). Rows are ordered by
    distance, ties by index.
    """
    n = x.shape[0]
    order = np.argsort(x, kind="stable")  # [n] rank -> index
    sorted_x = x[order]  # [n]
    offsets = np.concatenate([np.arange(-k, 0), np.arange(1, k + 1)])  # [2k]
    ranks = np.arange(n)[:, None] + offsets[None, :]  # [n, 2k] candidate ranks around each rank
    inside = (ranks >= 0) & (ranks < n)
    ranks = np.clip(ranks, 0, n - 1)
    candidates = order[ranks]  # [n, 2k] original indices
    gaps = np.where(inside, np.abs(sorted_x[ranks] - sorted_x[:, None]), np.inf)  # [n, 2k]
    pick = np.lexsort((candidates, gaps), axis=-1)[:, :k]  # [n, k] by distance, then index
    rows = np.arange(n)[:, None]
    neighbours = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float64)
    neighbours[order] = candidates[rows, pick]  # back from rank order to index order
    distances[order] = gaps[rows, pick]
    return neighbours, distances
