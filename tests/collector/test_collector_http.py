"""The collector's HTTP surface on a real server on 127.0.0.1 (Kafka replaced by the writer's
double, so these run without a broker): auth, gzip, limits, per-message 400s, metrics."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from segflow.collector.app import Background, Collector, CollectorSettings
from segflow.collector.writer import MemoryWriter
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS

KEY = "wk-test-123"
SETTINGS = Settings(bootstrap_servers="127.0.0.1:1")  # never dialled: the writer is a double


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.fixture
def collector(request: pytest.FixtureRequest) -> Iterator[tuple[httpx.Client, MemoryWriter]]:
    extra: dict[str, Any] = getattr(request, "param", {})
    config = CollectorSettings(port=0, write_keys=f"web={KEY},backend=other-key", **extra)
    writer = MemoryWriter()
    with (
        Background(Collector(SETTINGS, config, writer=writer)) as bg,
        httpx.Client(base_url=bg.url, timeout=10) as client,
    ):
        yield client, writer


def decoded(writer: MemoryWriter) -> list[dict[str, Any]]:
    serde = Serde.from_settings(SETTINGS)
    return [serde.decode(TOPICS.events, value) for _, value in writer.committed]


def test_track_call_with_basic_auth_is_written_as_a_behavior_event(collector: Any) -> None:
    client, writer = collector
    r = client.post(
        "/v1/track",
        headers=basic(KEY),
        json={
            "userId": "u1",
            "event": "Order Completed",
            "messageId": "m-1",
            "timestamp": "2024-03-01T10:00:00.123+01:00",
            "properties": {"revenue": 19.99, "currency": "EUR", "coupon": "SPRING"},
            "context": {"device": {"id": "dev-9"}, "traits": {"email": "Ana@Example.com"}},
        },
    )
    assert r.status_code == 200 and r.json() == {"success": True}
    [(key, _)] = writer.committed
    [ev] = decoded(writer)
    assert key == b"u1"
    assert ev["event_id"] == "m-1" and ev["event_type"] == "purchase"
    assert ev["occurred_at"] == 1709283600123  # 09:00:00.123Z
    assert (ev["user_id"], ev["device_id"], ev["email"]) == ("u1", "dev-9", "Ana@Example.com")
    assert (ev["amount"], ev["currency"], ev["properties"]) == (19.99, "EUR", {"coupon": "SPRING"})


def test_write_key_in_the_body_and_gzip_bodies_are_accepted(collector: Any) -> None:
    client, writer = collector
    body = {
        "writeKey": KEY,
        "batch": [
            {"type": "page", "anonymousId": "a1", "messageId": f"p{i}", "name": "Pricing"}
            for i in range(3)
        ],
    }
    r = client.post(
        "/v1/batch",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert [e["event_type"] for e in decoded(writer)] == ["page_view"] * 3
    assert decoded(writer)[0]["properties"] == {"name": "Pricing"}


@pytest.mark.parametrize(
    "headers",
    [{}, basic("wrong-key"), {"Authorization": "Basic !!notbase64"}, {"Authorization": "Bearer x"}],
)
def test_unknown_or_missing_write_key_is_401_and_writes_nothing(
    collector: Any, headers: dict[str, str]
) -> None:
    client, writer = collector
    r = client.post("/v1/identify", headers=headers, json={"userId": "u1", "messageId": "m"})
    assert r.status_code == 401
    assert "write key" in r.json()["message"]
    assert writer.committed == []


def test_a_batch_with_bad_messages_gets_400_naming_each_and_keeps_the_good_ones(
    collector: Any,
) -> None:
    client, writer = collector
    batch = [
        {"type": "track", "userId": "u1", "event": "Signed In", "messageId": "ok-1"},
        {"type": "track", "userId": "u1", "messageId": "no-name"},
        {"type": "identify", "messageId": "no-id", "traits": {"plan": "pro"}},
        {
            "type": "track",
            "userId": "u1",
            "event": "x",
            "messageId": "bad-time",
            "timestamp": "2024-01-01 10:00",
        },
        {"type": "teleport", "userId": "u1", "messageId": "bad-type"},
        {"type": "page", "anonymousId": "a1", "messageId": "ok-2"},
    ]
    r = client.post("/v1/batch", headers=basic(KEY), json={"batch": batch})
    assert r.status_code == 400
    out = r.json()
    assert out["code"] == "invalid_messages" and out["accepted"] == 2
    errors = {e["messageId"]: (e["index"], e["error"]) for e in out["errors"]}
    assert set(errors) == {"no-name", "no-id", "bad-time", "bad-type"}
    assert errors["no-name"][0] == 1 and "event name" in errors["no-name"][1]
    assert "userId or anonymousId" in errors["no-id"][1]
    assert (
        "has no UTC offset" in errors["bad-time"][1]
        and "epoch milliseconds" in errors["bad-time"][1]
    )
    assert "identify, track, page" in errors["bad-type"][1]
    assert sorted(e["event_id"] for e in decoded(writer)) == ["ok-1", "ok-2"]


def test_bodies_that_are_not_json_or_not_gzip_say_what_was_expected(collector: Any) -> None:
    client, writer = collector
    r = client.post("/v1/track", headers=basic(KEY), content=b"{nope")
    assert r.status_code == 400 and "expected a JSON object" in r.json()["message"]
    r = client.post(
        "/v1/track", headers={**basic(KEY), "Content-Encoding": "gzip"}, content=b"plain"
    )
    assert r.status_code == 400 and "not gzip" in r.json()["message"]
    r = client.post("/v1/batch", headers=basic(KEY), json={"messages": []})
    assert r.status_code == 400 and '{"batch": [' in r.json()["message"]
    assert writer.committed == []


def test_bodies_over_the_limit_are_413_compressed_or_not(collector: Any) -> None:
    client, writer = collector
    big = {"userId": "u1", "event": "x", "properties": {"blob": "x" * 40_000}}
    r = client.post("/v1/track", headers=basic(KEY), json=big)  # over the 32 KB per call
    assert r.status_code == 413 and "32768 bytes" in r.json()["message"]
    bomb = {"batch": [{"type": "track", "userId": "u", "event": "e", "p": "0" * 600_000}]}
    packed = gzip.compress(json.dumps(bomb).encode())
    assert len(packed) < 10_000  # small on the wire, over 500 KB once inflated
    r = client.post("/v1/batch", headers={**basic(KEY), "Content-Encoding": "gzip"}, content=packed)
    assert r.status_code == 413 and "decompressed" in r.json()["message"]
    r = client.post("/v1/batch", headers=basic(KEY), content=json.dumps(bomb).encode())
    assert r.status_code == 413
    assert writer.committed == []


@pytest.mark.parametrize("collector", [{"rate_per_key": 10, "burst_per_key": 20}], indirect=True)
def test_rate_limit_is_per_write_key_with_retry_after(collector: Any) -> None:
    client, writer = collector

    def batch(n: int, tag: str) -> dict[str, Any]:
        return {
            "batch": [
                {"type": "track", "userId": "u", "event": "e", "messageId": f"{tag}{i}"}
                for i in range(n)
            ]
        }

    assert client.post("/v1/batch", headers=basic(KEY), json=batch(15, "a")).status_code == 200
    r = client.post("/v1/batch", headers=basic(KEY), json=batch(10, "b"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "messages/s" in r.json()["message"]
    # another write key has its own budget
    assert (
        client.post("/v1/batch", headers=basic("other-key"), json=batch(10, "c")).status_code == 200
    )
    assert len(writer.committed) == 25


def test_kafka_not_acknowledging_is_503_never_200(collector: Any) -> None:
    client, writer = collector
    writer.fail = "broker down"
    r = client.post("/v1/track", headers=basic(KEY), json={"userId": "u", "event": "e"})
    assert r.status_code == 503 and "retry" in r.json()["message"]
    assert writer.committed == []


def test_metrics_count_by_source_never_by_key_or_identifier(collector: Any) -> None:
    client, _ = collector
    client.post(
        "/v1/identify",
        headers=basic(KEY),
        json={"userId": "u-secret", "traits": {"email": "pii@example.com"}},
    )
    client.post("/v1/identify", headers=basic("nope"), json={"userId": "u"})
    text = client.get("/metrics").text
    assert 'segflow_collector_messages_total{outcome="accepted",source="web"}' in text
    assert 'segflow_collector_requests_total{call="identify",source="unknown",status="401"}' in text
    for secret in (KEY, "u-secret", "pii@example.com"):
        assert secret not in text


def test_collector_refuses_to_start_without_write_keys() -> None:
    from segflow.errors import ConfigError

    with pytest.raises(ConfigError, match="SEGFLOW_COLLECTOR_WRITE_KEYS"):
        Collector(SETTINGS, CollectorSettings(write_keys=None), writer=MemoryWriter())
