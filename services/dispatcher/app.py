"""The dispatcher's shell: settings, the changelog-backed ledger, the loop, HTTP delivery.

Decisions come from :mod:`services.dispatcher.core`; this module only moves records and
makes calls. The once-and-only-once protocol:

1. the handler decides (``core.decide``/``core.promote``) and commits the ledger entry as
   ``in_flight`` together with the consumed offsets;
2. a later ``tick`` calls the API for committed ``in_flight`` entries, concurrently, with
   the entry's idempotency key, and commits ``sent`` / retry time / ``failed`` plus the
   results in its own transaction. On a channel whose vendor does not de-duplicate
   (SendGrid, SMTP, Marketo campaigns, policy ``at_most_once``) the tick first marks the
   entry ``started`` and makes the call only once that transaction has committed
   (``on_commit``);
3. after a crash between 2's call and its commit, the entry is still ``in_flight``: it is
   retried with the same key (the vendor applies it once), never decided again; an entry
   marked ``started`` is not called again but failed as ``ambiguous`` (at most once).

Partitioned for N instances of one consumer group: a customer's ledger lives in the changelog
partition of its id (the partition its segment changes and events arrive on); the instance that
owns the partition restores it on assignment and drops it on revoke. Before a rebalance takes
partitions away, ``before_revoke`` waits for the calls under way and the loop's next tick
commits their outcomes while this instance still owns them; a call still under way after
that (or at a ``kill -9``) is not recorded by the old owner: the new owner finds the entry
``in_flight`` and retries it with the same idempotency key, or, marked ``started``, fails it
as ``ambiguous``. KPI rows are kept per
partition (``kpi|<segment>|<playbook>|<variant>@<p>``) and summed when read; with
``clock: event`` the pipeline clock is per partition too (``clock@<p>``).
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import KafkaException
from tenacity import stop_after_attempt

from segflow.errors import ConfigError, PoisonMessage
from segflow.runtime.dlq import dead_letter
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.projection import _varint
from segflow.runtime.retry import kafka_retrying
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import KEY_SETTING, VaultSettings
from services.dispatcher import core, observing
from services.dispatcher.adapters import (
    Contacts,
    HttpClient,
    PatternContacts,
    Router,
)
from services.dispatcher.backoff import Breaker
from services.dispatcher.contacts import VaultContacts
from services.dispatcher.delivering import Delivering
from services.dispatcher.merge import CHANGE, EVENT
from services.dispatcher.metrics import (
    RESULTS,
)
from services.dispatcher.ordering import CLOCK_KEY, Ordering
from services.dispatcher.playbooks import Book, load_book
from services.dispatcher.reloading import Reloading
from services.dispatcher.settings import (
    AsyncRunner,
    DispatcherSettings,
    build_router,
)
from services.dispatcher.vendors import (
    is_local,
    routed,
)

__all__ = ["AsyncRunner", "Dispatcher", "DispatcherSettings", "build_router"]

log = logging.getLogger("segflow.dispatcher")
T = TypeVar("T")
KPI_PREFIX = "kpi|"


class Dispatcher(Delivering, Reloading, Ordering):
    """Handler + tick + hooks for the shared loop."""

    def __init__(
        self,
        settings: Settings,
        cfg: DispatcherSettings | None = None,
        book: Book | None = None,
        contacts: Contacts | None = None,
        router: Router | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cfg = cfg or DispatcherSettings()
        self.book = book or load_book(Path(p) for p in self.cfg.playbooks.split(",") if p)
        self.clock = clock
        self.serde = Serde.from_settings(settings)
        # The store keeps each record's bytes (decoded on demand; customers in use are in
        # ``_cache``): about a tenth of the memory of decoded records per customer.
        self.store = ChangelogStore(settings, TOPICS.dispatcher_state, self.serde, encoded=True)
        self.changes_topic = TOPICS.segment_changes.name(settings)
        self.events_topic = TOPICS.identified.name(settings)
        self.attributes_topic = TOPICS.attributes.name(settings)
        self.results_topic = TOPICS.dispatch_results.name(settings)
        self.runner = AsyncRunner()
        self._client: HttpClient | None = None
        self.vault: VaultContacts | None = None
        if router is None:
            if contacts is None:
                contacts = self._contacts()
            router, self._client = build_router(self.cfg, self.runner, contacts, self.book)
        self.router = router
        self._due: list[tuple[int, str]] = []  # (due_at pipeline ms, customer)
        self._retry: list[tuple[int, str, str]] = []  # (retry_at wall ms, customer, key)
        self._dirty = True
        # Decoded customers (the store holds Avro-shaped records) and the ids changed since
        # the last flush: one changelog write per customer per transaction, not per event.
        self._cache: dict[str, core.Customer] = {}
        self._pending: set[str] = set()
        # KPI rows changed since the last flush (key -> record), written once per transaction.
        self._kpi_pending: dict[str, dict[str, Any]] = {}
        # Calls under way on the I/O thread: the loop keeps consuming while they run and
        # records their outcomes at a later tick (the entries stay committed in_flight).
        self._calls: list[tuple[list[tuple[core.Customer, core.Action]], Any]] = []
        self._calling: set[str] = set()
        # At-most-once calls recorded as started in the open transaction (made at its commit),
        # outcomes recorded since the last commit (again after an abort), unknown outcomes.
        self._starting: list[tuple[list[tuple[core.Customer, core.Action]], list[Any]]] = []
        self._harvested: list[tuple[list[tuple[core.Customer, core.Action]], list[Any]]] = []
        self._unknown: dict[str, int] = {}
        self._started_at = 0.0  # perf_counter when this tick recorded calls as started
        self._stopping = False
        self._event_clocks: dict[int, int] = {}  # per partition (clock: event)
        self._saved_clocks: dict[int, int] = {}
        self._init_ordering()  # clock: event: the inputs' merged order (ordering.py)
        self._breakers: dict[str, Breaker] = {}
        self._paused: dict[str, float] = {}
        self._rng = random.Random()
        self._kpi_dirty = True
        self._kpi_keys: set[str] = set()
        self._gauges_at = 0.0
        self._attempt_counters: dict[tuple[str, str], Any] = {}
        self._call_seconds: dict[str, Any] = {}
        # hot reload of the playbook files, unless the book was handed in (tests, embedding)
        self._playbooks_from_files = book is None
        self._playbook_stamp = self._stamp_playbooks() if book is None else ()
        self._playbooks_polled = time.monotonic()

    def _contacts(self) -> Contacts:
        """Where recipients come from: the contact vault (``SEGFLOW_VAULT_KEY``), or the
        ``CONTACT_PATTERN`` stand-in for the local receiver. Refuses to start when an email
        channel is routed to a real endpoint without the vault key, or with the pattern."""
        cfg = self.cfg
        used = routed(self.book).keys()
        real = sorted(
            ch
            for ch, where in (("email", cfg.email_base_url), ("smtp", cfg.smtp_host))
            if ch in used and not is_local(where)
        )
        if cfg.contact_pattern:
            if real:
                raise ConfigError(
                    "dispatcher cannot start:\n  SEGFLOW_DISPATCHER_CONTACT_PATTERN: a stand-in "
                    f"for the local receiver; {real} go to a real endpoint: unset it and set "
                    f"{KEY_SETTING} (the contact vault's master key)"
                )
            return PatternContacts(cfg.contact_pattern)
        keyring = VaultSettings().keyring()
        if keyring is not None:
            self.vault = VaultContacts(self.settings, keyring)
            return self.vault
        if real:
            raise ConfigError(
                f"dispatcher cannot start:\n  {KEY_SETTING}: {real} routed to a real endpoint "
                "send to addresses from the contact vault, which this master key decrypts (the "
                "same key as the identity service's)"
            )
        if {"email", "smtp"} & used:
            log.warning(
                "contact vault off: %s is not set, email steps fail with no_contact", KEY_SETTING
            )
        return PatternContacts(None)

    # -- lifecycle -----------------------------------------------------------------------
    def restore(self, attempts: int = 20) -> int:
        """Load the ledger from the changelog and rebuild the timer indexes (and start
        following the contact vault)."""
        if self.vault is not None:
            self.vault.start()

        def start_over(_exc: BaseException) -> None:
            self.store.table.clear()

        # e.g. NOT_LEADER right after topic creation
        for attempt in kafka_retrying(
            "restore",
            when=lambda exc: isinstance(exc, KafkaException),
            stop=stop_after_attempt(attempts),
            first=0.5,
            longest=0.5,
            before_retry=start_over,
        ):
            with attempt:
                n = self.store.restore()
                self._cache.clear()
        self._load_clocks(set(range(self.store.partitions)))
        self._rebuild()
        return n

    def _load_clocks(self, partitions: set[int]) -> None:
        legacy = self.store.get(CLOCK_KEY)  # one clock for every partition (before partitions)
        for part in partitions:
            rec = self.store.get(f"{CLOCK_KEY}@{part}") or legacy
            if rec and rec.get("clock_ms"):
                self._event_clocks[part] = self._saved_clocks[part] = int(rec["clock_ms"])

    # -- partitions (loop hooks) -------------------------------------------------------------
    def on_assign(self, partitions: set[int]) -> None:
        """The store restored ``partitions``: their clocks, and indexes rebuilt at the tick."""
        self._cache.clear()
        self._merges_dropped(partitions)
        self._load_clocks(partitions)
        self._dirty = True

    def on_revoke(self, partitions: set[int]) -> None:
        """Another instance owns ``partitions``: forget their customers, KPI rows and clocks
        (``before_revoke`` recorded the calls under way for them; those that did not finish
        in time are left to the new owner, which retries the committed in_flight entries
        with the same idempotency keys)."""
        self._cache.clear()
        self._pending.clear()
        self._kpi_pending.clear()
        for part in partitions:
            self._event_clocks.pop(part, None)
            self._saved_clocks.pop(part, None)
        self._merges_dropped(partitions)
        self._dirty = True

    def loop(self, **overrides: Any) -> ProcessingLoop:
        s, cfg = self.settings, self.cfg
        if self.vault is not None:
            self.vault.start()  # recipients loaded before the first delivery
        config = LoopConfig(
            service="dispatcher",
            group_id=cfg.group_id,
            sources={
                self.changes_topic: TOPICS.segment_changes,
                self.events_topic: TOPICS.identified,
                self.attributes_topic: TOPICS.attributes,
            },
            transactional_id=cfg.transactional_id
            or f"{cfg.group_id}-{s.instance_id if s.instance_id is not None else 0}",
            batch_size=cfg.batch_size,
            tick_interval=cfg.tick_interval,
            pre_commit_delay=cfg.pre_commit_delay,
            decoders={self.events_topic: self.decode_identified},
            **overrides,
        )
        loop = ProcessingLoop(
            s,
            config,
            self.handle,
            serde=self.serde,
            hooks=[self.store, self],
            tick=self.tick,
            clock=self.clock,
            # under the event clock, input offsets never pass a record not applied yet
            commit_point=self.commit_point if cfg.clock == "event" else None,
        )
        if cfg.clock == "event":
            self._lag_source = loop.lags  # the idle rule: read to the end?
        return loop

    def close(self) -> None:
        if self.vault is not None:
            self.vault.close()
        if self._client is not None:
            self.runner.run(self._client.aclose())
        self.runner.close()

    def on_commit(self) -> None:
        self._stopping = False  # the final tick is over; a later run delivers again
        self._merges_committed()
        self.start_calls()  # the started records are committed: the calls may go out

    def on_abort(self) -> None:
        self._stopping = False
        self.forget_uncommitted()
        self._dirty = True  # the store rolled back: rebuild the timer indexes from it
        parts = set(self._event_clocks)  # and the clocks (the records are read again)
        self._event_clocks.clear()
        self._saved_clocks.clear()
        self._load_clocks(parts)
        self._merges_aborted()
        self._cache.clear()
        self._pending.clear()
        self._kpi_pending.clear()

    def before_commit(self) -> list[Output]:
        """The batch's customer and KPI changes, one write per key, inside its transaction."""
        return self._flush()

    def _flush(self) -> list[Output]:
        """The pending customer records, KPI rows and event clocks, one write each: the clocks
        commit with the offsets of the records that moved them, so the next owner of a
        partition restores the clock those offsets imply (``kill -9`` included)."""
        outs = [
            self.store.put(cid, core.customer_record(self._cache[cid])) for cid in self._pending
        ]
        for part, ms in self._event_clocks.items():
            if self._saved_clocks.get(part) != ms:
                record = {"kind": "clock", "clock_ms": ms}
                outs.append(self.store.put(f"{CLOCK_KEY}@{part}", record, part))
                self._saved_clocks[part] = ms
        outs += self._flush_marks()
        outs += [
            self.store.put(key, rec, _kpi_partition(key)) for key, rec in self._kpi_pending.items()
        ]
        self._pending.clear()
        self._kpi_pending.clear()
        return outs

    def _put(self, c: core.Customer) -> None:
        self._cache[c.customer_id] = c
        self._pending.add(c.customer_id)
        if len(self._cache) > self.cfg.cache_size and not self._pending - {c.customer_id}:
            self._cache.clear()  # bounded; refilled from the store on demand
            self._cache[c.customer_id] = c

    # -- clock -----------------------------------------------------------------------------
    def now_ms(self, part: int | None = None) -> int:
        """Wall time, or with ``clock: event`` the pipeline time of partition ``part`` (None:
        this instance's clock, the minimum over the partitions it has seen data on)."""
        if self.cfg.clock == "event":
            if part is None:
                return min(self._event_clocks.values(), default=0)
            return self._event_clocks.get(part, 0)
        return int(self.clock() * 1000)

    def _horizon(self) -> int:
        """The latest time any owned partition has reached."""
        if self.cfg.clock == "event":
            return max(self._event_clocks.values(), default=0)
        return int(self.clock() * 1000)

    # -- state access ----------------------------------------------------------------------
    def customer(self, customer_id: str) -> core.Customer | None:
        c = self._cache.get(customer_id)
        if c is not None:
            return c
        rec = self.store.get(customer_id)
        if rec is None:
            return None
        c = self._cache[customer_id] = core.customer_from_record(rec)
        return c

    def customers(self) -> Iterator[core.Customer]:
        for _key, rec in list(self.store.items()):
            if rec.get("kind") == "customer":
                yield core.customer_from_record(rec)

    def kpis(self) -> dict[tuple[str, str, str], dict[str, int]]:
        """KPI counters of the partitions this instance owns, summed over them."""
        out: dict[tuple[str, str, str], dict[str, int]] = {}
        for key in list(self._kpi_keys):  # this batch's changes first, as kpis_for reads them
            r = self._kpi_pending.get(key) or self.store.get(key)
            if r is not None:
                row = out.setdefault((r["segment"], r["playbook"], r["variant"]), {})
                for name, n in r["counts"].items():
                    row[name] = row.get(name, 0) + n
        return out

    def _rebuild(self) -> None:
        self._due, self._retry = [], []
        self._kpi_keys = set()
        for key, rec in self.store.items():  # one record decoded at a time
            kind = rec.get("kind")
            if kind == "kpi":
                self._kpi_keys.add(key)
            elif kind == "customer":  # its timers, read from the record (no Customer built)
                due, flights = core.record_timers(rec)
                if due is not None:
                    heapq.heappush(self._due, (due, key))
                for retry_at, action in flights:
                    heapq.heappush(self._retry, (retry_at, key, action))
        self._dirty = False
        self._kpi_dirty = True

    def _index(self, c: core.Customer) -> None:
        due = core.next_due(c)
        if due is not None:
            heapq.heappush(self._due, (due, c.customer_id))
        for a in core.in_flight(c):
            heapq.heappush(self._retry, (a.retry_at, c.customer_id, a.key))

    # -- handler ---------------------------------------------------------------------------
    def decode_identified(self, data: bytes | None) -> dict[str, Any]:
        """The loop's decoder for identified events: most events concern customers the
        dispatcher holds nothing for (no segment change yet), and ``observe`` ignores them
        unless their type or a profile property says otherwise. Those are recognised from the
        leading fields and a byte search, and come back as ``{"customer_id", "occurred_at",
        "event": None}`` without the full Avro decode; everything else is decoded in full.
        Under the event clock whether the customer is known is asked when the event is
        applied (its turn in the merged order, ``ordering.py``): the bytes are kept
        (``raw``) and decoded then if it is. (A skipped record is not checked past its
        leading fields: bytes that would not decode are ignored instead of dead-lettered, as
        nothing is derived from them.)"""
        event_clock = self.cfg.clock == "event"
        if (
            data is not None
            and len(data) > 8
            and data[0] == 0
            and self.serde.written_with_current(TOPICS.identified, data)
        ):
            try:
                n, pos = _varint(data, 5)  # customer_id
                cid = data[pos : pos + n].decode()
                if (
                    n >= 0
                    and (event_clock or (cid not in self._cache and cid not in self.store))
                    and b"do_not_contact" not in data
                    and b"timezone" not in data
                    and b"first_name" not in data
                ):
                    n, pos = _varint(data, pos + n)  # event.event_id
                    n, pos = _varint(data, pos + n)  # event.event_type
                    event_type = data[pos : pos + n].decode()
                    occurred_at, end = _varint(data, pos + n)  # event.occurred_at
                    if (
                        n >= 0
                        and end <= len(data)
                        and event_type not in core.UNKNOWN_CUSTOMER_TYPES
                    ):
                        lazy = {"customer_id": cid, "occurred_at": occurred_at, "event": None}
                        return {**lazy, "raw": data} if event_clock else lazy
            except (IndexError, UnicodeDecodeError):
                pass  # the full decode says what is wrong with it
        return self.serde.decode(TOPICS.identified, data)

    def handle(self, record: Incoming) -> Iterator[Output]:
        event_clock = self.cfg.clock == "event"
        if record.topic_name == self.changes_topic:
            try:
                change = core.SegmentChange.from_record(record.value)
            except (KeyError, TypeError, ValueError) as exc:
                raise PoisonMessage(f"segment change: {exc}", reason="invalid_record") from None
            if event_clock:  # in the merged order of the two inputs (ordering.py)
                cid, at = change.customer_id, change.occurred_at
                yield from self._read(CHANGE, record, cid, at, change)
                return
            part = self.store.partition_of(change.customer_id)
            yield from self._apply(CHANGE, change, part, self.now_ms(part))
        elif record.topic_name == self.attributes_topic:  # issue 19: attributes for templates
            cid = str(record.value["customer_id"])
            part = self.store.partition_of(cid)
            old = self.customer(cid)
            maybe_c = observing.set_attributes(
                old, cid, record.value.get("attributes") or {}, self.book
            )
            if maybe_c is not None:
                yield from self._emit(old, maybe_c, [], self.now_ms(part), part)
        elif event_clock:
            value = record.value
            at = int((value["event"] or value)["occurred_at"])
            item = (value, record.raw)  # the bytes, in case it waits (written to the changelog)
            yield from self._read(EVENT, record, str(value["customer_id"]), at, item)
        elif record.value["event"] is not None:  # else skipped by decode_identified
            part = self.store.partition_of(record.value["customer_id"])
            yield from self._apply(EVENT, (record.value, None), part, self.now_ms(part))

    def _apply(self, kind: str, item: Any, part: int, now: int) -> Iterator[Output]:
        """A segment change or an identified event, at ``now`` (the wall clock, or under the
        event clock its partition's clock at its turn), after the customer's steps due by
        then (what a tick would have done had it run first)."""
        if kind == CHANGE:
            change: core.SegmentChange = item
            old = self.customer(change.customer_id)
            due, fired = self._due_first(old, now)
            new, effects = core.decide(due, change, now, self.book, self._keep_in_flight)
            yield from self._emit(old, new, fired + effects, now, part)
            return
        value: dict[str, Any] = item[0]  # (the decoded record, its bytes)
        if value["event"] is None:  # skipped at read: decoded now if its customer is known
            cid = str(value["customer_id"])
            if value.get("raw") is None or (cid not in self._cache and cid not in self.store):
                return
            value = self.serde.decode(TOPICS.identified, value["raw"])
        obs = core.Observation.from_record(value)
        old = self.customer(obs.customer_id)
        due, fired = self._due_first(old, now)
        maybe, effects = observing.observe(due, obs, now, self.book, self._keep_in_flight)
        if maybe is not None:
            yield from self._emit(old, maybe, fired + effects, now, part)

    def _emit(
        self,
        old: core.Customer | None,
        new: core.Customer,
        effects: Iterable[core.Effect],
        now: int,
        part: int,
    ) -> Iterator[Output]:
        if new is not old and new != old:
            self._put(new)
            self._index(new)
        yield from self._effects(effects, now, part)

    def _effects(self, effects: Iterable[core.Effect], now: int, part: int) -> Iterator[Output]:
        """Results and dead letters to produce; KPI deltas counted into the partition's rows."""
        deltas: list[core.KpiDelta] = []
        for e in effects:
            if isinstance(e, core.Result):
                rec = core.result_record(e)
                RESULTS.labels(rec["channel"], rec["status"], _reason_label(rec["reason"])).inc()
                yield Output(TOPICS.dispatch_results, rec["customer_id"], rec)
            elif isinstance(e, core.KpiDelta):
                deltas.append(e)
            elif isinstance(e, core.DeadLetterAction):
                yield self._dead_letter(e, now)
        if deltas:  # counted now, written once per row and transaction by _flush
            current = self.kpis_for({(d.segment, d.playbook, d.variant) for d in deltas}, part)
            for (seg, pb, var), counts in core.apply_kpis(current, deltas).items():
                key = f"{KPI_PREFIX}{seg}|{pb}|{var}@{part}"
                self._kpi_keys.add(key)
                self._kpi_pending[key] = core.kpi_record(seg, pb, var, counts)
            self._kpi_dirty = True

    def kpis_for(
        self, rows: set[tuple[str, str, str]], part: int
    ) -> dict[tuple[str, str, str], dict[str, int]]:
        """Partition ``part``'s counters of ``rows``."""
        out = {}
        for seg, pb, var in rows:
            key = f"{KPI_PREFIX}{seg}|{pb}|{var}@{part}"
            rec = self._kpi_pending.get(key) or self.store.get(key)
            if rec is not None:
                out[(seg, pb, var)] = dict(rec["counts"])
        return out

    def _dead_letter(self, e: core.DeadLetterAction, now: int) -> Output:
        result = core.result_record(core.Result(e.action, "failed", e.reason, now))
        letter = dead_letter(
            service="dispatcher",
            error=PoisonMessage(
                f"{e.action.channel} {e.action.step}: {e.reason}", reason="dispatch_failed"
            ),
            topic=self.results_topic,
            partition=-1,
            offset=-1,
            timestamp_ms=now,
            key=e.action.customer_id.encode(),
            value=self.serde.encode(TOPICS.dispatch_results, result),
            headers=[("idempotency_key", e.action.key.encode())],
            now_ms=int(self.clock() * 1000),
        )
        return Output(TOPICS.dlq, e.action.customer_id.encode(), letter)

    # -- tick: deliver, then promote -------------------------------------------------------
    def tick(self) -> list[Output]:
        if (
            self._playbooks_from_files
            and time.monotonic() - self._playbooks_polled >= self.cfg.playbook_reload_interval
        ):
            self._playbooks_polled = time.monotonic()
            self.reload_playbooks()
        if self._dirty:
            self._rebuild()
        outs: list[Output] = []
        outs += self._deliver()
        outs += self._drain_all()  # changes and events that waited (clock: event)
        outs += self._promote()
        outs += self._flush()
        self._refresh_gauges()
        return outs


def _kpi_partition(key: str) -> int | None:
    """The partition a KPI row's key names (``...@<p>``); None for rows written before KPI
    rows were partitioned (they stay in their key's partition)."""
    _, at, part = key.rpartition("@")
    return int(part) if at and part.isdigit() else None


def _reason_label(reason: str | None) -> str:
    """A closed label set: the reason's code before any detail."""
    if not reason:
        return ""
    return reason.split(":")[0].split(" ")[0][:40]
