"""One answer from N instances of a service (issue 15: the API in front of a scaled service).

Each instance of a stateful service holds the customers of the partitions it owns, and its
internal endpoints answer for those only. When the gateway knows several instances of a
service (``SEGFLOW_API_<SERVICE>_URL`` = a comma-separated list), it asks all of them and
merges what they say (:func:`merge`):

* a **customer's** record (``/customers/<id>``, ``/console/customers/<id>/...``): the owner
  answers 200, the others 404; the owner's answer is the answer (so a query always reaches
  the instance that owns the customer, also during and after a rebalance, with no routing
  table to go stale);
* **segment sizes** (``/segments``) and **hourly flows** (``/console/flow``): summed;
* **members** (``/segments/<name>``: customer-id order; ``/console/segments/<name>/members``:
  churn or id order): each instance's first page merged in the same order, sizes summed;
* **KPIs** (``/kpis``): counts summed per segment × playbook × variant and the rates and
  uplift intervals computed again from the sums (rates cannot be added);
* **health**: ok when every instance is; each instance's answer listed.

Pure: the gateway does the calls (:class:`segflow.api.gateway.Upstream`), this module only
combines answers, given as ``(status, body)`` pairs in instance order.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Sequence
from typing import Any

from services.dispatcher.experiments import KPI_FIELDS, kpi_rows

Answer = tuple[int, Any]

CUSTOMER = re.compile(r"^(/console)?/customers/[^/]+(/.*)?$")
SEGMENT_MEMBERS = re.compile(r"^/segments/[^/]+$")
CONSOLE_MEMBERS = re.compile(r"^/console/segments/[^/]+/members$")


def paging(path: str, params: dict[str, str]) -> dict[str, str]:
    """The query each instance gets for a page of ``path``: the first ``offset + limit`` rows
    (a merged page needs every instance's candidates for it); other paths unchanged.

    >>> paging("/console/segments/A/members", {"offset": "40", "limit": "20"})
    {'offset': '0', 'limit': '60'}
    """
    if CONSOLE_MEMBERS.match(path):
        offset = int(params.get("offset", "0") or 0)
        limit = int(params.get("limit", "50") or 50)
        return {**params, "offset": "0", "limit": str(min(offset + limit, 1000))}
    return params


def merge(path: str, params: dict[str, str], answers: Sequence[Answer]) -> Answer:
    """Combine the instances' answers to GET ``path`` into one (see the module doc).

    >>> merge("/customers/c1", {}, [(404, {"error": {}}), (200, {"customer_id": "c1"})])
    (200, {'customer_id': 'c1'})
    >>> merge("/segments", {}, [(200, {"definition_version": "v", "sizes": {"A": 2},
    ...     "segments": [{"name": "A", "size": 2}]}), (200, {"definition_version": "v",
    ...     "sizes": {"A": 3}, "segments": [{"name": "A", "size": 3}]})])[1]["sizes"]
    {'A': 5}
    """
    if len(answers) == 1:
        return answers[0]
    ok = [body for status, body in answers if status == 200]
    if CUSTOMER.match(path) or not ok or len(ok) < len(answers) and path != "/health":
        # a customer's record: the owner's 200; otherwise the first non-200 says why
        return next(((s, b) for s, b in answers if s == 200), _first_failure(answers))
    combine = _combiner(path)
    return 200, combine(ok, params)


def _first_failure(answers: Sequence[Answer]) -> Answer:
    for status, body in answers:
        if status != 200:
            return status, body
    return answers[0]


def _combiner(path: str) -> Callable[[list[Any], dict[str, str]], Any]:
    if path == "/health":
        return _health
    if path == "/segments":
        return _sizes
    if path == "/kpis":
        return _kpis
    if path == "/console/flow":
        return _flow
    if SEGMENT_MEMBERS.match(path):
        return _members_by_id
    if CONSOLE_MEMBERS.match(path):
        return _console_members
    return lambda bodies, _params: bodies[0]  # same everywhere (e.g. definitions)


def _health(bodies: list[Any], _params: dict[str, str]) -> Any:
    out = dict(bodies[0])
    out["status"] = "ok" if all(b.get("status") == "ok" for b in bodies) else "degraded"
    out["instances"] = bodies
    for key in ("customers", "scheduled", "in_flight"):
        if all(isinstance(b.get(key), int) for b in bodies):
            out[key] = sum(b[key] for b in bodies)
    return out


def _sizes(bodies: list[Any], _params: dict[str, str]) -> Any:
    out = dict(bodies[0])
    sizes: dict[str, int] = {}
    for b in bodies:
        for name, n in (b.get("sizes") or {}).items():
            sizes[name] = sizes.get(name, 0) + n
    out["sizes"] = sizes
    out["segments"] = [
        {**seg, "size": sizes.get(seg["name"], 0)} for seg in bodies[0].get("segments", [])
    ]
    return out


def _members_by_id(bodies: list[Any], params: dict[str, str]) -> Any:
    """Pages in customer-id order after the same ``after``: the smallest ``limit`` ids."""
    limit = int(params.get("limit", "1000") or 1000)
    everyone = sorted({m for b in bodies for m in b.get("members", [])})
    page = everyone[:limit]
    more = len(everyone) > limit or any(b.get("next_after") for b in bodies)
    return {
        **bodies[0],
        "size": sum(b.get("size", 0) for b in bodies),
        "members": page,
        "next_after": page[-1] if more and page else None,
    }


def _console_members(bodies: list[Any], params: dict[str, str]) -> Any:
    offset = int(params.get("offset", "0") or 0)
    limit = int(params.get("limit", "50") or 50)
    rows = [m for b in bodies for m in b.get("members", [])]

    def by_churn(m: dict[str, Any]) -> tuple[float, str]:  # as the segmenter orders them
        churn = m["churn_probability"]
        return -(churn if churn is not None else -1.0), m["customer_id"]

    def by_id(m: dict[str, Any]) -> str:
        return str(m["customer_id"])

    key = by_churn if params.get("sort", "churn") == "churn" else by_id
    chosen = heapq.nsmallest(offset + limit, rows, key=key)
    return {
        **bodies[0],
        "total": sum(b.get("total", 0) for b in bodies),
        "offset": offset,
        "members": chosen[offset:],
    }


def _flow(bodies: list[Any], _params: dict[str, str]) -> Any:
    """Hourly entries and exits summed; the watermark is the slowest instance's."""
    out = dict(bodies[0])
    marks = [b["watermark"] for b in bodies if b.get("watermark")]
    out["watermark"] = min(marks) if marks else None
    segments: dict[str, dict[str, list[int]]] = {}
    for b in bodies:
        for name, series in (b.get("segments") or {}).items():
            acc = segments.setdefault(name, {k: [0] * len(v) for k, v in series.items()})
            for k, values in series.items():
                acc[k] = [x + y for x, y in zip(acc[k], values, strict=False)]
    out["segments"] = segments
    return out


def _kpis(bodies: list[Any], _params: dict[str, str]) -> Any:
    """Counts summed per row; rates and uplift computed again by the dispatcher's own
    :func:`~services.dispatcher.experiments.kpi_rows`."""
    totals: dict[tuple[str, str, str], dict[str, int]] = {}
    for rows in bodies:
        for row in rows:
            key = (row["segment"], row["playbook"], row["variant"])
            acc = totals.setdefault(key, {})
            for field in KPI_FIELDS:
                acc[field] = acc.get(field, 0) + int(row.get(field) or 0)
    return kpi_rows([(s, p, v, c) for (s, p, v), c in totals.items()])
