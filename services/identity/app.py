"""Wiring of the identity service: hashing, the changelog store, the shared loop.

The graph logic is :mod:`services.identity.core`; this module turns raw events into the core's
inputs (validated, normalised, keyed-hashed identifiers), applies the core's state writes
through a :class:`ChangelogStore` (same Kafka transaction as the outputs and offsets), and
produces ``IdentifiedEvent`` and ``IdentityMerge`` records. De-duplication by ``event_id``
is :mod:`services.identity.seen` (8-byte hashes in ``segflow.identity.dedup``, global across
input partitions). Its settings are :mod:`services.identity.settings` (re-exported here). One
instance owns the whole graph: run a single replica (its consumer group takes every partition
of ``segflow.events``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from segflow.errors import InvalidRecord
from segflow.events import validate_event
from segflow.runtime.dlq import dead_letter
from segflow.runtime.loop import Incoming, LoopConfig, Output, ProcessingLoop
from segflow.runtime.metrics import DLQ_RECORDS
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import ContactPoints, Keyring, VaultError, VaultSettings
from services.identity import core
from services.identity.hashing import _long
from services.identity.hashing import email_hash as email_hash
from services.identity.hashing import node_hasher as node_hasher
from services.identity.ordering import InputOrder
from services.identity.seen import SeenIds
from services.identity.settings import IdentitySettings as IdentitySettings

SERVICE = "identity"
log = logging.getLogger("segflow.identity")

EVENTS = Counter("segflow_identity_events_total", "Events by outcome", ["outcome"])
MERGES = Counter("segflow_identity_merges_total", "Profiles absorbed by merges", ["cause"])
CONFLICTS = Counter(
    "segflow_identity_conflicts_total", "Merges refused by a strong-identifier rule", ["type"]
)
LIMIT_HITS = Counter(
    "segflow_identity_limit_hits_total",
    "Identifiers not linked because of a limit",
    ["type", "limit"],
)
RELINKS = Counter(
    "segflow_identity_relinks_total",
    "Weak identifiers moved to a strong identifier's profile",
    ["type"],
)
NEW_PROFILES = Counter("segflow_identity_profiles_created_total", "New profiles")
EXPIRED = Counter("segflow_identity_dedup_expired_total", "Event ids that left the window")
LATENCY = Histogram(
    "segflow_identity_process_seconds",
    "Time to identify one event (validate, hash, link, build outputs; 1 in 16 sampled)",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05),
)
_IDENTIFIED = EVENTS.labels("identified")
_DUPLICATE = EVENTS.labels("duplicate")
_FORGOTTEN_HIT = EVENTS.labels("forgotten")
FORGET_REQUESTS = Counter(
    "segflow_identity_forget_requests_total", "Forget requests handled", ["found"]
)
STATE_KEYS = Gauge("segflow_identity_state_keys", "Entries in the identity state", ["kind"])
VAULT_WRITES = Counter(
    "segflow_identity_vault_writes_total",
    "Contact vault records written (seen: a new or newly primary contact point; merged; "
    "forgotten: tombstones)",
    ["cause"],
)
#: The property that carries a phone number: moved into the vault, removed from the event.
PHONE_PROPERTY = "phone"
#: ``event_type`` of the record identity writes keyed by an absorbed id when it merges it
#: (after every event of that id): the IdentifiedEvent's ``merge`` names the survivor.
MERGED_EVENT = "customer_merged"


def merge_mark(outcomes: tuple[core.LinkOutcome, ...]) -> dict[str, Any] | None:
    """The ``merge`` field of a merge-causing event's IdentifiedEvent (None: no merge): the
    survivor (the event's customer id) and every id it absorbed with this event."""
    for outcome in outcomes:
        if isinstance(outcome, core.Merged):
            return {"survivor_id": outcome.survivor, "absorbed_ids": list(outcome.absorbed)}
    return None


class EventChecks:
    """The per-event checks the one-process service and the front stage share: validate,
    hash the identifiers, and dead-letter an invalid event without its contact points."""

    serde: Serde
    rules: core.Rules
    config: IdentitySettings
    _hasher: core.Hasher
    _cache: dict[tuple[str, str], str]
    _max_future_ms: int

    def _identifiers(self, record: Incoming, now_ms: int) -> tuple[str, ...] | Output:
        """The event's hashed identifiers, or the DLQ entry of an invalid event that carries
        a contact point (raises :class:`InvalidRecord` for one that carries none: the loop
        dead-letters its bytes as they came)."""
        event = record.value
        try:
            validate_event(event, now_ms, self._max_future_ms)
            if len(self._cache) > self.config.hash_cache_size:
                self._cache.clear()
            ids = core.identifiers(event, self.rules, self._hasher, self._cache)
            if not ids:
                raise InvalidRecord(
                    f"event {event['event_id']} has no usable identifier (all blocked)",
                    reason="no_identifier",
                )
        except InvalidRecord as exc:
            if event.get("email") is None and PHONE_PROPERTY not in (event.get("properties") or {}):
                raise  # nothing personal: the loop dead-letters the bytes as they came
            return self._redacted_dead_letter(record, exc, now_ms)
        return ids

    def _redacted_dead_letter(self, record: Incoming, exc: Exception, now_ms: int) -> Output:
        """The DLQ entry of an invalid event that carries a contact point: the event without
        its email and phone (and without its key when that looks like an address), so the raw
        address never reaches the DLQ topic."""
        event = {
            **record.value,
            "email": None,
            "properties": {
                k: v
                for k, v in (record.value.get("properties") or {}).items()
                if k != PHONE_PROPERTY
            },
        }
        try:
            value: bytes | None = self.serde.encode(TOPICS.events, event)
        except Exception:  # noqa: BLE001 - an event the schema refuses: keep nothing of it
            value = None
        key = record.key.encode() if isinstance(record.key, str) else record.key
        if key is not None and (b"@" in key or key.strip().startswith(b"+")):
            key = None
        letter = dead_letter(
            service=SERVICE,
            error=exc,
            topic=record.topic_name,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
            key=key,
            value=value,
            headers=record.headers,
            now_ms=now_ms,
        )
        letter["detail"] = (letter["detail"] + " (email and phone removed)")[:1000]
        DLQ_RECORDS.labels(SERVICE, letter["reason"]).inc()
        log.warning(
            "record dead-lettered",
            extra={
                "fields": {
                    "reason": letter["reason"],
                    "topic": record.topic_name,
                    "partition": record.partition,
                    "offset": record.offset,
                }
            },
        )
        return Output(TOPICS.dlq, key, letter)


class IdentityService(EventChecks):
    """The handler, tick and hooks of the identity loop around one :class:`ChangelogStore`."""

    def __init__(
        self,
        settings: Settings,
        config: IdentitySettings | None = None,
        store: ChangelogStore | None = None,
        clock: Callable[[], float] = time.time,
        keyring: Keyring | None = None,
        vault: ChangelogStore | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or IdentitySettings()
        self.rules = self.config.rules()
        self.serde = Serde.from_settings(settings)
        # One graph for the whole deployment (a single identity instance): not partitioned.
        self.store = store or ChangelogStore(
            settings, TOPICS.identity_state, self.serde, partitioned=False
        )
        #: The contact vault (raw email and phone, encrypted per customer); None without
        #: SEGFLOW_VAULT_KEY: addresses are then only hashed and dropped, as before.
        self.keyring = keyring if keyring is not None else VaultSettings().keyring()
        self.vault: ChangelogStore | None = None
        if self.keyring is not None:
            self.vault = vault or ChangelogStore(
                settings, TOPICS.contact_vault, self.serde, partitioned=False
            )
        else:
            log.warning(
                "contact vault off: SEGFLOW_VAULT_KEY is not set, so raw emails are hashed "
                "and dropped and the dispatcher's email channel has no addresses"
            )
        #: customer -> keyed digest of the contact points last made primary: an event repeating
        #: them (every email_open carries the address) skips decrypting the record
        self._primary: dict[str, bytes] = {}
        self.clock = clock
        self._identified_header: bytes | None = None
        self._secret = settings.hash_secret.get_secret_value()
        self._primary_key = hashlib.sha256(b"vault-primary\x00" + self._secret.encode()).digest()
        self._hasher = node_hasher(self._secret)
        self._cache: dict[tuple[str, str], str] = {}
        self._max_future_ms = int(self.config.max_future_skew_s * 1000)
        #: the de-duplication window (global across input partitions) and its changelog
        self.seen = SeenIds(settings, self.rules.dedup_window_ms, self.serde)
        #: the input order (events of several partitions applied in an order of the input)
        self.order = InputOrder(
            self.store,
            TOPICS.events.name(settings),
            self.config.order_idle_ms,
            self.config.batch_size,
        )
        self._n = 0
        self._logged_conflicts: OrderedDict[tuple[str, str | None], None] = OrderedDict()

    # -- lifecycle -------------------------------------------------------------------------
    def restore(self) -> int:
        """Load the graph, the de-duplication window (its chunks, and the ``e:`` entries of
        earlier releases in the graph's changelog) and the vault, whose only writer this
        service is."""
        n = self.store.restore()
        if self.vault is not None:
            n += self.vault.restore()
        n += self.seen.restore(self.store.items())
        self.order.reload()
        self._refresh_gauges()
        return n

    def on_commit(self) -> None:
        pass  # the window's hook (self.seen) commits itself

    def on_abort(self) -> None:
        self._primary.clear()  # the vault store rolled back

    def loop(self, **overrides: Any) -> ProcessingLoop:
        """The processing loop over ``segflow.events`` (overrides go to :class:`LoopConfig`)."""
        prefix = self.settings.topic_prefix
        options: dict[str, Any] = {
            "service": SERVICE,
            "group_id": self.config.group_id or prefix + "identity",
            "sources": {
                TOPICS.events.name(self.settings): TOPICS.events,
                TOPICS.forget.name(self.settings): TOPICS.forget,
            },
            "transactional_id": self.config.transactional_id or prefix + "identity-0",
            "batch_size": self.config.batch_size,
        }
        options.update(overrides)
        loop = ProcessingLoop(
            self.settings,
            LoopConfig(**options),
            self.handle,
            serde=self.serde,
            hooks=[
                self.store,
                *([self.vault] if self.vault is not None else []),
                self.seen,
                self.order,  # after the store: reads its o: entries on abort
                self,
            ],
            clock=self.clock,
            tick=self.tick,
            commit_point=self.order.point,
        )
        self.order.loop = loop
        return loop

    # -- per event -------------------------------------------------------------------------
    def handle(self, record: Incoming) -> Iterator[Output]:
        """A forget request is applied on arrival; an event waits for its turn in the input
        order (:mod:`services.identity.ordering`), and the events then due are applied."""
        if record.topic is TOPICS.forget:
            yield from self._forget(record.value)
            return
        now_ms = int(self.clock() * 1000)
        order = self.order
        try:
            ids = self._identifiers(record, now_ms)
        except InvalidRecord:
            if order.replayed(record):
                return  # dead-lettered before the restore
            order.skipped(record)
            raise
        if isinstance(ids, Output):
            if not order.replayed(record):
                order.skipped(record)
                yield ids
            return
        for due, due_ids in order.receive(record, ids, now_ms):
            yield from self._apply_safely(due, due_ids)

    def _apply_safely(self, record: Incoming, ids: tuple[str, ...]) -> Iterator[Output]:
        """A due event's outputs; one that fails is dead-lettered (as the loop does for the
        record in hand), not the record that made it due."""
        try:
            outputs = list(self._apply(record, ids))
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the service
            log.exception("event failed", extra={"fields": {"offset": record.offset}})
            yield self._redacted_dead_letter(record, exc, int(self.clock() * 1000))
            return
        yield from outputs

    def _apply(self, record: Incoming, ids: tuple[str, ...]) -> Iterator[Output]:
        """Place one valid event in the graph: de-duplicate, link, identified event,
        merges, state, vault."""
        started = time.perf_counter()
        event = record.value
        now_ms = int(self.clock() * 1000)
        item = core.IdentityInput(event["event_id"], event["occurred_at"], ids)
        seen = self.seen.window
        h = self.seen.digest(item.event_id)
        if h in seen:  # whichever partition the first copy came from
            _DUPLICATE.inc()
            seen.advance(record.partition, item.occurred_at)
            return
        step = core.link(self.store.table, item, self.rules, dedup=False)
        if step.customer_id is None:
            _FORGOTTEN_HIT.inc()
            seen.advance(record.partition, item.occurred_at)
            return
        for outcome in step.outcomes:
            yield from self._outcome(outcome, now_ms)
        email = event.get("email")
        props = event.get("properties") or {}
        phone = props.get(PHONE_PROPERTY)
        identified: dict[str, Any] | bytes
        if phone is not None:  # a contact point: the vault keeps it, the event does not
            event = {**event, "properties": {k: v for k, v in props.items() if k != PHONE_PROPERTY}}
        mark = merge_mark(step.outcomes)
        if (
            mark is None
            and email is None
            and phone is None
            and record.raw is not None
            and self.serde.written_with_current(TOPICS.events, record.raw)
        ):
            identified = self._identified_bytes(step.customer_id, record.raw, now_ms)
        else:
            identified = {
                "customer_id": step.customer_id,
                "event": {**event, "email": None},
                "email_hash": email_hash(self._secret, email) if email else None,
                "identified_at": now_ms,
                "merge": mark,
            }
        yield Output(TOPICS.identified, step.customer_id, identified)
        # State last: if an output above failed to encode, the record is dead-lettered and
        # the in-memory table was not touched.
        store = self.store
        for key, value in step.writes:
            yield store.put(key, value) if value is not None else store.delete(key)
        if self.vault is not None:
            for outcome in step.outcomes:
                if isinstance(outcome, core.Merged):
                    for absorbed in outcome.absorbed:
                        yield from self._vault_merge(outcome.survivor, absorbed, now_ms)
            if email or phone:
                yield from self._vault_seen(step.customer_id, email, phone, now_ms)
        seen.add(record.partition, h, item.occurred_at, record.offset)  # chunk: before_commit
        _IDENTIFIED.inc()
        self._n += 1
        if not self._n & 15:  # a sample is enough for the histogram
            LATENCY.observe(time.perf_counter() - started)

    def _identified_bytes(
        self, customer_id: str, raw: bytes, now_ms: int, hashed_email: str | None = None
    ) -> bytes:
        """The IdentifiedEvent of an event without email, as bytes: its fields are
        ``customer_id``, the event, ``email_hash`` and ``identified_at`` in that order, so the
        event's body is spliced in as consumed instead of decoded into a dict and encoded
        again (byte for byte what encoding ``{**event, "email": None}`` gives, as its email is
        already null; about 12 us of ~90 per event)."""
        if self._identified_header is None:
            self._identified_header = b"\x00" + self.serde.schema_id(TOPICS.identified).to_bytes(
                4, "big"
            )
        cid = customer_id.encode()
        email = b"\x00"  # union branch 0: null
        if hashed_email is not None:
            digest = hashed_email.encode()
            email = b"\x02" + _long(len(digest)) + digest
        return b"".join(
            (self._identified_header, _long(len(cid)), cid, raw[5:], email, _long(now_ms), b"\x00")
        )  # the last byte: ``merge`` null (union branch 0)

    # -- contact vault ---------------------------------------------------------------------
    def _vault_points(self, cid: str) -> tuple[dict[str, Any] | None, ContactPoints]:
        """The customer's vault record and its contact points (none when it does not open:
        it is then replaced with a record under a new data key)."""
        assert self.vault is not None and self.keyring is not None
        record = self.vault.get(cid)
        if record is None:
            return None, ContactPoints()
        try:
            return record, self.keyring.open(record)
        except VaultError as exc:
            log.warning(
                "vault record unreadable, replaced",
                extra={"fields": {"customer_id": cid, "error": str(exc)}},
            )
            return None, ContactPoints()

    def _vault_seen(
        self, cid: str, email: str | None, phone: str | None, now_ms: int
    ) -> Iterator[Output]:
        """Record a raw email / phone as the customer's most recent contact point."""
        assert self.vault is not None and self.keyring is not None
        address = core.normalize("email", email) if email else None
        if address is not None and ("@" not in address or self.rules.is_blocked(address)):
            address = None  # placeholders and test addresses are not contact points
        number = phone.strip() if phone and phone.strip() else None
        if address is None and number is None:
            return
        digest = hashlib.blake2b(
            f"{address}\x00{number}".encode(), key=self._primary_key, digest_size=16
        ).digest()
        if self._primary.get(cid) == digest:
            return  # the same points as last time: already the primary ones
        record, points = self._vault_points(cid)
        updated = points.seen(address, number)
        if len(self._primary) > self.config.hash_cache_size:
            self._primary.clear()
        self._primary[cid] = digest
        if updated is points and record is not None:
            return  # nothing new: no write
        VAULT_WRITES.labels("seen").inc()
        yield self.vault.put(cid, self.keyring.reseal(record, cid, updated, now_ms))

    def _vault_merge(self, survivor: str, absorbed: str, now_ms: int) -> Iterator[Output]:
        """Move the absorbed profile's contact points to the survivor's record (sealed with
        the survivor's data key); the absorbed record is deleted with its data key."""
        assert self.vault is not None and self.keyring is not None
        self._primary.pop(absorbed, None)
        gone, theirs = self._vault_points(absorbed)
        if self.vault.get(absorbed) is None:
            return
        if gone is not None and (theirs.emails or theirs.phones):
            record, ours = self._vault_points(survivor)
            merged = ours.absorb(theirs)
            yield self.vault.put(survivor, self.keyring.reseal(record, survivor, merged, now_ms))
        VAULT_WRITES.labels("merged").inc()
        yield self.vault.delete(absorbed)

    def _forget(self, request: dict[str, Any]) -> Iterator[Output]:
        """Erase the profile, then tell downstream in the customer's own partition order:
        a ``customer_forgotten`` event on the identified topic, after every earlier event."""
        cid = str(request["customer_id"])
        writes = core.forget(self.store.table, cid, int(request["requested_at"]))
        FORGET_REQUESTS.labels("yes" if writes else "no").inc()
        log.info(
            "customer forgotten", extra={"fields": {"customer_id": cid, "entries": len(writes)}}
        )
        yield Output(
            TOPICS.identified,
            cid,
            {
                "customer_id": cid,
                "event": {
                    "event_id": str(request["request_id"]),
                    "event_type": "customer_forgotten",
                    "occurred_at": int(request["requested_at"]),
                    "properties": {},
                },
                "email_hash": None,
                "identified_at": int(self.clock() * 1000),
            },
        )
        for key, value in writes:
            yield self.store.put(key, value) if value is not None else self.store.delete(key)
        self._primary.pop(cid, None)
        if self.vault is not None and self.vault.get(cid) is not None:
            # The record held the only copy of the customer's data key: crypto-shredded.
            VAULT_WRITES.labels("forgotten").inc()
            yield self.vault.delete(cid)

    def _outcome(self, outcome: core.LinkOutcome, now_ms: int) -> Iterator[Output]:
        if isinstance(outcome, core.Merged):
            for absorbed, cause in zip(outcome.absorbed, outcome.causes, strict=True):
                cause_type = core.TYPE_OF_CODE[cause[0]]
                MERGES.labels(cause_type).inc()
                merge_id = (
                    "m-"
                    + hashlib.sha256(f"{outcome.event_id}\x00{absorbed}".encode()).hexdigest()[:16]
                )
                # the absorbed id's last record in its identified partition, after all its
                # events and before the causing event (which may share the partition)
                yield Output(
                    TOPICS.identified,
                    absorbed,
                    {
                        "customer_id": absorbed,
                        "event": {
                            "event_id": merge_id,
                            "event_type": MERGED_EVENT,
                            "occurred_at": outcome.occurred_at,
                            "properties": {},
                        },
                        "email_hash": None,
                        "identified_at": now_ms,
                        "merge": {"survivor_id": outcome.survivor, "absorbed_ids": [absorbed]},
                    },
                )
                yield Output(
                    TOPICS.merges,
                    absorbed,
                    {
                        "merge_id": merge_id,
                        "survivor_id": outcome.survivor,
                        "absorbed_ids": [absorbed],
                        "cause_identifier_type": cause_type,
                        "cause_identifier_hash": cause[2:],
                        "event_id": outcome.event_id,
                        "occurred_at": outcome.occurred_at,
                        "merged_at": now_ms,
                        "in_identified": True,
                    },
                )
        elif isinstance(outcome, core.Conflict):
            CONFLICTS.labels(outcome.identifier_type).inc()
            pair = (outcome.kept, outcome.other)
            if pair not in self._logged_conflicts:  # once per pair of profiles, not per event
                self._logged_conflicts[pair] = None
                if len(self._logged_conflicts) > 10_000:
                    self._logged_conflicts.popitem(last=False)
                log.info(
                    "strong identifier conflict: profiles kept apart",
                    extra={
                        "fields": {
                            "type": outcome.identifier_type,
                            "kept": outcome.kept,
                            "other": outcome.other,
                            "via": outcome.via[0],
                        }
                    },
                )
        elif isinstance(outcome, core.LimitHit):
            LIMIT_HITS.labels(outcome.identifier_type, outcome.limit).inc()
        elif isinstance(outcome, core.Relinked):
            RELINKS.labels(outcome.identifier_type).inc()
        elif isinstance(outcome, core.NewProfile):
            NEW_PROFILES.inc()

    # -- timers ----------------------------------------------------------------------------
    def tick(self) -> Iterator[Output]:
        """Expire event ids that left the de-duplication window (event time), and move
        ``e:`` entries of earlier releases into chunks; apply the events due once idle
        input partitions are not waited for."""
        released = False
        for due, due_ids in self.order.tick(int(self.clock() * 1000)):
            released = True
            yield from self._apply_safely(due, due_ids)
        if released:  # with the window's chunks of the events it applied
            yield from self.order.checkpoints()
            yield from self.seen.before_commit()
        outputs, n = self.seen.expire()
        migrated = self.seen.migrate(self.store)
        yield from outputs
        yield from migrated
        if n:
            EXPIRED.inc(n)
        if outputs or migrated:
            self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        STATE_KEYS.labels("seen").set(len(self.seen))
        STATE_KEYS.labels("graph").set(max(0, len(self.store) - len(self.seen.legacy)))
