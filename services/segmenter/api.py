"""The segmenter's read-only HTTP API (stdlib server in a background thread).

* ``GET /segments`` — size of every segment and the definition version;
* ``GET /segments/<name>?limit=N`` — members of one segment;
* ``GET /customers/<id>`` — a customer's memberships, primary segment and, per segment, each
  condition with its observed value, threshold and margin.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlparse


class Queries(Protocol):
    defs: Any

    def segment_sizes(self) -> dict[str, int]: ...
    def members(self, segment: str, limit: int = 1000) -> list[str]: ...
    def explain(self, customer_id: str) -> dict[str, Any] | None: ...


def serve(queries: Queries, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the API on ``port`` (0 picks a free one: read ``server.server_port``)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:  # no per-request logs (ids are PII-adjacent)
            return

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
            for _ in range(3):  # the loop thread mutates the tables: retry a torn read
                try:
                    return self._route(parts, parse_qs(url.query))
                except RuntimeError:
                    continue
            self._send(503, {"error": "busy, retry"})

        def _route(self, parts: list[str], query: dict[str, list[str]]) -> None:
            if parts == ["segments"]:
                return self._send(200, {"definition_version": queries.defs.version,
                                        "sizes": queries.segment_sizes()})
            if len(parts) == 2 and parts[0] == "segments":
                if parts[1] not in queries.defs.by_name:
                    return self._send(404, {"error": f"no segment {parts[1]!r}"})
                limit = int(query.get("limit", ["1000"])[0])
                return self._send(200, {"segment": parts[1],
                                        "members": queries.members(parts[1], limit)})
            if len(parts) == 2 and parts[0] == "customers":
                found = queries.explain(parts[1])
                if found is None:
                    return self._send(404, {"error": "unknown customer"})
                return self._send(200, found)
            return self._send(404, {"error": "try /segments, /segments/<name>, /customers/<id>"})

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="segmenter-api").start()
    return server
