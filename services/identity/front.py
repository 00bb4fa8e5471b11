"""Identity's front stage: the per-event work, as N instances of one consumer group.

Each instance owns some partitions of ``segflow.events`` (and the same partitions of
``segflow.forget.requests``): it decodes, validates, normalises and hashes each event,
drops duplicates by ``event_id`` (:mod:`services.identity.dedup`, state per input partition)
and writes a link request to ``segflow.identity.links`` (one partition), which the one graph
writer (:mod:`services.identity.writer`) consumes in order. A link request carries the
identifiers as keyed hashes, the event as it goes downstream (email null, phone removed),
the email's hash and, with a vault, the raw email and phone sealed with the vault master key.
Forget requests pass through as link requests (``forget_customer_id``).

Each request carries its ``order_time``, its input partition's stream time
(:mod:`services.identity.order`), and a partition read to its end with nothing new for
``SEGFLOW_IDENTITY_ORDER_IDLE_MS`` gets an idle mark on the links topic (a tick's), so that
the writer applies requests in an order of the input, not of the fronts' timing. The stream
times are kept in the de-dup changelog (key ``<partition>:w``): an instance that takes a
partition over goes on from the committed one.

Invalid events are dead-lettered here, as the one-instance service does (reason and source
offset; the email and phone removed). Link requests, de-dup chunks and offsets commit in one
transaction per batch; the instance's ``transactional.id`` and static ``group.instance.id``
are ``<prefix>identity-front-<SEGFLOW_INSTANCE_ID>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

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
from services.identity.dedup import DedupStore
from services.identity.order import IdleClock, OrderClock
from services.identity.ordering import at_end, caught_up

SERVICE = "identity-front"
log = logging.getLogger("segflow.identity.front")


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
        self.order = OrderClock()
        self._order_committed: dict[int, int] = {}
        self._moved: set[int] = set()
        self.idle = IdleClock(self.config.order_idle_ms)
        self._activity: dict[int, int] = {}
        self._loop: ProcessingLoop | None = None

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
        self._loop = ProcessingLoop(
            self.settings,
            LoopConfig(**options),
            self.handle,
            serde=self.serde,
            hooks=[self.dedup, self],  # after the de-dup store: its <p>:w entries
            clock=self.clock,
            tick=self.tick,
        )
        return self._loop

    def handle(self, record: Incoming) -> Iterator[Output]:
        if record.topic is TOPICS.forget:
            request = record.value
            yield self._request(
                {
                    "event_id": str(request["request_id"]),
                    "occurred_at": int(request["requested_at"]),
                    "identifiers": [],
                    "forget_customer_id": str(request["customer_id"]),
                },
                record,
            )
            return
        event = record.value
        now_ms = int(self.clock() * 1000)
        p = record.partition
        self._activity[p] = self._activity.get(p, 0) + 1
        ids = self._identifiers(record, now_ms)
        if isinstance(ids, Output):
            yield ids
            return
        event_id, occurred_at = event["event_id"], event["occurred_at"]
        order_time = self.order.stamp(p, occurred_at, now_ms)  # a duplicate's too
        self._moved.add(p)
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
                "read_at": now_ms,
            },
            record,
        )

    def _request(self, fields: dict[str, Any], record: Incoming) -> Output:
        value = {
            "event": None,
            "email_hash": None,
            "contact": None,
            "forget_customer_id": None,
            "order_time": None,
            "idle": False,
            "read_at": None,
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
        now_ms = int(self.clock() * 1000)
        events = TOPICS.events.name(self.settings)
        for p, done in sorted(caught_up(self._loop, events).items()):
            if self.idle.observe(p, self._activity.get(p, 0), done, now_ms) and at_end(
                self._loop, events, p
            ):
                yield Output(
                    TOPICS.identity_links,
                    None,
                    {
                        "event_id": "",
                        "occurred_at": max(0, self.order.get(p)),
                        "identifiers": [],
                        "event": None,
                        "email_hash": None,
                        "contact": None,
                        "forget_customer_id": None,
                        "source_partition": p,
                        "source_offset": -1,
                        "order_time": self.order.get(p),
                        "idle": True,
                        "read_at": now_ms,
                    },
                    partition=0,
                )

    # -- hooks ------------------------------------------------------------------------------
    def before_commit(self) -> Iterator[Output]:
        """The stream times that moved, in the de-dup changelog (the batch's transaction)."""
        for p in sorted(self._moved):
            t = self.order.get(p)
            if t != self._order_committed.get(p):
                yield self.dedup.store.put(order_key(p), {"hour": t, "hashes": b""}, partition=p)
        self._moved.clear()

    def on_commit(self) -> None:
        self._order_committed = dict(self.order.times)

    def on_abort(self) -> None:
        self.order.times = dict(self._order_committed)
        self._moved.clear()
        self.idle.reset()

    def on_assign(self, partitions: set[int]) -> None:
        """Go on from the stream times committed for the assigned partitions (restored with
        the de-dup changelog by the hook before this one)."""
        for p in partitions:
            value = self.dedup.store.get(order_key(p))
            if value is not None:
                self.order.load(p, int(value["hour"]))
                self._order_committed[p] = int(value["hour"])

    def on_revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self.order.times.pop(p, None)
            self._order_committed.pop(p, None)


def order_key(partition: int) -> str:
    """The de-dup changelog's key of ``partition``'s stream time."""
    return f"{partition}:w"
