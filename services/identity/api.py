"""The identity service's internal read-only endpoints (for the API gateway).

* ``GET /health`` — the service answers; entries in its state;
* ``GET /customers/<customer_id>`` — the profile: first seen, and its identifiers as
  ``{type, hash}`` (the graph stores keyed hashes only: no raw user id or email exists here);
* ``GET /resolve?type=<identifier type>&value=<raw value>`` — the customer_id that owns an
  identifier (hashed on arrival with the service's secret, never stored or logged).

Served by :func:`segflow.runtime.internal_api.serve` on ``SEGFLOW_IDENTITY_HTTP_PORT`` (127.0.0.1).
The routes read the graph entries published after each commit of the service's store
(:mod:`segflow.runtime.snapshot`): one committed graph, never the batch being written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from segflow.runtime.internal_api import (
    BadRequest,
    InternalServer,
    NotFound,
    Params,
    Query,
    Routes,
    serve,
)
from segflow.runtime.snapshot import Published
from segflow.runtime.state import ChangelogStore
from services.identity import core
from services.identity.app import IdentityService, node_hasher

#: The state entries the routes read: profiles and identifier nodes (not the ``e:`` window).
GRAPH_PREFIXES = ("p:", "n:")


class GraphPublisher:
    """Publishes the profile and node entries each time the store commits (on the loop
    thread), with the state's size as the view's ``extra``."""

    def __init__(self, store: ChangelogStore) -> None:
        self.store = store
        self.graph: Published[dict[str, Any], int] = Published(self._entries(), len(store))
        store.on_committed = self.committed

    def _entries(self) -> list[tuple[str, dict[str, Any]]]:
        return [(k, v) for k, v in self.store.table.items() if k[:2] in GRAPH_PREFIXES]

    def committed(self, keys: Iterable[str] | None) -> None:
        table = self.store.table
        if keys is None:  # restored or dropped: anything may have changed
            self.graph.rebuild(self._entries(), len(table))
            return
        changes = {k: table.get(k) for k in keys if k[:2] in GRAPH_PREFIXES}
        self.graph.publish(changes, len(table))


def routes(service: IdentityService) -> Routes:
    """The routes over the graph the service last committed."""
    r = Routes("identity")
    graph = GraphPublisher(service.store).graph
    hasher = node_hasher(service.settings.hash_secret.get_secret_value())

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        with graph.read() as view:
            return {"service": "identity", "status": "ok", "state_entries": view.extra}

    @r.get("/customers/{customer_id}")
    def customer(p: Params, _q: Query) -> dict[str, Any]:
        cid = p["customer_id"]
        with graph.read() as view:
            profile = view.get("p:" + cid)
        if profile is None:
            raise NotFound(f"identity has no profile {cid!r}")
        ids = [
            {"type": core.TYPE_OF_CODE[node[0]], "hash": node[2:]}
            for node in list(profile.get("identifiers") or ())
        ]
        counts: dict[str, int] = {}
        for item in ids:
            counts[item["type"]] = counts.get(item["type"], 0) + 1
        return {
            "customer_id": cid,
            "first_seen_at": profile.get("created_at"),
            "identifiers": ids,
            "identifier_counts": counts,
        }

    @r.get("/resolve")
    def resolve(_p: Params, q: Query) -> dict[str, Any]:
        id_type, value = q.get("type", ""), q.get("value", "")
        if id_type not in core.CODES:
            raise BadRequest(f"type must be one of {', '.join(core.TYPES)}")
        if not value.strip():
            raise BadRequest("value is required")
        nodes = core.identifiers({id_type: value}, service.rules, hasher)
        with graph.read() as view:
            node = view.get("n:" + nodes[0]) if nodes else None
        if node is None or not node.get("customer_id"):
            raise NotFound(f"no customer holds that {id_type}")
        return {"customer_id": node["customer_id"], "type": id_type}

    return r


def start(service: IdentityService, port: int, host: str = "127.0.0.1") -> InternalServer:
    """Serve the routes from a background thread (port 0: a free port)."""
    return serve(routes(service), port, host)
