"""The services' internal read-only query endpoints: a small JSON server on aiohttp.

Each service owns its state in memory; ``services/<name>/api.py`` declares a few GET routes
over it and :func:`serve` answers them from a background thread of the service's own process
(aiohttp's router and server on an event loop of its own), so the state has no second copy.
The gateway (:mod:`segflow.api.gateway`) is the only intended client: these endpoints have no
authentication and bind to 127.0.0.1 unless ``SEGFLOW_INTERNAL_API_HOST`` says otherwise
(containers on a private network, where the gateway runs in another container).

Every response is JSON; errors are ``{"error": {"code", "message"}}``; a method other than GET
gets 405 with ``Allow: GET``. Requests are not logged (paths carry customer ids).

The processing loop mutates the service's tables on its own thread. Routes read instead an
immutable view the service publishes after each commit (:mod:`segflow.runtime.snapshot`): a
request sees one committed state, whole, and never waits or retries; an exception in a route
is a bug, answered 500 (and logged without the path's ids).

>>> import httpx
>>> routes = Routes("demo")
>>> @routes.get("/things/{name}")
... def thing(params, query):
...     if params["name"] != "a":
...         raise NotFound("no such thing")
...     return {"name": "a", "limit": int_param(query, "limit", 10, 1, 100)}
>>> server = serve(routes, 0)
>>> url = f"http://127.0.0.1:{server.port}"
>>> httpx.get(url + "/things/a?limit=5").json()
{'name': 'a', 'limit': 5}
>>> httpx.get(url + "/things/b").status_code, httpx.get(url + "/nope").json()["error"]["code"]
(404, 'not_found')
>>> httpx.get(url + "/things/a?limit=x").json()["error"]["message"]
'limit must be an integer between 1 and 100'
>>> answer = httpx.post(url + "/things/a")
>>> answer.status_code, answer.headers["Allow"]
(405, 'GET')
>>> server.stop()
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from segflow.runtime.settings import Settings

log = logging.getLogger("segflow.runtime.internal_api")

Query = Mapping[str, str]
Params = Mapping[str, str]
RouteFn = Callable[[Params, Query], Any]


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
    """GET routes of one service: ``/a/{param}/b`` patterns (aiohttp's syntax, one path
    segment per parameter, percent-decoded), over views the service published."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._routes: list[tuple[str, RouteFn]] = []

    def get(self, pattern: str) -> Callable[[RouteFn], RouteFn]:
        def register(fn: RouteFn) -> RouteFn:
            self._routes.append((pattern, fn))
            return fn

        return register

    @property
    def patterns(self) -> list[str]:
        return [p for p, _ in self._routes]

    def answer(self, pattern: str, fn: RouteFn, params: Params, query: Query) -> tuple[int, Any]:
        """``(status, body)`` of one call, errors as JSON envelopes."""
        try:
            return 200, clean(fn(params, query))
        except ApiError as exc:
            return exc.status, error_body(exc.code, exc.message)
        except Exception as exc:  # a bug: answer 500, log without the path's ids
            return self._failed(pattern, exc)

    def _failed(self, pattern: str, exc: Exception) -> tuple[int, Any]:
        log.error(
            "query failed",
            exc_info=exc,
            extra={"fields": {"route": pattern, "error": type(exc).__name__}},
        )
        return 500, error_body("internal", f"{self.service} failed on {pattern}")

    def app(self) -> web.Application:
        """The aiohttp application answering these routes (with and without a trailing /)."""

        def handler(pattern: str, fn: RouteFn) -> Callable[[web.Request], Awaitable[web.Response]]:
            async def handle(request: web.Request) -> web.Response:
                query = {k: v for k, v in request.query.items()}
                return _json(*self.answer(pattern, fn, dict(request.match_info), query))

            return handle

        app = web.Application(middlewares=[self._errors])
        for pattern, fn in self._routes:
            for path in {pattern, pattern.rstrip("/") + "/"}:
                app.router.add_get(path, handler(pattern, fn), allow_head=False)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed:
            response = _json(405, error_body("method_not_allowed", "read-only: GET only"))
            response.headers["Allow"] = "GET"
            return response
        except web.HTTPNotFound:
            return _json(
                404,
                error_body(
                    "not_found",
                    f"no route {request.path!r}; {self.service} serves {', '.join(self.patterns)}",
                ),
            )


def _json(status: int, body: Any) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, allow_nan=False, default=str).encode(),
        content_type="application/json",
    )


LOOPBACK = "127.0.0.1"


class InternalServer:
    """A running internal API: its ``host`` and ``port``; :meth:`stop` ends it."""

    def __init__(self, routes: Routes, host: str, port: int) -> None:
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(routes.app(), access_log=None)
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name=f"{routes.service}-api"
        )
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(port), self._loop).result(10)

    async def _start(self, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port, backlog=128)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    @property
    def server_address(self) -> tuple[str, int]:
        return self.host, self.port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def serve(routes: Routes, port: int, host: str = LOOPBACK) -> InternalServer:
    """Answer ``routes`` on ``host:port`` from a daemon thread (port 0 picks a free one:
    read ``server.port``). A ``host`` left at the loopback default follows
    ``SEGFLOW_INTERNAL_API_HOST``."""
    if host == LOOPBACK:
        host = Settings().internal_api_host
    return InternalServer(routes, host, port)
