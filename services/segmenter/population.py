"""Percentile thresholds per scores partition, on a grid of that partition's event time.

A segment condition ``value: p80`` compares a feature with its 80th percentile over the
customers of the customer's own partition of ``segflow.scores`` (issue #15; README.md says why
a partition is population enough). Each partition has one :class:`Table` in force: the
nearest-rank ``pNN`` of its customers' latest values, computed when the partition's records
first reach the next instant of a grid every ``percentile_refresh`` of event time. The table
is therefore a function of the partition's records in order — the same with 1, 2 or N
instances and across a restart — and it is kept in the partition's changelog
(``thresholds@<partition>``), so a new owner continues with the committed table instead of
recomputing one from restored states.

>>> t = Table(2, 7_200_000, {("clv", 80.0): 10.5})
>>> Table.from_record(t.to_record()) == t
True
>>> t.due(10_799_999, 3_600_000), t.due(10_800_000, 3_600_000)
(False, True)
>>> grid_floor(10_799_999, 3_600_000)
7200000
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.segmenter.dsl import Definitions
from services.segmenter.quantiles import Column, nearest_rank

#: The changelog key of a partition's table: ``thresholds@<partition>``.
TABLE_KEY = "thresholds@"

Thresholds = dict[tuple[str, float], float]


def grid_floor(t: int, step_ms: int) -> int:
    """The latest grid instant at or before ``t`` (a multiple of ``step_ms`` since the epoch)."""
    return t - t % step_ms if step_ms > 0 else t


@dataclass(frozen=True)
class Table:
    """One partition's thresholds, in force from the grid instant after the previous table's
    ``at`` up to the grid instant after this one's ``at`` (the latest grid instant the
    partition's records had reached when it was computed)."""

    partition: int
    at: int
    values: Thresholds = field(default_factory=dict)

    def due(self, as_of: int, step_ms: int) -> bool:
        """Whether a record of instant ``as_of`` reaches the next grid instant."""
        return as_of >= self.at + max(step_ms, 1)

    def to_record(self) -> dict[str, Any]:
        """The changelog record (SegmenterStateEntry, kind ``thresholds``)."""
        return {
            "kind": "thresholds",
            "customer": None,
            "segment": None,
            "thresholds": {
                "partition": self.partition,
                "at": self.at,
                "values": {f"{feature}@{pct:g}": v for (feature, pct), v in self.values.items()},
            },
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Table:
        body = record["thresholds"]
        values: Thresholds = {}
        for key, v in (body.get("values") or {}).items():
            feature, _, pct = key.rpartition("@")
            values[(feature, float(pct))] = float(v)
        return cls(int(body["partition"]), int(body["at"]), values)


def crossed(
    old: Mapping[tuple[str, float], float], new: Thresholds
) -> list[tuple[str, float, float]]:
    """Per feature whose threshold moved, the value range ``[low, high]`` in which a customer's
    value lies between the old and the new one (everything when either is missing).

    >>> crossed({("clv", 80.0): 5.0}, {("clv", 80.0): 7.0, ("x", 50.0): 1.0})
    [('clv', 5.0, 7.0), ('x', -inf, inf)]
    """
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        lo, hi = (-math.inf, math.inf) if a is None or b is None else (min(a, b), max(a, b))
        out.append((key[0], lo, hi))
    return out


# -- nearest-rank thresholds ----------------------------------------------------------------
def percentile_thresholds(
    defs: Definitions, population: Mapping[str, Column | Iterable[float]]
) -> Thresholds:
    """Nearest-rank percentiles of each feature used as ``pNN`` over a population:
    :class:`~services.segmenter.quantiles.Column` s (the service: one partition's) or plain
    values (replay and tests), found by selection, not by sorting.

    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: clv, op: ">=", value: p80}}\\n')
    >>> percentile_thresholds(defs, {"clv": [float(i) for i in range(1, 101)]})
    {('clv', 80.0): 80.0}
    """
    out: Thresholds = {}
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
