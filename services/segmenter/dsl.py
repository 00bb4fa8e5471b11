"""The segment definition language: YAML in, checked and compiled definitions out (pure).

A definitions file has a ``version`` and a list of ``segments``; each segment has an
``enter`` rule and optionally a separate ``exit`` rule (hysteresis), a ``re_engaged_when``
rule (which exits count as ``re_engaged``), a ``priority`` and timings (``min_dwell``,
``cooldown``, ``ttl``, ``sustain``, optionally dated back by ``sustain_since``, a recency;
``re_engaged_after``, the shortest stay whose exit counts as re-engagement). A rule is a
condition or a combination:

* ``{feature: clv, op: ">=", value: 500}`` — ops ``> >= < <= == != between in``;
  ``value: p80`` is the 80th percentile of that feature over the current population;
* ``{all: [...]}``, ``{any: [...]}``, ``{not: rule}``;
* ``{weighted: [{when: rule, weight: 0.7}, ...], threshold: 1.2}`` — passes when the
  weights of the passing parts add up to the threshold;
* ``{cluster: [2, 5]}`` — shorthand for ``{feature: cluster, op: in, value: [2, 5]}``.

Besides the scorer's features, a condition may read a customer attribute (``attr.<name>``: an
identify trait or a CRM column, a string; numeric operators compare it as a number) or a lookup
table applied to an attribute (``lookup.<table>(attr.<name>)``, e.g.
``{feature: "lookup.zip_income(attr.zip)", op: "==", value: high}``); a missing attribute, table
or entry is a missing value.

A condition on a feature the customer does not have is false (and explained as missing).
Errors carry the line and the field:

>>> problems = check('''version: "1"
... segments:
...   - name: Big
...     enter: {feature: clv, op: "=>", value: 5}
... ''')
>>> [str(p) for p in problems]
["line 4: segments[0].enter.op: unknown operator '=>' (one of >, >=, <, <=, ==, !=, between, in)"]
>>> defs = parse('''version: "1"
... segments:
...   - name: Big
...     enter: {feature: clv, op: ">=", value: 500}
...     cooldown: 7d
... ''')
>>> seg = defs.segments[0]
>>> seg.name, seg.cooldown_ms == 7 * DAY, seg.enter.test({"clv": 600.0}, {})
('Big', True, True)
"""

from __future__ import annotations

import hashlib
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from segflow import durations, yamldoc

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


# -- problems -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One error in a definitions file: where (line, field) and what."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


class DefinitionError(ValueError):
    """A definitions file did not validate; ``problems`` lists every error found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


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


# -- parsing --------------------------------------------------------------------------------
def parse(text: str) -> Definitions:
    """Parse and validate a definitions file; raises :class:`DefinitionError` with every problem.

    >>> parse("version: 1\\nsegments: []\\n").version.startswith("1+")
    True
    """
    parser = _Parser()
    defs = parser.parse(text)
    if parser.problems or defs is None:
        raise DefinitionError(parser.problems or [Problem(1, "(file)", "empty definitions")])
    return defs


def check(text: str) -> list[Problem]:
    """Every problem in ``text`` (empty when valid).

    >>> [str(p) for p in check("version: 1\\nsegments:\\n  - name: X\\n    enter: {all: 3}\\n")]
    ['line 4: segments[0].enter.all: expected a list of rules']
    """
    try:
        parse(text)
    except DefinitionError as exc:
        return exc.problems
    return []


def parse_duration(text: Any) -> int | None:
    """Milliseconds in ``"7d"``, ``"48h"``, ``"30m"``, ``"10s"``, ``"500ms"``, ``"2w"`` (the one
    parser, :mod:`segflow.durations`); None when ``text`` is not a duration.

    >>> parse_duration("48h") == 2 * DAY, parse_duration("1.5d") == 36 * HOUR, parse_duration(3)
    (True, True, None)
    """
    try:
        return durations.parse_duration(text)
    except ValueError:
        return None


class _Parser:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.doc = yamldoc.Document()

    def err(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.doc.line(path), path or "(file)", message))

    def parse(self, text: str) -> Definitions | None:
        try:
            self.doc = yamldoc.load(text)
        except yamldoc.YamlSyntaxError as exc:
            self.problems.append(Problem(exc.line, "(yaml)", exc.problem))
            return None
        for dup in self.doc.duplicates:
            self.problems.append(Problem(dup.line, dup.path, "duplicate key"))
        if self.doc.data is None:
            self.problems.append(Problem(1, "(file)", "empty definitions"))
            return None
        doc = self.doc.data
        if not isinstance(doc, dict):
            self.err("", "expected a mapping with 'version' and 'segments'")
            return None
        self._unknown(doc, "", {"version", "segments", "deprecate_after", "description"})
        version = doc.get("version")
        if version is None or isinstance(version, bool) or not str(version).strip():
            self.err("version" if "version" in doc else "", "a non-empty 'version' is required")
            version = ""
        deprecate = self._duration(doc, "deprecate_after", "", 90 * DAY) or 90 * DAY
        raw_segments = doc.get("segments")
        if not isinstance(raw_segments, list):
            self.err("segments" if "segments" in doc else "", "'segments' must be a list")
            raw_segments = []
        segments: list[Segment] = []
        names: set[str] = set()
        for i, raw in enumerate(raw_segments):
            seg = self._segment(raw, f"segments[{i}]")
            # the name is recorded even when the segment has errors, so a later duplicate of
            # it is reported now, not only once the first one's errors are fixed
            name = raw.get("name") if isinstance(raw, dict) else None
            if isinstance(name, str) and name.strip():
                if name in names:
                    self.err(f"segments[{i}].name", f"duplicate segment name {name!r}")
                names.add(name)
            if seg is not None:
                segments.append(seg)
        if self.problems:
            return None
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        ordered = tuple(sorted(segments, key=lambda s: s.derived))  # stable: file order kept
        leaves = [leaf for s in ordered for leaf in s.leaves()]
        return Definitions(
            version=f"{version}+{digest}",
            segments=ordered,
            deprecate_after_ms=deprecate,
            percentiles=frozenset(
                (leaf.feature, leaf.percentile) for leaf in leaves if leaf.percentile is not None
            ),
            features=frozenset(leaf.feature for leaf in leaves)
            | frozenset(s.sustain_since for s in ordered if s.sustain_since is not None),
            by_name={s.name: s for s in ordered},
            aging_bounds=_aging_bounds(s.aging for s in ordered),
            lookups=tuple(
                sorted(
                    {
                        (leaf.feature, *call)
                        for leaf in leaves
                        if (call := lookup_call(leaf.feature)) is not None
                    }
                )
            ),
        )

    def _unknown(self, raw: dict[str, Any], path: str, allowed: set[str]) -> None:
        for key in raw:
            if key not in allowed:
                sub = f"{path}.{key}" if path else key
                self.err(sub, f"unknown field (expected one of {', '.join(sorted(allowed))})")

    def _duration(
        self, raw: dict[str, Any], key: str, path: str, default: int | None
    ) -> int | None:
        if key not in raw or raw[key] is None:
            return default
        sub = f"{path}.{key}" if path else key
        ms = parse_duration(raw[key])
        if ms is None:
            self.err(sub, f"bad duration {raw[key]!r}: {durations.EXPECTED}")
            return default
        return ms

    def _segment(self, raw: Any, path: str) -> Segment | None:
        if not isinstance(raw, dict):
            self.err(path, "expected a mapping")
            return None
        self._unknown(
            raw,
            path,
            {
                "name",
                "description",
                "priority",
                "enter",
                "exit",
                "re_engaged_when",
                "min_dwell",
                "cooldown",
                "ttl",
                "sustain",
                "sustain_since",
                "re_engaged_after",
            },
        )
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self.err(f"{path}.name" if "name" in raw else path, "a non-empty 'name' is required")
            name = ""
        priority = raw.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            self.err(f"{path}.priority", "priority must be an integer (higher wins)")
            priority = 0
        if "enter" not in raw:
            self.err(path, "an 'enter' rule is required")
            enter: Rule | None = None
        else:
            enter = self._rule(raw["enter"], f"{path}.enter")
        exit_ = self._rule(raw["exit"], f"{path}.exit") if raw.get("exit") is not None else None
        re_eng = (
            self._rule(raw["re_engaged_when"], f"{path}.re_engaged_when")
            if raw.get("re_engaged_when") is not None
            else None
        )
        ttl = self._duration(raw, "ttl", path, None)
        seg_fields = dict(
            min_dwell_ms=self._duration(raw, "min_dwell", path, 0) or 0,
            cooldown_ms=self._duration(raw, "cooldown", path, 0) or 0,
            sustain_ms=self._duration(raw, "sustain", path, 0) or 0,
            re_engaged_after_ms=self._duration(raw, "re_engaged_after", path, 0) or 0,
            ttl_ms=ttl,
        )
        if seg_fields["re_engaged_after_ms"] and raw.get("re_engaged_when") is None:
            self.err(f"{path}.re_engaged_after", "re_engaged_after needs a 're_engaged_when' rule")
        if ttl is not None and ttl <= 0:
            self.err(f"{path}.ttl", "ttl must be positive")
        since = raw.get("sustain_since")
        if since is not None:
            if (
                not isinstance(since, str)
                or not since.startswith(AGING_PREFIX)
                or since in DERIVED_FEATURES
            ):
                self.err(
                    f"{path}.sustain_since",
                    f"expected a recency feature named {AGING_PREFIX}* (got {since!r})",
                )
                since = None
            elif not seg_fields["sustain_ms"]:
                self.err(f"{path}.sustain_since", "sustain_since needs a 'sustain' duration")
                since = None
        if enter is None:
            return None
        rules = [r for r in (enter, exit_, re_eng) if r is not None]
        leaves = [leaf for r in rules for leaf in r.leaves()]
        return Segment(
            name=name,
            priority=priority,
            enter=enter,
            exit=exit_,
            re_engaged_when=re_eng,
            description=str(raw.get("description") or ""),
            line=self.doc.lines.get(path, 0),
            sustain_since=since,
            derived=any(leaf.feature in DERIVED_FEATURES for leaf in leaves),
            aging=tuple(
                leaf
                for leaf in leaves
                if leaf.feature.startswith(AGING_PREFIX) and leaf.op not in ("in", "==", "!=")
            ),
            **seg_fields,  # type: ignore[arg-type]
        )

    def _rule(self, raw: Any, path: str) -> Rule | None:
        if not isinstance(raw, dict):
            self.err(
                path,
                "expected a rule (a mapping with feature/op/value, all, any, not, "
                "weighted or cluster)",
            )
            return None
        kinds = [k for k in ("all", "any", "not", "weighted", "cluster", "feature") if k in raw]
        if len(kinds) != 1:
            self.err(
                path,
                "a rule needs exactly one of: feature, all, any, not, weighted, "
                f"cluster (got {', '.join(sorted(raw)) or 'nothing'})",
            )
            return None
        kind = kinds[0]
        if kind in ("all", "any"):
            self._unknown(raw, path, {kind})
            items_raw = raw[kind]
            if not isinstance(items_raw, list) or not items_raw:
                self.err(f"{path}.{kind}", "expected a list of rules")
                return None
            items = [self._rule(r, f"{path}.{kind}[{i}]") for i, r in enumerate(items_raw)]
            if any(i is None for i in items):
                return None
            fns = tuple(i._fn for i in items if i is not None)
            if kind == "all":

                def fn_all(v: Values, t: Thresholds, fns: Any = fns) -> bool:
                    for f in fns:  # noqa: SIM110 (a plain loop is faster on the hot path)
                        if not f(v, t):
                            return False
                    return True

                fn = fn_all
            else:

                def fn_any(v: Values, t: Thresholds, fns: Any = fns) -> bool:
                    for f in fns:  # noqa: SIM110 (a plain loop is faster on the hot path)
                        if f(v, t):
                            return True
                    return False

                fn = fn_any
            return Combination(path, kind, tuple(i for i in items if i is not None), fn)
        if kind == "not":
            self._unknown(raw, path, {"not"})
            inner = self._rule(raw["not"], f"{path}.not")
            if inner is None:
                return None
            inner_fn = inner._fn
            return Combination(path, "not", (inner,), lambda v, t: not inner_fn(v, t))
        if kind == "weighted":
            return self._weighted(raw, path)
        if kind == "cluster":
            self._unknown(raw, path, {"cluster"})
            clusters = raw["cluster"]
            if not isinstance(clusters, list):
                clusters = [clusters]
            return self._condition(
                {"feature": "cluster", "op": "in", "value": clusters},
                path,
                value_path=f"{path}.cluster",
            )
        return self._condition(raw, path)

    def _weighted(self, raw: dict[str, Any], path: str) -> Rule | None:
        self._unknown(raw, path, {"weighted", "threshold"})
        parts_raw = raw["weighted"]
        if not isinstance(parts_raw, list) or not parts_raw:
            self.err(f"{path}.weighted", "expected a list of {when: rule, weight: number}")
            return None
        threshold = raw.get("threshold")
        if not _is_number(threshold):
            self.err(
                f"{path}.threshold" if "threshold" in raw else path,
                "weighted scoring needs a numeric 'threshold'",
            )
            return None
        parts: list[tuple[Rule, float]] = []
        ok = True
        for i, part in enumerate(parts_raw):
            sub = f"{path}.weighted[{i}]"
            if not isinstance(part, dict):
                self.err(sub, "expected {when: rule, weight: number}")
                ok = False
                continue
            self._unknown(part, sub, {"when", "weight"})
            weight = part.get("weight")
            if not _is_number(weight):
                self.err(
                    f"{sub}.weight" if "weight" in part else sub, "a numeric 'weight' is required"
                )
                ok = False
            if "when" not in part:
                self.err(sub, "a 'when' rule is required")
                ok = False
                continue
            rule = self._rule(part["when"], f"{sub}.when")
            if rule is None or not _is_number(weight):
                ok = False
                continue
            parts.append((rule, float(weight)))  # type: ignore[arg-type]
        if not ok:
            return None
        thr = float(threshold)  # type: ignore[arg-type]
        fns = tuple((r._fn, w) for r, w in parts)

        def fn(v: Values, t: Thresholds) -> bool:
            return round(sum(w for f, w in fns if f(v, t)), 9) >= thr

        return Weighted(path, tuple(parts), thr, fn)

    def _condition(
        self, raw: dict[str, Any], path: str, value_path: str | None = None
    ) -> Rule | None:
        self._unknown(raw, path, {"feature", "op", "value"})
        feature = raw.get("feature")
        op = raw.get("op")
        vpath = value_path or f"{path}.value"
        if not isinstance(feature, str) or not feature:
            self.err(f"{path}.feature", "feature must be a non-empty name")
            return None
        if feature.startswith(ATTR_PREFIX) and not _ATTR.match(feature):
            self.err(
                f"{path}.feature",
                f"expected an attribute as attr.<name> (letters, digits, _), got {feature!r}",
            )
            return None
        if feature.startswith(LOOKUP_PREFIX) and lookup_call(feature) is None:
            self.err(
                f"{path}.feature",
                "expected a lookup as lookup.<table>(attr.<name>), e.g. "
                f"lookup.zip_income(attr.zip), got {feature!r}",
            )
            return None
        if op not in OPERATORS:
            self.err(
                f"{path}.op" if "op" in raw else path,
                f"unknown operator {op!r} ({'one of ' + ', '.join(OPERATORS)})"
                if "op" in raw
                else "an 'op' is required",
            )
            return None
        if "value" not in raw:
            self.err(path, "a 'value' is required")
            return None
        value = raw["value"]
        if op in ("between", "in"):
            if not isinstance(value, list) or not value:
                self.err(vpath, f"'{op}' needs a list of values")
                return None
            if op == "between":
                if len(value) != 2 or not all(_is_number(v) for v in value):
                    self.err(vpath, "'between' needs [low, high] numbers")
                    return None
                lo, hi = float(value[0]), float(value[1])
                if lo > hi:
                    self.err(vpath, f"'between' low {lo} is above high {hi}")
                    return None

                def fn_between(v: Values, t: Thresholds, f: str = feature) -> bool:
                    x = v.get(f)
                    return isinstance(x, float) and lo <= x <= hi

                return Condition(path, feature, op, None, (lo, hi), None, fn_between)
            members: list[Value] = []
            for i, item in enumerate(value):
                if _is_number(item):
                    members.append(float(item))
                elif isinstance(item, str):
                    members.append(item)
                else:
                    self.err(f"{vpath}[{i}]", "'in' values must be numbers or strings")
                    return None
            allowed = frozenset(members)

            def fn_in(v: Values, t: Thresholds, f: str = feature) -> bool:
                x = v.get(f)
                return x is not None and x in allowed

            return Condition(path, feature, op, None, tuple(members), None, fn_in)
        if isinstance(value, str):
            m = _PERCENTILE.match(value.strip())
            if m is not None and op in (">", ">=", "<", "<="):
                pct = float(m.group(1))
                key = (feature, pct)
                cmp = _COMPARE[op]

                def fn_pct(v: Values, t: Thresholds, f: str = feature) -> bool:
                    x = v.get(f)
                    thr = t.get(key)
                    return isinstance(x, float) and thr is not None and cmp(x, thr)

                return Condition(path, feature, op, None, (), pct, fn_pct)
            if op not in ("==", "!="):
                self.err(vpath, f"{op!r} needs a number or a percentile like p80 (got {value!r})")
                return None
            target: Value = value
        elif _is_number(value):
            target = float(value)
        else:
            self.err(vpath, f"value must be a number, a string or a percentile (got {value!r})")
            return None
        cmp = _COMPARE[op]
        if isinstance(target, float) and feature.startswith((ATTR_PREFIX, LOOKUP_PREFIX)):
            return Condition(path, feature, op, target, (), None, _textual(op, feature, target))
        if isinstance(target, float):
            return Condition(path, feature, op, target, (), None, _numeric(op, feature, target))
        tstr = target

        def fn_str(v: Values, t: Thresholds, f: str = feature) -> bool:
            x = v.get(f)
            return x is not None and cmp(x, tstr)

        return Condition(path, feature, op, target, (), None, fn_str)


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
