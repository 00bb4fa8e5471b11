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

from segflow import durations, yamldoc
from services.segmenter.rules import (
    _ATTR,
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
    _is_number,
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
