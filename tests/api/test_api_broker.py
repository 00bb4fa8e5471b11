"""The API on the real pipeline: the four services as processes on a real broker, a small
simulated population, the gateway as a supervised process in front of their query endpoints,
and a real customer's profile read through it and checked against the published topics."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from segflow.api import wiring
from segflow.cli import SCALABLE
from segflow.demo import _groups, _service_env, _wait_caught_up
from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.broker import free_port
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.testing import read_all, wait_until
from segflow.runtime.topics import TOPICS
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from segflow.sim.sink import KafkaSink
from segflow.supervisor import SERVICES, Supervisor

pytestmark = pytest.mark.broker
TOKEN = "broker-test-token"


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, SMTPReceiver]]:
    r, s = Receiver().start(), SMTPReceiver().start()
    try:
        yield r, s
    finally:
        r.stop()
        s.stop()


@pytest.mark.parametrize("instances", [1, 2], ids=["1-instance", "2-instances"])
def test_a_real_customers_profile_through_the_gateway(
    kafka_settings: Settings,
    tmp_path: Path,
    receivers: tuple[Receiver, SMTPReceiver],
    instances: int,
) -> None:
    """With 2 instances of each scalable service, each owns half the partitions: the
    gateway asks every instance and merges (a customer's record from its owner, sizes and
    KPIs summed, member pages merged), so the answers are the same as with one."""
    settings = kafka_settings
    prefix = settings.topic_prefix
    sup = Supervisor(tmp_path / "logs", env=_service_env(settings, prefix, *receivers))
    ports: dict[str, list[int]] = {}
    for name in SERVICES:
        n_of = instances if name in SCALABLE else 1
        ports[name] = [free_port() for _ in range(n_of)]
        for n, port in enumerate(ports[name]):
            env = {**wiring.service_env(name, port), "SEGFLOW_INSTANCE_ID": str(n)}
            sup.add(
                name if n == 0 else f"{name}-{n}", [sys.executable, "-m", f"services.{name}"], env
            )
    url = wiring.add_gateway(sup, ports, free_port(), TOKEN)
    sup.start_all()
    try:
        sim = Simulation(SimConfig(customers=30, days=35, seed=5))
        sink = KafkaSink.from_settings(settings)
        user_ids: dict[str, str] = {}  # simulated customer -> its user_id
        while not sim.finished:
            items = sim.step(7)
            for item in items:
                if isinstance(item, Delivery) and item.event.get("user_id"):
                    user_ids.setdefault(item.customer, item.event["user_id"])
            sink.write(items)
        sink.close()
        assert wiring.wait_ready(url, timeout=60), (tmp_path / "logs").iterdir()
        _wait_caught_up(settings, _groups(settings, list(SERVICES)), sup, timeout=60)

        # every instance holds a share of the customers (so the answers below are merged); a
        # second instance that joined late restores its partitions after the group caught up
        def held() -> list[int]:
            return [
                httpx.get(f"http://127.0.0.1:{port}/health").json()["customers"]
                for port in ports["segmenter"]
            ]

        def settled() -> bool:  # every instance holds customers, and no count still moves
            first = held()
            time.sleep(1.0)
            return all(n > 0 for n in first) and held() == first

        wait_until(settled, 60, what="customers on every instance, restored")
        _wait_caught_up(settings, _groups(settings, list(SERVICES)), sup, timeout=60)

        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        health = api.get("/v1/health").json()
        assert health["status"] == "ok"
        assert {n: s["status"] for n, s in health["services"].items()} == dict.fromkeys(
            SERVICES, "ok"
        )

        # What the segmenter published: each customer's active memberships.
        serde = Serde.from_settings(settings)
        active: dict[str, set[str]] = {}
        for rec in read_all(settings, TOPICS.segment_changes.name(settings)):
            c = serde.decode(TOPICS.segment_changes, rec.value)
            if c["transition"] == "entered":
                active.setdefault(c["customer_id"], set()).add(c["segment"])
            elif c["transition"] in ("exited", "re_engaged"):
                active.setdefault(c["customer_id"], set()).discard(c["segment"])

        # A real customer, found by the raw user id the simulator sent, and its profile.
        checked = 0
        for user_id in sorted(user_ids.values()):
            resp = api.get("/v1/identities/resolve", params={"type": "user_id", "value": user_id})
            assert resp.status_code == 200, resp.text
            cid = resp.json()["customer_id"]
            profile = api.get(f"/v1/customers/{cid}")
            assert profile.status_code == 200, profile.text
            body = profile.json()
            assert "user_id" in {i["type"] for i in body["identifiers"]}
            assert user_id not in profile.text  # identifiers come back hashed only
            if not active.get(cid):
                continue
            assert body["features"] and 0 <= body["scores"]["churn_probability"] <= 1
            members = {m["segment"] for m in body["segments"]["memberships"]}
            assert members == active[cid], cid
            for m in body["segments"]["memberships"]:
                assert m["member"] and m["conditions"]
            checked += 1
            if checked >= 3:
                break
        assert checked == 3

        # Segment sizes and a full walk of the largest segment agree with the topic.
        sizes = {s["name"]: s["size"] for s in api.get("/v1/segments").json()["segments"]}
        biggest = max(sizes, key=lambda n: sizes[n])
        members_seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
            page = api.get(f"/v1/segments/{biggest}/members", params=params).json()
            members_seen += page["members"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        published = sorted(c for c, segs in active.items() if biggest in segs)
        assert members_seen == published and sizes[biggest] == len(published) > 0
        assert api.get("/v1/campaigns/kpis").json()["kpis"]
        api.close()

        # The demo's tour of the API (segments, a profile, KPIs) works on this stack too.
        lines, summary = wiring.tour(url, TOKEN)
        assert summary["segments"] == sizes and summary["kpi_rows"] > 0
        # the KPI table: a header and one line per row, between the two summary lines
        assert summary["profile"]["segments"] and len(lines) == 2 + 1 + summary["kpi_rows"]
        assert "uplift vs holdout" in lines[1] and len(summary["kpis"]) == summary["kpi_rows"]
    finally:
        sup.stop()
