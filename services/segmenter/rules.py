"""The compiled rule tree of the segment definition language: conditions, combinations,
weighted rules, segments and definitions, with the compiled comparisons and explanations
(pure; split out of :mod:`services.segmenter.dsl`, which parses YAML into these; issue #14).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

OPERATORS = (">", ">=", "<", "<=", "==", "!=", "between", "in")
#: Features whose value grows with event time (a recency in days): a stored value is aged by
#: the time elapsed since it was computed, so membership can change with no new score.
AGING_PREFIX = "days_since_"
#: Features the segmenter derives itself from a customer's own membership history.
DERIVED_FEATURES = frozenset({"days_since_re_engaged"})
#: Score fields of CustomerScore that rules may use next to the ``features`` map.
SCORE_FIELDS = ("churn_probability", "engagement_score", "clv", "cluster", "lifecycle_stage")

Value = Union[float, str]  # noqa: UP007 (a runtime alias)
Values = Mapping[str, Value]
Thresholds = Mapping[tuple[str, float], float]

_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?|100)$")

#: Customer attributes (segflow.attributes) appear in a customer's values under this prefix.
ATTR_PREFIX = "attr."
LOOKUP_PREFIX = "lookup."
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_ATTR = re.compile(rf"^attr\.({_NAME})$")
_LOOKUP = re.compile(rf"^lookup\.({_NAME})\((attr\.{_NAME})\)$")
#: Lookup tables as the core reads them: table name -> key -> value.
Lookups = Mapping[str, Mapping[str, str]]
NO_LOOKUPS: Lookups = {}


def lookup_call(feature: str) -> tuple[str, str] | None:
    """``(table, attribute feature)`` of a ``lookup.<table>(attr.<name>)`` feature, else None.

    >>> lookup_call("lookup.zip_income(attr.zip)"), lookup_call("attr.zip")
    (('zip_income', 'attr.zip'), None)
    """
    m = _LOOKUP.match(feature)
    return (m.group(1), m.group(2)) if m is not None else None


# -- the compiled rule tree -----------------------------------------------------------------
@dataclass(frozen=True)
class Explanation:
    """One condition's verdict: observed value, threshold and margin (≥ 0 on the passing side)."""

    path: str
    feature: str
    operator: str
    observed: float | None
    threshold: float | None
    margin: float | None
    passed: bool
    observed_text: str | None = None
    threshold_text: str | None = None


@dataclass(frozen=True)
class Condition:
    """A leaf: ``feature op value``; ``percentile`` set when the threshold is ``pNN``."""

    path: str
    feature: str
    op: str
    value: Value | None = None
    values: tuple[Value, ...] = ()
    percentile: float | None = None
    _fn: Callable[[Values, Thresholds], bool] = field(
        default=lambda v, t: False, compare=False, repr=False
    )

    def test(self, values: Values, thresholds: Thresholds) -> bool:
        return self._fn(values, thresholds)

    def leaves(self) -> list[Condition]:
        return [self]

    def threshold(self, thresholds: Thresholds) -> Value | None:
        """The threshold in force (a percentile resolved against ``thresholds``)."""
        if self.percentile is not None:
            return thresholds.get((self.feature, self.percentile))
        return self.value

    def explain(self, values: Values, thresholds: Thresholds) -> list[Explanation]:
        observed = values.get(self.feature)
        passed = self.test(values, thresholds)
        obs_num = observed if isinstance(observed, float) else None
        obs_txt = observed if isinstance(observed, str) else None
        if self.op in ("between", "in"):
            nums = [v for v in self.values if isinstance(v, float)]
            thr_txt: str | None = ",".join(_fmt(v) for v in self.values)
            margin = None
            if self.op == "between" and obs_num is not None and len(nums) == 2:
                margin = round(min(obs_num - nums[0], nums[1] - obs_num), 9)
            threshold = nums[0] if len(nums) == 1 else None
            return [
                Explanation(
                    self.path,
                    self.feature,
                    self.op,
                    obs_num,
                    threshold,
                    margin,
                    passed,
                    obs_txt,
                    thr_txt,
                )
            ]
        thr = self.threshold(thresholds)
        thr_num = thr if isinstance(thr, float) else None
        thr_txt = thr if isinstance(thr, str) else None
        if self.percentile is not None:
            thr_txt = f"p{_fmt(self.percentile)}" + ("" if thr is not None else " (not computed)")
        margin = None
        if obs_num is not None and thr_num is not None:
            margin = round(_margin(self.op, obs_num, thr_num), 9)
        if observed is None:
            obs_txt = "missing"
        return [
            Explanation(
                self.path, self.feature, self.op, obs_num, thr_num, margin, passed, obs_txt, thr_txt
            )
        ]


@dataclass(frozen=True)
class Combination:
    """``all`` / ``any`` / ``not`` over child rules."""

    path: str
    kind: str
    items: tuple[Rule, ...]
    _fn: Callable[[Values, Thresholds], bool] = field(
        default=lambda v, t: False, compare=False, repr=False
    )

    def test(self, values: Values, thresholds: Thresholds) -> bool:
        return self._fn(values, thresholds)

    def leaves(self) -> list[Condition]:
        return [leaf for item in self.items for leaf in item.leaves()]

    def explain(self, values: Values, thresholds: Thresholds) -> list[Explanation]:
        return [e for item in self.items for e in item.explain(values, thresholds)]


@dataclass(frozen=True)
class Weighted:
    """Weighted scoring: the sum of the weights of passing parts must reach ``threshold``."""

    path: str
    parts: tuple[tuple[Rule, float], ...]
    threshold: float
    _fn: Callable[[Values, Thresholds], bool] = field(
        default=lambda v, t: False, compare=False, repr=False
    )

    def test(self, values: Values, thresholds: Thresholds) -> bool:
        return self._fn(values, thresholds)

    def score(self, values: Values, thresholds: Thresholds) -> float:
        return round(sum(w for rule, w in self.parts if rule.test(values, thresholds)), 9)

    def leaves(self) -> list[Condition]:
        return [leaf for rule, _ in self.parts for leaf in rule.leaves()]

    def explain(self, values: Values, thresholds: Thresholds) -> list[Explanation]:
        total = self.score(values, thresholds)
        out = [
            Explanation(
                self.path,
                "weighted_score",
                ">=",
                total,
                self.threshold,
                round(total - self.threshold, 9),
                total >= self.threshold,
            )
        ]
        for rule, _ in self.parts:
            out.extend(rule.explain(values, thresholds))
        return out


Rule = Union[Condition, Combination, Weighted]  # noqa: UP007 (a runtime alias)


def first_weighted(rule: Rule) -> Weighted | None:
    """The first weighted node of a rule (its score goes on the change), if any."""
    if isinstance(rule, Weighted):
        return rule
    if isinstance(rule, Combination):
        for item in rule.items:
            found = first_weighted(item)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class Segment:
    """One compiled segment definition."""

    name: str
    priority: int
    enter: Rule
    exit: Rule | None  # None: leave when ``enter`` stops holding
    re_engaged_when: Rule | None  # an exit is ``re_engaged`` when this holds
    min_dwell_ms: int = 0
    cooldown_ms: int = 0
    ttl_ms: int | None = None
    sustain_ms: int = 0
    #: A recency (``days_since_*``) that dates ``sustain`` back: when enter starts to hold,
    #: it is taken to have held since the event the recency measures (e.g. the last purchase,
    #: after which the overdue gap began), when that is earlier.
    sustain_since: str | None = None
    #: An exit is ``re_engaged`` only after a stay this long; a shorter stay was transient
    #: behaviour (seed 001: "applying a cooldown window before re-engagement triggers").
    re_engaged_after_ms: int = 0
    description: str = ""
    line: int = 0
    derived: bool = False  # uses features derived from membership history: evaluated last
    aging: tuple[Condition, ...] = ()  # leaves on aging features (timers at their crossings)

    def leaves(self) -> list[Condition]:
        rules = [r for r in (self.enter, self.exit, self.re_engaged_when) if r is not None]
        return [leaf for r in rules for leaf in r.leaves()]


@dataclass(frozen=True)
class Definitions:
    """A validated, versioned set of segments (base segments first, derived ones last)."""

    version: str
    segments: tuple[Segment, ...]
    deprecate_after_ms: int = 90 * DAY
    percentiles: frozenset[tuple[str, float]] = frozenset()
    features: frozenset[str] = frozenset()
    by_name: Mapping[str, Segment] = field(default_factory=dict, compare=False, repr=False)
    #: Every distinct threshold on an aging feature, over all segments: (feature, fixed
    #: bound, percentile) with exactly one of the last two set (the instants a recency
    #: crosses them are the timers of a customer).
    aging_bounds: tuple[tuple[str, float | None, float | None], ...] = field(
        default=(), compare=False, repr=False
    )
    #: Lookup features the rules read: (feature, table, attribute feature), e.g.
    #: ("lookup.zip_income(attr.zip)", "zip_income", "attr.zip").
    lookups: tuple[tuple[str, str, str], ...] = ()

    @property
    def attributes(self) -> frozenset[str]:
        """The attribute features (``attr.*``) the rules read, directly or through a lookup."""
        return frozenset(f for f in self.features if f.startswith(ATTR_PREFIX)) | frozenset(
            arg for _, _, arg in self.lookups
        )

    @property
    def score_features(self) -> frozenset[str]:
        """The features that come from scores (not attributes, not lookups)."""
        return frozenset(
            f
            for f in self.features
            if not f.startswith(ATTR_PREFIX) and not f.startswith(LOOKUP_PREFIX)
        )


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


def _numeric(op: str, f: str, c: float) -> Callable[[Values, Thresholds], bool]:
    """``feature op constant`` with the comparison inlined (the hot path: no call per test)."""
    if op == ">":

        def gt(v: Values, t: Thresholds) -> bool:
            x = v.get(f)
            return x.__class__ is float and x > c

        return gt
    if op == ">=":

        def ge(v: Values, t: Thresholds) -> bool:
            x = v.get(f)
            return x.__class__ is float and x >= c

        return ge
    if op == "<":

        def lt(v: Values, t: Thresholds) -> bool:
            x = v.get(f)
            return x.__class__ is float and x < c

        return lt
    if op == "<=":

        def le(v: Values, t: Thresholds) -> bool:
            x = v.get(f)
            return x.__class__ is float and x <= c

        return le
    cmp = _COMPARE[op]

    def other(v: Values, t: Thresholds) -> bool:
        x = v.get(f)
        return x.__class__ is float and cmp(x, c)

    return other


def _textual(op: str, f: str, c: float) -> Callable[[Values, Thresholds], bool]:
    """``attribute op number``: attributes are strings; one that reads as a number compares.

    >>> fn = _textual(">=", "attr.seats", 10.0)
    >>> fn({"attr.seats": "12"}, {}), fn({"attr.seats": "a few"}, {}), fn({}, {})
    (True, False, False)
    """
    cmp = _COMPARE[op]

    def textual(v: Values, t: Thresholds) -> bool:
        x = v.get(f)
        if isinstance(x, str):
            try:
                x = float(x)
            except ValueError:
                return False
        return isinstance(x, float) and math.isfinite(x) and cmp(x, c)

    return textual


def _aging_bounds(
    groups: Any,
) -> tuple[tuple[str, float | None, float | None], ...]:
    """The distinct (feature, bound, percentile) thresholds of aging leaves, in first-seen order.

    >>> from services.segmenter.dsl import parse
    >>> d = parse('version: 1\\nsegments:\\n'
    ...           '  - {name: A, enter: {feature: days_since_open, op: between, value: [7, 30]},'
    ...           '     exit: {feature: days_since_open, op: ">", value: 30}}\\n')
    >>> d.aging_bounds
    (('days_since_open', 7.0, None), ('days_since_open', 30.0, None))
    """
    out: dict[tuple[str, float | None, float | None], None] = {}
    for leaves in groups:
        for leaf in leaves:
            if leaf.op == "between":
                for b in leaf.values:
                    if isinstance(b, float):
                        out[(leaf.feature, b, None)] = None
            elif leaf.percentile is not None:
                out[(leaf.feature, None, leaf.percentile)] = None
            elif isinstance(leaf.value, float):
                out[(leaf.feature, leaf.value, None)] = None
    return tuple(out)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _margin(op: str, observed: float, threshold: float) -> float:
    """Signed distance to the threshold, positive (or zero) on the passing side."""
    if op in (">", ">="):
        return observed - threshold
    if op in ("<", "<="):
        return threshold - observed
    if op == "==":
        return -abs(observed - threshold)
    return abs(observed - threshold)  # !=


def _fmt(v: Value) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
