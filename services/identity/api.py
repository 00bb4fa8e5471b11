"""The identity service's internal read-only endpoints (for the API gateway).

* ``GET /health`` — the service answers; entries in its state;
* ``GET /customers/<customer_id>`` — the profile: first seen, and its identifiers as
  ``{type, hash}`` (the graph stores keyed hashes only: no raw user id or email exists here);
* ``GET /resolve?type=<identifier type>&value=<raw value>`` — the customer_id that owns an
  identifier (hashed on arrival with the service's secret, never stored or logged).

Served by :func:`segflow.runtime.internal_api.serve` on ``SEGFLOW_IDENTITY_HTTP_PORT`` (127.0.0.1).
"""

from __future__ import annotations

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
from services.identity import core
from services.identity.app import IdentityService, node_hasher


def routes(service: IdentityService) -> Routes:
    """The routes over one running service's state."""
    r = Routes("identity")
    store = service.store
    hasher = node_hasher(service.settings.hash_secret.get_secret_value())

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        return {"service": "identity", "status": "ok", "state_entries": len(store)}

    @r.get("/customers/{customer_id}")
    def customer(p: Params, _q: Query) -> dict[str, Any]:
        cid = p["customer_id"]
        profile = store.get("p:" + cid)
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
        node = store.get("n:" + nodes[0]) if nodes else None
        if node is None or not node.get("customer_id"):
            raise NotFound(f"no customer holds that {id_type}")
        return {"customer_id": node["customer_id"], "type": id_type}

    return r


def start(service: IdentityService, port: int, host: str = "127.0.0.1") -> InternalServer:
    """Serve the routes from a background thread (port 0: a free port)."""
    return serve(routes(service), port, host)
