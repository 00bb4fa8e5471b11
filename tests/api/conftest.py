"""Fixtures for the API tests: the four services' real handlers fed a small simulated
population in process (no broker: records go from one handler to the next through the Avro
serde), their real query endpoints on 127.0.0.1, and the gateway in front of them."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from segflow.api.app import Background
from segflow.api.gateway import GatewaySettings
from segflow.runtime.broker import free_port
from segflow.runtime.internal_api import InternalServer
from segflow.runtime.loop import Incoming, Output
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS, Topic
from segflow.sim.generator import SimConfig, Simulation
from segflow.sim.noise import Delivery
from services.dispatcher import api as dispatcher_api
from services.dispatcher.app import Dispatcher, DispatcherSettings
from services.identity import api as identity_api
from services.identity.app import IdentityService
from services.scorer import api as scorer_api
from services.scorer.app import ScorerService
from services.scorer.settings import ScorerSettings
from services.segmenter import api as segmenter_api
from services.segmenter.app import Segmenter, SegmenterConfig

TOKEN = "test-token-" + os.urandom(8).hex()


@dataclass
class MiniPipeline:
    """identity → scorer → segmenter → dispatcher, handler to handler, in one process."""

    settings: Settings
    serde: Serde = field(init=False)
    identity: IdentityService = field(init=False)
    scorer: ScorerService = field(init=False)
    segmenter: Segmenter = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    raw_ids: dict[str, dict[str, str]] = field(default_factory=dict)  # customer -> raw ids
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.serde = Serde.from_settings(s)
        self.identity = IdentityService(s)
        # its own model, learned in place: this pipeline has no learner reading the shared
        # model's examples topic (services/scorer/README.md, One churn model)
        self.scorer = ScorerService(s, ScorerSettings(shared_model=False))
        self.segmenter = Segmenter(s, SegmenterConfig(percentile_refresh=0.0))
        self.dispatcher = Dispatcher(s, DispatcherSettings(clock="event"))

    def _consumers(self, topic: Topic) -> list[Any]:
        return {
            TOPICS.events.key_name: [self.identity.handle],
            TOPICS.identified.key_name: [self.scorer.handle, self.dispatcher.handle],
            TOPICS.merges.key_name: [self.scorer.handle, self.segmenter],
            TOPICS.scores.key_name: [self.segmenter],
            TOPICS.segment_changes.key_name: [self.dispatcher.handle],
        }.get(topic.key_name, [])

    def send(self, outputs: Any) -> None:
        """Deliver outputs (and what they cause) to their consumers, breadth first."""
        queue: deque[Output] = deque(outputs)
        while queue:
            out = queue.popleft()
            if out.value is None or not self._consumers(out.topic):
                continue
            # Through the serde, as on the wire: defaults filled, types as consumers see them.
            value = self.serde.decode(out.topic, self.serde.encode(out.topic, out.value))
            self.counts[out.topic.key_name] = self.counts.get(out.topic.key_name, 0) + 1
            record = Incoming(
                out.topic, out.topic.name(self.settings), 0, 0, out.key, value, None, []
            )
            if out.topic is TOPICS.identified:
                event = value["event"]
                ids = self.raw_ids.setdefault(value["customer_id"], {})
                for name in ("user_id", "anonymous_id", "device_id"):
                    if event.get(name):
                        ids.setdefault(name, event[name])
            for consume in self._consumers(out.topic):
                queue.extend(consume(record))

    def run(self, sim: Simulation, days: int) -> None:
        while not sim.finished:
            items = sim.step(days)
            self.send(
                Output(TOPICS.events, i.key, i.event) for i in items if isinstance(i, Delivery)
            )
            self.tick()

    def tick(self) -> None:
        self.send(self.scorer.tick())
        self.send(self.segmenter.tick())
        self.send(self.dispatcher.before_commit())  # as the loop does before each commit
        for hook in (
            self.identity.store,
            self.scorer.states,
            self.scorer.models,
            self.segmenter.store,
            self.segmenter,  # publishes the view its API reads
            self.dispatcher.store,
        ):
            hook.on_commit()


@dataclass
class Stack:
    pipeline: MiniPipeline
    servers: dict[str, InternalServer]
    gateway: Background

    @property
    def urls(self) -> dict[str, str]:
        return {n: f"http://127.0.0.1:{s.port}" for n, s in self.servers.items()}

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.gateway.url, headers=headers, timeout=10)


def gateway_for(urls: dict[str, str], token: str | None = TOKEN, **extra: Any) -> Background:
    settings = GatewaySettings(
        token=token,
        host="127.0.0.1",
        port=0,
        **{f"{n}_url": u for n, u in urls.items()},
        **extra,
    )
    return Background(settings, insecure_no_auth=token is None)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A small population through the real handlers, served by the real endpoints."""
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="api-test.")
    pipeline = MiniPipeline(settings)
    pipeline.run(Simulation(SimConfig(customers=40, days=42, seed=11)), days=7)
    servers = {
        "identity": identity_api.start(pipeline.identity, 0),
        "scorer": scorer_api.start(pipeline.scorer, 0),
        "segmenter": segmenter_api.serve(pipeline.segmenter, 0),
        "dispatcher": dispatcher_api.start(pipeline.dispatcher, 0),
    }
    urls = {n: f"http://127.0.0.1:{s.port}" for n, s in servers.items()}
    # no broker here: a console what-if replay fails (502) instead of waiting two minutes
    gateway = gateway_for(urls, replay_timeout=5.0)
    try:
        yield Stack(pipeline, servers, gateway)
    finally:
        gateway.stop()
        for server in servers.values():
            server.stop()
        pipeline.dispatcher.close()


def closed_port() -> int:
    """A port nothing listens on (a service that is down)."""
    return free_port()
