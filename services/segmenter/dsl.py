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
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from segflow import durations, yamldoc
from segflow.yamldoc import located
from services.segmenter.definition_model import (
    AllRule,
    AnyRule,
    ClusterRule,
    ConditionRule,
    DefinitionsModel,
    NotRule,
    SegmentModel,
    WeightedRule,
)
from services.segmenter.definition_model import (
    RuleModel as RuleModel,
)
from services.segmenter.rules import (
    _COMPARE,
    _PERCENTILE,
    AGING_PREFIX,
    ATTR_PREFIX,
    DAY,
    DERIVED_FEATURES,
    HOUR,
    LOOKUP_PREFIX,
    MINUTE,
    NO_LOOKUPS,
    OPERATORS,
    SCORE_FIELDS,
    SECOND,
    Combination,
    Condition,
    Definitions,
    Explanation,
    Lookups,
    Rule,
    Segment,
    Thresholds,
    Value,
    Values,
    Weighted,
    _aging_bounds,
    _numeric,
    _textual,
    first_weighted,
    lookup_call,
)


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


# -- parsing --------------------------------------------------------------------------------
def parse(text: str) -> Definitions:
    """Parse and validate a definitions file; raises :class:`DefinitionError` with every problem.

    >>> parse("version: 1\\nsegments: []\\n").version.startswith("1+")
    True
    """
    problems, model, doc = _validate(text)
    if problems or model is None:
        raise DefinitionError(problems or [Problem(1, "(file)", "empty definitions")])
    return _compile(text, model, doc)


def check(text: str) -> list[Problem]:
    """Every problem in ``text`` (empty when valid).

    >>> [str(p) for p in check("version: 1\\nsegments:\\n  - name: X\\n    enter: {all: 3}\\n")]
    ['line 4: segments[0].enter.all: expected a list of rules']
    """
    return _validate(text)[0]


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


def _validate(text: str) -> tuple[list[Problem], DefinitionsModel | None, yamldoc.Document]:
    """The file's problems (YAML, duplicate keys, the model's errors, duplicate segment names,
    in the order of the file) and its model when it has none."""
    try:
        doc = yamldoc.load(text)
    except yamldoc.YamlSyntaxError as exc:
        return [Problem(exc.line, "(yaml)", exc.problem)], None, yamldoc.Document()
    problems = [Problem(d.line, d.path, "duplicate key") for d in doc.duplicates]
    if doc.data is None:
        return [*problems, Problem(1, "(file)", "empty definitions")], None, doc
    model = None
    try:
        model = DefinitionsModel.model_validate(doc.data)
    except ValidationError as exc:
        problems += [Problem(e.line, e.path or "(file)", e.message) for e in located(exc, doc)]
    # names are compared even in segments with errors, so a later duplicate is reported now,
    # not only once the first one's errors are fixed
    raw = doc.data.get("segments") if isinstance(doc.data, dict) else None
    names: set[str] = set()
    for i, seg in enumerate(raw if isinstance(raw, list) else []):
        name = seg.get("name") if isinstance(seg, dict) else None
        if isinstance(name, str) and name.strip():
            if name in names:
                path = f"segments[{i}].name"
                problems.append(Problem(doc.line(path), path, f"duplicate segment name {name!r}"))
            names.add(name)
    problems.sort(key=lambda p: p.line)
    return problems, (None if problems else model), doc


def _compile(text: str, model: DefinitionsModel, doc: yamldoc.Document) -> Definitions:
    segments = [_segment(seg, f"segments[{i}]", doc) for i, seg in enumerate(model.segments)]
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    ordered = tuple(sorted(segments, key=lambda s: s.derived))  # stable: file order kept
    leaves = [leaf for s in ordered for leaf in s.leaves()]
    return Definitions(
        version=f"{model.version}+{digest}",
        segments=ordered,
        deprecate_after_ms=model.deprecate_after or 90 * DAY,
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


def _segment(seg: SegmentModel, path: str, doc: yamldoc.Document) -> Segment:
    enter = _rule(seg.enter, f"{path}.enter")
    exit_ = _rule(seg.exit, f"{path}.exit") if seg.exit is not None else None
    re_eng = (
        _rule(seg.re_engaged_when, f"{path}.re_engaged_when")
        if seg.re_engaged_when is not None
        else None
    )
    rules = [r for r in (enter, exit_, re_eng) if r is not None]
    leaves = [leaf for r in rules for leaf in r.leaves()]
    return Segment(
        name=seg.name,
        priority=seg.priority,
        enter=enter,
        exit=exit_,
        re_engaged_when=re_eng,
        description=str(seg.description or ""),
        line=doc.lines.get(path, 0),
        sustain_since=seg.sustain_since,
        derived=any(leaf.feature in DERIVED_FEATURES for leaf in leaves),
        aging=tuple(
            leaf
            for leaf in leaves
            if leaf.feature.startswith(AGING_PREFIX) and leaf.op not in ("in", "==", "!=")
        ),
        min_dwell_ms=seg.min_dwell or 0,
        cooldown_ms=seg.cooldown or 0,
        sustain_ms=seg.sustain or 0,
        re_engaged_after_ms=seg.re_engaged_after or 0,
        ttl_ms=seg.ttl,
    )


def _rule(raw: RuleModel, path: str) -> Rule:
    """The compiled rule of a valid rule model (every check was made by the model)."""
    if isinstance(raw, AllRule | AnyRule):
        kind = "all" if isinstance(raw, AllRule) else "any"
        listed = raw.all if isinstance(raw, AllRule) else raw.any
        items = tuple(_rule(r, f"{path}.{kind}[{i}]") for i, r in enumerate(listed))
        fns = tuple(i._fn for i in items)
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
        return Combination(path, kind, items, fn)
    if isinstance(raw, NotRule):
        inner = _rule(raw.not_, f"{path}.not")
        inner_fn = inner._fn
        return Combination(path, "not", (inner,), lambda v, t: not inner_fn(v, t))
    if isinstance(raw, WeightedRule):
        return _weighted(raw, path)
    if isinstance(raw, ClusterRule):
        return _condition(path, "cluster", "in", raw.cluster)
    assert isinstance(raw, ConditionRule)
    return _condition(path, raw.feature, raw.op, raw.value)


def _weighted(raw: WeightedRule, path: str) -> Rule:
    parts = tuple(
        (_rule(part.when, f"{path}.weighted[{i}].when"), part.weight)
        for i, part in enumerate(raw.weighted)
    )
    thr = raw.threshold
    fns = tuple((r._fn, w) for r, w in parts)

    def fn(v: Values, t: Thresholds) -> bool:
        return round(sum(w for f, w in fns if f(v, t)), 9) >= thr

    return Weighted(path, parts, thr, fn)


def _condition(path: str, feature: str, op: str, value: Any) -> Rule:
    if op == "between":
        lo, hi = float(value[0]), float(value[1])

        def fn_between(v: Values, t: Thresholds, f: str = feature) -> bool:
            x = v.get(f)
            return isinstance(x, float) and lo <= x <= hi

        return Condition(path, feature, op, None, (lo, hi), None, fn_between)
    if op == "in":
        members: tuple[Value, ...] = tuple(value)
        allowed = frozenset(members)

        def fn_in(v: Values, t: Thresholds, f: str = feature) -> bool:
            x = v.get(f)
            return x is not None and x in allowed

        return Condition(path, feature, op, None, members, None, fn_in)
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
        target: Value = value
    else:
        target = float(value)
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


__all__ = [
    "SECOND",
    "MINUTE",
    "HOUR",
    "DAY",
    "OPERATORS",
    "AGING_PREFIX",
    "DERIVED_FEATURES",
    "SCORE_FIELDS",
    "Value",
    "Values",
    "Thresholds",
    "ATTR_PREFIX",
    "LOOKUP_PREFIX",
    "Lookups",
    "NO_LOOKUPS",
    "lookup_call",
    "Explanation",
    "Condition",
    "Combination",
    "Weighted",
    "Rule",
    "first_weighted",
    "Segment",
    "Definitions",
    "Problem",
    "DefinitionError",
    "parse",
    "check",
    "parse_duration",
]
