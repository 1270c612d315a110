"""Local Outlier Factor on 1-D values: the outlier fraction text-guided recovery sizes its sets with.

As the released Recoverable-Compression code: scikit-learn's
``LocalOutlierFactor(n_neighbors=k, contamination='auto').fit_predict`` on the values as float32,
and the fraction labelled -1 (LOF > 1.5). Only that fraction is used; the sets are then
picked by top-k.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.neighbors import LocalOutlierFactor


def lof_outlier_fraction(values: np.ndarray, n_neighbors: int) -> float:
    """Fraction of ``values`` LOF labels outliers, in [0, 1]; 0 when there are fewer than two."""
    x = np.asarray(values, dtype=np.float32).reshape(-1, 1)  # [n, 1]
    n = x.shape[0]
    if n < 2:
        return 0.0  # no neighbours, no outliers (scikit-learn would raise)
    # scikit-learn clamps k to n - 1 itself, with a warning; clamp here and say nothing.
    k = max(1, min(int(n_neighbors), n - 1))
    with warnings.catch_warnings():
        # "Duplicate values are leading to incorrect results": expected, and part of the reference.
        warnings.simplefilter("ignore", UserWarning)
        labels = LocalOutlierFactor(n_neighbors=k, contamination="auto").fit_predict(x)
    return int(np.count_nonzero(labels == -1)) / n
