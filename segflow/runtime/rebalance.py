"""The shared loop's consumer-group partition bookkeeping (moved out of
:mod:`segflow.runtime.loop`): the co-partitioning check at start, and the assignment,
revocation and loss callbacks that tell the hooks which partitions' state to restore or
drop (a partition revoked and assigned back keeps its state when its changelogs did not
move meanwhile)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException, TopicPartition

from segflow.errors import ConfigError
from segflow.runtime import metrics

if TYPE_CHECKING:
    from confluent_kafka import Consumer

    from segflow.runtime.records import Hooks, LoopConfig

log = logging.getLogger("segflow.loop")


class PartitionCallbacks:
    """Mixed into :class:`~segflow.runtime.loop.ProcessingLoop`."""

    config: LoopConfig
    consumer: Consumer
    hooks: list[Hooks]
    instance: str
    assigned: set[int]
    clock: Any
    _m_assigned: Any
    _parked: set[int]
    _parked_ends: dict[tuple[str, int], int]
    _fence: dict[tuple[str, int], int]
    _committed: dict[tuple[str, int], tuple[int, int]]
    _last_data: float
    _assigned_once: bool
    _closing: bool
    tick: Any

    def _run_tick(self) -> bool:
        raise NotImplementedError

    if TYPE_CHECKING:

        def _forget_holds(self, parts: set[int]) -> None: ...

    # -- partitions -------------------------------------------------------------------------
    def _check_copartitioned(self) -> None:
        """Every input, and every hook's changelog, must have the same partition count: an
        instance owns partition numbers, and a customer's records and state share one."""
        names = [n for n in self.config.sources if n not in self.config.uncopartitioned]
        names += self._changelogs()
        md = self.consumer.list_topics(timeout=30)
        counts = {n: len(md.topics[n].partitions) for n in names if n in md.topics}
        if len(set(counts.values())) > 1:
            raise ConfigError(
                f"{self.config.service}: inputs and state must be co-partitioned (equal "
                f"partition counts), found {counts}"
            )

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        parts = {tp.partition for tp in partitions}
        # A partition revoked by this rebalance and assigned back keeps its state when no one
        # wrote its changelog meanwhile (the range assignor is eager: every rebalance revokes
        # everything first); the others are dropped now.
        kept = self._unchanged(self._parked & parts)
        gone = self._parked - kept
        self._parked, self._parked_ends = set(), {}
        self._drop(gone)
        new = parts - self.assigned - kept
        self.assigned |= parts
        svc = self.config.service
        metrics.REBALANCES.labels(svc, self.instance, "assigned").inc()
        self._m_assigned.set(len(self.assigned))
        started = time.monotonic()
        if new:
            for hook in self.hooks:
                on_assign = getattr(hook, "on_assign", None)
                if on_assign is not None:
                    on_assign(new)
        seconds = time.monotonic() - started
        self._last_data = self.clock()  # idle time counts from when there is work to own
        self._assigned_once = True
        metrics.RESTORE_SECONDS.labels(svc, self.instance).observe(seconds)
        log.info(
            "partitions assigned",
            extra={
                "fields": {
                    "instance": self.instance,
                    "partitions": sorted(new),
                    "kept": sorted(kept),
                    "owned": sorted(self.assigned),
                    "restore_seconds": round(seconds, 3),
                }
            },
        )

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Hooks finish and commit the work under way for the partitions (``before_revoke``),
        then the partitions are parked: their state stays until the assignment that follows
        says whether they come back unchanged. Nothing runs for them meanwhile (no batch, no
        tick)."""
        parts = {tp.partition for tp in partitions}
        self._forget_holds(parts)  # the next owner reads them from the held record
        if not self._closing:
            self._finish_before_revoke(parts)
        self.assigned -= parts
        self._fence = {k: v for k, v in self._fence.items() if k[1] not in parts}
        if self._closing:
            return
        self._parked |= parts
        self._parked_ends.update(self._changelog_ends(parts))
        metrics.REBALANCES.labels(self.config.service, self.instance, "revoked").inc()
        self._m_assigned.set(len(self.assigned))
        log.info(
            "partitions revoked",
            extra={"fields": {"instance": self.instance, "partitions": sorted(parts)}},
        )

    def _finish_before_revoke(self, parts: set[int]) -> None:
        """Like a Kafka Streams task committed before it is revoked: the hooks with
        ``before_revoke`` finish the work under way (bounded by ``drain_timeout``, well inside
        the rebalance timeout) and one tick commits it while this instance still owns the
        partitions (its transaction carries their offsets: the coordinator checks that). The
        callback runs inside ``consume()``, between batches: no transaction is open. Work that
        could not finish is logged and counted; the partitions' new owner does it again."""
        hooks = [fn for fn in (getattr(h, "before_revoke", None) for h in self.hooks) if fn]
        if not hooks or self.tick is None or not parts:
            return
        timeout = self.config.drain_timeout
        started = time.monotonic()
        unfinished = 0
        for before_revoke in hooks:
            left = max(0.0, timeout - (time.monotonic() - started))
            unfinished += int(before_revoke(parts, left))
        committed = self._run_tick()
        if unfinished or not committed:
            metrics.REVOKE_UNFINISHED.labels(self.config.service, self.instance).inc(unfinished)
            log.warning(
                "work under way not finished before revoke",
                extra={
                    "fields": {
                        "instance": self.instance,
                        "partitions": sorted(parts),
                        "unfinished": unfinished,
                        "committed": committed,
                    }
                },
            )

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Lost (this member was thrown out of the group): others may own them already."""
        parts = {tp.partition for tp in partitions}
        self._forget_holds(parts)
        self.assigned -= parts
        self._fence = {k: v for k, v in self._fence.items() if k[1] not in parts}
        self._parked -= parts
        metrics.REBALANCES.labels(self.config.service, self.instance, "lost").inc()
        self._m_assigned.set(len(self.assigned))
        self._drop(parts)
        log.warning(
            "partitions lost",
            extra={"fields": {"instance": self.instance, "partitions": sorted(parts)}},
        )

    def _drop(self, parts: set[int]) -> None:
        if not parts:
            return
        self._committed = {k: v for k, v in self._committed.items() if k[1] not in parts}
        for hook in self.hooks:
            on_revoke = getattr(hook, "on_revoke", None)
            if on_revoke is not None:
                on_revoke(parts)

    def _changelogs(self) -> list[str]:
        names = (getattr(h, "topic_name", None) for h in self.hooks if getattr(h, "partitioned", 0))
        return [str(n) for n in names if n]

    def _changelog_ends(self, parts: set[int]) -> dict[tuple[str, int], int]:
        """End offsets of the partitioned stores' changelog partitions (-1: unknown)."""
        ends: dict[tuple[str, int], int] = {}
        for name in self._changelogs():
            for p in parts:
                try:
                    _, high = self.consumer.get_watermark_offsets(
                        TopicPartition(name, p), timeout=10
                    )
                    ends[(name, p)] = int(high)
                except KafkaException:
                    ends[(name, p)] = -1
        return ends

    def _unchanged(self, parts: set[int]) -> set[int]:
        """Those of ``parts`` whose changelogs nobody wrote since they were parked."""
        if not parts:
            return set()
        now = self._changelog_ends(parts)
        return {
            p
            for p in parts
            if all(
                self._parked_ends.get(k, -1) == v and v >= 0 for k, v in now.items() if k[1] == p
            )
        }
