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

Requests are not applied in the order they are read (the interleaving of the fronts'
writes, which depends on timing) but in the input order of :mod:`services.identity.order`:
``(order_time, source_partition, source_offset)``, each released once every input partition
has a later request or an idle mark from its front. Forget requests (and requests of fronts
of an earlier release, without ``order_time``) are applied on arrival. The buffer is not
written anywhere: the writer commits the links offset of its oldest buffered request, and
the graph's changelog holds, in the same transaction, the next source offset to apply per
input partition (``o:<partition>``): a writer that takes over reads again from the committed
offset and skips the requests below it (:mod:`services.identity.ordering`).

Per request it does what the one-instance service does after de-duplication: places the
event in the graph (:func:`services.identity.core.link`), emits the IdentifiedEvent (the
front's event bytes spliced in), merges, the contact vault writes and the state changes,
and handles forget requests, all in one transaction per batch with the consumed offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

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
    merge_mark,
)
from services.identity.order import Merge
from services.identity.ordering import order_entry, order_key

SERVICE = "identity-writer"
#: the ``o:`` entry of the requests applied on arrival (forget requests): the links offset
#: after the last one
ARRIVED = -1
log = logging.getLogger("segflow.identity.writer")


class GraphWriter(IdentityService):
    """The identity service's graph half: link requests in, identified events out."""

    _legacy: list[str]
    _loop: ProcessingLoop | None = None
    _merge: Merge | None = None
    _partitions = TOPICS.events.partitions
    _links_read = -1  # the links offset after the last request read since the buffer was made
    _links_floor = -1  # after a rebalance: the requests below it were read (read again: skip)
    #: per input partition: the next source offset to apply (requests below it are skipped)
    _next: dict[int, int]
    _moved: set[int]

    @property
    def merge(self) -> Merge:
        if self._merge is None:  # outside a consumer group (tools, benchmarks)
            self._reload_order()
        assert self._merge is not None
        return self._merge

    def _reload_order(self) -> None:
        """An empty buffer and the committed next offsets (the loop reads again from the
        committed links offset)."""
        partitions = self._partitions
        self._merge = Merge(settle_ms=self.config.order_idle_ms)
        self._merge.expect(range(partitions))
        self._links_read = self._links_floor = -1
        self._next = {}
        self._moved = set()
        for p in [ARRIVED, *range(partitions)]:
            entry = self.store.get(order_key(p))
            if entry is not None and entry.get("offsets"):
                self._next[p] = int(entry["offsets"][0])

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
        self._reload_order()
        log.info(
            "active graph writer",
            extra={"fields": {"restored": restored, "entries": len(self.store)}},
        )

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
        loop = ProcessingLoop(
            self.settings,
            LoopConfig(**options),
            self.handle,
            serde=self.serde,
            hooks=[self.store, *([self.vault] if self.vault is not None else []), self],
            clock=self.clock,
            tick=self.tick,
            commit_point=self.commit_point,
        )
        self._loop = loop
        # the input partitions to wait for (asked here: not inside a rebalance callback)
        events = TOPICS.events.name(self.settings)
        topic = loop.consumer.list_topics(events, timeout=30).topics.get(events)
        if topic is not None and topic.partitions:
            self._partitions = len(topic.partitions)
        return loop

    # -- order ------------------------------------------------------------------------------
    def handle(self, record: Incoming) -> Iterator[Output]:
        """Buffer a request, or apply it (a forget request), then the requests now due."""
        request = record.value
        merge = self.merge
        if record.offset < self._links_floor:
            return  # read again after a rebalance that kept the partition here (buffered)
        self._links_read = record.offset + 1
        order = request.get("order_time")
        p = int(request["source_partition"])
        if request.get("idle"):
            merge.mark_idle(
                p, int(order) if order is not None else -(2**62), request.get("read_at")
            )
        elif order is None:  # a forget request, or a front of an earlier release
            if record.offset < self._next.get(ARRIVED, -1):
                return  # applied before this writer read it again
            self._next[ARRIVED] = record.offset + 1
            self._moved.add(ARRIVED)
            yield from self._apply_request(request, record.raw, record.offset)
            return
        else:
            offset = int(request["source_offset"])
            if offset < self._next.get(p, -1):
                return  # applied before this writer read it again
            merge.push(
                p, int(order), offset, (request, record.raw, record.offset), request.get("read_at")
            )
        for due_p, due_offset, (due, raw, links_offset) in merge.ready():
            self._next[due_p] = due_offset + 1
            self._moved.add(due_p)
            yield from self._apply_request(due, raw, links_offset)

    def before_revoke(self, _partitions: set[int], _timeout: float) -> int:
        """A rebalance: if it gives the links partition back unchanged, the consumer reads it
        again from the committed offset: what was read is skipped then."""
        self._links_floor = self._links_read
        return 0

    def commit_point(self, topic: str, partition: int, offset: int) -> int:
        """The links offset to commit: the oldest buffered request's (read again from there)."""
        heads = [links_offset for _r, _raw, links_offset in self.merge.heads()]
        return (
            min([offset, *heads]) if topic == TOPICS.identity_links.name(self.settings) else offset
        )

    def before_commit(self) -> Iterator[Output]:
        """The next source offsets that moved (in the batch's transaction)."""
        for p in sorted(self._moved):
            yield self.store.put(order_key(p), order_entry(-(2**62), self._next[p], self._next[p]))
        self._moved.clear()

    def _apply_request(
        self, request: dict[str, Any], raw: bytes | None, links_offset: int
    ) -> Iterator[Output]:
        """A request's outputs; one that fails is dead-lettered (as the loop does for the
        record in hand), not the request that released it."""
        try:
            outputs = list(self._apply_one(request))
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the writer
            log.exception("link request failed", extra={"fields": {"offset": links_offset}})
            letter = dead_letter(
                service=SERVICE,
                error=exc,
                topic=TOPICS.identity_links.name(self.settings),
                partition=0,
                offset=links_offset,
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

    # -- one request ------------------------------------------------------------------------
    def _apply_one(self, request: dict[str, Any]) -> Iterator[Output]:
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
        mark = merge_mark(step.outcomes)
        if mark is None and self.serde.written_with_current(TOPICS.events, raw):
            identified = self._identified_bytes(step.customer_id, raw, now_ms, hashed)
        else:  # a merge's mark, or a front of another release: decode and encode
            identified = {
                "customer_id": step.customer_id,
                "event": self.serde.decode(TOPICS.events, raw),
                "email_hash": hashed,
                "identified_at": now_ms,
                "merge": mark,
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

    def tick(self) -> Iterator[Output]:
        """Delete the one-instance service's ``e:`` entries (50,000 per tick)."""
        legacy = getattr(self, "_legacy", [])
        chunk, self._legacy = legacy[:50_000], legacy[50_000:]
        for key in chunk:
            if key in self.store:
                yield self.store.delete(key)

    def on_abort(self) -> None:
        self._primary.clear()  # the vault store rolled back
        self._reload_order()  # the store too; the loop reads again from the committed offset

    def on_commit(self) -> None:
        pass
