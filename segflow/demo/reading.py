"""What the demo reads back from segflow's topics: tails (read_committed, no group) and the
observations it keeps for the report."""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import Topic
from services.identity.app import MERGED_EVENT

DAY_MS = 86_400_000


WEEK_DAYS = 7


def say(text: str = "") -> None:
    print(text, flush=True)


class Tail:
    """Reads a topic incrementally from its beginning (read_committed, no consumer group)."""

    def __init__(self, settings: Settings, serde: Serde, topic: Topic) -> None:
        self.topic = topic
        self.serde = serde
        self.name = topic.name(settings)
        self.consumer = Consumer(
            {
                **settings.kafka_config(),
                "group.id": f"demo-tail-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        # End offsets are asked on a consumer that fetches nothing: on the reading one, the
        # request would queue behind its long-poll fetch (fetch.wait.max.ms) on the same
        # connection - half a second per partition per read, most of the demo's wall time.
        self.probe = Consumer(
            {**settings.kafka_config(), "group.id": f"demo-tail-probe-{uuid.uuid4().hex[:8]}"}
        )
        md = self.consumer.list_topics(self.name, timeout=10)
        self.partitions = sorted(md.topics[self.name].partitions)
        self.consumer.assign(
            [TopicPartition(self.name, p, OFFSET_BEGINNING) for p in self.partitions]
        )
        self.count = 0

    def poll(self, budget: float = 15.0) -> list[tuple[bytes | None, dict[str, Any]]]:
        """Everything up to the current end of the topic (or what ``budget`` seconds allow)."""
        out: list[tuple[bytes | None, dict[str, Any]]] = []
        ends = {}
        for p in self.partitions:
            high = _high(self.probe, TopicPartition(self.name, p))
            ends[p] = high
        deadline = time.monotonic() + budget
        empty = 0
        while time.monotonic() < deadline:
            positions = self.consumer.position([TopicPartition(self.name, p) for p in ends])
            if all(
                tp.offset >= ends[tp.partition] or (tp.offset < 0 and ends[tp.partition] == 0)
                for tp in positions
            ):
                break
            msgs = self.consumer.consume(5000, 0.2)
            # The high watermark can include a transaction still open (a service's tick):
            # read_committed stops before it, so two empty polls in a row also end the read.
            empty = empty + 1 if not msgs else 0
            if empty >= 2:
                break
            for m in msgs:
                if m.error() or m.value() is None:
                    continue
                value = self.serde.decode(self.topic, m.value())
                value[RECORD_TS] = m.timestamp()[1]  # producer CreateTime, ms
                out.append((m.key(), value))
        self.count += len(out)
        return out

    def close(self) -> None:
        self.consumer.close()
        self.probe.close()


RECORD_TS = "_record_ts"  # added to each record the demo reads: when it was produced


def _high(consumer: Consumer, tp: TopicPartition, timeout: float = 30.0) -> int:
    """High watermark, retried while a just-created partition has no leader yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException as exc:
            if time.monotonic() > deadline or not (exc.args[0].retriable() or "LEADER" in str(exc)):
                raise
            time.sleep(0.2)


@dataclass
class Observed:
    """What the demo read back from segflow's topics."""

    event_owner: dict[str, str] = field(default_factory=dict)  # event_id -> customer_id
    handle: dict[str, str] = field(default_factory=dict)  # customer_id -> an identifier
    merges: int = 0
    survivor: dict[str, str] = field(default_factory=dict)  # absorbed id -> survivor id

    def final_id(self, cid: str) -> str:
        """Follow merge chains (a → b, later b → c) to the surviving customer_id."""
        seen = 0
        while cid in self.survivor and seen < 100:
            cid = self.survivor[cid]
            seen += 1
        return cid

    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # latest per customer
    changes: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    dlq: Counter[str] = field(default_factory=Counter)
    # (customer_id, as_of) -> scored_at of the first score published for that event time
    scored_at: dict[tuple[str, int], int] = field(default_factory=dict)
    drain_seconds: list[float] = field(default_factory=list)  # per simulated week


def _read(tails: dict[str, Tail], obs: Observed) -> None:
    for _ in range(3):
        for _key, ev in tails["identified"].poll():
            cid = ev["customer_id"]
            e = ev["event"]
            if e["event_type"] == MERGED_EVENT:  # identity's merge mark, not an event
                continue
            obs.event_owner[e["event_id"]] = cid
            ident = e.get("user_id") or e.get("anonymous_id") or e.get("device_id")
            if ident and (cid not in obs.handle or e.get("user_id")):
                obs.handle[cid] = ident
        for _key, merge in tails["merges"].poll():
            obs.merges += 1
            for absorbed in merge["absorbed_ids"]:
                obs.survivor[absorbed] = merge["survivor_id"]
        for _key, score in tails["scores"].poll():
            obs.scores[score["customer_id"]] = score
            obs.scored_at.setdefault((score["customer_id"], score["as_of"]), score["scored_at"])
        obs.changes += [c for _k, c in tails["segment_changes"].poll()]
        obs.results += [r for _k, r in tails["dispatch_results"].poll()]
        for _key, letter in tails["dlq"].poll():
            obs.dlq[letter["reason"]] += 1


def _new_actions(obs: Observed, produced: dict[str, Any]) -> list[dict[str, Any]]:
    start = produced.get("actions_seen", 0)
    produced["actions_seen"] = len(obs.results)
    return [r for r in obs.results[start:] if r["status"] in ("sent", "holdout")]


def _sizes(changes: list[dict[str, Any]]) -> Counter[str]:
    members: dict[str, set[str]] = defaultdict(set)
    for c in changes:
        if c["transition"] in ("entered",):
            members[c["segment"]].add(c["customer_id"])
        elif c["transition"] in ("exited", "re_engaged"):
            members[c["segment"]].discard(c["customer_id"])
    return Counter({s: len(m) for s, m in members.items()})
