"""Recipients from the contact vault (``segflow.contacts.vault``, see
:mod:`segflow.runtime.vault`): the dispatcher is the vault's only reader.

:class:`VaultContacts` follows the compacted topic in a background thread (every partition,
read_committed) and keeps each customer's *encrypted* record; an address is decrypted only
when an email is about to go out, and not kept. A tombstone (forget, or the absorbed side of a
merge) drops the record and with it the customer's data key.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import Keyring, VaultError

log = logging.getLogger("segflow.dispatcher")


class VaultContacts:
    """``Contacts`` backed by the contact vault."""

    def __init__(self, settings: Settings, keyring: Keyring) -> None:
        self.settings = settings
        self.keyring = keyring
        self.topic = TOPICS.contact_vault.name(settings)
        self.serde = Serde.from_settings(settings)
        self._records: dict[str, bytes] = {}  # customer_id -> the record's wire bytes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread: threading.Thread | None = None

    # -- Contacts ---------------------------------------------------------------------------
    def email_for(self, customer_id: str) -> str | None:
        with self._lock:
            raw = self._records.get(customer_id)
        if raw is None:
            return None
        try:
            return self.keyring.open(self.serde.decode(TOPICS.contact_vault, raw)).primary_email
        except VaultError as exc:
            log.warning(
                "vault record unreadable",
                extra={"fields": {"customer_id": customer_id, "error": str(exc)}},
            )
            return None

    def __len__(self) -> int:
        return len(self._records)

    # -- following the topic ----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start following the vault and wait until what it held at start is loaded."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, daemon=True, name="vault")
            self._thread.start()
        if not self._caught_up.wait(timeout):
            raise TimeoutError(f"loading the contact vault {self.topic} took over {timeout}s")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _consumer(self) -> tuple[Consumer, dict[int, int]]:
        consumer = Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"vault-{uuid.uuid4().hex[:8]}",  # no offsets: always from the start
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        md = consumer.list_topics(self.topic, timeout=10)
        parts = list(md.topics[self.topic].partitions)
        ends = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        return consumer, ends

    def _follow(self) -> None:
        consumer: Consumer | None = None
        ends: dict[int, int] = {}
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer, ends = self._consumer()
                    if not ends:
                        self._caught_up.set()
                msgs = consumer.consume(1000, 0.2)
            except KafkaException as exc:  # topic not there yet, leader moving: try again
                log.warning("vault follow retry", extra={"fields": {"error": str(exc)}})
                if consumer is not None:
                    consumer.close()
                    consumer = None
                time.sleep(0.5)
                continue
            with self._lock:
                for msg in msgs:
                    if msg.error():
                        continue
                    key = (msg.key() or b"").decode()
                    value: Any = msg.value()
                    if value is None:
                        self._records.pop(key, None)
                    else:
                        self._records[key] = value
            if not self._caught_up.is_set():
                for tp in consumer.position([TopicPartition(self.topic, p) for p in list(ends)]):
                    if tp.offset >= ends[tp.partition]:
                        ends.pop(tp.partition, None)
                if not ends:
                    self._caught_up.set()
        if consumer is not None:
            consumer.close()
