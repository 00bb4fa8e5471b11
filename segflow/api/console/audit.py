"""The console's audit index: every membership change and merge of each customer, read by the
gateway from the topics the services publish, so the customer page can show a customer's whole
history and not only each segment's latest entry and exit (which is all the segmenter keeps:
its per-customer state stays small).

A background thread reads ``segment.changes`` and ``identity.merges`` from the beginning
(``read_committed``: an aborted batch is never shown) with a consumer of its own that commits
nothing, and keeps, per customer, the last :data:`MAX_CHANGES` changes as their raw Avro bytes
(decoded when a page asks) and every merge that customer survived. Bounded per customer; in
memory, rebuilt from the topics when the gateway starts (so it covers the topics' retention).

Enabled with ``SEGFLOW_API_AUDIT=1`` (``segflow up`` and ``demo`` set it); without it the
timeline falls back to the segmenter's latest entry and exit per segment.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from typing import Any

from segflow.errors import DecodeError
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS

log = logging.getLogger("segflow.api.audit")

#: Changes kept per customer (the newest); older ones are dropped from the index, not the topic.
MAX_CHANGES = 200
#: Merges kept per surviving customer.
MAX_MERGES = 50
#: Customer-level transitions shown on the timeline (segment-level ones, deprecated and
#: reactivated, concern the segment, not the customer).
CUSTOMER_TRANSITIONS = frozenset({"entered", "exited", "re_engaged", "primary_changed"})


class AuditIndex:
    """Per-customer membership changes and merges; fed by :meth:`add_change` and
    :meth:`add_merge` (the reader thread, or a test or bench directly)."""

    def __init__(self, serde: Serde | None = None, max_changes: int = MAX_CHANGES) -> None:
        self.serde = serde or Serde.from_settings(Settings())
        self.max_changes = max_changes
        self._changes: dict[str, deque[bytes]] = {}
        self._merges: dict[str, list[dict[str, Any]]] = {}
        self._merged_into: dict[str, str] = {}
        self._lock = threading.Lock()
        self.records = 0
        self.caught_up = threading.Event()

    # -- feeding -------------------------------------------------------------------------
    def add_change(self, customer_id: str, value: bytes) -> None:
        with self._lock:
            q = self._changes.get(customer_id)
            if q is None:
                q = self._changes[customer_id] = deque(maxlen=self.max_changes)
            q.append(value)
            self.records += 1

    def add_merge(self, value: bytes) -> None:
        m = self.serde.decode(TOPICS.merges, value)
        merge = {
            "merge_id": m["merge_id"],
            "survivor_id": m["survivor_id"],
            "absorbed_ids": list(m["absorbed_ids"]),
            "cause_identifier_type": m["cause_identifier_type"],
            "occurred_at": m["occurred_at"],
            "merged_at": m["merged_at"],
        }
        with self._lock:
            known = self._merges.setdefault(m["survivor_id"], [])
            if all(k["merge_id"] != merge["merge_id"] for k in known):
                known.append(merge)
                del known[:-MAX_MERGES]
            for absorbed in merge["absorbed_ids"]:
                self._merged_into[absorbed] = m["survivor_id"]
            self.records += 1

    # -- reading -------------------------------------------------------------------------
    def changes(self, customer_id: str) -> list[dict[str, Any]]:
        """The customer's membership changes, oldest first (one per ``change_id``)."""
        with self._lock:
            raw = list(self._changes.get(customer_id, ()))
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for value in raw:
            try:
                change = self.serde.decode(TOPICS.segment_changes, value)
            except DecodeError:
                continue
            if change["transition"] not in CUSTOMER_TRANSITIONS:
                continue
            if change["change_id"] in seen:  # a replayed or re-sent change
                continue
            seen.add(change["change_id"])
            out.append(change)
        out.sort(key=lambda ch: ch["occurred_at"])
        return out

    def merges(self, customer_id: str) -> list[dict[str, Any]]:
        """Merges the customer survived (absorbed ids, when, which identifier linked them)."""
        with self._lock:
            return [dict(m) for m in self._merges.get(customer_id, ())]

    def merged_into(self, customer_id: str) -> str | None:
        """The survivor that absorbed this customer id, if one did."""
        with self._lock:
            return self._merged_into.get(customer_id)

    def knows(self, customer_id: str) -> bool:
        with self._lock:
            return (
                customer_id in self._changes
                or customer_id in self._merges
                or customer_id in self._merged_into
            )

    def customers(self) -> int:
        with self._lock:
            return len(self._changes)


class AuditReader:
    """The thread that feeds an :class:`AuditIndex` from the topics until :meth:`stop`."""

    def __init__(self, index: AuditIndex, settings: Settings | None = None) -> None:
        self.index = index
        self.settings = settings or Settings()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-audit", daemon=True)

    def start(self) -> AuditReader:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        from confluent_kafka import Consumer, KafkaError

        prefix = self.settings.topic_prefix
        changes = TOPICS.segment_changes.name_with(prefix)
        merges = TOPICS.merges.name_with(prefix)
        consumer = Consumer(
            {
                **self.settings.kafka_config(),
                # a group of its own that never commits: every start reads from the beginning
                "group.id": f"segflow-console-audit-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "topic.metadata.refresh.interval.ms": 5000,
                "logger": log,
            }
        )
        consumer.subscribe([changes, merges])
        idle = 0
        try:
            while not self._stop.is_set():
                batch = consumer.consume(1000, timeout=0.5)
                if not batch:
                    idle += 1
                    if idle >= 2:
                        self.index.caught_up.set()
                    continue
                idle = 0
                for msg in batch:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("audit read error", extra={"fields": {"error": str(err)}})
                        continue
                    value, key = msg.value(), msg.key()
                    if value is None or key is None:
                        continue
                    try:
                        if msg.topic() == changes:
                            self.index.add_change(key.decode(), value)
                        elif msg.topic() == merges:
                            self.index.add_merge(value)
                    except (DecodeError, UnicodeDecodeError, KeyError) as exc:
                        log.warning(
                            "audit record skipped",
                            extra={"fields": {"topic": msg.topic(), "error": type(exc).__name__}},
                        )
        finally:
            consumer.close()
