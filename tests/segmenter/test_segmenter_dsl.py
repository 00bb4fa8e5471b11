"""The segment definition language: what each rule form accepts, evaluates and rejects."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.segmenter.dsl import DAY, HOUR, DefinitionError, check, parse

DEFAULT = Path(__file__).resolve().parents[2] / "services/segmenter/segments/default.yaml"


def one(rule: str, **extra: str) -> str:
    more = "".join(f"    {k}: {v}\n" for k, v in extra.items())
    return f'version: "1"\nsegments:\n  - name: S\n    enter: {rule}\n{more}'


# rule, values, expected verdict
CASES = [
    ('{feature: x, op: ">", value: 3}', {"x": 4.0}, True),
    ('{feature: x, op: ">", value: 3}', {"x": 3.0}, False),
    ('{feature: x, op: ">=", value: 3}', {"x": 3.0}, True),
    ('{feature: x, op: "<", value: 3}', {"x": 2.9}, True),
    ('{feature: x, op: "<=", value: 3}', {"x": 3.1}, False),
    ('{feature: x, op: "==", value: 0}', {"x": 0.0}, True),
    ('{feature: x, op: "!=", value: 0}', {"x": 1.0}, True),
    ("{feature: x, op: between, value: [1, 2]}", {"x": 2.0}, True),
    ("{feature: x, op: between, value: [1, 2]}", {"x": 2.5}, False),
    ("{feature: stage, op: in, value: [prospect, loyal]}", {"stage": "loyal"}, True),
    ("{feature: stage, op: in, value: [prospect, loyal]}", {"stage": "churned"}, False),
    ('{feature: stage, op: "==", value: loyal}', {"stage": "loyal"}, True),
    ("{cluster: [2, 5]}", {"cluster": 5.0}, True),
    ("{cluster: 2}", {"cluster": 3.0}, False),
    # a missing feature makes a condition false, whatever the operator
    ('{feature: x, op: "<", value: 3}', {}, False),
    ('{feature: x, op: "!=", value: 3}', {}, False),
    ('{not: {feature: x, op: ">", value: 3}}', {"x": 1.0}, True),
    (
        '{all: [{feature: x, op: ">", value: 1}, {feature: y, op: ">", value: 1}]}',
        {"x": 2.0, "y": 0.0},
        False,
    ),
    (
        '{any: [{feature: x, op: ">", value: 1}, {feature: y, op: ">", value: 1}]}',
        {"x": 2.0, "y": 0.0},
        True,
    ),
    (
        "{weighted: [{when: {feature: a, op: '>', value: 0}, weight: 0.7},"
        " {when: {feature: b, op: '>', value: 0}, weight: 0.5}], threshold: 1.2}",
        {"a": 1.0, "b": 1.0},
        True,
    ),
    (
        "{weighted: [{when: {feature: a, op: '>', value: 0}, weight: 0.7},"
        " {when: {feature: b, op: '>', value: 0}, weight: 0.5}], threshold: 1.2}",
        {"a": 1.0, "b": 0.0},
        False,
    ),
]


@pytest.mark.parametrize(("rule", "values", "expected"), CASES)
def test_rule_verdicts(rule: str, values: dict[str, float | str], expected: bool) -> None:
    seg = parse(one(rule)).segments[0]
    assert seg.enter.test(values, {}) is expected


def test_percentile_threshold_uses_the_current_population_value() -> None:
    seg = parse(one('{feature: clv, op: ">=", value: p80}')).segments[0]
    assert seg.enter.test({"clv": 500.0}, {}) is False  # not computed yet: false, not an error
    assert seg.enter.test({"clv": 500.0}, {("clv", 80.0): 400.0}) is True
    assert seg.enter.test({"clv": 300.0}, {("clv", 80.0): 400.0}) is False
    why = seg.enter.explain({"clv": 300.0}, {("clv", 80.0): 400.0})[0]
    assert (why.threshold, why.threshold_text, why.margin, why.passed) == (
        400.0,
        "p80",
        -100.0,
        False,
    )


@pytest.mark.parametrize(
    ("op", "observed", "threshold", "margin"),
    [(">", 5.0, 3.0, 2.0), ("<", 5.0, 3.0, -2.0), ("<=", 1.0, 3.0, 2.0), ("==", 2.0, 3.0, -1.0)],
)
def test_margin_is_positive_on_the_passing_side(
    op: str, observed: float, threshold: float, margin: float
) -> None:
    seg = parse(one(f'{{feature: x, op: "{op}", value: {threshold}}}')).segments[0]
    why = seg.enter.explain({"x": observed}, {})[0]
    assert (why.feature, why.operator, why.observed, why.threshold, why.margin) == (
        "x",
        op,
        observed,
        threshold,
        margin,
    )


def test_missing_feature_is_explained_as_missing() -> None:
    why = parse(one('{feature: x, op: ">", value: 3}')).segments[0].enter.explain({}, {})[0]
    assert (why.passed, why.observed, why.observed_text) == (False, None, "missing")


def test_weighted_explanation_carries_the_score_and_every_part() -> None:
    seg = parse(
        one(
            "{weighted: [{when: {feature: a, op: '>', value: 0}, weight: 0.7},"
            " {when: {feature: b, op: '>', value: 0}, weight: 0.6}], threshold: 1.2}"
        )
    )
    why = seg.segments[0].enter.explain({"a": 1.0, "b": 1.0}, {})
    assert [(w.feature, w.observed, w.passed) for w in why] == [
        ("weighted_score", 1.3, True),
        ("a", 1.0, True),
        ("b", 1.0, True),
    ]
    assert why[0].path == "segments[0].enter"


def test_timings_priority_and_hysteresis_fields() -> None:
    seg = parse(
        one(
            '{feature: x, op: ">", value: 3}',
            priority="7",
            min_dwell="2d",
            cooldown="36h",
            ttl="30d",
            sustain="21d",
            exit='{feature: x, op: "<", value: 1}',
            re_engaged_when='{feature: y, op: ">", value: 0}',
        )
    ).segments[0]
    assert (seg.priority, seg.min_dwell_ms, seg.cooldown_ms, seg.ttl_ms, seg.sustain_ms) == (
        7,
        2 * DAY,
        36 * HOUR,
        30 * DAY,
        21 * DAY,
    )
    assert seg.exit is not None and seg.exit.test({"x": 0.5}, {})
    assert seg.re_engaged_when is not None
    seg = parse(
        one(
            '{feature: x, op: ">", value: 3}',
            sustain="21d",
            sustain_since="days_since_purchase",
            re_engaged_when='{feature: y, op: ">", value: 0}',
            re_engaged_after="7d",
        )
    ).segments[0]
    assert (seg.sustain_since, seg.re_engaged_after_ms) == ("days_since_purchase", 7 * DAY)


def test_version_changes_with_content() -> None:
    a = parse(one('{feature: x, op: ">", value: 3}'))
    b = parse(one('{feature: x, op: ">", value: 4}'))
    assert a.version.split("+")[0] == b.version.split("+")[0] == "1"
    assert a.version != b.version


# text, expected "line N: field" prefixes
ERRORS = [
    (one('{feature: x, op: "=>", value: 3}'), ["line 4: segments[0].enter.op"]),
    (one('{feature: x, op: ">", value: high}'), ["line 4: segments[0].enter.value"]),
    (one("{feature: x, op: between, value: [3, 1]}"), ["line 4: segments[0].enter.value"]),
    (one('{feature: x, op: ">", value: 3}', cooldown="soon"), ["line 5: segments[0].cooldown"]),
    (one('{feature: x, op: ">", value: 3}', priority="high"), ["line 5: segments[0].priority"]),
    (one('{feature: x, op: ">", value: 3}', colour="red"), ["line 5: segments[0].colour"]),
    (
        one("{weighted: [{when: {feature: a, op: '>', value: 0}}], threshold: 1}"),
        ["line 4: segments[0].enter.weighted[0]"],
    ),
    (one("{all: []}"), ["line 4: segments[0].enter.all"]),
    (
        one('{feature: x, op: ">", value: 3}', sustain="21d", sustain_since="clv"),
        ["line 6: segments[0].sustain_since"],
    ),
    (
        one('{feature: x, op: ">", value: 3}', sustain_since="days_since_purchase"),
        ["line 5: segments[0].sustain_since"],
    ),
    (
        one('{feature: x, op: ">", value: 3}', re_engaged_after="7d"),
        ["line 5: segments[0].re_engaged_after"],
    ),
    (
        'version: "1"\nsegments:\n  - name: A\n    enter: {feature: x, op: ">", value: 1}\n'
        '  - name: A\n    enter: {feature: x, op: ">", value: 1}\n',
        ["line 5: segments[1].name"],
    ),
    # the first of the duplicates has an error (its enter rule is missing): the duplicate is
    # still reported, so fixing the first error does not reveal a second one
    (
        'version: "1"\nsegments:\n  - name: A\n    priority: 1\n'
        '  - name: A\n    enter: {feature: x, op: ">", value: 1}\n',
        ["line 3: segments[0]", "line 5: segments[1].name"],
    ),
    (
        'version: "1"\nsegments:\n  - name: A\n    enter: {feature: x, op: "=>", value: 1}\n'
        '  - name: A\n    enter: {feature: x, op: ">", value: 1}\n',
        ["line 4: segments[0].enter.op", "line 5: segments[1].name"],
    ),
    ("segments: []\n", ["line 1: (file)"]),
    ('version: "1"\nsegments:\n  - name: A\n    enter: {feature: x, op: ">"\n', ["line 5: (yaml)"]),
    (
        'version: "1"\nsegments:\n  - name: A\n    enter:\n      any:\n'
        '        - {feature: x, op: ">", value: 1}\n        - {feature: y, op: "<<", value: 1}\n'
        "    ttl: -3d\n",
        ["line 7: segments[0].enter.any[1].op", "line 8: segments[0].ttl"],
    ),
]


@pytest.mark.parametrize(("text", "where"), ERRORS)
def test_errors_name_line_and_field(text: str, where: list[str]) -> None:
    problems = [str(p) for p in check(text)]
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in problems] == where, problems
    with pytest.raises(DefinitionError):
        parse(text)


def test_default_segments_are_valid_and_cover_the_spec() -> None:
    defs = parse(DEFAULT.read_text())
    names = [s.name for s in defs.segments]
    for name in [
        "AtRisk-60d",
        "Silent Decline",
        "Support Escalation",
        "Purchase Frequency Drop",
        "High-CLV Login Drop",
        "Engaged But At-Risk",
        "New Lead No Content",
        "ReEngageAtRisk",
        "Re-engaged",
        "Lifecycle: prospect",
        "Lifecycle: onboarded",
        "Lifecycle: adopting",
        "Lifecycle: loyal",
        "Lifecycle: at_risk",
        "Lifecycle: churned",
    ]:
        assert name in names
    assert names[-1] == "Re-engaged"  # derived from other segments' exits: evaluated last
    assert defs.deprecate_after_ms == 90 * DAY
