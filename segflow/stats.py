"""The statistics segflow reports, defined once: ROC AUC, calibration error, latency quantiles.

Pure (numpy only). The scorer's exported model quality, the demo's report and the benches all
use these, so a number called "AUC" or "p99" means the same thing wherever it is printed.

* **ROC AUC** is rank based (Mann-Whitney U), ties counting half; ``None`` when only one
  class is present (an AUC of a single class is undefined, not 0 or 0.5).
* **Calibration error** is the expected calibration error over equal-width probability bins.
* **Quantiles** are nearest-rank (numpy's ``inverted_cdf``): the p99 is a value that was
  observed, the smallest with at least 99 % of the values at or below it — what a latency
  objective ("99 % of changes within 1 s") is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def roc_auc(scores: Any, labels: Any) -> float | None:
    """Rank-based ROC AUC, ties counting half; None when only one class is present.

    >>> roc_auc([0.1, 0.4, 0.4, 0.9], [False, False, True, True])
    0.875
    >>> roc_auc([0.1, 0.2], [True, True]) is None
    True
    """
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s))
    edges = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(s)]])
    ranks[order] = np.repeat((starts + ends - 1) / 2.0 + 1.0, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def calibration_error(scores: Any, labels: Any, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width probability bins.

    >>> calibration_error([0.05, 0.05, 0.95, 0.95], [False, False, True, True])
    0.05
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    if not len(s):
        return 0.0
    idx = np.minimum((s * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            err += mask.sum() / len(s) * abs(s[mask].mean() - y[mask].mean())
    return round(float(err), 12)


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile: the smallest observed value with at least ``q`` of the values
    at or below it.

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.5), quantile(list(range(1, 101)), 0.99)
    (2.0, 99.0)
    """
    return float(np.quantile(np.asarray(values, dtype=float), q, method="inverted_cdf"))


def latency_summary(values: Sequence[float]) -> dict[str, float] | None:
    """``n``, ``p50``, ``p99`` and ``max`` of ``values`` (None when there are none).

    >>> latency_summary([0.2, 0.1, 0.4])
    {'n': 3, 'p50': 0.2, 'p99': 0.4, 'max': 0.4}
    """
    if not len(values):
        return None
    return {
        "n": len(values),
        "p50": quantile(values, 0.5),
        "p99": quantile(values, 0.99),
        "max": float(max(values)),
    }
