"""The gateway's application: the API routes (:mod:`segflow.api.gateway`), the console's
(:mod:`segflow.api.console.handlers`), authentication, and serving.

Kept apart from the routes so that the console can use the gateway's building blocks without
the gateway importing the console back (the import graph has no cycle: tests/test_layers.py).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from segflow.api.console.handlers import SESSIONS, add_routes, is_page, is_public
from segflow.api.gateway import (
    EDITOR_TOKEN,
    PUBLIC,
    ROLE,
    SETTINGS,
    TOKEN,
    UPSTREAM,
    VIA_COOKIE,
    GatewayError,
    GatewaySettings,
    Handler,
    Upstream,
    customer,
    errors,
    health,
    kpis,
    log,
    members,
    openapi,
    resolve,
    segments,
)
from segflow.errors import ConfigError


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token (viewer, or editor with ``SEGFLOW_API_EDITOR_TOKEN``) or the console's
    session cookie; sets ``request["role"]``."""
    from segflow.api.console import COOKIE, VIEWER, role_for_token

    token = request.app[TOKEN]
    editor = request.app[EDITOR_TOKEN]
    if not token or request.path in PUBLIC or is_public(request.path):
        request[ROLE] = VIEWER  # with --insecure-no-auth too: publishing needs the editor
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise GatewayError(401, "unauthorized", "missing bearer token")
        granted = role_for_token(given, token, editor)
        if granted is None:
            raise GatewayError(401, "unauthorized", "invalid bearer token")
        request[ROLE] = granted
        return await handler(request)
    sid = request.cookies.get(COOKIE)
    granted = request.app[SESSIONS].role(sid) if sid else None
    if granted is None:
        if is_page(request.path):
            raise web.HTTPSeeOther("/console/login")
        raise GatewayError(401, "unauthorized", "missing bearer token")
    request[ROLE], request[VIA_COOKIE] = granted, True
    return await handler(request)


def create_app(settings: GatewaySettings, insecure_no_auth: bool = False) -> web.Application:
    """The gateway application; raises ConfigError without a token (unless insecure)."""
    token = settings.token.get_secret_value() if settings.token is not None else ""
    if not token and not insecure_no_auth:
        raise ConfigError(
            "SEGFLOW_API_TOKEN is not set: refusing to serve customer data without "
            "authentication (use --insecure-no-auth for local development only)"
        )
    app = web.Application(middlewares=[errors, auth])
    app[SETTINGS] = settings
    app[TOKEN] = token
    app[EDITOR_TOKEN] = (
        settings.editor_token.get_secret_value() if settings.editor_token is not None else ""
    )

    async def session_ctx(app: web.Application) -> Any:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[UPSTREAM] = Upstream(settings, session)
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/openapi.yaml", openapi)
    app.router.add_get("/v1/customers/{customer_id}", customer)
    app.router.add_get("/v1/identities/resolve", resolve)
    app.router.add_get("/v1/segments", segments)
    app.router.add_get("/v1/segments/{name}/members", members)
    app.router.add_get("/v1/campaigns/kpis", kpis)
    add_routes(app)
    return app


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    ready: Callable[[int, asyncio.Event], None],
    signals: bool,
) -> None:
    """Listen until the event passed to ``ready(port, stop)`` is set (or SIGTERM/SIGINT)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    stop = asyncio.Event()
    if signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    ready(bound, stop)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(
    settings: GatewaySettings,
    insecure_no_auth: bool = False,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; ``ready(port)`` is called once listening."""
    app = create_app(settings, insecure_no_auth)

    def announce(port: int, _stop: asyncio.Event) -> None:
        log.info(
            "api listening",
            extra={
                "fields": {
                    "host": settings.host,
                    "port": port,
                    "auth": "bearer" if settings.token else "NONE (insecure)",
                }
            },
        )
        if ready is not None:
            ready(port)

    asyncio.run(_serve(app, settings.host, settings.port, announce, signals=True))


class Background:
    """The gateway served from a daemon thread of this process (tests, embedding)."""

    def __init__(self, settings: GatewaySettings, insecure_no_auth: bool = False) -> None:
        app = create_app(settings, insecure_no_auth)
        self.host = settings.host
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.port = 0

        def ready(port: int, stop: asyncio.Event) -> None:
            self.port, self._stop, self._loop = port, stop, asyncio.get_running_loop()
            self._started.set()

        def main() -> None:
            try:
                asyncio.run(_serve(app, settings.host, settings.port, ready, signals=False))
            except BaseException as exc:  # e.g. the port is taken: report it to start()
                self._error = exc
                self._started.set()

        self._thread = threading.Thread(target=main, daemon=True, name="segflow-api")
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        if not self.port:
            raise TimeoutError("the API gateway did not start within 30 s")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
