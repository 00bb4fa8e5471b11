"""The collector on a real broker, fed by Segment's official Python SDK (issue 19, must-show).

Simulated customers' events go through ``segment-analytics-python`` (identify, track, page,
in batches of up to 100) to the collector on 127.0.0.1; the email provider's events, which
carry only an email, go as raw ``/v1/batch`` posts. What lands on ``segflow.events`` is read
back with ``read_committed`` and compared with what the simulator writes to Kafka directly.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import segment.analytics.request as segment_request
from segment.analytics import Client

from segflow.collector.app import Background, Collector, CollectorSettings
from segflow.runtime.broker import LocalBroker
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import isolated_settings, read_all, wait_until
from segflow.runtime.topics import TOPICS
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.identities import event_key
from services.identity.app import MERGED_EVENT, IdentityService

pytestmark = pytest.mark.broker

KEY = "sdk-write-key"
# How a producer would name segflow's event types in Segment's vocabulary (the test's own
# table, written from Segment's spec, not taken from the collector).
SEGMENT_NAMES = {
    "purchase": "Order Completed",
    "cart_view": "Cart Viewed",
    "cart_abandon": "Cart Abandoned",
    "login": "Signed In",
    "session_start": "Application Opened",
    "feature_use": "Feature Used",
    "subscription_cancel": "Subscription Cancelled",
    "email_sent": "Email Delivered",
    "email_open": "Email Opened",
    "email_click": "Email Link Clicked",
    "email_unsubscribe": "Unsubscribed",
    "email_bounce": "Email Bounced",
    "support_ticket": "Ticket Created",
}
TYPED = (
    "amount",
    "currency",
    "product_id",
    "feature",
    "session_seconds",
    "sentiment",
    "escalated",
    "campaign_id",
    "variant",
)


def segment_call(ev: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The SDK call a producer would make for one simulated event."""
    context: dict[str, Any] = {}
    if ev.get("device_id"):
        context["device"] = {"id": ev["device_id"]}
    props = {("revenue" if k == "amount" else k): ev[k] for k in TYPED if ev.get(k) is not None}
    props.update(ev.get("properties") or {})
    common = {
        "user_id": ev.get("user_id"),
        "anonymous_id": ev.get("anonymous_id"),
        "message_id": ev["event_id"],
        "timestamp": datetime.fromtimestamp(ev["occurred_at"] / 1000, tz=UTC),
        "context": context,
    }
    if ev["event_type"] == "identify":
        traits = dict(props)
        if ev.get("email"):
            traits["email"] = ev["email"]
        return "identify", {**common, "traits": traits}
    if ev.get("email"):
        context["traits"] = {"email": ev["email"]}
    if ev["event_type"] == "page_view":
        return "page", {**common, "properties": props}
    return "track", {**common, "event": SEGMENT_NAMES[ev["event_type"]], "properties": props}


def raw_message(ev: dict[str, Any]) -> dict[str, Any]:
    """An email-only event as an email provider's relay posts it (no userId/anonymousId)."""
    props = {k: ev[k] for k in TYPED if ev.get(k) is not None}
    return {
        "type": "track",
        "event": SEGMENT_NAMES[ev["event_type"]],
        "messageId": ev["event_id"],
        "timestamp": datetime.fromtimestamp(ev["occurred_at"] / 1000, tz=UTC).isoformat(),
        "context": {"traits": {"email": ev["email"]}},
        "properties": props,
    }


@contextmanager
def collector(settings: Settings, **config: Any) -> Iterator[Background]:
    cfg = CollectorSettings(port=0, write_keys=f"sdk={KEY}", **config)
    with Background(Collector(settings, cfg)) as bg:
        yield bg


@contextmanager
def answers_seen() -> Iterator[list[tuple[int, list[str]]]]:
    """Every HTTP answer the SDK gets, with the messageIds of the batch it answered."""
    seen: list[tuple[int, list[str]]] = []

    def hook(response: Any, *args: Any, **kwargs: Any) -> None:
        raw = response.request.body
        if response.request.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        body = json.loads(raw)
        seen.append((response.status_code, [m["messageId"] for m in body["batch"]]))

    segment_request._session.hooks["response"].append(hook)
    try:
        yield seen
    finally:
        segment_request._session.hooks["response"].remove(hook)


def test_sdk_calls_land_once_as_the_simulator_writes_them_and_identity_stitches(
    kafka_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    s = kafka_settings
    sim = Simulation(SimConfig(customers=40, days=28, seed=19, shared_device_rate=0.0))
    deliveries = list(sim.run())
    events = [d.event for d in deliveries]
    truth = {d.event["event_id"]: d.customer for d in deliveries}
    via_sdk = [e for e in events if e.get("user_id") or e.get("anonymous_id")]
    via_raw = [e for e in events if not (e.get("user_id") or e.get("anonymous_id"))]
    assert via_sdk and via_raw

    errors: list[Any] = []
    with collector(s) as bg, answers_seen() as answers:
        client = Client(
            KEY,
            host=bg.url,
            upload_size=100,
            upload_interval=0.05,
            gzip=True,
            max_queue_size=100_000,
            on_error=lambda e, batch: errors.append(e),
        )
        for ev in via_sdk:
            method, kwargs = segment_call(ev)
            ok, _ = getattr(client, method)(**kwargs)
            assert ok
        with httpx.Client(base_url=bg.url, auth=(KEY, ""), timeout=30) as http:
            for i in range(0, len(via_raw), 100):
                batch = [raw_message(e) for e in via_raw[i : i + 100]]
                assert http.post("/v1/batch", json={"batch": batch}).status_code == 200
        client.shutdown()
    assert errors == []
    assert answers and {status for status, _ in answers} == {200}
    assert max(len(ids) for _, ids in answers) == 100  # real batches, not one call per request

    serde = Serde.from_settings(s)
    records = read_all(s, TOPICS.events.name(s), expected=len(events), timeout=60)
    got = {}
    for r in records:
        ev = serde.decode(TOPICS.events, r.value)
        got[ev["event_id"]] = (r.key, ev)
    # every call exactly once, nothing else
    assert Counter(
        Counter(serde.decode(TOPICS.events, r.value)["event_id"] for r in records).values()
    ) == {1: len(events)}
    assert set(got) == {e["event_id"] for e in events}
    # identical to what the simulator writes to Kafka directly: same key, same record
    for ev in events:
        direct = serde.decode(TOPICS.events, serde.encode(TOPICS.events, ev))
        key, collected = got[ev["event_id"]]
        assert key == event_key(ev).encode()
        assert collected == direct, ev["event_id"]

    # identity stitches anonymous browsing to the user who later logs in
    service = IdentityService(s)
    service.restore()
    assert service.loop().run(max_records=len(events), idle_timeout=15) == len(events)
    out = read_all(s, TOPICS.identified.name(s), expected=len(events), timeout=60)
    survivor = {}
    for r in read_all(s, TOPICS.merges.name(s)):
        m = serde.decode(TOPICS.merges, r.value)
        for absorbed in m["absorbed_ids"]:
            survivor[absorbed] = m["survivor_id"]

    def resolve(cid: str) -> str:
        while cid in survivor:
            cid = survivor[cid]
        return cid

    final = {}
    for r in out:
        v = serde.decode(TOPICS.identified, r.value)
        if v["event"]["event_type"] == MERGED_EVENT:
            continue  # identity's record of a merge (keyed by the absorbed id), not an event
        final[v["event"]["event_id"]] = resolve(v["customer_id"])
    assert len(final) == len(events)
    user_of_anon = {
        e["anonymous_id"]: e["user_id"]
        for e in events
        if e.get("anonymous_id") and e.get("user_id")
    }
    customer_of_user: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.get("user_id"):
            customer_of_user[e["user_id"]].add(final[e["event_id"]])
    assert all(len(c) == 1 for c in customer_of_user.values())
    anonymous_first = [
        e
        for e in events
        if e.get("anonymous_id") and not e.get("user_id") and e["anonymous_id"] in user_of_anon
    ]
    stitched = [
        e
        for e in anonymous_first
        if {final[e["event_id"]]} == customer_of_user[user_of_anon[e["anonymous_id"]]]
    ]
    assert len(anonymous_first) >= 20 and len(stitched) == len(anonymous_first)
    # and no two true customers share a customer id
    owners: dict[str, set[str]] = defaultdict(set)
    for eid, cid in final.items():
        owners[cid].add(truth[eid])
    assert all(len(o) == 1 for o in owners.values())
    with capsys.disabled():
        print(
            f"\ncollector: {len(via_sdk)} SDK calls in {len(answers)} requests + {len(via_raw)} "
            f"raw; {len(anonymous_first)} anonymous-first events stitched to their user"
        )


def librdkafka_threads() -> int:
    """Threads librdkafka runs for this process's clients (named rdk:...)."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            count += (task / "comm").read_text().startswith("rdk:")
    return count


def test_broker_killed_mid_batch_gives_errors_never_a_200_for_a_lost_event(
    own_broker: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    s = isolated_settings(own_broker.bootstrap, "collect-kill")
    clients_before = librdkafka_threads()
    n = 1500
    ids = [f"kill-{i}" for i in range(n)]
    errors: list[Any] = []
    with collector(s, commit_timeout_s=3.0, request_timeout_s=8.0) as bg, answers_seen() as answers:
        client = Client(
            KEY,
            host=bg.url,
            upload_size=100,
            upload_interval=0.05,
            timeout=15,
            max_retries=30,
            max_queue_size=100_000,
            on_error=lambda e, batch: errors.append(e),
        )
        t0 = datetime(2024, 1, 1, tzinfo=UTC)

        def send() -> None:
            for i, mid in enumerate(ids):
                client.track(
                    user_id=f"u{i % 50}",
                    event="Feature Used",
                    message_id=mid,
                    properties={"feature": "reports"},
                    timestamp=t0,
                )
                if i % 100 == 99:
                    time.sleep(0.1)

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 60
        while sum(1 for st, _ in answers if st == 200) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        own_broker.kill()
        killed_at = len(answers)
        while not any(st != 200 for st, _ in answers[killed_at:]) and time.monotonic() < deadline:
            time.sleep(0.1)
        failed = [st for st, _ in answers[killed_at:] if st != 200]
        own_broker.start()
        sender.join()
        client.flush()
        client.join()
    assert failed and set(failed) == {503}  # the client was told, and retried
    assert errors == []  # ... until everything got through
    # every producer the collector made is closed with it, also those dropped after a
    # failed abort (they used to live on, retrying the gone broker, for the whole session)
    wait_until(lambda: librdkafka_threads() <= clients_before, 20, what="producers closed")

    serde = Serde.from_settings(s)
    records = read_all(s, TOPICS.events.name(s), expected=n, timeout=90)
    counts = Counter(serde.decode(TOPICS.events, r.value)["event_id"] for r in records)
    lost = set(ids) - set(counts)
    assert not lost, f"{len(lost)} events lost"
    ok_first_time = set()
    retried = set()
    for status, batch in answers:
        (ok_first_time if status == 200 else retried).update(batch)
    ok_first_time -= retried
    doubled = {m for m, c in counts.items() if c > 1}
    # a message answered 200 at its first attempt is never written twice
    assert not (doubled & ok_first_time)
    with capsys.disabled():
        print(
            f"\ncollector under a broker kill: {len(answers)} answers, {len(failed)} errors "
            f"while down, {len(retried)} messages retried, {len(doubled)} on the topic twice, "
            "none lost"
        )
