"""Probabilities and explanations from a churn model's contribution matrix (pure; moved
out of :mod:`services.scorer.model`, which imports them)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def sigmoid_rows(raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The logistic function of log-odds, exactly 0 or 1 beyond +-30, NaN-safe (0.5)."""
    with np.errstate(over="ignore"):
        p = 1.0 / (1.0 + np.exp(-np.clip(raw, -30.0, 30.0)))
    p = np.where(raw < -30, 0.0, np.where(raw > 30, 1.0, p))
    out: npt.NDArray[np.float64] = np.where(np.isfinite(p), np.clip(p, 0.0, 1.0), 0.5)
    return out


def explain_rows(
    contrib: npt.NDArray[np.float64], intercept: float, names: Sequence[str], k: int
) -> tuple[npt.NDArray[np.float64], list[list[tuple[str, float]]]]:
    """Probabilities ``sigmoid(intercept + row sum)`` of a contribution matrix and each row's
    ``k`` largest contributions by magnitude (column ``j`` is named ``names[j]``).

    >>> p, tops = explain_rows(np.array([[1.0, -2.0, 0.5]]), 0.0, ("a", "b", "c"), 2)
    >>> round(float(p[0]), 4), tops
    (0.3775, [[('b', -2.0), ('a', 1.0)]])
    """
    p = sigmoid_rows(contrib.sum(axis=1) + intercept)
    if k <= 0:
        return p, [[] for _ in range(len(p))]
    order = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(contrib, order, axis=1).tolist()
    tops = [
        [(names[j], c) for j, c in zip(row, vals, strict=True)]
        for row, vals in zip(order.tolist(), picked, strict=True)
    ]
    return p, tops
