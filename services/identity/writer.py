"""Identity's graph writer: the one process that decides customer ids and merges.

It consumes ``segflow.identity.links`` (one partition, written by the front instances,
:mod:`services.identity.front`) in the consumer group ``<prefix>identity-writer``. With one
partition only one member of the group works; every further instance is a warm standby that
the group gives the partition when the active one leaves or dies (after its session
timeout). Each instance has its own ``transactional.id`` and static ``group.instance.id``
(``<prefix>identity-writer-<SEGFLOW_INSTANCE_ID>``): a restarted instance fences its own
predecessor at once, and a standby that took over commits with the group's new generation,
so the dead writer's open transaction can never commit (KIP-447) and is aborted by the
broker at its transaction timeout.

Requests are not applied in the order they are read (the interleaving of the fronts' writes,
which depends on timing) but in the order of ``(order_time, event_id, source_partition,
source_offset)``: each is buffered until every input partition's watermark, published by the
fronts on the same topic, has passed its ``order_time`` (:class:`~services.identity.order.
ReleaseBuffer`), so the same input gives the same customer ids and merges whatever the timing.
A request below the released watermark (a front of an earlier release) is applied on arrival
and counted (``segflow_identity_late_requests_total{stage="writer"}``).

The buffer is not written anywhere: the writer commits the links offset of its oldest buffered
request (not its read position), with the offset commit's metadata holding the released
watermark, the partitions' watermarks and the read position, in the batch's transaction. A
writer that takes over (or rewinds after an aborted transaction) reads again from that offset:
a request read again with ``order_time`` below the committed released watermark and an offset
below the committed read position was applied by that transaction and is skipped; the others
are buffered again.

Per applied request it does what the one-instance service does after de-duplication: places
the event in the graph (:func:`services.identity.core.link`), emits the IdentifiedEvent (the
front's event bytes spliced in), merges, the contact vault writes and the state changes, and
handles forget requests, all in one transaction per batch with the consumed offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from confluent_kafka import TopicPartition
from prometheus_client import Gauge

from segflow.runtime import metrics
from segflow.runtime.dlq import dead_letter
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import VaultError
from services.identity import core
from services.identity.app import (
    _FORGOTTEN_HIT,
    _IDENTIFIED,
    IdentityService,
)
from services.identity.front import LATE
from services.identity.order import NONE, Key, ReleaseBuffer

SERVICE = "identity-writer"
log = logging.getLogger("segflow.identity.writer")

BUFFERED = Gauge(
    "segflow_identity_order_buffered", "Link requests waiting for the input partitions' watermarks"
)
RELEASED = Gauge(
    "segflow_identity_order_released_ms",
    "Released watermark (epoch ms): every link request with an earlier order time is applied",
)
_LATE_WRITER = LATE.labels("writer")


class _WriterLoop(ProcessingLoop):
    """The shared loop, committing the writer's oldest buffered offset with its checkpoint."""

    writer: GraphWriter

    def _commit(self, offsets: list[TopicPartition]) -> bool:
        return super()._commit([self.writer.commit_point(tp) for tp in offsets])


class GraphWriter(IdentityService):
    """The identity service's graph half: link requests in, identified events out."""

    _legacy: list[str]
    _loop: ProcessingLoop | None = None
    buffer: ReleaseBuffer | None = None
    _checkpoint: str | None = None  # the metadata of the last committed offset

    def restore(self) -> int:
        """Load the graph (and the vault). ``e:`` entries of the one-instance service's
        de-duplication window, if any, are deleted by the first ticks."""
        n = self.store.restore()
        if self.vault is not None:
            n += self.vault.restore()
        self._legacy = [k for k in self.store if k[:2] == "e:"]
        self._refresh_gauges()
        return n

    def on_assign(self, partitions: set[int]) -> None:
        """This instance became the active writer (at start, or a standby taking over): load
        the graph and the vault as the previous writer committed them."""
        self.store.table.clear()
        if self.vault is not None:
            self.vault.table.clear()
        self._primary.clear()
        restored = self.restore()
        self._restore_buffer()
        log.info(
            "active graph writer",
            extra={"fields": {"restored": restored, "entries": len(self.store)}},
        )

    def _restore_buffer(self) -> None:
        """The committed checkpoint (read again from the committed offset) and the number of
        input partitions whose watermarks release requests."""
        partitions = TOPICS.events.partitions
        checkpoint = None
        if self._loop is not None:
            consumer = self._loop.consumer
            events = TOPICS.events.name(self.settings)
            topic = consumer.list_topics(events, timeout=10).topics.get(events)
            if topic is not None and topic.partitions:
                partitions = len(topic.partitions)
            links = TOPICS.identity_links.name(self.settings)
            [tp] = consumer.committed([TopicPartition(links, 0)], timeout=30)
            checkpoint = tp.metadata if tp.offset >= 0 else None
        self.buffer = ReleaseBuffer(partitions)
        self.buffer.restore(checkpoint)
        self._checkpoint = checkpoint
        RELEASED.set(max(0, self.buffer.released))
        BUFFERED.set(0)

    def loop(self, **overrides: Any) -> ProcessingLoop:
        prefix = self.settings.topic_prefix
        instance = self.settings.instance_id or "0"
        options: dict[str, Any] = {
            "service": SERVICE,
            "group_id": prefix + "identity-writer",
            "sources": {TOPICS.identity_links.name(self.settings): TOPICS.identity_links},
            "transactional_id": f"{prefix}identity-writer-{instance}",
            "batch_size": self.config.batch_size,
        }
        options.update(overrides)
        loop = _WriterLoop(
            self.settings,
            LoopConfig(**options),
            self.handle,
            serde=self.serde,
            hooks=[self.store, *([self.vault] if self.vault is not None else []), self],
            clock=self.clock,
        )
        loop.writer = self
        self._loop = loop
        return loop

    # -- ordering --------------------------------------------------------------------------
    def handle(self, record: Incoming) -> Iterator[Output]:
        """Buffer a request, or release the buffered ones a watermark lets through."""
        if self.buffer is None:  # outside a consumer group (tools, benchmarks)
            self._restore_buffer()
        buf = self.buffer
        assert buf is not None
        request = record.value
        mark = request.get("watermark")
        if mark is not None:
            if buf.advance(int(request["source_partition"]), int(mark)):
                RELEASED.set(max(0, buf.released))
                for _key, (item, raw, offset) in buf.release():
                    yield from self._apply_safely(item, raw, offset)
                BUFFERED.set(len(buf))
            return
        order = request.get("order_time")
        key: Key = (
            NONE if order is None else int(order),
            str(request["event_id"]),
            int(request["source_partition"]),
            int(request["source_offset"]),
        )
        if record.offset < buf.replay_until and (order is None or key[0] < buf.released):
            return  # read again after a restore: the committed transaction applied it
        if order is None or buf.is_late(key[0]):
            _LATE_WRITER.inc()
            log.info(
                "link request below the released watermark, applied on arrival",
                extra={
                    "fields": {
                        "source_partition": key[2],
                        "source_offset": key[3],
                        "order_time": order,
                        "released": buf.released,
                    }
                },
            )
            yield from self._apply(request)
            return
        buf.push(key, (request, record.raw, record.offset), record.offset)
        BUFFERED.set(len(buf))

    def commit_point(self, tp: TopicPartition) -> TopicPartition:
        """The offset to commit for the links partition: the oldest buffered request's (the
        buffer is rebuilt from there), with the checkpoint as the commit's metadata."""
        if self.buffer is None or tp.topic != TOPICS.identity_links.name(self.settings):
            return tp
        oldest = self.buffer.oldest_offset()
        checkpoint = self.buffer.checkpoint(tp.offset)
        self._pending_checkpoint = checkpoint
        offset = tp.offset if oldest is None else oldest
        return TopicPartition(tp.topic, tp.partition, offset, checkpoint)

    def _apply_safely(
        self, request: dict[str, Any], raw: bytes | None, offset: int
    ) -> Iterator[Output]:
        """A released request's outputs; one that fails is dead-lettered (as the loop does for
        the record in hand), not the watermark that released it."""
        try:
            outputs = list(self._apply(request))
        except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the writer
            log.exception("link request failed", extra={"fields": {"offset": offset}})
            letter = dead_letter(
                service=SERVICE,
                error=exc,
                topic=TOPICS.identity_links.name(self.settings),
                partition=0,
                offset=offset,
                timestamp_ms=None,
                key=None,
                value=raw,
                headers=[],
                now_ms=int(self.clock() * 1000),
            )
            metrics.DLQ_RECORDS.labels(SERVICE, letter["reason"]).inc()
            yield Output(TOPICS.dlq, None, letter)
            return
        yield from outputs

    # -- one request -----------------------------------------------------------------------
    def _apply(self, request: dict[str, Any]) -> Iterator[Output]:
        now_ms = int(self.clock() * 1000)
        forget = request.get("forget_customer_id")
        if forget is not None:
            yield from self._forget(
                {
                    "customer_id": forget,
                    "request_id": request["event_id"],
                    "requested_at": request["occurred_at"],
                }
            )
            return
        item = core.IdentityInput(
            request["event_id"], request["occurred_at"], tuple(request["identifiers"])
        )
        step = core.link(self.store.table, item, self.rules, dedup=False)
        if step.customer_id is None:
            _FORGOTTEN_HIT.inc()
            return
        for outcome in step.outcomes:
            yield from self._outcome(outcome, now_ms)
        raw = bytes(request["event"])
        hashed = request.get("email_hash")
        identified: dict[str, Any] | bytes
        if self.serde.written_with_current(TOPICS.events, raw):
            identified = self._identified_bytes(step.customer_id, raw, now_ms, hashed)
        else:  # a front of another release: decode and encode
            identified = {
                "customer_id": step.customer_id,
                "event": self.serde.decode(TOPICS.events, raw),
                "email_hash": hashed,
                "identified_at": now_ms,
            }
        yield Output(TOPICS.identified, step.customer_id, identified)
        store = self.store
        for key, value in step.writes:
            yield store.put(key, value) if value is not None else store.delete(key)
        if self.vault is not None and self.keyring is not None:
            for outcome in step.outcomes:
                if isinstance(outcome, core.Merged):
                    for absorbed in outcome.absorbed:
                        yield from self._vault_merge(outcome.survivor, absorbed, now_ms)
            contact = request.get("contact")
            if contact is not None:
                try:
                    email, phone = self.keyring.open_transit(item.event_id, bytes(contact))
                except VaultError as exc:
                    log.warning(
                        "contact points not readable, not stored",
                        extra={"fields": {"event_id": item.event_id, "error": str(exc)}},
                    )
                else:
                    yield from self._vault_seen(step.customer_id, email, phone, now_ms)
        _IDENTIFIED.inc()

    def before_commit(self) -> Iterator[Output]:
        """Delete the one-instance service's ``e:`` entries (50,000 per batch; in the batch's
        transaction: the writer has no tick, whose transaction would commit its read position
        instead of its oldest buffered offset)."""
        legacy = getattr(self, "_legacy", [])
        chunk, self._legacy = legacy[:50_000], legacy[50_000:]
        for key in chunk:
            if key in self.store:
                yield self.store.delete(key)

    def on_abort(self) -> None:
        self._primary.clear()  # the vault store rolled back
        if self.buffer is not None:  # the loop reads again from the committed offset
            self.buffer.restore(self._checkpoint)
            BUFFERED.set(0)

    def on_commit(self) -> None:
        self._checkpoint = getattr(self, "_pending_checkpoint", self._checkpoint)
