"""Attributes and lookups in the segment DSL and the core (issue 19), without a broker."""

from __future__ import annotations

import pytest

from segflow.lookups import LookupError_, read_csv
from services.segmenter.core import (
    CustomerState,
    Score,
    advance,
    evaluate,
    explain_customer,
    set_attributes,
    state_from_record,
    state_to_record,
)
from services.segmenter.dsl import DAY, check, parse

DEFS = parse(
    """version: "1"
segments:
  - name: Enterprise
    priority: 2
    enter: {feature: attr.product_tier, op: "==", value: enterprise}
  - name: RichAndBig
    priority: 1
    enter:
      all:
        - {feature: "lookup.zip_income(attr.zip)", op: "==", value: high}
        - {feature: attr.seats, op: ">=", value: 10}
"""
)
HIGH = {"zip_income": {"94027": "high", "10001": "mid"}}


def test_rules_on_attributes_and_lookups_enter_and_explain_by_name() -> None:
    s, changes = set_attributes(
        None, "c", {"product_tier": "enterprise", "zip": "94027", "seats": "12"}, 0, DEFS
    )
    assert changes == []  # no score yet: not evaluated
    s, changes = evaluate(s, Score("c", DAY, {}), DEFS, {}, HIGH)
    entered = {c.segment: c for c in changes if c.transition == "entered"}
    assert set(entered) == {"Enterprise", "RichAndBig"}
    why = {e.feature: e for e in entered["RichAndBig"].explanation}
    assert why["lookup.zip_income(attr.zip)"].observed_text == "high"
    assert why["attr.seats"].passed is True
    # the same customer without the table: the lookup reads as missing
    out = explain_customer(s, DAY, DEFS, {}, {})
    rich = next(o for o in out if o["segment"] == "RichAndBig")
    cond = next(c for c in rich["conditions"] if c["feature"].startswith("lookup."))
    assert (cond["observed_text"], cond["passed"]) == ("missing", False)


def test_a_lookup_change_alone_moves_a_customer_in_and_out() -> None:
    s, _ = set_attributes(None, "c", {"zip": "10001", "seats": "50"}, 0, DEFS)
    s, changes = evaluate(s, Score("c", DAY, {}), DEFS, {}, HIGH)
    assert [c.segment for c in changes if c.transition == "entered"] == []
    s, changes = advance(s, DAY, DEFS, {}, {"zip_income": {"10001": "high"}})
    assert [(c.segment, c.transition) for c in changes][:1] == [("RichAndBig", "entered")]
    s, changes = advance(s, 2 * DAY, DEFS, {}, {"zip_income": {}})
    assert [(c.segment, c.transition) for c in changes][:1] == [("RichAndBig", "exited")]


def test_attributes_survive_new_scores_and_the_changelog_round_trip() -> None:
    s, _ = set_attributes(None, "c", {"product_tier": "enterprise"}, 0, DEFS)
    s, _ = evaluate(s, Score("c", DAY, {}), DEFS)
    s, changes = evaluate(s, Score("c", 2 * DAY, {}), DEFS)
    assert s.attribute("product_tier") == "enterprise" and changes == []
    restored = state_from_record(state_to_record(s))
    assert restored == s
    # an attribute-only customer round-trips as not scored
    a, _ = set_attributes(None, "d", {"zip": "1"}, 0, DEFS)
    assert state_from_record(state_to_record(a)).scored is False


def test_a_score_at_event_time_zero_after_attributes_is_evaluated() -> None:
    s, _ = set_attributes(None, "c", {"product_tier": "enterprise"}, 5 * DAY, DEFS)
    assert isinstance(s, CustomerState) and not s.scored
    _, changes = evaluate(s, Score("c", 0, {}), DEFS)
    assert ("Enterprise", "entered") in [(c.segment, c.transition) for c in changes]


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ("attr.", "expected an attribute as attr.<name>"),
        ("attr.product tier", "expected an attribute as attr.<name>"),
        ("lookup.zip_income(zip)", "expected a lookup as lookup.<table>(attr.<name>)"),
        ("lookup.zip_income", "expected a lookup as lookup.<table>(attr.<name>)"),
    ],
)
def test_malformed_attribute_and_lookup_names_are_errors_that_say_the_form(
    feature: str, message: str
) -> None:
    rule = f'{{feature: "{feature}", op: "==", value: x}}'
    text = f"version: 1\nsegments:\n  - {{name: A, enter: {rule}}}\n"
    problems = check(text)
    assert [(p.line, p.field) for p in problems] == [(3, "segments[0].enter.feature")]
    assert message in problems[0].message


def test_lookup_csv_columns_and_errors() -> None:
    assert read_csv("tier,zip\nhigh,94027\n", key="zip", value="tier") == (
        "zip",
        "tier",
        {"94027": "high"},
    )
    with pytest.raises(LookupError_, match="no column 'zip'"):
        read_csv("a,b\n1,2\n", key="zip")
    with pytest.raises(LookupError_, match="line 3: empty key"):
        read_csv("zip,tier\n1,high\n,low\n")
    with pytest.raises(LookupError_, match="at least two columns"):
        read_csv("zip\n1\n")
