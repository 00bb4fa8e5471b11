"""Templates read customer attributes (segflow.attributes, issue 19)."""

from __future__ import annotations

from services.dispatcher import core, observing
from services.dispatcher.core import SegmentChange
from services.dispatcher.playbooks import Book, parse_documents

NOON = 1_772_452_800_000
PLAYBOOK = """\
playbook: P
segment: S
defaults: {first_name: there, product_tier: your plan}
steps:
  - {id: mail, channel: email, template: d-1, subject: "Hi {{first_name}}, about {{product_tier}}"}
---
policy: {default_timezone: UTC}
"""


def book() -> Book:
    playbooks, policy = parse_documents(PLAYBOOK)
    assert policy is not None
    return Book(tuple(playbooks), policy)


def test_a_template_renders_an_attribute_and_keeps_only_those_templates_read() -> None:
    b = book()
    assert {"first_name", "product_tier"} <= b.template_traits
    c = observing.set_attributes(None, "c1", {"product_tier": "enterprise", "zip": "94027"}, b)
    assert c is not None and dict(c.attrs) == {"product_tier": "enterprise"}  # zip not kept
    c, _ = core.decide(c, SegmentChange("c1", "S", "entered", "c1:S:1", NOON), NOON, b)
    req = core.request_for(c, c.actions[0], b)
    assert req is not None and req.problem is None
    assert req.subject == "Hi there, about enterprise"
    # an attribute change later is what the next send renders
    c2 = observing.set_attributes(c, "c1", {"product_tier": "pro"}, b)
    assert c2 is not None
    req = core.request_for(c2, c2.actions[0], b)
    assert req is not None and req.subject == "Hi there, about pro"


def test_without_the_attribute_the_playbooks_default_is_rendered() -> None:
    # the loader requires a default for every variable (never a half-rendered text)
    b = book()
    c, _ = core.decide(None, SegmentChange("c2", "S", "entered", "c2:S:1", NOON), NOON, b)
    req = core.request_for(c, c.actions[0], b)
    assert req is not None and req.subject == "Hi there, about your plan"
