"""The segmenter's read-only HTTP API (aiohttp in a background thread).

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

The routes read a :class:`SegmenterView` the segmenter publishes after each commit (customers
as a :class:`~segflow.runtime.snapshot.Snapshot`, with the definitions, thresholds, sizes and
watermarks of that commit): a request sees one committed state, never a batch half applied.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
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
from segflow.runtime.snapshot import Published, View
from services.segmenter import core
from services.segmenter.app import Segmenter
from services.segmenter.population import Table

MAX_PAGE = 10_000


class Queries(Protocol):
    @property
    def defs(self) -> Any: ...
    @property
    def states(self) -> Mapping[str, Any]: ...

    @property
    def statuses(self) -> dict[str, Any]: ...
    @property
    def watermark(self) -> int: ...

    def segment_sizes(self) -> dict[str, int]: ...
    def explain(self, customer_id: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Committed:
    """What a query reads beside the customers, as of one commit."""

    defs: Any
    sizes: dict[str, int]
    statuses: dict[str, Any]
    watermarks: dict[int, int]
    tables: dict[int, Table]  # per scores partition: its pNN table in force
    lookups: dict[str, dict[str, str]]
    partition_of: Callable[[str], int]


class SegmenterView:
    """The segmenter as of one commit: its customers (a published
    :class:`~segflow.runtime.snapshot.View`) and the :class:`Committed` values beside them."""

    def __init__(self, view: View[core.CustomerState, Committed]) -> None:
        self.states = view
        self.committed = c = view.extra
        self.defs, self.statuses, self.tables = c.defs, c.statuses, c.tables

    @property
    def watermark(self) -> int:
        return min(self.committed.watermarks.values(), default=0)

    def segment_sizes(self) -> dict[str, int]:
        sizes = self.committed.sizes
        return {name: sizes.get(name, 0) for name in self.defs.by_name}

    def explain(self, customer_id: str) -> dict[str, Any] | None:
        st = self.states.get(customer_id)
        if st is None:
            return None
        c = self.committed
        part = c.partition_of(customer_id)
        now = max(c.watermarks.get(part, 0), st.as_of)
        table = c.tables.get(part)
        thresholds = table.values if table is not None else {}
        return {
            "customer_id": customer_id,
            "definition_version": c.defs.version,
            "as_of": st.as_of,
            "primary_segment": st.primary,
            "segments": core.explain_customer(st, now, c.defs, thresholds, c.lookups),
        }


class ViewPublisher:
    """Publishes the segmenter's customers and :class:`Committed` values at each of its commits
    (on the loop thread, through ``Segmenter.on_committed``)."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self.table: Published[core.CustomerState, Committed] = Published(
            segmenter.states, self._committed()
        )
        segmenter.on_committed = self.committed

    def _committed(self) -> Committed:
        seg = self.segmenter
        return Committed(
            defs=seg.defs,
            sizes=dict(seg.sizes),
            statuses=seg.statuses,  # a new dict each time
            watermarks=dict(seg.watermarks),
            tables=dict(seg.tables),  # each Table is immutable, replaced at its grid instant
            lookups=dict(seg.lookups),  # tables are replaced whole
            partition_of=seg.store.partition_of,
        )

    def committed(self, keys: Iterable[str] | None) -> None:
        """``keys``: the customers changed by the committed transaction; None: any may have
        (a restore, an assignment or a revocation)."""
        states = self.segmenter.states
        if keys is None:
            self.table.rebuild(states, self._committed())
        else:
            self.table.publish({k: states.get(k) for k in keys}, self._committed())

    @contextmanager
    def read(self) -> Iterator[Queries]:
        with self.table.read() as view:
            yield SegmenterView(view)


def _pairs(states: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every (customer, state) of a published view, or of a plain dict (a copy of its items)."""
    return states.pairs() if isinstance(states, View) else iter(list(states.items()))


def current(source: Queries | Segmenter) -> Callable[[], AbstractContextManager[Queries]]:
    """How each request reads: the view a running segmenter published last (a publisher is
    attached here), or ``source`` itself when it is a fixed view (tests, benches)."""
    if isinstance(source, Segmenter):
        return ViewPublisher(source).read
    return lambda: nullcontext(source)


def routes(source: Queries | Segmenter) -> Routes:
    """The routes over a running segmenter's published state (or over a fixed view)."""
    r = Routes("segmenter")
    view = current(source)

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        with view() as queries:
            return {
                "service": "segmenter",
                "status": "ok",
                "customers": len(queries.states),
                "watermark": queries.watermark or None,
                "definition_version": queries.defs.version,
            }

    @r.get("/percentiles")
    def percentiles(_p: Params, _q: Query) -> dict[str, Any]:
        """The pNN thresholds in force on each scores partition this instance owns, with the
        event-time grid instant each was computed at (README.md)."""
        with view() as queries:
            tables = getattr(queries, "tables", {})
            return {
                "definition_version": queries.defs.version,
                "partitions": {
                    str(part): {
                        "at": table.at,
                        "thresholds": {
                            f"{feature} p{pct:g}": value
                            for (feature, pct), value in sorted(table.values.items())
                        },
                    }
                    for part, table in sorted(tables.items())
                },
            }

    @r.get("/segments")
    def segments(_p: Params, _q: Query) -> dict[str, Any]:
        with view() as queries:
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
        with view() as queries:
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
                    for cid, st in _pairs(queries.states)
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
        with view() as queries:
            found = queries.explain(p["customer_id"])
        if found is None:
            raise NotFound("segmenter has no state for that customer")
        return found

    console_routes(r, view)
    return r


HOUR_MS = 3_600_000
#: How long one pass over every customer serves the console's flow and member pages (then it is
#: remade in the background, answering the old one meanwhile). The
#: console refreshes every 3 s; several viewers, and the Segment page's two reads, share it.
SNAPSHOT_TTL = 5.0
#: A snapshot older than the TTL is still answered (while the next one is made) up to this age:
#: the first page after a quiet hour answers at once, from the last pass, and the console's own
#: refresh 3 s later shows the new one (a page never waits for a pass over 100,000 customers,
#: 0.5-0.9 s, unless the definitions changed or there is no snapshot yet).
STALE_MAX = 3600.0
#: Hours of entries and exits a snapshot counts (the flow route's ``hours`` limit).
MAX_FLOW_HOURS = 24 * 90


class ConsoleSnapshot:
    """One pass over every customer for the console: per segment, its active members
    ``(customer_id, churn, entered_at)`` and its entries and exits counted by hours before
    the watermark."""

    def __init__(self, queries: Queries) -> None:
        self.at = time.monotonic()
        self.version = queries.defs.version
        self.watermark = end = int(queries.watermark or 0)
        names = [seg.name for seg in queries.defs.segments]
        members: dict[str, list[tuple[str, float | None, int | None]]] = {n: [] for n in names}
        entered: dict[str, dict[int, int]] = {n: {} for n in names}
        exited: dict[str, dict[int, int]] = {n: {} for n in names}
        for cid, st in _pairs(queries.states):
            churn = st.values.get("churn_probability")
            churn = churn if isinstance(churn, float) else None
            for name, m in list(st.memberships.items()):
                rows = members.get(name)
                if rows is None:
                    continue
                if m.active:
                    rows.append((cid, churn, m.entered_at))
                for at, counts in ((m.entered_at, entered), (m.exited_at, exited)):
                    if at is not None and at <= end:
                        k = (end - at) // HOUR_MS
                        if k < MAX_FLOW_HOURS:
                            c = counts[name]
                            c[k] = c.get(k, 0) + 1
        self.members, self.entered, self.exited = members, entered, exited

    def fresh(self, queries: Queries) -> bool:
        return time.monotonic() - self.at < SNAPSHOT_TTL and queries.defs.version == self.version

    def flow(self, name: str, hours: int) -> dict[str, list[int]]:
        """Entries and exits per hour, oldest first, the last bucket ending at the watermark."""
        out = {}
        for key, counts in (("entered", self.entered[name]), ("exited", self.exited[name])):
            series = [0] * hours
            for k, n in counts.items():
                if k < hours:
                    series[hours - 1 - k] += n
            out[key] = series
        return out


def console_routes(r: Routes, view: Callable[[], AbstractContextManager[Queries]]) -> None:
    """Reads for the browser console (segflow.api.console), over the same state.

    * ``GET /console/flow?hours=N`` — per segment, entries and exits per hour of event time
      over the last ``N`` hours before the watermark (from each customer's latest entry and
      exit per segment: a customer who entered twice within the window counts once);
    * ``GET /console/segments/<name>/members?q=&sort=churn|id&offset=&limit=`` — members with
      their churn probability and entry time, filtered by a customer-id substring, sorted;
    * ``GET /console/customers/<id>/memberships`` — every segment the customer ever entered:
      active or not, stays, last entry and exit (event time).

    The first two read a :class:`ConsoleSnapshot` (one pass over every customer, reused for
    :data:`SNAPSHOT_TTL` seconds and then remade in the background: a page sees data at most
    a few seconds old, and never of other definitions).
    """
    lock = threading.Lock()
    cache: list[ConsoleSnapshot] = []
    refreshing = threading.Event()

    def refresh() -> None:
        try:
            with view() as queries:
                snap = ConsoleSnapshot(queries)
            with lock:
                cache[:] = [snap]
        finally:
            refreshing.clear()

    def snapshot() -> ConsoleSnapshot:
        """The current snapshot. One older than the TTL (but not than STALE_MAX, and of the
        running definitions) is answered while a new one is made in the background, so a
        page does not wait for the pass; none, or a too old one, is made now."""
        with view() as queries, lock:
            snap = cache[0] if cache else None
            if snap is not None and snap.version == queries.defs.version:
                age = time.monotonic() - snap.at
                if age < SNAPSHOT_TTL:
                    return snap
                if age < STALE_MAX:
                    if not refreshing.is_set():
                        refreshing.set()
                        threading.Thread(target=refresh, daemon=True).start()
                    return snap
            cache[:] = [ConsoleSnapshot(queries)]  # concurrent readers wait and share it
            return cache[0]

    @r.get("/console/flow")
    def flow(_p: Params, q: Query) -> dict[str, Any]:
        hours = int_param(q, "hours", 24, 1, MAX_FLOW_HOURS)
        snap = snapshot()
        return {
            "watermark": snap.watermark or None,
            "hours": hours,
            "segments": {n: snap.flow(n, hours) for n in snap.members},
        }

    @r.get("/console/segments/{name}/members")
    def members(p: Params, q: Query) -> dict[str, Any]:
        name = p["name"]
        with view() as queries:
            known = name in queries.defs.by_name
        if not known:
            raise NotFound(f"no segment {name!r}")
        limit = int_param(q, "limit", 50, 1, 1000)
        offset = int_param(q, "offset", 0, 0, 10_000_000)
        needle = q.get("q", "").strip().lower()
        sort = q.get("sort", "churn")
        if sort not in ("churn", "id"):
            raise BadRequest("sort must be 'churn' or 'id'")
        rows = snapshot().members.get(name, [])
        if needle:
            rows = [row for row in rows if needle in row[0].lower()]
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
        with view() as queries:
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


def serve(source: Queries | Segmenter, port: int, host: str = "127.0.0.1") -> InternalServer:
    """Start the API on ``port`` (0 picks a free one: read ``server.port``)."""
    return serve_routes(routes(source), port, host)
