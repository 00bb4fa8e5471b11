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
from typing import Any, Protocol

from segflow.runtime.internal_api import (
    BadRequest,
    InternalServer,
    NotFound,
    Params,
    Query,
    Routes,
    int_param,
)
from segflow.runtime.internal_api import serve as serve_routes

MAX_PAGE = 10_000


class Queries(Protocol):
    defs: Any
    states: dict[str, Any]

    @property
    def statuses(self) -> dict[str, Any]: ...
    @property
    def watermark(self) -> int: ...

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

    console_routes(r, queries)
    return r


HOUR_MS = 3_600_000


def console_routes(r: Routes, queries: Queries) -> None:
    """Reads for the browser console (segflow.api.console), over the same state.

    * ``GET /console/flow?hours=N`` — per segment, entries and exits per hour of event time
      over the last ``N`` hours before the watermark (from each customer's latest entry and
      exit per segment: a customer who entered twice within the window counts once);
    * ``GET /console/segments/<name>/members?q=&sort=churn|id&offset=&limit=`` — members with
      their churn probability and entry time, filtered by a customer-id substring, sorted;
    * ``GET /console/customers/<id>/memberships`` — every segment the customer ever entered:
      active or not, stays, last entry and exit (event time).
    """

    @r.get("/console/flow")
    def flow(_p: Params, q: Query) -> dict[str, Any]:
        hours = int_param(q, "hours", 24, 1, 24 * 90)
        end = int(queries.watermark or 0)
        start = end - hours * HOUR_MS
        names = [seg.name for seg in queries.defs.segments]
        entered = {n: [0] * hours for n in names}
        exited = {n: [0] * hours for n in names}
        for st in list(queries.states.values()):
            for name, m in list(st.memberships.items()):
                if name not in entered:
                    continue
                for at, counts in ((m.entered_at, entered), (m.exited_at, exited)):
                    if at is not None and start < at <= end:
                        counts[name][min(hours - 1, (at - start - 1) // HOUR_MS)] += 1
        return {
            "watermark": end or None,
            "hours": hours,
            "segments": {n: {"entered": entered[n], "exited": exited[n]} for n in names},
        }

    @r.get("/console/segments/{name}/members")
    def members(p: Params, q: Query) -> dict[str, Any]:
        name = p["name"]
        if name not in queries.defs.by_name:
            raise NotFound(f"no segment {name!r}")
        limit = int_param(q, "limit", 50, 1, 1000)
        offset = int_param(q, "offset", 0, 0, 10_000_000)
        needle = q.get("q", "").strip().lower()
        sort = q.get("sort", "churn")
        if sort not in ("churn", "id"):
            raise BadRequest("sort must be 'churn' or 'id'")
        rows = []
        for cid, st in list(queries.states.items()):
            m = st.memberships.get(name)
            if m is None or not m.active or (needle and needle not in cid.lower()):
                continue
            churn = st.values.get("churn_probability")
            rows.append((cid, churn if isinstance(churn, float) else None, m.entered_at))
        # only the first offset + limit rows are ordered (a page, not the whole segment)
        if sort == "churn":
            page = heapq.nsmallest(
                offset + limit, rows, key=lambda t: (-(t[1] if t[1] is not None else -1.0), t[0])
            )
        else:
            page = heapq.nsmallest(offset + limit, rows)
        return {
            "segment": name,
            "total": len(rows),
            "offset": offset,
            "members": [
                {"customer_id": c, "churn_probability": ch, "entered_at": at}
                for c, ch, at in page[offset:]
            ],
        }

    @r.get("/console/customers/{customer_id}/memberships")
    def history(p: Params, _q: Query) -> dict[str, Any]:
        st = queries.states.get(p["customer_id"])
        if st is None:
            raise NotFound("segmenter has no state for that customer")
        return {
            "customer_id": st.customer_id,
            "memberships": [
                {
                    "segment": m.segment,
                    "active": m.active,
                    "stays": m.seq,
                    "entered_at": m.entered_at,
                    "exited_at": m.exited_at,
                }
                for m in sorted(st.memberships.values(), key=lambda m: m.segment)
                if m.entered_at is not None
            ],
        }


def serve(queries: Queries, port: int, host: str = "127.0.0.1") -> InternalServer:
    """Start the API on ``port`` (0 picks a free one: read ``server.port``)."""
    return serve_routes(routes(queries), port, host)
