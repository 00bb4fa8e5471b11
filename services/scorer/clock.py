"""The scorer's event-time clocks (pure): one per input partition, a function of that
partition's records in order, like a Kafka Streams task's stream time (moved out of
:mod:`services.scorer.core`; see its module doc, *Event time*)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from segflow.errors import InvalidRecord
from services.scorer.config import FORGET_EVENT, ScorerConfig
from services.scorer.features import DAY


@dataclass
class PartitionClock:
    """One input partition's clock: nothing but its own records, in their order, move it.

    ``latest`` (the clock) is the newest event time read from the partition; timers of its
    customers fire when ``latest - watermark_delay`` passes them. ``floor`` is the *reorder
    floor*, the basis of the final watermark (``floor - allowed_lateness``; older events are
    too late): the oldest event time of the partition's last ``block`` to ``2 * block``
    records (the current block's minimum ``cur`` and the previous full block's ``prev``;
    ``n`` records in the current block), never backwards. The floor is there because one
    identified partition is not in event-time order: identity re-keys a batch input
    partition by input partition, so a burst lands as runs of days that start over.
    """

    latest: int = -1
    floor: int = -1
    n: int = 0
    cur: int | None = None
    prev: int | None = None

    def observe(self, t: int, block: int) -> None:
        """Move the clock with an event of ``t`` (a record of ``block`` per block)."""
        if t > self.latest:
            self.latest = t
        self.cur = t if self.cur is None else min(self.cur, t)
        self.n += 1
        low = self.cur if self.prev is None else min(self.prev, self.cur)
        if self.n >= block:
            self.prev, self.cur, self.n = self.cur, None, 0
        if low > self.floor:
            self.floor = low

    def advance_to(self, t: int) -> None:
        """Move the clock to at least ``t`` (tools, tests and benches: time passes)."""
        self.latest = max(self.latest, t)
        self.floor = max(self.floor, t)


class EventClock:
    """The clock part of :class:`services.scorer.core.Scorer` (a mixin: the attributes are
    the scorer's dataclass fields)."""

    config: ScorerConfig
    #: Per input partition this scorer reads: its clock (missing: nothing read from it yet).
    clocks: dict[Any, PartitionClock]
    #: Partitions whose clock moved since :meth:`moved_clocks` was last called.
    _moved: set[Any]
    #: The partition a customer id's records (and so its state and timers) are in; None: one
    #: partition, ``0``, for every customer and every record (tools, tests, benches).
    partition_of: Callable[[str], Any] | None
    retired: set[str]
    #: The position of the record being handled: counts the records read (events, merges),
    #: so it orders one partition's records (see :meth:`passed_at`).
    _pos: int
    #: Per partition whose watermark moved since the batch's outputs were last released:
    #: (watermark, position of the record that moved it there), the first entry the
    #: watermark before (position -1).
    _passes: dict[Any, list[tuple[int, int]]]
    #: The watermark moves are kept (:attr:`_passes`) only while score outputs are held.
    defer_scores: bool

    def part(self, customer_id: str) -> Any:
        """The input partition whose clock drives ``customer_id``'s timers."""
        return 0 if self.partition_of is None else self.partition_of(customer_id)

    def _source(self, source: Any) -> Any:
        return 0 if self.partition_of is None else source

    # -- clocks --------------------------------------------------------------------------
    @property
    def max_event_ms(self) -> int | None:
        """The instance's clock: the smallest over the partitions it reads that delivered an
        event (None: none did). Only for deployment-level work (training snapshots, label
        maturity, the API's default instant, metrics); timers and lateness use each
        partition's own clock."""
        known = [c.latest for c in self.clocks.values() if c.latest >= 0]
        return min(known) if known else None

    @max_event_ms.setter
    def max_event_ms(self, t: int | None) -> None:
        """Time passes for every partition (tools, tests, benches): each clock moves to at
        least ``t`` (partition 0's is created if there is none)."""
        if t is None:
            return
        if not self.clocks:
            self.clocks[0] = PartitionClock()
        for p, c in self.clocks.items():
            c.advance_to(t)
            self._moved.add(p)

    @property
    def watermark(self) -> int | None:
        """The instance's watermark (see :attr:`max_event_ms`): deployment-level work only."""
        t = self.max_event_ms
        return None if t is None else t - self.config.watermark_delay_ms

    @property
    def final_watermark(self) -> int | None:
        """The instance's clock less ``allowed_lateness``: churn labels mature behind it
        (deployment-level work only; which events are too late is each partition's
        :meth:`final_watermark_of`, more lenient while its recent records are out of order)."""
        t = self.max_event_ms
        return None if t is None else t - self.config.allowed_lateness_ms

    def watermark_of(self, part: Any) -> int | None:
        """Event time up to which partition ``part`` is considered complete enough to act on:
        its customers' timers due by then fire."""
        c = self.clocks.get(part)
        if c is None or c.latest < 0:
            return None
        return c.latest - self.config.watermark_delay_ms

    def final_watermark_of(self, part: Any) -> int | None:
        """Event time before which partition ``part`` accepts no event any more."""
        c = self.clocks.get(part)
        if c is None or c.latest < 0:
            return None
        return c.floor - self.config.allowed_lateness_ms

    def restore_clocks(self, clocks: Mapping[Any, PartitionClock | None]) -> None:
        """Set the clocks of partitions (a new owner's assignment, an abort): each exactly as
        its changelog had it (None: the partition had none, nothing read from it yet)."""
        for p, c in clocks.items():
            if c is None:
                self.clocks.pop(p, None)
            else:
                self.clocks[p] = PartitionClock(c.latest, c.floor, c.n, c.cur, c.prev)
            self._moved.discard(p)

    def drop_sources(self, sources: Iterable[Any]) -> None:
        """Input partitions this scorer no longer reads (another owns them now)."""
        for source in sources:
            self.clocks.pop(source, None)
            self._moved.discard(source)

    def moved_clocks(self) -> dict[Any, PartitionClock]:
        """The clocks that moved since the last call (the shell writes them to the
        partitions' changelogs in the transaction of the records that moved them)."""
        out = {p: self.clocks[p] for p in self._moved if p in self.clocks}
        self._moved.clear()
        return out

    def _observe(self, source: Any, t: int) -> None:
        c = self.clocks.get(source)
        if c is None:
            c = self.clocks[source] = PartitionClock()
        block = max(1, self.config.reorder_records // 2)
        old = c.latest
        c.observe(t, block)
        self._moved.add(source)
        delay = self.config.watermark_delay_ms
        if old < 0 or (c.latest - delay) // DAY > (old - delay) // DAY:
            self._day_passed(source)
        if c.latest > old and self.defer_scores:
            delay = self.config.watermark_delay_ms
            passes = self._passes.get(source)
            if passes is None:
                start = old - delay if old >= 0 else -(2**62)
                passes = self._passes[source] = [(start, -1)]
            passes.append((c.latest - delay, self._pos))

    def _day_passed(self, source: Any) -> None:
        """Partition ``source``'s first record, or its watermark passed a day boundary (at the
        record that moved it, before the record is applied): services.scorer.days sweeps it
        (one model for N instances)."""

    def next_record(self) -> None:
        """A record is read (the shell, for every record: also those that are no event, such
        as an absorbed id's ``customer_merged``): what it makes due comes after what the
        records before it did (:meth:`admit` and the core's ``on_merge`` count too)."""
        self._pos += 1

    def passed_at(self, part: Any, due: int) -> int:
        """The position of the record that moved partition ``part``'s watermark past event
        time ``due`` (-1: before the records since the outputs were last released; not
        passed yet: the current record's)."""
        wm = self.watermark_of(part)
        if wm is None or due > wm:
            return self._pos
        passes = self._passes.get(part)
        if not passes:
            return -1
        i = bisect_left(passes, due, key=lambda x: x[0])
        return passes[i][1] if i < len(passes) else self._pos

    def admit(self, customer_id: str, event: Mapping[str, Any], now_ms: int, source: Any) -> None:
        """What :meth:`on_event` does with an event as it is read from input partition
        ``source``, before applying it: check it against that partition's clock (raises
        :class:`~segflow.errors.InvalidRecord`, before anything changed) and move the clock
        with it."""
        self._pos += 1
        if not customer_id:
            raise InvalidRecord("identified event without customer_id", reason="missing_field")
        if str(event["event_type"]) == FORGET_EVENT or customer_id in self.retired:
            return
        t = int(event["occurred_at"])
        if t > now_ms + self.config.max_future_ms:
            raise InvalidRecord(
                f"event occurred {(t - now_ms) / 1000:.0f}s in the future", reason="future_event"
            )
        source = self._source(source)
        fw = self.final_watermark_of(source)
        if fw is not None and t < fw:
            raise InvalidRecord(
                f"event is {(fw - t) / 1000:.0f}s older than the allowed lateness",
                reason="too_late",
            )
        self._observe(source, t)
