"""The attributes service's shell: identified events and merges in, ``segflow.attributes`` out.

The compacted ``segflow.attributes`` topic is both this service's changelog and its output (a
:class:`~segflow.runtime.state.ChangelogStore`): one CustomerAttributes record per customer,
co-partitioned with the scores, written in the same Kafka transaction as the consumed offsets.
The segmenter reads it.

* an ``identify`` event (after identity resolved the customer) folds its traits in;
* a ``customer_forgotten`` event (``segflow forget``) tombstones the customer's record;
* an identity merge (keyed by the absorbed id) moves the absorbed id's attributes to the
  survivor and tombstones the absorbed id. Runs as one instance (like the scorer): a merge
  whose survivor lives on another partition is applied from the one table the instance holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter

from segflow.runtime.kafka import ensure_topics
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS
from services.attributes import core
from services.attributes.settings import AttributesConfig as AttributesConfig

log = logging.getLogger("segflow.attributes")

UPDATES = Counter(
    "segflow_attributes_updates_total", "Attribute records written, by cause", ["cause"]
)
DROPPED = Counter(
    "segflow_attributes_pii_dropped_total",
    "Traits kept out as PII (by trait name, never by value)",
    ["trait"],
)


class AttributesService:
    """Handler around :mod:`core`."""

    def __init__(self, settings: Settings, config: AttributesConfig) -> None:
        self.settings = settings
        self.config = config
        self.serde = Serde.from_settings(settings)
        # not partitioned: one instance holds every customer (merges cross partitions)
        self.store = ChangelogStore(
            settings, TOPICS.attributes, serde=self.serde, partitioned=False
        )
        self.plain = frozenset(
            core.trait_name(t) for t in config.plain_traits.split(",") if t.strip()
        )
        self.identified_topic = TOPICS.identified.name(settings)
        self.merges_topic = TOPICS.merges.name(settings)

    def _get(self, cid: str) -> core.Attributes | None:
        rec = self.store.get(cid)
        return core.Attributes.from_record(rec) if rec is not None else None

    def __call__(self, record: Incoming) -> Iterator[Output]:
        if record.topic_name == self.merges_topic:
            yield from self._merge(record.value)
            return
        cid = str(record.value["customer_id"])
        event = record.value.get("event") or {}
        if event.get("event_type") == "customer_forgotten":
            if cid in self.store:
                UPDATES.labels("forgotten").inc()
                yield self.store.delete(cid)
            return
        found = core.traits_of(event)
        if found is None:
            return
        traits, source = found
        current = self._get(cid)
        new = core.fold(
            current, cid, traits, int(event.get("occurred_at") or 0), source, self.plain
        )
        for name in new.dropped:
            DROPPED.labels(name).inc()
        if current is not None and new == current:
            return
        UPDATES.labels(source).inc()
        yield self.store.put(cid, new.to_record())

    def _merge(self, merge: dict[str, Any]) -> Iterator[Output]:
        survivor = str(merge["survivor_id"])
        for absorbed in merge.get("absorbed_ids") or []:
            if absorbed == survivor:
                continue
            moved = self._get(str(absorbed))
            if moved is None:
                continue
            new = core.merge(self._get(survivor), moved, survivor)
            UPDATES.labels("merge").inc()
            yield self.store.put(survivor, new.to_record())
            yield self.store.delete(str(absorbed))


def build_loop(
    settings: Settings, config: AttributesConfig
) -> tuple[AttributesService, ProcessingLoop]:
    """Restore the table and wire the service into the shared loop."""
    service = AttributesService(settings, config)
    ensure_topics(settings, topics=[TOPICS.attributes, TOPICS.identified, TOPICS.merges])
    service.store.restore()
    instance = settings.instance_id
    loop_config = LoopConfig(
        service="attributes",
        group_id=settings.topic_prefix + config.group_id,
        sources={service.identified_topic: TOPICS.identified, service.merges_topic: TOPICS.merges},
        transactional_id=settings.topic_prefix
        + (f"{config.group_id}-{instance}" if instance is not None else config.instance),
        batch_size=config.batch_size,
        tick_interval=config.tick_interval,
    )
    loop = ProcessingLoop(
        settings, loop_config, service, serde=service.serde, hooks=[service.store]
    )
    return service, loop
