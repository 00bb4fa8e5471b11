"""The dispatcher's internal read-only endpoints (for the API gateway).

* ``GET /health`` — the service answers; actions waiting; endpoints whose breaker is open;
* ``GET /kpis`` — campaign KPIs per segment × playbook × variant: counts, rates and the
  conversion uplift vs the holdout with its 95 % interval (computed from the ledger on request);
* ``GET /customers/<customer_id>`` — the customer's suppressions, experiment assignments,
  pending actions (scheduled or in flight) and settled ones (sent, suppressed, failed, holdout).

Served by :func:`segflow.runtime.internal_api.serve` on ``SEGFLOW_DISPATCHER_API_PORT`` (127.0.0.1).
The routes read the ledger records and figures published after each commit of the dispatcher's
store (:mod:`segflow.runtime.snapshot`): one committed ledger, never a batch half written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from segflow.runtime.internal_api import InternalServer, NotFound, Params, Query, Routes, serve
from segflow.runtime.snapshot import Published
from segflow.runtime.topics import TOPICS
from services.dispatcher import core, experiments
from services.dispatcher.app import KPI_PREFIX, Dispatcher

PENDING = frozenset({"scheduled", "in_flight"})


@dataclass(frozen=True)
class Figures:
    """The health figures as of one commit."""

    scheduled: int
    in_flight: int
    open_circuits: list[str]
    playbooks: dict[str, str]


class LedgerPublisher:
    """Publishes, at each commit of the dispatcher's store (on the loop thread), its customer
    records and its KPI rows (as stored: encoded, immutable bytes) and the health figures."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.customers: Published[bytes, Figures] = Published(
            self._entries(kpi=False), self._figures()
        )
        self.kpis: Published[bytes, None] = Published(self._entries(kpi=True), None)
        dispatcher.store.on_committed = self.committed

    def _entries(self, kpi: bool) -> list[tuple[str, bytes]]:
        table = self.dispatcher.store.table
        return [(k, v) for k, v in table.items() if k.startswith(KPI_PREFIX) is kpi]

    def _figures(self) -> Figures:
        d = self.dispatcher
        return Figures(
            scheduled=len(d._due),
            in_flight=len(d._retry),
            open_circuits=sorted(e for e, b in d._breakers.items() if b.state == "open"),
            # the running playbooks (hot-reloaded from their files) and their versions
            playbooks={pb.name: str(pb.version) for pb in d.book.playbooks},
        )

    def committed(self, keys: Iterable[str] | None) -> None:
        if keys is None:  # restored or dropped: anything may have changed
            self.customers.rebuild(self._entries(kpi=False), self._figures())
            self.kpis.rebuild(self._entries(kpi=True), None)
            return
        table = self.dispatcher.store.table
        changed = {k: table.get(k) for k in keys}
        kpis = {k: v for k, v in changed.items() if k.startswith(KPI_PREFIX)}
        self.customers.publish({k: v for k, v in changed.items() if k not in kpis}, self._figures())
        if kpis:
            self.kpis.publish(kpis, None)

    def decode(self, raw: bytes) -> dict[str, Any]:
        return self.dispatcher.serde.decode(TOPICS.dispatcher_state, raw)


def _action(a: core.Action) -> dict[str, Any]:
    return {
        "playbook": a.playbook,
        "step": a.step,
        "segment": a.segment,
        "channel": a.channel,
        "variant": a.variant,
        "status": a.status,
        "reason": a.reason,
        "decided_at": a.decided_at,
        "due_at": a.due_at,
        "attempt": a.attempt,
        "dispatched_at": a.dispatched_at,
        "idempotency_key": a.key,
    }


def routes(dispatcher: Dispatcher) -> Routes:
    """The routes over one running dispatcher's ledger."""
    r = Routes("dispatcher")
    ledger = LedgerPublisher(dispatcher)

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        with ledger.customers.read() as view:
            f = view.extra
        return {
            "service": "dispatcher",
            "status": "ok",
            "scheduled": f.scheduled,
            "in_flight": f.in_flight,
            "open_circuits": f.open_circuits,
            "playbooks": f.playbooks,
        }

    @r.get("/kpis")
    def kpis(_p: Params, _q: Query) -> list[dict[str, Any]]:
        with ledger.kpis.read() as view:
            rows = list(view.pairs())
        summed: dict[tuple[str, str, str], dict[str, int]] = {}
        for _key, raw in rows:  # one row per partition: summed, as Dispatcher.kpis does
            rec = ledger.decode(raw)
            row = summed.setdefault((rec["segment"], rec["playbook"], rec["variant"]), {})
            for name, n in rec["counts"].items():
                row[name] = row.get(name, 0) + n
        return experiments.kpi_rows([(s, p, v, c) for (s, p, v), c in summed.items()])

    @r.get("/customers/{customer_id}")
    def customer(p: Params, _q: Query) -> dict[str, Any]:
        with ledger.customers.read() as view:
            raw = view.get(p["customer_id"])
        rec = ledger.decode(raw) if raw is not None else None
        if rec is None or rec.get("kind") != "customer":
            raise NotFound("dispatcher has no ledger entry for that customer")
        c = core.customer_from_record(rec)
        return {
            "customer_id": c.customer_id,
            "suppressions": sorted(c.suppressions),
            "last_engagement_at": c.last_engagement_at,
            "assignments": [
                {
                    "playbook": a.playbook,
                    "segment": a.segment,
                    "variant": a.variant,
                    "decided_at": a.decided_at,
                }
                for a in c.assignments
            ],
            "pending": [_action(a) for a in c.actions if a.status in PENDING],
            "settled": [_action(a) for a in c.actions if a.status not in PENDING],
        }

    return r


def start(dispatcher: Dispatcher, port: int, host: str = "127.0.0.1") -> InternalServer:
    """Serve the routes from a background thread (port 0: a free port)."""
    return serve(routes(dispatcher), port, host)
