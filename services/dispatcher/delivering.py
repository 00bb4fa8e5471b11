"""The dispatcher's tick side: promote due steps, pick the in-flight actions whose calls may go
out (vendor pauses, breakers), call the APIs concurrently on the I/O loop, record the outcomes,
refresh the gauges. A mixin of :class:`services.dispatcher.app.Dispatcher` (the attributes and
methods it declares for type checking are the Dispatcher's); moved out of ``app.py``.

A call on a channel whose vendor does not de-duplicate (``Router.at_most_once``: SendGrid mail
send, SMTP, Marketo campaign requests) is recorded as started first: the tick marks the entry
``started`` and the call goes out when the tick's transaction has committed
(:meth:`Delivering.start_calls`, from ``on_commit``). An owner that finds an entry started by
someone else and never settled (a ``kill -9`` while it was under way) does not make it again:
:meth:`Delivering._settle_unknown` fails it as ``ambiguous`` (``core.UNKNOWN_OUTCOME``). Calls
on the other channels go out at once and are repeated with their key after a crash (the vendor
applies them once).

With ``clock: event`` a due step is decided at its due time, whichever tick finds it, and a
customer's due steps are fired before its next record is applied (``_due_first``): the
decisions do not depend on how the input was batched or when the ticks ran, so one instance,
two, and a new owner after ``kill -9`` decide alike (issue #15).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from segflow.runtime.loop import Output
from segflow.runtime.state import ChangelogStore
from services.dispatcher import core, delivery
from services.dispatcher.adapters import (
    CallFailed,
    Rejected,
    Router,
)
from services.dispatcher.backoff import Breaker
from services.dispatcher.experiments import summarise
from services.dispatcher.metrics import (
    ATTEMPTS,
    BREAKER_OPEN,
    CALL_SECONDS,
    KPI,
    PENDING,
    RATE,
    START_WAIT,
    UNKNOWN_OUTCOMES,
    UPLIFT,
)
from services.dispatcher.playbooks import Book
from services.dispatcher.settings import (
    AsyncRunner,
    DispatcherSettings,
)

log = logging.getLogger("segflow.dispatcher")


class Delivering:
    """Promotion and delivery methods of :class:`~services.dispatcher.app.Dispatcher`."""

    if TYPE_CHECKING:  # provided by Dispatcher
        cfg: DispatcherSettings
        book: Book
        clock: Callable[[], float]
        store: ChangelogStore
        router: Router
        runner: AsyncRunner
        _due: list[tuple[int, str]]
        _retry: list[tuple[int, str, str]]
        _calls: list[tuple[list[tuple[core.Customer, core.Action]], Any]]
        _calling: set[str]
        _starting: list[tuple[list[tuple[core.Customer, core.Action]], list[core.Request | None]]]
        _harvested: list[tuple[list[tuple[core.Customer, core.Action]], list[core.Outcome]]]
        _unknown: dict[str, int]
        _started_at: float
        _stopping: bool
        _breakers: dict[str, Breaker]
        _paused: dict[str, float]
        _rng: random.Random
        _kpi_dirty: bool
        _gauges_at: float
        _attempt_counters: dict[tuple[str, str], Any]
        _call_seconds: dict[str, Any]

        def now_ms(self, part: int | None = None) -> int: ...
        def _merges_reread(self, partitions: set[int]) -> None: ...
        def _horizon(self) -> int: ...
        def customer(self, customer_id: str) -> core.Customer | None: ...
        def kpis(self) -> dict[tuple[str, str, str], dict[str, int]]: ...
        def _put(self, c: core.Customer) -> None: ...
        def _index(self, c: core.Customer) -> None: ...
        def _emit(
            self,
            old: core.Customer | None,
            new: core.Customer,
            effects: Iterable[core.Effect],
            now: int,
            part: int,
        ) -> Iterator[Output]: ...
        def _effects(
            self, effects: Iterable[core.Effect], now: int, part: int
        ) -> Iterator[Output]: ...

    @property
    def _keep_in_flight(self) -> bool:
        """A forget leaves in-flight actions to their calls under the event clock (they were
        taken before it in event time; whether their call is still under way is timing)."""
        return self.cfg.clock == "event"

    def _due_first(
        self, old: core.Customer | None, upto: int
    ) -> tuple[core.Customer | None, list[core.Effect]]:
        """The customer, with its steps due by ``upto`` (the time its next record is applied
        at) fired first, each at its due time under the event clock: what a tick would have
        done had it run before this record, so a change or event finds the same ledger
        however the records were batched and ticks fell. The caller writes the result
        (compared with ``old``) with the record's own changes."""
        if old is None:
            return None, []
        return core.fire_due(old, upto, self.book, self.cfg.clock == "event")

    def _promote(self) -> list[Output]:
        horizon = self._horizon()
        outs: list[Output] = []
        seen: set[str] = set()
        later: list[tuple[int, str]] = []  # due on a partition whose clock is behind
        while self._due and self._due[0][0] <= horizon and len(seen) < self.cfg.promote_batch:
            due, cid = heapq.heappop(self._due)
            if cid in seen:  # pushed again by this tick (a step held by quiet hours): later
                later.append((due, cid))
                continue
            part = self.store.partition_of(cid)
            now = self.now_ms(part)
            if due > now:
                later.append((due, cid))
                continue
            seen.add(cid)
            old = self.customer(cid)
            if old is None:
                continue
            # under the event clock each step at its due time: the same decisions whenever
            # this tick runs (the clock it reads depends on how the records were batched)
            new, effects = core.fire_due(old, now, self.book, self.cfg.clock == "event")
            outs += self._emit(old, new, effects, now, part)
        for entry in later:
            heapq.heappush(self._due, entry)
        return outs

    def _select(
        self, wall_ms: int, once_quota: int
    ) -> tuple[list[tuple[core.Customer, core.Action]], list[tuple[core.Customer, core.Action]]]:
        """Committed in-flight actions whose retry time has come, endpoints permitting; and
        those an earlier owner recorded as started and never settled (not to be called again).
        At most ``once_quota`` calls on at-most-once channels: each one recorded as started
        goes out at once (what is started and still waiting for a connection at a crash is
        lost), the next ones wait for a later tick."""
        picked: list[tuple[core.Customer, core.Action]] = []
        orphans: list[tuple[core.Customer, core.Action]] = []
        later: list[tuple[int, str, str]] = []
        probes: set[str] = set()
        keys: set[str] = set()
        cache: dict[str, core.Customer | None] = {}
        wall = wall_ms / 1000
        while self._retry and self._retry[0][0] <= wall_ms and len(picked) < self.cfg.max_batch:
            entry = heapq.heappop(self._retry)
            _, cid, key = entry
            if cid not in cache:
                cache[cid] = self.customer(cid)
            cust = cache[cid]
            action = cust.action(key) if cust is not None else None
            if (
                action is None
                or action.status != "in_flight"
                or action.retry_at > entry[0]
                or key in keys
                or key in self._calling
            ):
                continue  # stale or duplicate index entry
            keys.add(key)
            if action.started:  # started by an earlier owner (this one is not calling it)
                orphans.append((cust, action))  # type: ignore[arg-type]
                continue
            once = self.router.at_most_once(action.channel)
            if once and once_quota <= 0:
                later.append(entry)  # the calls recorded as started go first
                break
            adapter = self.router.for_channel(action.channel)
            endpoint = adapter.endpoint if adapter is not None else action.channel
            breaker = self._breakers.get(endpoint, Breaker())
            hold = delivery.hold_until(
                breaker, self._paused.get(endpoint, 0.0), wall, endpoint in probes
            )
            if hold is not None:
                later.append((int(hold * 1000), cid, key))
                continue
            if breaker.state == "open":
                probes.add(endpoint)  # half-open: this tick's one probe
            once_quota -= once
            picked.append((cust, action))  # type: ignore[arg-type]
        for at, cid, key in later:
            # Held back in memory only (the durable retry_at is unchanged and earlier).
            heapq.heappush(self._retry, (at, cid, key))
        return picked, orphans

    def _deliver(self) -> list[Output]:
        """Record the outcomes of finished calls, then start calls for what is due: at once,
        or (at-most-once channels) recorded as started in this tick's transaction and made
        when it commits (``start_calls``)."""
        outs = self._harvest()
        if self._stopping or len(self._calling) >= 4 * self.cfg.concurrency:
            return outs  # stopping, or enough under way (the rest waits in the retry index)
        picked, orphans = self._select(
            int(self.clock() * 1000), self.cfg.concurrency - len(self._calling)
        )
        if orphans:
            outs += self._settle_unknown(orphans)
        now = [(c, a) for c, a in picked if not self.router.at_most_once(a.channel)]
        first = [(c, a) for c, a in picked if self.router.at_most_once(a.channel)]
        if now:
            requests = [core.request_for(c, a, self.book) for c, a in now]
            self._calling.update(a.key for _, a in now)
            self._calls.append((now, self.runner.submit(self._call_all(requests))))
        if first:
            started: list[tuple[core.Customer, core.Action]] = []
            for _, a in first:
                current = self.customer(a.customer_id)
                if current is None:
                    continue
                current = core.start_call(current, a.key)
                self._put(current)
                started.append((current, a))
            requests = [core.request_for(c, a, self.book) for c, a in started]
            self._calling.update(a.key for _, a in started)
            self._starting.append((started, requests))
            self._started_at = time.perf_counter()
        return outs

    def start_calls(self) -> None:
        """The tick's transaction committed: make the calls it recorded as started, each on
        its own (its place under the quota frees when it ends, not when its batch does)."""
        if self._starting:
            wait = time.perf_counter() - self._started_at
            for picked, requests in self._starting:
                for one, req in zip(picked, requests, strict=True):
                    self._calls.append(([one], self.runner.submit(self._call_all([req]))))
                    START_WAIT.observe(wait)
        self._starting.clear()
        self._harvested.clear()
        for channel, n in self._unknown.items():
            UNKNOWN_OUTCOMES.labels(channel).inc(n)
        self._unknown.clear()

    def forget_uncommitted(self) -> None:
        """The transaction aborted (the store rolled back): the calls it recorded as started
        are not made (their entries are in flight, not started, and picked again); outcomes
        it recorded are recorded again at the next tick (the calls were made)."""
        for picked, _ in self._starting:
            self._calling.difference_update(a.key for _, a in picked)
        self._starting.clear()
        for picked, outcomes in self._harvested:
            done: concurrent.futures.Future[list[core.Outcome]] = concurrent.futures.Future()
            done.set_result(outcomes)
            self._calling.update(a.key for _, a in picked)
            self._calls.append((picked, done))
        self._harvested.clear()
        self._unknown.clear()

    def _settle_unknown(self, orphans: list[tuple[core.Customer, core.Action]]) -> list[Output]:
        """Entries an earlier owner recorded as started and never settled: failed as
        ``ambiguous`` (``core.UNKNOWN_OUTCOME``), not called again (at most once)."""
        olds: dict[str, core.Customer] = {}
        by_customer: dict[str, core.Customer] = {}
        effects: dict[int, list[core.Effect]] = {}
        for _, action in orphans:
            cid = action.customer_id
            current = by_customer.get(cid) or self.customer(cid)
            if current is None:
                continue
            olds.setdefault(cid, current)
            part = self.store.partition_of(cid)
            new, more = core.unknown_outcome(
                current, action.key, self._settled_at(action, part), self.book
            )
            by_customer[cid] = new
            effects.setdefault(part, []).extend(more)
            self._unknown[action.channel] = self._unknown.get(action.channel, 0) + 1
        log.warning(
            "calls started by an earlier owner, outcome unknown: not made again",
            extra={"fields": {"actions": len(orphans)}},
        )
        return self._settle(olds, by_customer, effects)

    def _settled_at(self, action: core.Action, part: int) -> int:
        """Under the event clock an outcome is settled at the action's event time (when it
        went out), not at the clock the tick reads: the settled time is what "no engagement
        since" counts from, and it is on the result."""
        if self.cfg.clock == "event":
            return max(action.due_at, action.decided_at)
        return self.now_ms(part)

    def _settle(
        self,
        olds: dict[str, core.Customer],
        by_customer: dict[str, core.Customer],
        effects: dict[int, list[core.Effect]],
    ) -> list[Output]:
        outs: list[Output] = []
        for part, part_effects in effects.items():  # KPI rows written once per tick
            outs += self._effects(part_effects, self.now_ms(part), part)
        for cid, new in by_customer.items():
            if new != olds[cid]:
                self._put(new)
                self._index(new)
        return outs

    def _harvest(self, wait: float = 0.0) -> list[Output]:
        """Settle the calls that have finished (waiting up to ``wait`` seconds for them)."""
        if wait and self._calls:
            concurrent.futures.wait([f for _, f in self._calls], timeout=wait)
        done = [(picked, f) for picked, f in self._calls if f.done()]
        if not done:
            return []
        self._calls = [(picked, f) for picked, f in self._calls if not f.done()]
        olds: dict[str, core.Customer] = {}
        by_customer: dict[str, core.Customer] = {}
        effects: dict[int, list[core.Effect]] = {}  # per partition
        for picked, future in done:
            outcomes = future.result()
            self._harvested.append((picked, outcomes))  # recorded again if the tick aborts
            for (_, action), outcome in zip(picked, outcomes, strict=True):
                self._calling.discard(action.key)
                cid = action.customer_id
                current = by_customer.get(cid) or self.customer(cid)
                if current is None:
                    continue  # forgotten meanwhile, or its partition moved to another instance
                olds.setdefault(cid, current)
                part = self.store.partition_of(cid)
                outcome = self._finish(action, outcome)
                at = self._settled_at(action, part)
                new, more = core.record_outcome(current, action.key, outcome, at, self.book)
                by_customer[cid] = new
                effects.setdefault(part, []).extend(more)
        return self._settle(olds, by_customer, effects)

    def drain(self, timeout: float) -> None:
        """Before a clean stop: wait for the calls under way so the final tick records them
        (a call whose outcome is not committed is made again, with its key, after a restart)."""
        self._stopping = True  # the final tick records outcomes and starts no new call
        if self._calls:
            concurrent.futures.wait([f for _, f in self._calls], timeout=timeout)

    def before_revoke(self, partitions: set[int], timeout: float) -> int:
        """A rebalance takes ``partitions`` away: wait (up to ``timeout`` s) for the calls under
        way so the tick the loop runs next records their outcomes while this instance still
        owns them (else the new owner, finding them in_flight, makes them again: a second
        email where the vendor does not de-duplicate). That tick starts no new call. Returns
        the calls for ``partitions`` still under way (their new owner makes them again)."""
        log.info(
            "finishing calls before revoke",
            extra={"fields": {"calls": sum(len(picked) for picked, _ in self._calls)}},
        )
        self.drain(timeout)
        self._merges_reread(partitions)  # if kept, they are read again from the commit point
        return sum(
            1
            for picked, future in self._calls
            if not future.done()
            for _, action in picked
            if self.store.partition_of(action.customer_id) in partitions
        )

    def _finish(self, action: core.Action, outcome: core.Outcome) -> core.Outcome:
        """A raw retry becomes a scheduled retry time, or a failure once attempts run out."""
        return delivery.after_attempt(
            action.attempt,
            outcome,
            now_ms=int(self.clock() * 1000),
            max_attempts=self.cfg.max_attempts,
            backoff_base=self.cfg.backoff_base,
            backoff_cap=self.cfg.backoff_cap,
            jitter=self._rng.random(),
        )

    async def _call_all(self, requests: list[core.Request | None]) -> list[core.Outcome]:
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(req: core.Request | None) -> core.Outcome:
            async with sem:
                return await self._call(req)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _call(self, req: core.Request | None) -> core.Outcome:
        """One attempt. ``Outcome.retry_at`` carries the server's Retry-After (ms) here."""
        if req is None:
            return core.Outcome("failed", detail="playbook_removed")
        if req.problem is not None:  # could not be rendered: fail, never send a partial text
            return core.Outcome("failed", detail=req.problem)
        adapter = self.router.for_channel(req.channel)
        if adapter is None:
            return core.Outcome("failed", detail=f"no_adapter: {req.channel}")
        endpoint = adapter.endpoint
        started = time.perf_counter()
        now = self.clock()
        try:
            sent = await adapter.send(req)
        except CallFailed as exc:
            self._attempts(endpoint, "retry").inc()
            self._on_failure(endpoint, exc.pause)
            return core.Outcome(
                "retry", exc.status, endpoint, str(exc), retry_at=int((exc.retry_after or 0) * 1000)
            )
        except Rejected as exc:
            self._attempts(endpoint, "failed").inc()
            return core.Outcome(
                "failed", exc.status, endpoint, str(exc), dispatched_at=int(now * 1000)
            )
        except Exception as exc:  # an adapter bug: retry later, never lose the action
            log.exception("adapter error", extra={"fields": {"endpoint": endpoint}})
            self._attempts(endpoint, "retry").inc()
            self._on_failure(endpoint, None)
            return core.Outcome("retry", None, endpoint, f"error: {type(exc).__name__}")
        finally:
            seconds = self._call_seconds.get(endpoint)
            if seconds is None:
                seconds = self._call_seconds[endpoint] = CALL_SECONDS.labels(endpoint)
            seconds.observe(time.perf_counter() - started)
        self._attempts(endpoint, "sent").inc()
        breaker = self._breakers.get(endpoint)
        if breaker is None or breaker.failures or breaker.opened_at is not None:
            self._breakers[endpoint] = (breaker or self._new_breaker()).success()
        if sent.pause:
            self._paused[endpoint] = max(self._paused.get(endpoint, 0.0), now + sent.pause)
        return core.Outcome("sent", sent.status, endpoint, dispatched_at=int(now * 1000))

    def _attempts(self, endpoint: str, outcome: str) -> Any:
        """The attempts counter's child (labels() costs a lock and a lookup per call)."""
        child = self._attempt_counters.get((endpoint, outcome))
        if child is None:
            child = self._attempt_counters[(endpoint, outcome)] = ATTEMPTS.labels(endpoint, outcome)
        return child

    def _new_breaker(self) -> Breaker:
        return Breaker(self.cfg.breaker_threshold, self.cfg.breaker_cooldown)

    def _on_failure(self, endpoint: str, pause: float | None) -> None:
        now = self.clock()
        breaker = self._breakers.get(endpoint, self._new_breaker())
        was_open = breaker.state == "open"
        breaker = self._breakers[endpoint] = breaker.failure(now)  # a failed probe re-opens it
        if breaker.state == "open" and not was_open:
            log.warning("circuit opened", extra={"fields": {"endpoint": endpoint}})
        if pause:
            self._paused[endpoint] = max(self._paused.get(endpoint, 0.0), now + pause)

    # -- gauges ------------------------------------------------------------------------
    def _refresh_gauges(self) -> None:
        for endpoint, b in self._breakers.items():
            BREAKER_OPEN.labels(endpoint).set(1 if b.state == "open" else 0)
        PENDING.labels("scheduled").set(len(self._due))
        PENDING.labels("in_flight").set(len(self._retry))
        if not self._kpi_dirty or time.monotonic() - self._gauges_at < 2.0:
            return
        self._kpi_dirty = False
        self._gauges_at = time.monotonic()
        rows = [(s, p, v, c) for (s, p, v), c in self.kpis().items()]
        for k in summarise(rows):
            labels = (k.segment, k.playbook, k.variant)
            for name, value in k.counts.items():
                KPI.labels(*labels, name).set(value)
            rates = {
                "open": k.open_rate,
                "click": k.click_rate,
                "conversion": k.conversion_rate,
                "unsubscribe": k.unsubscribe_rate,
                "churn": k.churn_rate,
            }
            for name, rate in rates.items():
                if rate is not None:
                    RATE.labels(*labels, name).set(rate)
            if k.uplift is not None:
                UPLIFT.labels(*labels, "estimate").set(k.uplift)
                UPLIFT.labels(*labels, "low").set(k.uplift_low or 0.0)
                UPLIFT.labels(*labels, "high").set(k.uplift_high or 0.0)
