"""The segmenter changelog's customer record (Avro shape of ``SegmenterStateEntry``) and back
(pure; split out of :mod:`services.segmenter.core`, issue #14).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.segmenter.dsl import (
    Value,
)
from services.segmenter.model import CustomerState, Membership


def state_to_record(state: CustomerState) -> dict[str, Any]:
    """CustomerState → SegmenterStateEntry record (kind ``customer``)."""
    return {
        "kind": "customer",
        "customer": {
            "customer_id": state.customer_id,
            "as_of": state.as_of,
            "numbers": {k: v for k, v in state.values.items() if isinstance(v, float)},
            "texts": {k: v for k, v in state.values.items() if isinstance(v, str)},
            "memberships": [
                {
                    "segment": m.segment,
                    "active": m.active,
                    "seq": m.seq,
                    "entered_at": m.entered_at,
                    "exited_at": m.exited_at,
                    "pending_since": m.pending_since,
                }
                for m in state.memberships.values()
            ],
            "primary": state.primary,
            "primary_seq": state.primary_seq,
            "re_engaged_at": state.re_engaged_at,
            "next_timer": state.next_timer,
        },
        "segment": None,
    }


def state_from_record(record: Mapping[str, Any]) -> CustomerState:
    """SegmenterStateEntry record (kind ``customer``) → CustomerState.

    >>> s = CustomerState("c", 5, {"x": 1.0, "lifecycle_stage": "loyal"},
    ...                   {"A": Membership("A", True, 1, 5)}, "A", 1)
    >>> state_from_record(state_to_record(s)) == s
    True
    """
    c = record["customer"]
    values: dict[str, Value] = dict(c["numbers"])
    values.update(c["texts"])
    return CustomerState(
        customer_id=c["customer_id"],
        as_of=c["as_of"],
        values=values,
        memberships={
            m["segment"]: Membership(
                m["segment"],
                m["active"],
                m["seq"],
                m["entered_at"],
                m["exited_at"],
                m["pending_since"],
            )
            for m in c["memberships"]
        },
        primary=c["primary"],
        primary_seq=c["primary_seq"],
        re_engaged_at=c["re_engaged_at"],
        next_timer=c["next_timer"],
    )
