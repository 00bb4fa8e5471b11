"""The scorer's event-time clock (pure): the watermarks and how the input partitions
move them (moved out of :mod:`services.scorer.core`; see its module doc, *Event time*)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from segflow.errors import InvalidRecord
from services.scorer.config import FORGET_EVENT, ScorerConfig


class EventClock:
    """The clock part of :class:`services.scorer.core.Scorer` (a mixin: the attributes are
    the scorer's dataclass fields)."""

    config: ScorerConfig
    max_event_ms: int | None
    _sources: dict[Any, tuple[int, int]]
    _pending: dict[Any, int]
    _lag: dict[Any, int | None]
    _recent: dict[Any, deque[tuple[int, int]]]
    _seq: dict[Any, int]
    retired: set[str]

    # -- clock ---------------------------------------------------------------------------
    @property
    def watermark(self) -> int | None:
        """Event time up to which the stream is considered complete enough to act on."""
        if self.max_event_ms is None:
            return None
        return self.max_event_ms - self.config.watermark_delay_ms

    @property
    def final_watermark(self) -> int | None:
        """Event time before which no event is accepted any more."""
        if self.max_event_ms is None:
            return None
        return self.max_event_ms - self.config.allowed_lateness_ms

    def _observe(self, source: Any, t: int, now_ms: int) -> None:
        """Advance the clock with an event of ``t`` from input partition ``source``: the clock
        is the smallest latest event time of the partitions that can still deliver older
        events (see :meth:`on_batch`), or the largest of all when none can; it never goes
        backwards. A replay that reads one partition ahead of the others thus does not make
        the others' events late."""
        old = self._sources.get(source)
        self._sources[source] = (t if old is None or t > old[0] else old[0], now_ms)
        if source in self._lag:  # the floor only matters for reported partitions
            recent = self._recent.get(source)
            if recent is None:
                recent = self._recent[source] = deque()
            seq = self._seq[source] = self._seq.get(source, 0) + 1
            while recent and recent[-1][1] >= t:
                recent.pop()
            recent.append((seq, t))
            if recent[0][0] <= seq - self.config.reorder_records:
                recent.popleft()
        self._advance(now_ms)

    def _holds(self, source: Any, seen: int, now_ms: int) -> bool:
        """Whether ``source`` may still deliver events older than its latest: it has records
        in the batch at hand or unread ones (as last reported); without a report, whether it
        delivered within ``source_idle_ms`` of processing time."""
        if source in self._lag:
            lag = self._lag[source]
            if self._pending.get(source, 0) > 0 or (lag is not None and lag > 0):
                return True
            if lag is not None:
                return False
        return now_ms - seen <= self.config.source_idle_ms

    def _advance(self, now_ms: int) -> None:
        holding = [
            self._floor(src, t)
            for src, (t, seen) in self._sources.items()
            if self._holds(src, seen, now_ms)
        ]
        clock = min(holding) if holding else max(t for t, _ in self._sources.values())
        if clock >= 0 and (self.max_event_ms is None or clock > self.max_event_ms):
            self.max_event_ms = clock

    def _floor(self, source: Any, latest: int) -> int:
        """What a partition that may still deliver holds the clock at: the oldest of its last
        ``reorder_records`` records when it is reported (its unread records may start over
        from there), else its latest."""
        recent = self._recent.get(source)
        if source in self._lag and recent:
            return min(latest, recent[0][1])
        return latest

    def expect_sources(self, sources: Iterable[Any], now_ms: int) -> None:
        """Declare input partitions before they deliver: each holds the clock back until its
        first event, until it is reported caught up, or (without reports) until it has been
        idle for ``source_idle_ms``."""
        for source in sources:
            self._sources.setdefault(source, (-1, now_ms))

    def drop_sources(self, sources: Iterable[Any]) -> None:
        """Input partitions this instance no longer reads (another owns them): they stop
        holding the clock back."""
        for source in sources:
            for table in (self._sources, self._pending, self._lag, self._recent, self._seq):
                table.pop(source, None)

    def on_batch(
        self, pending: Mapping[Any, int], lag: Mapping[Any, int | None], now_ms: int
    ) -> None:
        """Report the input partitions' progress before a batch is handled: ``pending`` =
        records of each partition in the batch, ``lag`` = records of each assigned partition
        not read yet after the batch (None: unknown). A partition with either holds the clock
        back, so a burst read from one partition after a pause does not carry the clock past
        older events waiting in another; one read to its end does not hold it at all (an
        empty or quiet partition does not stall the clock either). Partitions missing from
        ``lag`` fall back to the processing-time rule."""
        self._pending = dict(pending)
        self._lag = dict(lag)
        for source in self._lag:
            self._sources.setdefault(source, (-1, now_ms))
        if self._sources:
            self._advance(now_ms)

    def _handled(self, source: Any) -> None:
        n = self._pending.get(source)
        if n:
            self._pending[source] = n - 1

    def admit(self, customer_id: str, event: Mapping[str, Any], now_ms: int, source: Any) -> None:
        """What :meth:`on_event` does with an event as it is read, before applying it: count
        it as handled for its partition, check it (raises
        :class:`~segflow.errors.InvalidRecord`, before anything changed) and move the clock
        with it."""
        self._handled(source)
        if not customer_id:
            raise InvalidRecord("identified event without customer_id", reason="missing_field")
        if str(event["event_type"]) == FORGET_EVENT or customer_id in self.retired:
            return
        t = int(event["occurred_at"])
        if t > now_ms + self.config.max_future_ms:
            raise InvalidRecord(
                f"event occurred {(t - now_ms) / 1000:.0f}s in the future", reason="future_event"
            )
        fw = self.final_watermark
        if fw is not None and t < fw:
            raise InvalidRecord(
                f"event is {(fw - t) / 1000:.0f}s older than the allowed lateness",
                reason="too_late",
            )
        self._observe(source, t, now_ms)

    def handled(self, source: Any) -> None:
        """A record of input partition ``source`` that is no event (a merge mark) was read."""
        self._handled(source)
