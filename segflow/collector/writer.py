"""Kafka writes for the collector: one transaction per group of requests, acknowledged or not.

Requests hand their records to :meth:`KafkaWriter.submit` and wait on the returned future. A
writer thread takes whatever requests are waiting, writes all their records in one Kafka
transaction and commits it; every future then resolves together (group commit: one commit
serves many concurrent requests). A future resolves with ``None`` only after the commit, so
the broker has every record (``acks=all``, idempotent); otherwise it fails with
:class:`KafkaUnavailable` and the records are aborted, invisible to ``read_committed`` readers,
so a client's retry cannot leave a committed duplicate behind. A request whose future was
cancelled (its HTTP handler gave up waiting) before the writer took it is never written.

The producer is transactional with a stable ``transactional.id``: a restarted collector fences
its predecessor and aborts whatever transaction it left open at once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, Producer

from segflow.runtime.kafka import make_producer
from segflow.runtime.kafka import produce as kafka_produce
from segflow.runtime.settings import Settings

log = logging.getLogger("segflow.collector")


class KafkaUnavailable(Exception):
    """The records were not acknowledged; nothing of them is visible. Retry later."""


@dataclass
class _Job:
    records: list[tuple[bytes, bytes]]
    future: Future[None]


class KafkaWriter:
    """A transactional producer behind a queue, run by its own thread."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        transactional_id: str,
        commit_timeout: float = 10.0,
        max_records: int = 20_000,
        **producer_overrides: Any,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.transactional_id = transactional_id
        self.commit_timeout = commit_timeout
        self.max_records = max_records
        self.overrides = producer_overrides
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._producer: Producer | None = None
        self._thread = threading.Thread(target=self._run, name="collector-writer", daemon=True)
        self._stopping = False
        self.commits = 0
        self.failures = 0
        self.last_error: str | None = None

    # -- caller side ----------------------------------------------------------------------
    def start(self, connect_timeout: float = 30.0) -> None:
        """Start the thread; raise KafkaUnavailable if the producer cannot initialise."""
        self._producer = self._connect(connect_timeout)
        self._thread.start()

    def submit(self, records: list[tuple[bytes, bytes]]) -> Future[None]:
        """Queue ``records`` (key, value) for the next transaction."""
        job = _Job(records, Future())
        self._queue.put(job)
        return job.future

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the queued jobs and stop the thread."""
        self._stopping = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        producer, self._producer = self._producer, None
        if producer is not None and not self._thread.is_alive():
            producer.close()  # every client closed: no producer left retrying a gone broker

    @property
    def healthy(self) -> bool:
        return self._producer is not None

    # -- writer thread --------------------------------------------------------------------
    def _connect(self, timeout: float) -> Producer:
        conf = {
            "transactional_id": self.transactional_id,
            "transaction_timeout_ms": int(max(self.commit_timeout * 3, 30) * 1000),
            "message_timeout_ms": int(self.commit_timeout * 1000),
            "linger_ms": 2,
            **self.overrides,
        }
        producer = make_producer(self.settings, **conf)
        try:
            producer.init_transactions(timeout)
        except KafkaException as exc:
            _retire(producer)  # or it keeps retrying for the rest of the process
            raise KafkaUnavailable(f"Kafka did not initialise the producer: {exc}") from exc
        return producer

    def _take(self) -> list[_Job] | None:
        """The next group of jobs (blocks for the first); None when stopping with none left."""
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        count = len(first.records)
        while count < self.max_records:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # seen again after this group
                break
            jobs.append(job)
            count += len(job.records)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                self._commit(live)
            except Exception as exc:  # every failure fails the group; nothing is committed
                self.failures += 1
                self.last_error = str(exc)
                log.warning("collector: Kafka transaction failed: %s", exc)
                error = KafkaUnavailable(f"Kafka did not acknowledge the events: {exc}")
                for job in live:
                    job.future.set_exception(error)
                continue
            self.commits += 1
            for job in live:
                job.future.set_result(None)

    def _commit(self, jobs: list[_Job]) -> None:
        producer = self._producer
        if producer is None:
            producer = self._producer = self._connect(self.commit_timeout)
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        try:
            producer.begin_transaction()
            for job in jobs:
                for key, value in job.records:
                    kafka_produce(producer, self.topic, value, key, on_delivery)
            producer.commit_transaction(self.commit_timeout)
            if errors:  # commit raises first; belt and braces
                raise KafkaUnavailable(f"{len(errors)} records failed: {errors[0]}")
        except Exception:
            self._abort(producer)
            raise

    def _abort(self, producer: Producer) -> None:
        """Abort the open transaction; on failure drop the producer (a new one fences it)."""
        deadline = time.monotonic() + self.commit_timeout
        try:
            producer.abort_transaction(max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            log.warning("collector: abort failed (%s); the producer will be recreated", exc)
            self._producer = None
            _retire(producer)


def _retire(producer: Producer) -> None:
    """Close a dropped producer in the background: its undelivered records purged (they were
    never acknowledged, so their callers got an error), then closed, so it stops retrying a
    gone broker. Its open transaction is fenced by the next producer with the same id."""

    def close() -> None:
        with contextlib.suppress(Exception):
            producer.purge()
            producer.close()

    threading.Thread(target=close, daemon=True, name="collector-retire").start()


class MemoryWriter:
    """The writer's test double: keeps what it "commits"; fails while ``fail`` is set."""

    def __init__(self) -> None:
        self.committed: list[tuple[bytes, bytes]] = []
        self.fail: str | None = None
        self.healthy = True

    def start(self) -> None:
        pass

    def submit(self, records: list[tuple[bytes, bytes]]) -> Future[None]:
        future: Future[None] = Future()
        if self.fail is not None:
            future.set_exception(KafkaUnavailable(self.fail))
        else:
            self.committed.extend(records)
            future.set_result(None)
        return future

    def stop(self) -> None:
        pass
