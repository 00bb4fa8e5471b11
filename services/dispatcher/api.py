"""The dispatcher's internal read-only endpoints (for the API gateway).

* ``GET /health`` — the service answers; actions waiting; endpoints whose breaker is open;
* ``GET /kpis`` — campaign KPIs per segment × playbook × variant: counts, rates and the
  conversion uplift vs the holdout with its 95 % interval (computed from the ledger on request);
* ``GET /customers/<customer_id>`` — the customer's suppressions, experiment assignments,
  pending actions (scheduled or in flight) and settled ones (sent, suppressed, failed, holdout).

Served by :func:`segflow.runtime.internal_api.serve` on ``SEGFLOW_DISPATCHER_API_PORT`` (127.0.0.1).
"""

from __future__ import annotations

from typing import Any

from segflow.runtime.internal_api import InternalServer, NotFound, Params, Query, Routes, serve
from services.dispatcher import core, experiments
from services.dispatcher.app import Dispatcher

PENDING = frozenset({"scheduled", "in_flight"})


def kpi_rows(dispatcher: Dispatcher) -> list[dict[str, Any]]:
    """One row per segment × playbook × variant (the ``GET /kpis`` body)."""
    return experiments.kpi_rows([(s, p, v, c) for (s, p, v), c in dispatcher.kpis().items()])


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
    r = Routes("dispatcher", live=True)  # the ledger is read live (not yet published)

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        breakers = dict(dispatcher._breakers)
        return {
            "service": "dispatcher",
            "status": "ok",
            "scheduled": len(dispatcher._due),
            "in_flight": len(dispatcher._retry),
            "open_circuits": sorted(e for e, b in breakers.items() if b.state == "open"),
            # the running playbooks (hot-reloaded from their files) and their versions
            "playbooks": {pb.name: str(pb.version) for pb in dispatcher.book.playbooks},
        }

    @r.get("/kpis")
    def kpis(_p: Params, _q: Query) -> list[dict[str, Any]]:
        return kpi_rows(dispatcher)

    @r.get("/customers/{customer_id}")
    def customer(p: Params, _q: Query) -> dict[str, Any]:
        c = dispatcher.customer(p["customer_id"])
        if c is None:
            raise NotFound("dispatcher has no ledger entry for that customer")
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
