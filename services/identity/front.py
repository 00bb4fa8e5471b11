"""Identity's front stage: the per-event work, as N instances of one consumer group.

Each instance owns some partitions of ``segflow.events`` (and the same partitions of
``segflow.forget.requests``): it decodes, validates, normalises and hashes each event,
drops duplicates by ``event_id`` (:mod:`services.identity.dedup`, state per input partition)
and writes a link request to ``segflow.identity.links`` (one partition), which the one graph
writer (:mod:`services.identity.writer`) consumes in order. A link request carries the
identifiers as keyed hashes, the event as it goes downstream (email null, phone removed),
the email's hash and, with a vault, the raw email and phone sealed with the vault master key.
Forget requests pass through as link requests (``forget_customer_id``).

Each request carries its ``order_time`` and each input partition's watermark is published on
the links topic (:mod:`services.identity.order`): with every batch that moved it, and on each
tick for a partition with nothing unread (idle: its watermark follows the clock minus the
grace ``SEGFLOW_IDENTITY_ORDER_GRACE_MS``), so that the writer applies requests in an order
that does not depend on how the fronts' writes interleave. The watermarks are kept in the
de-dup changelog (key ``<partition>:w``), so an instance that takes a partition over goes on
from the committed one.

Invalid events are dead-lettered here, as the one-instance service does (reason and source
offset; the email and phone removed). Link requests, watermarks, de-dup chunks and offsets
commit in one transaction per batch; the instance's ``transactional.id`` and static
``group.instance.id`` are ``<prefix>identity-front-<SEGFLOW_INSTANCE_ID>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import TopicPartition
from prometheus_client import Counter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import Keyring, VaultSettings
from services.identity.app import (
    _DUPLICATE,
    EXPIRED,
    PHONE_PROPERTY,
    STATE_KEYS,
    EventChecks,
    IdentitySettings,
    email_hash,
    node_hasher,
)
from services.identity.dedup import DedupStore, watermark_key
from services.identity.order import PartitionClocks

SERVICE = "identity-front"
log = logging.getLogger("segflow.identity.front")

LATE = Counter(
    "segflow_identity_late_requests_total",
    "Link requests applied out of event-time order: front: an event more than the grace "
    "behind its input partition's watermark (ordered at the watermark); writer: a request "
    "below the released watermark (applied on arrival)",
    ["stage"],
)
_LATE_FRONT = LATE.labels("front")


class OrderSettings(BaseSettings):
    """``SEGFLOW_IDENTITY_ORDER_GRACE_MS``: how far behind its partition's latest event time an
    event may be and still be applied in event-time order (larger: more latency)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_IDENTITY_", extra="ignore", frozen=True)

    order_grace_ms: int = Field(default=2000, ge=0)


def instance_name(settings: Settings) -> str:
    return settings.instance_id or "0"


class FrontService(EventChecks):
    """Handler, tick and hooks of one front instance."""

    def __init__(
        self,
        settings: Settings,
        config: IdentitySettings | None = None,
        clock: Callable[[], float] = time.time,
        keyring: Keyring | None = None,
        dedup: DedupStore | None = None,
        grace_ms: int | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or IdentitySettings()
        self.rules = self.config.rules()
        self.serde = Serde.from_settings(settings)
        self.clock = clock
        self.keyring = keyring if keyring is not None else VaultSettings().keyring()
        self._secret = settings.hash_secret.get_secret_value()
        self._hasher = node_hasher(self._secret)
        self._cache: dict[tuple[str, str], str] = {}
        self._max_future_ms = int(self.config.max_future_skew_s * 1000)
        self.dedup = dedup or DedupStore(settings, self.rules.dedup_window_ms)
        grace = OrderSettings().order_grace_ms if grace_ms is None else grace_ms
        self.clocks = PartitionClocks(grace)
        self._loop: ProcessingLoop | None = None
        self._sources: list[str] = []
        #: records handled per input partition (idle detection)
        self._activity: dict[int, int] = {}
        self._last_seen: dict[int, tuple[Any, ...]] = {}

    def loop(self, **overrides: Any) -> ProcessingLoop:
        prefix = self.settings.topic_prefix
        options: dict[str, Any] = {
            "service": SERVICE,
            "group_id": prefix + "identity-front",
            "sources": {
                TOPICS.events.name(self.settings): TOPICS.events,
                TOPICS.forget.name(self.settings): TOPICS.forget,
            },
            "transactional_id": f"{prefix}identity-front-{instance_name(self.settings)}",
            "batch_size": self.config.batch_size,
        }
        options.update(overrides)
        self._sources = list(options["sources"])
        self._loop = ProcessingLoop(
            self.settings,
            LoopConfig(**options),
            self.handle,
            serde=self.serde,
            hooks=[self.dedup, self],
            clock=self.clock,
            tick=self.tick,
        )
        return self._loop

    def handle(self, record: Incoming) -> Iterator[Output]:
        now_ms = int(self.clock() * 1000)
        p = record.partition
        self._activity[p] = self._activity.get(p, 0) + 1
        if record.topic is TOPICS.forget:
            request = record.value
            at = int(request["requested_at"])
            yield self._request(
                {
                    "event_id": str(request["request_id"]),
                    "occurred_at": at,
                    "identifiers": [],
                    "forget_customer_id": str(request["customer_id"]),
                    # ordered at its time, but a wall-clock time does not move the watermark
                    "order_time": self.clocks.stamp(p, at, now_ms, advance=False),
                },
                record,
            )
            return
        event = record.value
        ids = self._identifiers(record, now_ms)
        if isinstance(ids, Output):
            yield ids
            return
        event_id, occurred_at = event["event_id"], event["occurred_at"]
        if not self.dedup.first_time(record.partition, event_id, occurred_at, record.offset):
            _DUPLICATE.inc()
            return
        email = event.get("email")
        props = event.get("properties") or {}
        phone = props.get(PHONE_PROPERTY)
        raw = record.raw
        if email is None and phone is None and raw is not None:
            if not self.serde.written_with_current(TOPICS.events, raw):
                raw = None
        else:
            raw = None
        if raw is None:  # re-encode without the contact points (or in the current schema)
            clean = {**event, "email": None}
            if phone is not None:
                clean["properties"] = {k: v for k, v in props.items() if k != PHONE_PROPERTY}
            raw = self.serde.encode(TOPICS.events, clean)
        late = self.clocks.late
        order_time = self.clocks.stamp(p, occurred_at, now_ms)
        if self.clocks.late != late:
            _LATE_FRONT.inc()
            if late < 100 or not late % 1000:  # no identifier: partition, offset, how late
                log.info(
                    "late event ordered at its partition's watermark",
                    extra={
                        "fields": {
                            "partition": p,
                            "offset": record.offset,
                            "behind_ms": order_time - occurred_at,
                            "late_total": late + 1,
                        }
                    },
                )
        contact = None
        if self.keyring is not None and (email or phone):
            contact = self.keyring.seal_transit(event_id, email, phone)
        yield self._request(
            {
                "event_id": event_id,
                "occurred_at": occurred_at,
                "identifiers": list(ids),
                "event": raw,
                "email_hash": email_hash(self._secret, email) if email else None,
                "contact": contact,
                "order_time": order_time,
            },
            record,
        )

    def _request(self, fields: dict[str, Any], record: Incoming) -> Output:
        value = {
            "event": None,
            "email_hash": None,
            "contact": None,
            "forget_customer_id": None,
            "watermark": None,
            **fields,
            "source_partition": record.partition,
            "source_offset": record.offset,
        }
        return Output(TOPICS.identity_links, None, value, partition=0)

    def tick(self) -> Iterator[Output]:
        n = 0
        for out in self.dedup.expire():
            n += 1
            yield out
        if n:
            EXPIRED.inc(n)
        STATE_KEYS.labels("seen").set(len(self.dedup))
        if self._loop is not None:
            now_ms = int(self.clock() * 1000)
            for p in self._idle(self._loop.assigned):
                self.clocks.idle(p, now_ms)
            yield from self._watermarks(self._loop.assigned)

    # -- watermarks ----------------------------------------------------------------------------
    def _watermarks(self, partitions: set[int]) -> Iterator[Output]:
        """The watermarks that moved: on the links topic (after the requests they cover, in
        the same transaction) and in the de-dup changelog."""
        for p, mark in sorted(self.clocks.changed(partitions).items()):
            yield Output(
                TOPICS.identity_links,
                None,
                {
                    "event_id": "",
                    "occurred_at": mark,
                    "identifiers": [],
                    "event": None,
                    "email_hash": None,
                    "contact": None,
                    "forget_customer_id": None,
                    "source_partition": p,
                    "source_offset": -1,
                    "order_time": None,
                    "watermark": mark,
                },
                partition=0,
            )
            yield self.dedup.store.put(watermark_key(p), {"hour": mark, "hashes": b""}, partition=p)

    def _idle(self, partitions: set[int]) -> list[int]:
        """Owned partitions with nothing unread and nothing handled since the last tick: every
        input's position is its end and did not move (records returned by the consume that
        preceded this tick, not handled yet, would have moved it)."""
        assert self._loop is not None
        consumer = self._loop.consumer
        idle = []
        for p in partitions:
            seen: list[Any] = [self._activity.get(p, 0)]
            caught_up = True
            for name in self._sources:
                tp = TopicPartition(name, p)
                [pos] = consumer.position([tp])
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    caught_up = False
                    break
                offset: int | None = pos.offset
                if pos.offset < 0:  # nothing returned since assignment: the committed offset
                    offset = self._loop._committed_offset((name, p), low, high)
                if offset is None or offset < high:
                    caught_up = False
                    break
                seen.append(pos.offset)
            key = tuple(seen)
            if caught_up and self._last_seen.get(p) == key:
                idle.append(p)
            self._last_seen[p] = key if caught_up else ()
        return idle

    # -- hooks -----------------------------------------------------------------------------------
    def before_commit(self) -> Iterator[Output]:
        if self._loop is not None:
            yield from self._watermarks(self._loop.assigned)

    def on_commit(self) -> None:
        self.clocks.on_commit()

    def on_abort(self) -> None:
        self.clocks.on_abort()
        self._last_seen.clear()

    def on_assign(self, partitions: set[int]) -> None:
        """Go on from the watermarks committed for the assigned partitions (restored with the
        de-dup changelog by the hook before this one)."""
        for p in partitions:
            value = self.dedup.store.get(watermark_key(p))
            if value is not None:
                self.clocks.load(p, int(value["hour"]))
            self._last_seen.pop(p, None)

    def on_revoke(self, partitions: set[int]) -> None:
        self.clocks.drop(partitions)
        for p in partitions:
            self._last_seen.pop(p, None)
