"""The segmenter's read-only HTTP API (stdlib server in a background thread).

* ``GET /health`` — the service answers; customers, watermark, definition version;
* ``GET /segments`` — size of every segment and the definition version; ``segments`` lists
  each with its priority, description and whether it is deprecated;
* ``GET /segments/<name>?limit=N&after=<customer_id>`` — members of one segment in
  customer_id order, ``limit`` (default 1000, at most 10000) at a time after ``after``;
  ``next_after`` is the value for the next page (null on the last);
* ``GET /customers/<id>`` — a customer's memberships, primary segment and, per segment, each
  condition with its observed value, threshold and margin.

Errors are ``{"error": {"code", "message"}}`` (:mod:`segflow.runtime.internal_api`). Served on
``SEGFLOW_SEGMENTER_HTTP_PORT``; the API gateway (:mod:`segflow.api.gateway`) aggregates it.
"""

from __future__ import annotations

import heapq
from http.server import ThreadingHTTPServer
from typing import Any, Protocol

from segflow.runtime.internal_api import NotFound, Params, Query, Routes, int_param
from segflow.runtime.internal_api import serve as serve_routes

MAX_PAGE = 10_000


class Queries(Protocol):
    defs: Any
    states: dict[str, Any]
    statuses: dict[str, Any]
    watermark: int

    def segment_sizes(self) -> dict[str, int]: ...
    def explain(self, customer_id: str) -> dict[str, Any] | None: ...


def routes(queries: Queries) -> Routes:
    """The routes over a running segmenter's state."""
    r = Routes("segmenter")

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        return {
            "service": "segmenter",
            "status": "ok",
            "customers": len(queries.states),
            "watermark": queries.watermark or None,
            "definition_version": queries.defs.version,
        }

    @r.get("/segments")
    def segments(_p: Params, _q: Query) -> dict[str, Any]:
        sizes = queries.segment_sizes()
        statuses = dict(queries.statuses)
        return {
            "definition_version": queries.defs.version,
            "sizes": sizes,
            "segments": [
                {
                    "name": seg.name,
                    "size": sizes.get(seg.name, 0),
                    "priority": seg.priority,
                    "description": seg.description,
                    "deprecated": bool(getattr(statuses.get(seg.name), "deprecated", False)),
                }
                for seg in queries.defs.segments
            ],
        }

    @r.get("/segments/{name}")
    def members(p: Params, q: Query) -> dict[str, Any]:
        name = p["name"]
        if name not in queries.defs.by_name:
            raise NotFound(f"no segment {name!r}")
        limit = int_param(q, "limit", 1000, 1, MAX_PAGE)
        after = q.get("after", "")
        # One pass over the customers, keeping the ``limit + 1`` smallest ids after ``after``.
        found = heapq.nsmallest(
            limit + 1,
            (
                cid
                for cid, st in list(queries.states.items())
                if cid > after and (m := st.memberships.get(name)) is not None and m.active
            ),
        )
        page = found[:limit]
        return {
            "segment": name,
            "size": queries.segment_sizes().get(name, 0),
            "members": page,
            "next_after": page[-1] if len(found) > limit else None,
        }

    @r.get("/customers/{customer_id}")
    def customer(p: Params, _q: Query) -> dict[str, Any]:
        found = queries.explain(p["customer_id"])
        if found is None:
            raise NotFound("segmenter has no state for that customer")
        return found

    return r


def serve(queries: Queries, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start the API on ``port`` (0 picks a free one: read ``server.server_port``)."""
    return serve_routes(routes(queries), port, host)
