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

Per request it does what the one-instance service does after de-duplication: places the
event in the graph (:func:`services.identity.core.link`), emits the IdentifiedEvent (the
front's event bytes spliced in), merges, the contact vault writes and the state changes,
and handles forget requests, all in one transaction per batch with the consumed offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

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

SERVICE = "identity-writer"
log = logging.getLogger("segflow.identity.writer")


class GraphWriter(IdentityService):
    """The identity service's graph half: link requests in, identified events out."""

    _legacy: list[str]

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
        return ProcessingLoop(
            self.settings,
            LoopConfig(**options),
            self.handle,
            serde=self.serde,
            hooks=[self.store, *([self.vault] if self.vault is not None else []), self],
            clock=self.clock,
            tick=self.tick,
        )

    def handle(self, record: Incoming) -> Iterator[Output]:
        request = record.value
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

    def on_commit(self) -> None:
        pass
