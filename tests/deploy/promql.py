"""What the deploy tests check PromQL against: the metrics the code defines, and the metric and
label names a PromQL expression uses.

The metric catalogue comes from importing the modules that define metrics (the shared runtime
and every service's ``app``) and reading the live ``prometheus_client`` objects, so renaming a
metric or a label in the code breaks the dashboard and alert tests.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

from prometheus_client.metrics import MetricWrapperBase

METRIC_MODULES = (
    "segflow.runtime.metrics",
    "services.identity.app",
    "services.scorer.app",
    "services.segmenter.app",
    "services.dispatcher.app",
    # where the #14 split moved a service's metrics out of its app.py
    "services.scorer.metrics",
    "services.segmenter.metrics",
    "services.dispatcher.metrics",
)
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


@dataclass(frozen=True)
class Metric:
    name: str  # as exported, e.g. segflow_records_in_total
    family: str  # e.g. segflow_records_in
    kind: str
    labels: frozenset[str]
    module: str


def defined_metrics() -> dict[str, Metric]:
    """Every series name the code can export (``_total``, ``_bucket`` ... included)."""
    out: dict[str, Metric] = {}
    for module_name in METRIC_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if not isinstance(value, MetricWrapperBase):
                continue
            kind = value._type
            family = value._name
            labels = frozenset(value._labelnames)
            for suffix in _SUFFIXES[kind]:
                extra = {"le"} if suffix == "_bucket" else set()
                if kind == "counter" and suffix == "_total":
                    name = family + "_total"
                else:
                    name = family + suffix
                out[name] = Metric(name, family, kind, labels | extra, module_name)
    return out


# --- PromQL -----------------------------------------------------------------------------------
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "atan2", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_IN_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


@dataclass
class Selector:
    metric: str
    labels: set[str] = field(default_factory=set)


@dataclass
class Parsed:
    selectors: list[Selector]
    grouping_labels: set[str]


def parse(expr: str) -> Parsed:
    """The metric selectors (with their matcher labels) and grouping labels of ``expr``.

    >>> p = parse('sum by (job, le) (rate(a_bucket{x="1"}[5m])) / on (job) b offset 1h > 0.5')
    >>> [(s.metric, sorted(s.labels)) for s in p.selectors], sorted(p.grouping_labels)
    ([('a_bucket', ['x']), ('b', [])], ['job', 'le'])
    """
    grouping: set[str] = set()
    for m in _GROUPING.finditer(expr):
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
    text = _GROUPING.sub(" ", expr)
    # Strings go first (values are not checked); each {matchers} block becomes a numbered
    # placeholder token right after its metric name.
    matcher_sets: list[set[str]] = []

    def keep(m: re.Match[str]) -> str:
        matcher_sets.append(set(_LABEL_IN_MATCHER.findall(m.group(1))))
        return f" __matchers{len(matcher_sets) - 1}__ "

    text = _MATCHERS.sub(keep, _STRING.sub('""', text))
    text = _RANGE.sub(" ", text)
    selectors: list[Selector] = []
    tokens = list(_IDENT.finditer(text))
    for i, tok in enumerate(tokens):
        name, call = tok.group(1), tok.group(2)
        if call or name in _KEYWORDS or name.startswith("__matchers"):
            continue
        sel = Selector(name)
        if i + 1 < len(tokens) and tokens[i + 1].group(1).startswith("__matchers"):
            between = text[tok.end() : tokens[i + 1].start()]
            if not between.strip():
                sel.labels = matcher_sets[int(tokens[i + 1].group(1)[len("__matchers") : -2])]
        selectors.append(sel)
    return Parsed(selectors, grouping)


def problems(expr: str, metrics: dict[str, Metric]) -> list[str]:
    """Why ``expr`` does not fit the code's metrics (empty when it does)."""
    out: list[str] = []
    parsed = parse(expr)
    if not parsed.selectors:
        out.append("no metric in the expression")
    known_labels: set[str] = set(TARGET_LABELS)
    for sel in parsed.selectors:
        if sel.metric == "up":  # Prometheus's own scrape health
            continue
        metric = metrics.get(sel.metric)
        if metric is None:
            out.append(f"unknown metric {sel.metric}")
            continue
        known_labels |= metric.labels
        for label in sel.labels - metric.labels - TARGET_LABELS:
            out.append(f"{sel.metric} has no label {label!r} (it has {sorted(metric.labels)})")
    for label in parsed.grouping_labels - known_labels:
        out.append(f"grouping by {label!r}, which none of the expression's metrics has")
    return out
