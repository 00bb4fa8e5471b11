"""The scorer's internal read-only endpoints (for the API gateway).

* ``GET /health`` — the service answers; customers, event-time watermark, model quality;
* ``GET /customers/<customer_id>`` — the customer's features, churn probability, engagement,
  CLV, cluster, lifecycle stage and the top features contributing to the churn score, computed
  on request from its state as of the scorer's watermark with the current model (the
  ``CustomerScore`` shape), plus what was last emitted to ``segflow.scores``.

Served by :func:`segflow.runtime.internal_api.serve` on ``SEGFLOW_SCORER_HTTP_PORT`` (127.0.0.1).
"""

from __future__ import annotations

import time
from typing import Any

from segflow.runtime.internal_api import InternalServer, NotFound, Params, Query, Routes, serve
from services.scorer.app import RETIRED_KEY, ScorerService
from services.scorer.features import Buckets


def routes(service: ScorerService) -> Routes:
    """The routes over one running service's state and model."""
    r = Routes("scorer", live=True)  # the model and state are read live (not yet published)

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        sc = service.scorer
        quality = sc.model.quality()
        return {
            "service": "scorer",
            "status": "ok",
            "customers": service.customer_count(),
            "watermark": sc.watermark,
            "model_version": sc.model.version,
            "model": {k: quality[k] for k in ("roc_auc", "log_loss", "n_learned", "drifts")},
        }

    @r.get("/customers/{customer_id}")
    def customer(p: Params, _q: Query) -> dict[str, Any]:
        cid = p["customer_id"]
        st = None if cid.startswith(RETIRED_KEY) else service.states.get(cid)
        if st is None:  # never seen, merged away, or forgotten
            raise NotFound(f"scorer has no state for {cid!r}")
        sc = service.scorer
        as_of = max(int(st["last_event_ms"]), int(st["scored_as_of"] or 0), sc.watermark or 0)
        # Own copy of the buckets: the scorer's cache belongs to the loop thread.
        scored = sc.score(st, as_of, Buckets.load(st["buckets"]))
        record = sc.record(cid, scored, int(time.time() * 1000))
        record.pop("scored_at", None)
        emitted = None
        if st["emitted_as_of"] is not None:
            emitted = {
                "as_of": st["emitted_as_of"],
                "churn_probability": round(float(st["emitted_churn"]), 4),
                "engagement_score": round(float(st["emitted_engagement"]), 2),
                "lifecycle_stage": st["emitted_stage"],
                "cluster": st["emitted_cluster"],
            }
        return {**record, "last_event_at": st["last_event_ms"], "last_emitted": emitted}

    return r


def start(service: ScorerService, port: int, host: str = "127.0.0.1") -> InternalServer:
    """Serve the routes from a background thread (port 0: a free port)."""
    return serve(routes(service), port, host)
