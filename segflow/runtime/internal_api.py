"""The services' internal read-only query endpoints: a tiny JSON server on ``http.server``.

Each service owns its state in memory; ``services/<name>/api.py`` declares a few routes over
it and :func:`serve` answers them from a background thread of the service's own process, so
the state has no second copy. The gateway (:mod:`segflow.api.gateway`) is the only intended
client: these endpoints have no authentication and bind to 127.0.0.1 unless
``SEGFLOW_INTERNAL_API_HOST`` says otherwise (containers on a private network, where the gateway
runs in another container).

Every response is JSON; errors are ``{"error": {"code", "message"}}``. The processing loop
mutates the tables while a request reads them: a read torn by a concurrent change (a
``RuntimeError`` such as "dictionary changed size during iteration") is retried, then
answered ``503 busy``. Requests are not logged (paths carry customer ids).

>>> routes = Routes("demo")
>>> @routes.get("/things/{name}")
... def thing(params, query):
...     if params["name"] != "a":
...         raise NotFound("no such thing")
...     return {"name": "a", "limit": int_param(query, "limit", 10, 1, 100)}
>>> routes.dispatch("/things/a", {"limit": "5"})
(200, {'name': 'a', 'limit': 5})
>>> routes.dispatch("/things/b", {})[0], routes.dispatch("/nope", {})[1]["error"]["code"]
(404, 'not_found')
>>> routes.dispatch("/things/a", {"limit": "x"})[1]["error"]["message"]
'limit must be an integer between 1 and 100'
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

from segflow.runtime.settings import Settings

log = logging.getLogger("segflow.runtime.internal_api")

Query = Mapping[str, str]
Params = Mapping[str, str]
RouteFn = Callable[[Params, Query], Any]

#: Attempts at a read before answering 503 (the loop thread may mutate a table mid-read).
READ_ATTEMPTS = 5


class ApiError(Exception):
    """An error answer: HTTP ``status`` and a stable ``code``."""

    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ApiError):
    status = 404
    code = "not_found"


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON error envelope shared by the services and the gateway."""
    return {"error": {"code": code, "message": message}}


def int_param(query: Query, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``[low, high]`` (BadRequest otherwise)."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadRequest(f"{name} must be an integer between {low} and {high}")
    return value


def clean(value: Any) -> Any:
    """JSON-safe copy: tuples become lists, NaN and infinities become null.

    >>> clean({"a": (1.0, float("inf")), "b": {"c": float("nan")}})
    {'a': [1.0, None], 'b': {'c': None}}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v) for v in value]
    return value


class Routes:
    """GET routes of one service: ``/a/{param}/b`` patterns, one segment per parameter."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._routes: list[tuple[str, re.Pattern[str], RouteFn]] = []

    def get(self, pattern: str) -> Callable[[RouteFn], RouteFn]:
        regex = re.compile(
            "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern)) + "$"
        )

        def register(fn: RouteFn) -> RouteFn:
            self._routes.append((pattern, regex, fn))
            return fn

        return register

    @property
    def patterns(self) -> list[str]:
        return [p for p, _, _ in self._routes]

    def dispatch(self, path: str, query: Query) -> tuple[int, Any]:
        """``(status, body)`` for a GET of ``path`` (already split from its query)."""
        for pattern, regex, fn in self._routes:
            match = regex.match(path.rstrip("/") or "/")
            if match is None:
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            for attempt in range(READ_ATTEMPTS):
                try:
                    return 200, clean(fn(params, query))
                except ApiError as exc:
                    return exc.status, error_body(exc.code, exc.message)
                except RuntimeError:  # a read torn by the loop thread's writes: try again
                    if attempt == READ_ATTEMPTS - 1:
                        return 503, error_body("busy", f"{self.service} is busy, retry")
                except Exception as exc:  # a bug: answer 500, log without the path's ids
                    log.exception(
                        "query failed",
                        extra={"fields": {"route": pattern, "error": type(exc).__name__}},
                    )
                    return 500, error_body("internal", f"{self.service} failed on {pattern}")
        return 404, error_body(
            "not_found", f"no route {path!r}; {self.service} serves {', '.join(self.patterns)}"
        )


LOOPBACK = "127.0.0.1"


def serve(routes: Routes, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Answer ``routes`` on ``host:port`` from a daemon thread (port 0 picks a free one:
    read ``server.server_port``). Stop with ``server.shutdown()``. A ``host`` left at the
    loopback default follows ``SEGFLOW_INTERNAL_API_HOST``."""
    if host == LOOPBACK:
        host = Settings().internal_api_host

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:  # paths carry customer ids: no access log
            return

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body, allow_nan=False, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            query = dict(parse_qsl(url.query, keep_blank_values=True))
            self._send(*routes.dispatch(url.path, query))

        def _not_allowed(self) -> None:
            self.close_connection = True  # the body (if any) is not read
            self._send(405, error_body("method_not_allowed", "read-only: GET only"))

        do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    name = f"{routes.service}-api"
    threading.Thread(target=server.serve_forever, daemon=True, name=name).start()
    return server
