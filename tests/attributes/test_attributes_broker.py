"""Attributes on the real broker: identify traits and a CRM export go through identity and
the attributes service into segflow.attributes (PII traits kept out), an identity merge moves
them to the survivor, and forget erases them."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from segflow import forget
from segflow.attributes import to_events
from segflow.produce import produce_file
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import read_all
from segflow.runtime.topics import TOPICS
from services.attributes.app import AttributesConfig, build_loop
from services.identity.app import IdentityService

pytestmark = pytest.mark.broker

T0 = 1_700_000_000_000


def event(eid: str, at: int, etype: str = "identify", **fields: Any) -> dict[str, Any]:
    props = fields.pop("properties", {})
    return {
        "event_id": eid,
        "event_type": etype,
        "occurred_at": at,
        "user_id": None,
        "anonymous_id": None,
        "device_id": None,
        "email": None,
        "properties": props,
        **fields,
    }


def send_events(s: Settings, events: list[dict[str, Any]]) -> None:
    lines = io.StringIO("".join(json.dumps(e) + "\n" for e in events))
    assert produce_file(s, lines, out=io.StringIO()) == 0


def table(s: Settings) -> dict[str, dict[str, Any] | None]:
    """segflow.attributes as a table (latest per key; None: tombstoned)."""
    serde = Serde.from_settings(s)
    out: dict[str, dict[str, Any] | None] = {}
    for r in read_all(s, TOPICS.attributes.name(s), timeout=20):
        key = (r.key or b"").decode()
        out[key] = serde.decode(TOPICS.attributes, r.value) if r.value is not None else None
    return out


def run(s: Settings) -> None:
    identity = IdentityService(s)
    identity.restore()
    identity.loop().run(idle_timeout=3)
    _, loop = build_loop(s, AttributesConfig(instance="at1", tick_interval=0.2))
    loop.run(idle_timeout=3)


def test_identify_traits_and_a_crm_export_become_attributes_then_merge_and_forget(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    s = kafka_settings
    # an anonymous visitor identifies (traits, one of them PII), then logs in as u1
    send_events(
        s,
        [
            event(
                "e1",
                T0,
                anonymous_id="anon-1",
                properties={"zip": "94027", "plan": "pro", "phone": "+1 555 0100"},
            ),
            event("e2", T0 + 1000, anonymous_id="anon-2", properties={"plan": "free"}),
            event("e3", T0 + 2000, "login", user_id="u1", anonymous_id="anon-2"),
        ],
    )
    crm = "user_id,product_tier,first_name,owner\nu1,enterprise,Ana,sam@corp.example\n"
    crm_events, problems = to_events(Path("crm.csv"), crm, T0 + 3000)
    assert problems == []
    send_events(s, crm_events)
    run(s)
    got = {k: v for k, v in table(s).items() if v is not None}
    # anon-1 and u1 (with anon-2) are two customers: attributes per customer_id
    by_plan = {v["attributes"].get("plan"): v for v in got.values()}
    assert set(by_plan) == {"pro", "free"}
    u1 = by_plan["free"]
    assert u1["attributes"] == {"plan": "free", "product_tier": "enterprise"}
    assert u1["sources"] == ["crm", "identify"]
    anon1 = by_plan["pro"]
    assert anon1["attributes"] == {"plan": "pro", "zip": "94027"}  # phone kept out
    raw = b"".join(r.value or b"" for r in read_all(s, TOPICS.attributes.name(s)))
    for pii in (b"555 0100", b"Ana", b"sam@corp"):
        assert pii not in raw

    # anon-1 logs in as u1: identity merges the profiles; the attributes follow the survivor
    send_events(s, [event("e4", T0 + 5000, "login", user_id="u1", anonymous_id="anon-1")])
    run(s)
    after = table(s)
    live = {k: v for k, v in after.items() if v is not None}
    assert len(live) == 1
    ((survivor, rec),) = live.items()
    assert rec["attributes"] == {"plan": "free", "product_tier": "enterprise", "zip": "94027"}
    assert "merge" in rec["sources"]
    absorbed = [k for k, v in after.items() if v is None]
    assert absorbed and survivor not in absorbed

    # forget erases them
    forget.send(s, forget.request(survivor, "ticket-1", int(time.time() * 1000)))
    run(s)
    assert table(s).get(survivor, "absent") is None
