"""``segflow forget`` on the real pipeline: the four services as processes on a real broker
(and the API gateway in front of their query endpoints), a small simulated population, then
one customer with segment memberships forgotten."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from segflow.api import wiring
from segflow.demo import _groups, _service_env, _wait_caught_up
from segflow.forget import request, send
from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.broker import free_port
from segflow.runtime.kafka import make_producer
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import read_all, wait_until
from segflow.runtime.topics import TOPICS
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.sink import KafkaSink
from segflow.supervisor import SERVICES, Supervisor

pytestmark = pytest.mark.broker
TOKEN = "forget-test-token"


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, SMTPReceiver]]:
    r, s = Receiver().start(), SMTPReceiver().start()
    try:
        yield r, s
    finally:
        r.stop()
        s.stop()


def decoded(settings: Settings, topic: Any) -> list[tuple[str | None, dict[str, Any] | None]]:
    serde = Serde.from_settings(settings)
    return [
        (r.key.decode() if r.key else None, serde.decode(topic, r.value) if r.value else None)
        for r in read_all(settings, topic.name(settings))
    ]


def test_a_forgotten_customer_leaves_every_segment_and_is_never_profiled_or_contacted_again(
    kafka_settings: Settings, tmp_path: Path, receivers: tuple[Receiver, SMTPReceiver]
) -> None:
    settings = kafka_settings
    sup = Supervisor(
        tmp_path / "logs", env=_service_env(settings, settings.topic_prefix, *receivers)
    )
    ports = {name: free_port() for name in SERVICES}
    for name in SERVICES:
        sup.add_service(name, env=wiring.service_env(name, ports[name]))
    url = wiring.add_gateway(sup, ports, free_port(), TOKEN)
    sup.start_all()
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    scorer = httpx.Client(base_url=f"http://127.0.0.1:{ports['scorer']}", timeout=10)
    groups = _groups(settings, list(SERVICES))
    try:
        sim = Simulation(SimConfig(customers=30, days=35, seed=5))
        sink = KafkaSink.from_settings(settings)
        while not sim.finished:
            sink.write(sim.step(7))
        sink.close()
        _wait_caught_up(settings, groups, sup, timeout=90)

        # A customer with active memberships and a user_id we can send again.
        active: dict[str, set[str]] = {}
        for _, c in decoded(settings, TOPICS.segment_changes):
            assert c is not None
            if c["transition"] == "entered":
                active.setdefault(c["customer_id"], set()).add(c["segment"])
            elif c["transition"] in ("exited", "re_engaged"):
                active.setdefault(c["customer_id"], set()).discard(c["segment"])
        user_of: dict[str, str] = {}
        for cid, ev in decoded(settings, TOPICS.identified):
            assert ev is not None and cid is not None
            if ev["event"].get("user_id"):
                user_of.setdefault(cid, ev["event"]["user_id"])
        cid = next(c for c in sorted(active) if active[c] and c in user_of)
        was_in = active[cid]
        assert wiring.wait_ready(url, timeout=60)
        # before: the scorer and the gateway know the person's features and churn score
        assert scorer.get(f"/customers/{cid}").status_code == 200
        before = api.get(f"/v1/customers/{cid}")
        assert before.status_code == 200 and before.json()["features"]
        assert 0 <= before.json()["scores"]["churn_probability"] <= 1

        forgotten_at = int(time.time() * 1000)
        send(settings, request(cid, "test", forgotten_at))
        # the person comes back with the same user_id after the erasure
        serde = Serde.from_settings(settings)
        producer = make_producer(settings)
        again = {"event_id": "after-forget-1", "event_type": "login",
                 "occurred_at": sim.now_ms,
                 "user_id": user_of[cid]}  # fmt: skip
        producer.produce(
            TOPICS.events.name(settings), serde.encode(TOPICS.events, again), user_of[cid].encode()
        )
        producer.flush(10)

        def forgotten_by_identity() -> bool:
            return any(
                k == cid and e["event"]["event_type"] == "customer_forgotten"
                for k, e in decoded(settings, TOPICS.identified)
                if e
            )

        # identity has acted on the request; then every service has read all there is
        wait_until(forgotten_by_identity, 60, what="identity's customer_forgotten event")
        _wait_caught_up(settings, groups, sup, timeout=90)

        changes = [c for _, c in decoded(settings, TOPICS.segment_changes) if c]
        mine = [c for c in changes if c["customer_id"] == cid]
        exits = [c for c in mine if c["transition"] == "exited" and c["reason"] == "forgotten"]
        assert {c["segment"] for c in exits} == was_in
        last_exit = max(i for i, c in enumerate(mine) if c["reason"] == "forgotten")
        assert not [c for c in mine[last_exit + 1 :] if c["transition"] == "entered"]

        identified = [(k, e) for k, e in decoded(settings, TOPICS.identified) if e]
        assert any(
            k == cid and e["event"]["event_type"] == "customer_forgotten" for k, e in identified
        )
        assert not [e for _, e in identified if e["event"]["event_id"] == "after-forget-1"]

        state: dict[str, Any] = {}
        for key, value in decoded(settings, TOPICS.identity_state):
            state[key or ""] = value
        assert state.get("p:" + cid) is None, "the profile is still in the identity state"
        assert not [k for k, v in state.items() if v and v.get("customer_id") == cid]

        # the scorer forgot the features too: its query endpoint, the gateway's profile and
        # the compacted scores topic (its last record for the id is a tombstone) have nothing
        assert scorer.get(f"/customers/{cid}").status_code == 404
        profile = api.get(f"/v1/customers/{cid}")
        assert profile.status_code == 404, profile.text
        scores = [v for k, v in decoded(settings, TOPICS.scores) if k == cid]
        assert scores and scores[-1] is None
        scorer_state: dict[str, Any] = {}
        for key, value in decoded(settings, TOPICS.scorer_state):
            scorer_state[key or ""] = value
        assert scorer_state.get(cid) is None, "the scorer still keeps the customer's features"
        assert f"retired:{cid}" in scorer_state  # a late event cannot bring them back

        results = [r for _, r in decoded(settings, TOPICS.dispatch_results) if r]
        late_sends = [
            r for r in results
            if r["customer_id"] == cid and r["status"] == "sent" and r["decided_at"] > forgotten_at
        ]  # fmt: skip
        assert late_sends == []
        assert sup.check() == []  # nothing crashed on the way
    finally:
        api.close()
        scorer.close()
        sup.stop()
