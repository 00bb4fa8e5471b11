"""Deployment-wide percentile thresholds: per-partition summaries and their exact merge.

A segment condition ``value: p80`` compares a feature with its 80th percentile over *all*
the deployment's customers (issue #15), while each segmenter instance holds only the
customers of the partitions it owns. At every percentile refresh an instance summarises
each owned partition's values of each ``pNN`` feature (:func:`summarize`) and publishes the
summary on the compacted ``segflow.segmenter.population`` topic (key ``<feature>@<partition>``,
in the tick's transaction); every instance reads that topic whole and merges its own fresh
summaries with the other partitions' latest ones (:func:`merged_rank`).

The summary is every distinct value with its count, so the merge gives exactly the
nearest-rank percentile of the union — the same number one instance holding every customer
computes (:func:`services.segmenter.quantiles.nearest_rank`). A partition with more than
``MAX_EXACT`` distinct values (one record stays under Kafka's default 1 MB) is summarised by
``MAX_EXACT`` evenly spaced order statistics instead, each counting the values up to it: the
merged percentile's rank is then off by at most ``customers / MAX_EXACT`` of that partition
(e.g. 2 ranks at 100,000 distinct values), and the record says ``exact: false``.

>>> a = summarize(np.array([1.0, 2.0, 2.0]))
>>> b = summarize(np.array([3.0, 4.0]))
>>> a.values, a.counts, a.exact
([1.0, 2.0], [1, 2], True)
>>> merged_rank([a, b], 50.0), merged_rank([a, b], 100.0), merged_rank([], 50.0)
(2.0, 4.0, None)
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.segmenter.dsl import Definitions
from services.segmenter.quantiles import Column, nearest_rank

#: Distinct values one record carries exactly (~10 bytes each in Avro: ~600 KB).
MAX_EXACT = 60_000


@dataclass(frozen=True)
class Summary:
    """One partition's values of one feature: ascending ``values`` with their ``counts``."""

    values: list[float]
    counts: list[int]
    exact: bool = True

    @property
    def customers(self) -> int:
        return int(sum(self.counts))

    def to_record(self, feature: str, partition: int, instance: str, now_ms: int) -> dict[str, Any]:
        return {
            "feature": feature,
            "partition": partition,
            "instance": instance,
            "computed_at": now_ms,
            "customers": self.customers,
            "exact": self.exact,
            "values": self.values,
            "counts": self.counts,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Summary:
        return cls(
            [float(v) for v in record["values"]],
            [int(c) for c in record["counts"]],
            bool(record.get("exact", True)),
        )


def summarize(values: np.ndarray, max_points: int = MAX_EXACT) -> Summary:
    """The summary of one partition's values (NaN-free).

    >>> s = summarize(np.arange(1.0, 11.0), max_points=5)
    >>> s.values, s.counts, s.exact
    ([2.0, 4.0, 6.0, 8.0, 10.0], [2, 2, 2, 2, 2], False)
    """
    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) <= max_points:
        return Summary(uniq.tolist(), counts.tolist(), True)
    ordered = np.sort(values)
    n = len(ordered)
    ranks = np.ceil(np.arange(1, max_points + 1) * n / max_points).astype(np.int64)  # 1-based
    return Summary(ordered[ranks - 1].tolist(), np.diff(ranks, prepend=0).tolist(), False)


def merged_rank(parts: Iterable[Summary], pct: float) -> float | None:
    """The ``pct``-th percentile (nearest rank) of the union of ``parts``; None when empty.

    Nearest rank as :func:`services.segmenter.quantiles.nearest_rank`: the k-th smallest value,
    k = ceil(pct / 100 * n) clamped to [1, n].
    """
    parts = [p for p in parts if p.values]
    if not parts:
        return None
    values = np.concatenate([np.asarray(p.values, dtype=np.float64) for p in parts])
    counts = np.concatenate([np.asarray(p.counts, dtype=np.int64) for p in parts])
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(counts[order])
    n = int(cum[-1])
    if n <= 0:
        return None
    k = min(max(1, math.ceil(pct / 100 * n)), n)
    return float(values[order][int(np.searchsorted(cum, k, side="left"))])


# -- dynamic thresholds ---------------------------------------------------------------------
def percentile_thresholds(
    defs: Definitions, population: Mapping[str, Column | Iterable[float]]
) -> dict[tuple[str, float], float]:
    """Nearest-rank percentiles of each feature used as ``pNN`` over the current population:
    :class:`~services.segmenter.quantiles.Column` s (the service) or plain values (replay and
    tests), found by selection, not by sorting.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: clv, op: ">=", value: p80}}\\n')
    >>> percentile_thresholds(defs, {"clv": [float(i) for i in range(1, 101)]})
    {('clv', 80.0): 80.0}
    """
    out: dict[tuple[str, float], float] = {}
    for feature, pct in defs.percentiles:
        column = population.get(feature, ())
        if isinstance(column, Column):
            value = column.nearest_rank(pct)
        else:
            value = nearest_rank((v for v in column if not math.isnan(v)), pct)
        if value is not None:
            out[(feature, pct)] = value
    return out


def rank_of(sorted_values: list[float], value: float) -> float:
    """Percentile rank of ``value`` in ``sorted_values`` (for explanations and tests)."""
    if not sorted_values:
        return 0.0
    return 100.0 * bisect.bisect_right(sorted_values, value) / len(sorted_values)
