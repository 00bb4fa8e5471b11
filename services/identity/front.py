"""Identity's front stage: the per-event work, as N instances of one consumer group.

Each instance owns some partitions of ``segflow.events`` (and the same partitions of
``segflow.forget.requests``): it decodes, validates, normalises and hashes each event,
drops duplicates by ``event_id`` (:mod:`services.identity.dedup`, state per input partition)
and writes a link request to ``segflow.identity.links`` (one partition), which the one graph
writer (:mod:`services.identity.writer`) consumes in order. A link request carries the
identifiers as keyed hashes, the event as it goes downstream (email null, phone removed),
the email's hash and, with a vault, the raw email and phone sealed with the vault master key.
Forget requests pass through as link requests (``forget_customer_id``).

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
        return ProcessingLoop(
            self.settings,
            LoopConfig(**options),
            self.handle,
            serde=self.serde,
            hooks=[self.dedup],
            clock=self.clock,
            tick=self.tick,
        )

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
            },
            record,
        )

    def _request(self, fields: dict[str, Any], record: Incoming) -> Output:
        value = {
            "event": None,
            "email_hash": None,
            "contact": None,
            "forget_customer_id": None,
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
