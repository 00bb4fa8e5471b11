"""Segment definitions validated by pydantic models over the line-tracking loader: unknown
keys, wrong types and errors deep in a rule tree are each reported with the line of the value
and its field path (the lines below are counted by hand in the texts)."""

from __future__ import annotations

import pytest

from services.segmenter.dsl import DefinitionError, check, parse

NESTED = """\
version: "1"
segments:
  - name: Deep
    enter:
      all:
        - {feature: clv, op: ">", value: 100}
        - any:
            - {feature: x, op: ">", value: 1}
            - not:
                feature: y
                op: "<"
                value: 3
                colour: red
        - weighted:
            - {when: {feature: a, op: ">", value: 0}, weight: heavy}
          threshold: 1
"""


def test_errors_deep_in_a_rule_tree_name_their_line_and_path() -> None:
    problems = check(NESTED)
    assert [(p.line, p.field) for p in problems] == [
        (13, "segments[0].enter.all[1].any[1].not.colour"),
        (15, "segments[0].enter.all[2].weighted[0].weight"),
    ]
    assert "unknown field" in problems[0].message
    assert "feature, op, value" in problems[0].message  # what is allowed there
    assert "numeric 'weight'" in problems[1].message


@pytest.mark.parametrize(
    ("extra", "line", "field", "words"),
    [
        ("    colour: red\n", 5, "segments[0].colour", "unknown field"),
        ("    priority: [1]\n", 5, "segments[0].priority", "integer"),
        ("    min_dwell: {days: 2}\n", 5, "segments[0].min_dwell", "bad duration"),
        ("    exit: [1, 2]\n", 5, "segments[0].exit", "expected a rule"),
        ("    exit: {feature: x, all: []}\n", 5, "segments[0].exit", "exactly one of"),
        ("    sustain_since: 7\n", 5, "segments[0].sustain_since", "recency feature"),
    ],
)
def test_wrong_types_and_unknown_keys_of_a_segment(
    extra: str, line: int, field: str, words: str
) -> None:
    text = 'version: "1"\nsegments:\n  - name: S\n    enter: {feature: x, op: ">", value: 1}\n'
    problems = check(text + extra)
    assert [(p.line, p.field) for p in problems] == [(line, field)], problems
    assert words in problems[0].message
    with pytest.raises(DefinitionError):
        parse(text + extra)


def test_unknown_top_level_key_and_a_segment_that_is_not_a_mapping() -> None:
    text = 'version: "1"\nsegmnts: []\nsegments:\n  - just a name\n'
    problems = check(text)
    assert [(p.line, p.field) for p in problems] == [
        (2, "segmnts"),
        (4, "segments[0]"),
    ]
    assert "expected one of deprecate_after, description, segments, version" in str(problems[0])
    assert problems[1].message == "expected a mapping"


def test_every_problem_in_a_file_is_reported_in_file_order() -> None:
    text = (
        'version: "1"\n'
        "segments:\n"
        "  - name: A\n"
        "    enter: {feature: x, op: between, value: [9, 1]}\n"
        "  - name: B\n"
        "    enter: {cluster: [1, {a: 2}]}\n"
        "    cooldown: soon\n"
        "  - name: C\n"
        "    enter: {feature: attr.zip code, op: '==', value: x}\n"
    )
    problems = check(text)
    assert [(p.line, p.field) for p in problems] == [
        (4, "segments[0].enter.value"),
        (6, "segments[1].enter.cluster[1]"),
        (7, "segments[1].cooldown"),
        (9, "segments[2].enter.feature"),
    ]
    assert "'between' low 9.0 is above high 1.0" in problems[0].message


def test_a_valid_nested_tree_still_compiles_and_evaluates() -> None:
    text = NESTED.replace("                colour: red\n", "").replace("heavy", "1.5")
    assert check(text) == []
    rule = parse(text).segments[0].enter
    assert rule.test({"clv": 200.0, "x": 2.0, "a": 1.0}, {}) is True
    assert rule.test({"clv": 200.0, "x": 0.0, "y": 1.0, "a": 1.0}, {}) is False  # not(y<3)
    assert rule.test({"clv": 200.0, "x": 2.0, "a": 0.0}, {}) is False  # weight 1.5 unmet


def test_doubled_braces_are_reported_as_typed() -> None:
    """``{{...}}`` (a template habit) is a mapping used as a key: the error shows the text."""
    text = 'version: "1"\nsegments:\n  - name: S\n    enter: {{feature: x, op: ">", value: 1}}\n'
    problems = check(text)
    assert [(p.line, p.field) for p in problems] == [(4, "segments[0].enter")]
    assert problems[0].message.endswith('(got {feature: x, op: ">", value: 1})')
