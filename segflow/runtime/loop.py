"""The consume → handle → produce loop every Kafka-facing service runs.

A service gives the loop its source topics and a handler: a function from one decoded
input record to the records it produces. The loop does the rest:

* decodes values with the topic's Avro schema; anything that does not decode, or that the
  handler rejects with :class:`~segflow.errors.PoisonMessage`, goes to the DLQ with
  its original bytes, headers, reason and source offset, and the loop carries on; a
  compacted input's tombstones (the key deleted upstream) are dropped, except for the
  sources the handler asked them of (``LoopConfig.tombstones``: ``value`` None, headers kept);
* in ``exactly_once`` mode, produces a batch's outputs, its dead letters and its consumed
  offsets in one Kafka transaction (KIP-447: the consumer group's metadata travels with the
  offsets, so a restarted or fenced instance never commits twice); an aborted transaction
  rewinds the consumer to the last committed offsets and tells the handler to drop
  uncommitted state;
* otherwise (at-least-once), flushes the batch's outputs and only then commits offsets;
* stops cleanly on SIGTERM/SIGINT: finishes and commits the batch in hand, leaves the group;
* runs as one of N instances of a consumer group: partitions are assigned with the ``range``
  assignor, which gives an instance the same partition numbers of every input (inputs are
  co-partitioned: equal partition counts, same keys, checked at start), and hooks with
  ``on_assign(partitions)`` / ``on_revoke(partitions)`` hear of every change with the set of
  partition numbers (a store restores the assigned ones before their first record is
  fetched, and drops the revoked or lost ones). Callbacks run inside ``consume()``, between
  batches, so no transaction is open when state moves. Before a rebalance takes partitions
  away, hooks with ``before_revoke(partitions, timeout)`` finish the work under way and one
  tick commits it (Kafka Streams commits a task before it is revoked);
* holds a partition at a record its handler cannot handle yet: the handler raises
  :class:`~segflow.runtime.records.HoldPartition`, the batch commits the partition's offset
  up to that record (not beyond) and keeps it and the partition's later records of the batch
  in memory; the loop pauses the partition until a hook's ``releases()`` (asked after each
  record handled while a partition is held, and after each poll and batch) or
  :meth:`ProcessingLoop.release` releases it: its kept records are handled then, from the
  held record, in the batch in hand or first in the next one; a held partition that is
  revoked or lost is forgotten, its next owner reads it from the held record; with a hook's
  ``urgent(topic, partition, value)``, a batch ends early once a record it calls urgent
  arrived (a hand-off another instance waits for), so that a hold's round trip does not wait
  for full batches (:mod:`segflow.runtime.holds`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from segflow.errors import PoisonMessage
from segflow.runtime import metrics
from segflow.runtime.dlq import dead_letter
from segflow.runtime.holds import PartitionHolds
from segflow.runtime.kafka import make_consumer, make_producer, produce
from segflow.runtime.rebalance import PartitionCallbacks
from segflow.runtime.records import BatchInfo as BatchInfo  # re-exported (moved)
from segflow.runtime.records import CommitPoint as CommitPoint
from segflow.runtime.records import Handler as Handler
from segflow.runtime.records import HoldPartition as HoldPartition
from segflow.runtime.records import Hooks as Hooks
from segflow.runtime.records import Incoming as Incoming
from segflow.runtime.records import LoopConfig as LoopConfig
from segflow.runtime.records import Output as Output
from segflow.runtime.retry import kafka_retrying
from segflow.runtime.serde import Serde, decode_key, encode_key
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.runtime.watchdog import EXIT_STUCK as EXIT_STUCK  # re-exported (moved)
from segflow.runtime.watchdog import Watchdog as _Watchdog

log = logging.getLogger("segflow.loop")


class ProcessingLoop(PartitionCallbacks, PartitionHolds):
    """Run ``handler`` over ``config.sources`` until stopped."""

    def __init__(
        self,
        settings: Settings,
        config: LoopConfig,
        handler: Handler,
        serde: Serde | None = None,
        hooks: Hooks | Sequence[Hooks] | None = None,
        clock: Callable[[], float] = time.time,
        tick: Callable[[], Iterable[Output]] | None = None,
        commit_point: CommitPoint | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.handler = handler
        self.serde = serde or Serde.from_settings(settings)
        self.hooks: list[Hooks] = (
            [] if hooks is None else list(hooks) if isinstance(hooks, Sequence) else [hooks]
        )
        self.tick = tick
        self.commit_point = commit_point
        self._before_batch = [
            fn for fn in (getattr(h, "before_batch", None) for h in self.hooks) if fn is not None
        ]
        self._committed: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (high, committed)
        self._last_tick = 0.0
        self.clock = clock
        self.dlq_topic = TOPICS.dlq.name(settings)
        self._running = False
        self._stop_requested = False
        self.processed = 0
        producer_conf: dict[str, Any] = dict(config.producer_overrides)
        if config.exactly_once:
            producer_conf["transactional.id"] = (
                config.transactional_id or f"{config.group_id}-{config.service}"
            )
            producer_conf.setdefault("transaction.timeout.ms", settings.transaction_timeout_ms)
        self.producer = make_producer(settings, **producer_conf)
        consumer_conf: dict[str, Any] = dict(config.consumer_overrides)
        if config.transactional_id:
            consumer_conf.setdefault("group.instance.id", config.transactional_id)
        # Range gives every member the same partition numbers of each (co-partitioned)
        # input; cooperative-sticky (KIP-429) balances each topic on its own and would split
        # a customer's scores and merges across instances.
        consumer_conf.setdefault("partition.assignment.strategy", "range")
        consumer_conf.setdefault("session.timeout.ms", settings.session_timeout_ms)
        # A restore runs inside the assignment callback, i.e. inside one consume() call: give
        # it 15 minutes (librdkafka's default 5 would evict a member restoring ~1 M customers
        # on a loaded box, bench/bench_scale.py).
        consumer_conf.setdefault("max.poll.interval.ms", 900000)
        consumer_conf.setdefault("statistics.interval.ms", 5000)
        consumer_conf.setdefault(
            "stats_cb", lambda doc: metrics.record_consumer_lag(config.service, doc)
        )
        self.consumer = make_consumer(settings, config.group_id, **consumer_conf)
        self._delivery_error: KafkaError | None = None
        svc = config.service
        self._m_in = {n: metrics.RECORDS_IN.labels(svc, n) for n in config.sources}
        self._m_batch = metrics.BATCH_SECONDS.labels(svc)
        self._m_age = metrics.RECORD_AGE_SECONDS.labels(svc)
        self._m_out: dict[str, Any] = {}
        self._n_in: Counter[str] = Counter()
        self._n_out: Counter[str] = Counter()
        self._guard = _Watchdog(config.stuck_timeout, config.service)
        self.instance = settings.instance_id or "0"
        #: Input partition numbers this instance owns now.
        self.assigned: set[int] = set()
        self._m_assigned = metrics.ASSIGNED_PARTITIONS.labels(svc, self.instance)
        self._last_data = 0.0
        self._assigned_once = False
        self._closing = False
        #: Revoked by a rebalance under way, state kept until the assignment that follows.
        self._parked: set[int] = set()
        self._parked_ends: dict[tuple[str, int], int] = {}
        #: Offsets after the records this instance read and committed last, per owned input
        #: partition (sent again, through ``commit_point``, with a tick's transaction so that
        #: the coordinator checks ownership).
        self._fence: dict[tuple[str, int], int] = {}
        self._init_holds()

    # -- lifecycle -----------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Ask the loop to finish the batch in hand and return (signal-handler safe)."""
        self._stop_requested = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self, max_records: int | None = None, idle_timeout: float | None = None) -> int:
        """Process until stopped (or ``max_records`` / ``idle_timeout`` seconds idle).

        Returns the number of input records processed (including dead-lettered ones).
        """
        cfg = self.config
        if cfg.exactly_once:
            self.producer.init_transactions(cfg.commit_timeout)
        self._check_copartitioned()
        self.consumer.subscribe(
            list(cfg.sources),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        metrics.UP.labels(cfg.service).set(1)
        metrics.INSTANCE.labels(cfg.service, self.instance).set(1)
        self._running = True
        self._last_data = started = self.clock()
        log.info(
            "loop started",
            extra={"fields": {"sources": list(cfg.sources), "exactly_once": cfg.exactly_once}},
        )
        try:
            while not self._stop_requested:
                if max_records is not None and self.processed >= max_records:
                    break
                msgs = self._poll()
                if (
                    self.tick is not None
                    and not self._parked  # mid-rebalance: parked state is not ours to act on
                    and self.clock() - self._last_tick >= cfg.tick_interval
                ):
                    self._run_tick()
                self._ask_releases()
                if not msgs and not self._ready:
                    if (
                        idle_timeout is not None
                        and self.clock() - self._last_data > idle_timeout
                        # idle means nothing to read from partitions it owns: a group join
                        # on a loaded broker can take longer than the idle time (60 s cap)
                        and (self._assigned_once or self.clock() - started > 60)
                    ):
                        break
                    continue
                self._last_data = self.clock()
                self._process_batch(msgs)
                self._ask_releases()
            self._final_tick()
        finally:
            metrics.UP.labels(cfg.service).set(0)
            metrics.INSTANCE.labels(cfg.service, self.instance).set(0)
            self._running = False
            self.close()
        return self.processed

    def _final_tick(self) -> None:
        """On a clean stop: let hooks finish work under way (``drain(timeout)``, optional),
        then one last tick commits what it produced."""
        if self.tick is None:
            return
        for hook in self.hooks:
            drain = getattr(hook, "drain", None)
            if drain is not None:
                drain(self.config.drain_timeout)
        self._run_tick()

    def close(self) -> None:
        # Leaving the group revokes everything: the in-memory state stays readable (tools and
        # tests read it after a run); nothing is processed any more.
        self._closing = True
        with contextlib.suppress(KafkaException, RuntimeError):  # already closed
            self.consumer.close()
        self.producer.flush(10)
        with contextlib.suppress(KafkaException, RuntimeError):  # already closed
            self.producer.close()
        self._guard.close()

    # -- one batch -----------------------------------------------------------------------
    def _process_batch(self, msgs: list[Message]) -> None:
        cfg = self.config
        started = time.perf_counter()
        offsets: dict[tuple[str, int], int] = {}
        timestamps: list[int] = []
        if self._ready:  # released stashes first (their partitions' records, in order)
            msgs = [*self._ready, *msgs]
            self._ready = []
        if self._before_batch:
            batch = self._batch_info(msgs)
            for before_batch in self._before_batch:
                before_batch(batch)
        if cfg.exactly_once:
            self.producer.begin_transaction()
        done = 0  # records handled (or errors), of the batch and of stashes released in it
        pending = msgs[::-1]  # popped from the end; a partition released in the batch goes back
        while pending:
            msg = pending.pop()
            err = msg.error()
            if err is not None:
                done += 1
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error", extra={"fields": {"error": str(err)}})
                continue
            topic_name = cast(str, msg.topic())
            partition = cast(int, msg.partition())
            offset = cast(int, msg.offset())
            key = (topic_name, partition)
            if self._is_held(key):  # at an earlier record: read again once released
                self._skip(key, msg)
                continue
            ts_type, ts = msg.timestamp()
            held = self._handle(msg, topic_name, partition, offset, ts if ts_type else None)
            if held is not None:
                offsets[key] = offset  # committed up to the held record, not beyond
                self._hold(key, offset, held, msg)
                continue
            if self._held_since:
                self._handled_held(key, offset)
            offsets[key] = offset + 1
            done += 1
            if ts_type:
                timestamps.append(ts)
            if self._holding or self.held:  # released by what this record brought: now
                pending.extend(reversed(self._release_in_batch()))
        self.processed += done
        self._flush_counts()
        if not offsets:
            if cfg.exactly_once:
                self.producer.abort_transaction(cfg.commit_timeout)
            return
        for hook in self.hooks:
            before = getattr(hook, "before_commit", None)
            if before is not None:
                for out in before():
                    self._produce(*self._encode(out), out.headers, out.partition)
        if cfg.pre_commit_delay:
            time.sleep(cfg.pre_commit_delay)
        with self._watchdog():
            committed = self._commit(self._points(offsets))
        if committed:
            self._holds_committed()
            self._fence.update(offsets)
            for hook in self.hooks:
                hook.on_commit()
            now_ms = self.clock() * 1000
            for ts in timestamps[:: max(1, len(timestamps) // 50)]:
                self._m_age.observe(max(0.0, (now_ms - ts) / 1000))
        self._m_batch.observe(time.perf_counter() - started)

    def _batch_info(self, msgs: list[Message]) -> BatchInfo:
        counts: Counter[tuple[str, int]] = Counter()
        for msg in msgs:
            if msg.error() is None:
                counts[(cast(str, msg.topic()), cast(int, msg.partition()))] += 1
        lag: dict[tuple[str, int], int | None] = {}
        assigned = self.consumer.assignment()
        for tp in self.consumer.position(assigned) if assigned else []:
            key = (tp.topic, tp.partition)
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), cached=True
            )
            if high < 0:
                lag[key] = None
                continue
            position: int | None = tp.offset
            if tp.offset < 0:  # nothing read since assignment: it starts at the committed offset
                position = self.committed_offset(key, low, high)
            lag[key] = None if position is None else max(0, high - position)
        return BatchInfo(dict(counts), lag)

    def lags(self) -> dict[tuple[str, int], int | None]:
        """Per assigned input partition, the records after this instance's position at the
        cached high watermark (None: unknown now), as ``before_batch`` hooks get them."""
        return self._batch_info([]).lag

    def committed_offset(self, key: tuple[str, int], low: int, high: int) -> int | None:
        """The group's committed offset of a partition nothing was read from yet (asked of the
        broker once per high watermark), or None when it cannot be known now."""
        if high <= low:
            return high  # empty: nothing to read wherever it starts
        cached = self._committed.get(key)
        if cached is not None and cached[0] == high:
            return cached[1]
        try:
            [tp] = self.consumer.committed([TopicPartition(*key)], timeout=5)
        except KafkaException as exc:
            log.warning("committed offset unknown", extra={"fields": {"error": str(exc)}})
            return None
        committed = tp.offset if tp.offset >= 0 else low  # none yet: auto.offset.reset earliest
        self._committed[key] = (high, committed)
        return committed

    def _points(self, offsets: dict[tuple[str, int], int]) -> list[TopicPartition]:
        """The offsets to commit for the offsets after the records read: ``commit_point``'s
        (a service that buffers records commits the offset of its oldest buffered one)."""
        point = self.commit_point
        if point is None:
            return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        return [TopicPartition(t, p, point(t, p, o)) for (t, p), o in offsets.items()]

    def _run_tick(self) -> bool:
        """Produce the tick's outputs in a transaction of their own (no offsets); False when
        it was aborted."""
        assert self.tick is not None
        self._last_tick = self.clock()
        cfg = self.config
        if cfg.exactly_once:
            self.producer.begin_transaction()
        produced = 0
        try:
            for out in self.tick():
                self._produce(*self._encode(out), out.headers, out.partition)
                produced += 1
            if cfg.exactly_once and produced and self._fence:
                # The tick's transaction carries the offsets this instance last committed
                # (unchanged): the group coordinator then rejects it if this instance no
                # longer owns those partitions (KIP-447), so a zombie's timers never commit.
                self.producer.send_offsets_to_transaction(
                    self._points(self._fence),  # after the tick's outputs were made
                    self.consumer.consumer_group_metadata(),
                    cfg.commit_timeout,
                )
        except Exception as exc:
            fenced = isinstance(exc, KafkaException)
            if fenced:
                log.warning("tick fenced", extra={"fields": {"error": str(exc)}})
            else:
                log.exception("tick failed")
            if cfg.exactly_once:
                self.producer.abort_transaction(cfg.commit_timeout)
            for hook in self.hooks:
                hook.on_abort()
            return False
        with self._watchdog():
            if cfg.exactly_once:
                try:
                    for attempt in kafka_retrying("tick commit"):
                        with attempt:
                            self.producer.commit_transaction(cfg.commit_timeout)
                except KafkaException as exc:
                    if not exc.args[0].txn_requires_abort():
                        raise
                    self.producer.abort_transaction(cfg.commit_timeout)
                    for hook in self.hooks:
                        hook.on_abort()
                    return False
            else:
                self.producer.flush(cfg.commit_timeout)
        for hook in self.hooks:
            hook.on_commit()
        return True

    def _flush_counts(self) -> None:
        """Add the batch's per-topic counts to the Prometheus counters (cheaper than per record)."""
        for name, n in self._n_in.items():
            self._m_in[name].inc(n)
        for name, n in self._n_out.items():
            counter = self._m_out.get(name)
            if counter is None:
                counter = self._m_out[name] = metrics.RECORDS_OUT.labels(self.config.service, name)
            counter.inc(n)
        self._n_in.clear()
        self._n_out.clear()

    def _handle(
        self, msg: Message, topic_name: str, partition: int, offset: int, ts: int | None
    ) -> str | None:
        """Handle one record; why the handler holds its partition at it (HoldPartition's
        argument, "hold" without one), None when it was handled."""
        source = self.config.sources[topic_name]
        tombstone = msg.value() is None and "compact" in source.cleanup
        if tombstone and topic_name not in self.config.tombstones:
            self._n_in[topic_name] += 1
            return None  # a tombstone on a compacted input: the key was deleted upstream
        decode = self.config.decoders.get(topic_name)
        try:
            if tombstone:  # asked for (LoopConfig.tombstones): value None, headers as written
                decoded = cast(dict[str, Any], None)
            elif decode is None:
                decoded = self.serde.decode(source, msg.value())
            else:
                decoded = decode(msg.value())
            record = Incoming(
                topic=source,
                topic_name=topic_name,
                partition=partition,
                offset=offset,
                key=decode_key(source, msg.key()),
                value=decoded,
                timestamp_ms=ts,
                headers=_headers(msg),
                raw=msg.value(),
            )
            outputs = [(out, self._encode(out)) for out in self.handler(record)]
        except HoldPartition as hold:
            return str(hold.args[0]) if hold.args else "hold"
        except PoisonMessage as exc:
            self._n_in[topic_name] += 1
            self._dead_letter(msg, exc)
            return None
        except Exception as exc:  # a handler bug must not stop the service: DLQ and log
            self._n_in[topic_name] += 1
            log.exception(
                "handler failed", extra={"fields": {"topic": topic_name, "offset": offset}}
            )
            self._dead_letter(msg, exc)
            return None
        self._n_in[topic_name] += 1
        for out, (name, key, value) in outputs:
            self._produce(name, key, value, out.headers, out.partition)
        return None

    def _encode(self, out: Output) -> tuple[str, bytes | None, bytes | None]:
        name = out.topic_name or out.topic.name(self.settings)
        value = out.value
        if value is not None and not isinstance(value, bytes):
            value = self.serde.encode(out.topic, value)
        return name, encode_key(out.topic, out.key), value

    def _dead_letter(self, msg: Message, exc: BaseException) -> None:
        letter = dead_letter(
            service=self.config.service,
            error=exc,
            topic=cast(str, msg.topic()),
            partition=cast(int, msg.partition()),
            offset=cast(int, msg.offset()),
            timestamp_ms=msg.timestamp()[1] if msg.timestamp()[0] else None,
            key=msg.key(),
            value=msg.value(),
            headers=_headers(msg),
            now_ms=int(self.clock() * 1000),
        )
        reason = letter["reason"]
        metrics.DLQ_RECORDS.labels(self.config.service, reason).inc()
        log.warning(
            "record dead-lettered",
            extra={
                "fields": {
                    "reason": reason,
                    "topic": msg.topic(),
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                }
            },
        )
        self._produce(self.dlq_topic, msg.key(), self.serde.encode(TOPICS.dlq, letter), None)

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        partition: int | None = None,
    ) -> None:
        produce(self.producer, topic, value, key, self._on_delivery, headers, partition)
        self._n_out[topic] += 1

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._delivery_error = err

    # -- commits -------------------------------------------------------------------------
    def _commit(self, offsets: list[TopicPartition]) -> bool:
        """Commit the batch; False when it was aborted and the consumer rewound."""
        cfg = self.config
        svc = cfg.service
        if not cfg.exactly_once:
            remaining = self.producer.flush(cfg.commit_timeout)
            while remaining > 0 or self._delivery_error is not None:
                if self._delivery_error is not None:
                    failed, self._delivery_error = self._delivery_error, None
                    log.error(
                        "delivery failed; rewinding", extra={"fields": {"error": str(failed)}}
                    )
                    self._rewind(offsets)
                    return False
                remaining = self.producer.flush(cfg.commit_timeout)
            self.consumer.commit(offsets=offsets, asynchronous=False)
            return True
        offsets_sent = False

        def count_retry(_exc: BaseException) -> None:
            metrics.TRANSACTIONS.labels(svc, "retried").inc()

        try:
            # Each step is retried on its own: once the offsets are in the transaction, sending
            # them again while a commit is in progress is itself an error ("Conflicting
            # commit_transaction API call"), which used to spin at full CPU. A commit stuck
            # for longer than stuck_timeout is ended by the watchdog, not here.
            for attempt in kafka_retrying("commit", before_retry=count_retry):
                with attempt:
                    if not offsets_sent:
                        self.producer.send_offsets_to_transaction(
                            offsets, self.consumer.consumer_group_metadata(), cfg.commit_timeout
                        )
                        offsets_sent = True
                    self.producer.commit_transaction(cfg.commit_timeout)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if not err.txn_requires_abort():
                raise
            log.warning("transaction aborted", extra={"fields": {"error": str(err)}})
            self.producer.abort_transaction(cfg.commit_timeout)
            metrics.TRANSACTIONS.labels(svc, "aborted").inc()
            self._rewind(offsets)
            return False
        metrics.TRANSACTIONS.labels(svc, "committed").inc()
        return True

    def _watchdog(self) -> _Watchdog:
        return self._guard

    def _rewind(self, offsets: list[TopicPartition]) -> None:
        """Seek back to the committed offsets so the aborted batch is processed again."""
        self._holds_aborted()
        for hook in self.hooks:
            hook.on_abort()
        parts = [TopicPartition(tp.topic, tp.partition) for tp in offsets]
        for tp in self.consumer.committed(parts, timeout=self.config.commit_timeout):
            if tp.offset < 0:  # nothing committed yet: start of the partition
                tp.offset = OFFSET_BEGINNING
            try:
                self.consumer.seek(tp)
            except KafkaException as exc:
                log.warning("seek failed", extra={"fields": {"error": str(exc)}})


def _headers(msg: Message) -> list[tuple[str, bytes | None]]:
    return cast(list[tuple[str, bytes | None]], msg.headers() or [])
