"""mParticle's server-to-server events API on the collector (a real HTTP server on
127.0.0.1; Kafka is the writer double, as in test_collector_http.py)."""

from __future__ import annotations

import base64
from typing import Any

from tests.collector.test_collector_http import KEY, collector, decoded  # noqa: F401

T = 1704067200000  # 2024-01-01T00:00:00Z


def mp_auth(key: str, secret: str = "s3cret") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


BATCH = {
    "environment": "production",
    "mpid": 8675309,
    "user_identities": {"customer_id": "u7", "email": "Bo@Example.com"},
    "device_info": {"ios_idfv": "idfv-1"},
    "user_attributes": {"product_tier": "enterprise", "$FirstName": "Bo"},
    "timestamp_unixtime_ms": T,
    "batch_id": 11,
    "events": [
        {
            "event_type": "custom_event",
            "data": {
                "event_name": "Feature Used",
                "source_message_id": "mp-1",
                "timestamp_unixtime_ms": T + 1000,
                "custom_attributes": {"feature": "reports", "plan": "pro"},
            },
        },
        {
            "event_type": "commerce_event",
            "data": {
                "source_message_id": "mp-2",
                "timestamp_unixtime_ms": T + 2000,
                "currency_code": "USD",
                "product_action": {
                    "action": "purchase",
                    "total_amount": 42.0,
                    "products": [{"id": "sku-9", "price": 42.0}],
                },
            },
        },
        {"event_type": "screen_view", "data": {"screen_name": "Home", "source_message_id": "mp-3"}},
    ],
}


def test_an_mparticle_batch_becomes_behavior_events(collector: Any) -> None:  # noqa: F811
    client, writer = collector
    r = client.post("/v2/events", headers=mp_auth(KEY), json=BATCH)
    assert r.status_code == 202 and r.json() == {"success": True}
    evs = {e["event_id"]: e for e in decoded(writer)}
    assert set(evs) == {"mp-11-attributes", "mp-1", "mp-2", "mp-3"}
    for e in evs.values():
        assert (e["user_id"], e["anonymous_id"], e["device_id"]) == ("u7", "mp:8675309", "idfv-1")
        assert e["email"] == "Bo@Example.com"  # raw for identity, which hashes it
    ident = evs["mp-11-attributes"]
    assert ident["event_type"] == "identify"
    assert ident["properties"]["product_tier"] == "enterprise"
    assert evs["mp-1"]["event_type"] == "feature_use" and evs["mp-1"]["feature"] == "reports"
    assert evs["mp-1"]["occurred_at"] == T + 1000
    buy = evs["mp-2"]
    assert (buy["event_type"], buy["amount"], buy["currency"], buy["product_id"]) == (
        "purchase",
        42.0,
        "USD",
        "sku-9",
    )
    assert evs["mp-3"]["event_type"] == "page_view"


def test_bulk_events_name_each_bad_message_and_keep_the_good(collector: Any) -> None:  # noqa: F811
    client, writer = collector
    good = {"user_identities": {"customer_id": "u8"}, "events": BATCH["events"][:1]}
    bad = {"events": [{"event_type": "custom_event", "data": {"event_name": "X"}}]}  # no id
    r = client.post("/v2/bulkevents", headers=mp_auth(KEY), json=[good, bad])
    assert r.status_code == 400
    body = r.json()
    assert body["accepted"] == 1
    assert [e["index"] for e in body["errors"]] == [1]
    assert "expected userId or anonymousId" in body["errors"][0]["error"]
    assert [e["user_id"] for e in decoded(writer)] == ["u8"]
    r = client.post("/v2/bulkevents", headers=mp_auth(KEY), json=good)  # not a list
    assert r.status_code == 400 and "JSON array of mParticle batches" in r.text
    r = client.post("/v2/events", headers=mp_auth("wrong-key"), json=BATCH)
    assert r.status_code == 401
