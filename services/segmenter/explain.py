"""What a customer's memberships rest on: every condition with observed value, threshold and
margin (pure; split out of :mod:`services.segmenter.core`, issue #14).
"""

from __future__ import annotations

from typing import Any

from services.segmenter.dsl import (
    NO_LOOKUPS,
    Definitions,
    Lookups,
    Rule,
    Thresholds,
)
from services.segmenter.model import (
    EMPTY,
    CustomerState,
    Membership,
    aged_values,
    entry_id,
    with_lookups,
)


def explain_customer(
    state: CustomerState,
    now: int,
    defs: Definitions,
    thresholds: Thresholds = EMPTY,
    lookups: Lookups = NO_LOOKUPS,
) -> list[dict[str, Any]]:
    """Why a customer is (or is not) in each segment right now, for ``segflow explain``.

    >>> from services.segmenter.core import Score, evaluate
    >>> from services.segmenter.dsl import parse
    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1}}\\n')
    >>> s, _ = evaluate(None, Score("c", 0, {"x": 3.0}), defs)
    >>> out = explain_customer(s, 0, defs)
    >>> out[0]["segment"], out[0]["member"], out[0]["primary"], out[0]["conditions"][0]["margin"]
    ('A', True, True, 2.0)

    A customer who meets ``enter`` but whom the exit rule would remove is not a member; the
    exit conditions that hold it out are listed too:

    >>> defs = parse('version: 1\\nsegments:\\n'
    ...              '  - {name: A, enter: {feature: x, op: ">", value: 1},\\n'
    ...              '     exit: {feature: stage, op: "==", value: churned}}\\n')
    >>> s, _ = evaluate(None, Score("c", 0, {"x": 3.0, "stage": "churned"}), defs)
    >>> out = explain_customer(s, 0, defs)[0]
    >>> out["member"], out["rule"], [c["feature"] for c in out["conditions"]]
    (False, 'enter, held out by the exit rule', ['x', 'stage'])
    """
    values = aged_values(state, now)
    if defs.lookups:
        with_lookups(values, defs, lookups)
    out: list[dict[str, Any]] = []
    for seg in defs.segments:
        m = state.memberships.get(seg.name) or Membership(seg.name)
        rule: Rule = seg.enter if not m.active or seg.exit is None else seg.exit
        kind = "exit" if m.active and seg.exit is not None else "enter"
        conditions = [e.__dict__ for e in rule.explain(values, thresholds)]
        if (
            not m.active
            and seg.exit is not None
            and seg.enter.test(values, thresholds)
            and seg.exit.test(values, thresholds)
        ):  # qualifies but the exit rule would remove it: show what holds it out
            kind = "enter, held out by the exit rule"
            conditions += [e.__dict__ for e in seg.exit.explain(values, thresholds) if e.passed]
        out.append(
            {
                "segment": seg.name,
                "member": m.active,
                "primary": state.primary == seg.name,
                "entry_id": entry_id(state.customer_id, seg.name, m.seq) if m.active else None,
                "entered_at": m.entered_at if m.active else None,
                "rule": kind,
                "conditions": conditions,
            }
        )
    return out
