"""The segflow HTTP API: one authenticated gateway over the services' own query endpoints.

Each service answers reads over the state it owns from its own process (``services/<name>/
api.py`` on an internal port, :mod:`segflow.runtime.internal_api`); this gateway authenticates
the caller, fans a request out to the services concurrently and assembles the answer. It keeps no
state of its own. The routes and their schemas are documented in ``openapi.yaml`` next to
this file (also served at ``GET /v1/openapi.yaml``).

* Auth: ``Authorization: Bearer <SEGFLOW_API_TOKEN>``, compared in constant time. Only
  ``/v1/health`` and ``/v1/openapi.yaml`` are public. The gateway refuses to start without a
  token unless told ``insecure_no_auth`` (local development).
* Errors: always ``{"error": {"code", "message"}}`` — 400 bad parameters, 401 no or wrong
  token, 404 unknown customer, segment or route, 502 a service answered nonsense, 503 a
  service is down or busy (``error.service`` names it).
* No access log: paths carry customer ids.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from segflow.api import fanout
from segflow.runtime.internal_api import error_body

log = logging.getLogger("segflow.api")

SPEC_PATH = Path(__file__).resolve().parent / "openapi.yaml"
SERVICES = ("identity", "scorer", "segmenter", "dispatcher")
#: Default internal port of each service's query endpoint, and the variable that sets it.
SERVICE_PORTS = {"identity": 9410, "scorer": 9411, "segmenter": 9412, "dispatcher": 9413}
SERVICE_PORT_ENV = {
    "identity": "SEGFLOW_IDENTITY_HTTP_PORT",
    "scorer": "SEGFLOW_SCORER_HTTP_PORT",
    "segmenter": "SEGFLOW_SEGMENTER_HTTP_PORT",
    "dispatcher": "SEGFLOW_DISPATCHER_API_PORT",
}
PUBLIC = frozenset({"/v1/health", "/v1/openapi.yaml"})
MAX_ID = 200
MAX_PAGE = 1000
DEFAULT_PAGE = 100

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewaySettings(BaseSettings):
    """``SEGFLOW_API_*``: the token, where to listen, where the services answer."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_API_", extra="ignore", frozen=True)

    token: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = 8480
    identity_url: str = f"http://127.0.0.1:{SERVICE_PORTS['identity']}"
    scorer_url: str = f"http://127.0.0.1:{SERVICE_PORTS['scorer']}"
    segmenter_url: str = f"http://127.0.0.1:{SERVICE_PORTS['segmenter']}"
    dispatcher_url: str = f"http://127.0.0.1:{SERVICE_PORTS['dispatcher']}"
    timeout: float = 5.0  # seconds per call to a service
    health_timeout: float = 2.0
    # The console (segflow.api.console): the token that may also publish definitions, the
    # definitions file it publishes to (None: read SEGFLOW_SEGMENTER_DEFINITIONS or the
    # default, publishing off), the playbooks it shows, how often it samples segment sizes.
    editor_token: SecretStr | None = None
    definitions: Path | None = None
    playbooks: str | None = None
    console_sample_interval: float = 5.0
    replay_timeout: float = 120.0
    # read segment.changes and identity.merges into the console's audit index (needs the
    # broker settings, SEGFLOW_KAFKA_*, in the environment; segflow up and demo set it)
    audit: bool = False

    def urls(self, service: str) -> list[str]:
        """Every instance's query endpoint (``SEGFLOW_API_<SERVICE>_URL`` may list several,
        comma-separated: the gateway then asks all and merges, :mod:`segflow.api.fanout`)."""
        raw = str(getattr(self, f"{service}_url"))
        return [u.strip().rstrip("/") for u in raw.split(",") if u.strip()]

    def url(self, service: str) -> str:
        return self.urls(service)[0]


# -- errors ------------------------------------------------------------------------------
class GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str, service: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.service = status, code, message, service

    def response(self) -> web.Response:
        body = error_body(self.code, self.message)
        if self.service is not None:
            body["error"]["service"] = self.service
        headers = {"WWW-Authenticate": 'Bearer realm="segflow"'} if self.status == 401 else None
        return web.json_response(body, status=self.status, headers=headers)


def bad_request(message: str) -> GatewayError:
    return GatewayError(400, "bad_request", message)


def not_found(message: str) -> GatewayError:
    return GatewayError(404, "not_found", message)


class ServiceDown(GatewayError):
    """A service did not answer (503) or answered something unusable (502)."""

    def __init__(self, service: str, detail: str, status: int = 503) -> None:
        code = "service_unavailable" if status == 503 else "bad_gateway"
        verb = "is unavailable" if status == 503 else "answered badly"
        super().__init__(status, code, f"{service} {verb}: {detail}", service)


# -- calls to the services ---------------------------------------------------------------
class Upstream:
    """GETs to the services' internal endpoints; failures become :class:`ServiceDown`."""

    def __init__(self, settings: GatewaySettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session

    async def get(
        self,
        service: str,
        path: str,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """``(status, json)`` for 200, 400 and 404 answers; anything else raises. A service
        with several instances is asked on each, and the answers merged (a customer's record
        comes from the instance that owns the customer)."""
        urls = self.settings.urls(service)
        if len(urls) == 1:
            return await self._get(service, urls[0], path, params, timeout)
        asked = fanout.paging(path, params or {})
        results = await asyncio.gather(
            *(self._get(service, u, path, asked, timeout) for u in urls), return_exceptions=True
        )
        answers = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ServiceDown):
                raise r
        down = [r for r in results if isinstance(r, ServiceDown)]
        owner_answered = fanout.CUSTOMER.match(path) and any(st == 200 for st, _ in answers)
        if down and not owner_answered:
            raise down[0]  # a merged answer without an instance's share would be wrong
        return fanout.merge(path, params or {}, answers)

    async def _get(
        self,
        service: str,
        base: str,
        path: str,
        params: dict[str, str] | None,
        timeout: float | None,
    ) -> tuple[int, Any]:
        url = base + path
        try:
            async with self.session.get(
                url,
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout or self.settings.timeout),
            ) as resp:
                status = resp.status
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    raise ServiceDown(service, f"HTTP {status}, not JSON", 502) from None
        except ServiceDown:
            raise
        except TimeoutError:
            raise ServiceDown(service, "timed out") from None
        except aiohttp.ClientConnectionError as exc:
            refused = isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                exc.os_error, ConnectionRefusedError
            )
            reason = "connection refused" if refused else f"no connection ({type(exc).__name__})"
            raise ServiceDown(service, reason) from None
        except aiohttp.ClientError as exc:
            raise ServiceDown(service, type(exc).__name__, 502) from None
        if status == 503:
            raise ServiceDown(service, "busy")
        if status not in (200, 400, 404):
            raise ServiceDown(service, f"HTTP {status}", 502)
        return status, body


def upstream(request: web.Request) -> Upstream:
    return request.app[UPSTREAM]


UPSTREAM = web.AppKey("upstream", Upstream)
SETTINGS = web.AppKey("settings", GatewaySettings)
TOKEN = web.AppKey("token", str)
EDITOR_TOKEN = web.AppKey("editor_token", str)
ROLE = web.RequestKey("role", str)  # viewer or editor (segflow.api.console)
VIA_COOKIE = web.RequestKey("via_cookie", bool)  # authenticated by the console's cookie


def _found(status: int, body: Any) -> Any:
    return body if status == 200 else None


def _customer_id(request: web.Request) -> str:
    # Any 1 to MAX_ID characters (as the spec says): an id no service knows is a 404.
    cid = request.match_info["customer_id"]
    if not cid or len(cid) > MAX_ID:
        raise bad_request(f"customer_id must be 1 to {MAX_ID} characters")
    return cid


# -- handlers ----------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    """Every service's health; 503 when any is down."""
    up = upstream(request)
    timeout = request.app[SETTINGS].health_timeout

    async def one(service: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            status, body = await up.get(service, "/health", timeout=timeout)
        except ServiceDown as exc:
            return {"status": "down", "error": exc.message}
        if status != 200 or not isinstance(body, dict):
            return {"status": "down", "error": f"{service} health answered HTTP {status}"}
        ms = round((time.perf_counter() - started) * 1000, 1)
        details = {k: v for k, v in body.items() if k not in ("service", "status")}
        return {"status": str(body.get("status", "ok")), "latency_ms": ms, "details": details}

    results = await asyncio.gather(*(one(s) for s in SERVICES))
    services = dict(zip(SERVICES, results, strict=True))
    ok = all(r["status"] == "ok" for r in results)
    return web.json_response(
        {"status": "ok" if ok else "degraded", "services": services}, status=200 if ok else 503
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=SPEC_PATH.read_text(), content_type="application/yaml")


async def customer(request: web.Request) -> web.Response:
    """Identifiers, features, scores, memberships with explanations and actions of one customer."""
    cid = _customer_id(request)
    every = request.query.get("segments", "member")
    if every not in ("member", "all"):
        raise bad_request("segments must be 'member' or 'all'")
    up = upstream(request)
    path = "/customers/" + quote(cid, safe="")
    calls = [up.get(s, path) for s in SERVICES]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    down = [a for a in answers if isinstance(a, ServiceDown)]
    if down:
        first = down[0]
        if len(down) > 1:
            names = ", ".join(str(d.service) for d in down)
            raise ServiceDown(str(first.service), f"also down: {names}", first.status)
        raise first
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    ident, scored, segs, acts = (_found(*a) for a in answers)  # type: ignore[misc]
    if ident is None and scored is None and segs is None:
        raise not_found(f"no customer {cid!r}")
    features = scored.pop("features", None) if scored else None
    if scored is not None:
        scored.pop("customer_id", None)
    segments = None
    if segs is not None:
        evaluated = segs.get("segments") or []
        segments = {
            "definition_version": segs.get("definition_version"),
            "as_of": segs.get("as_of"),
            "primary_segment": segs.get("primary_segment"),
            "memberships": [s for s in evaluated if every == "all" or s.get("member")],
        }
    actions = None
    if acts is not None:
        acts.pop("customer_id", None)
        actions = acts
    return web.json_response(
        {
            "customer_id": cid,
            "first_seen_at": ident.get("first_seen_at") if ident else None,
            "identifiers": ident.get("identifiers") if ident else [],
            "features": features,
            "scores": scored,
            "segments": segments,
            "actions": actions,
        }
    )


async def resolve(request: web.Request) -> web.Response:
    """The customer_id that owns an identifier (``type`` and raw ``value``)."""
    id_type = request.query.get("type", "")
    value = request.query.get("value", "")
    if id_type not in ("user_id", "email", "anonymous_id", "device_id"):
        raise bad_request("type must be one of user_id, email, anonymous_id, device_id")
    if not value.strip():
        raise bad_request("value is required")
    status, body = await upstream(request).get(
        "identity", "/resolve", {"type": id_type, "value": value}
    )
    if status == 404:
        raise not_found(f"no customer holds that {id_type}")
    if status != 200:
        raise bad_request(str(body.get("error", {}).get("message", "bad identifier")))
    return web.json_response({"customer_id": body["customer_id"], "type": id_type})


async def segments(request: web.Request) -> web.Response:
    """Every segment with its size."""
    _, body = await upstream(request).get("segmenter", "/segments")
    return web.json_response(
        {"definition_version": body["definition_version"], "segments": body["segments"]}
    )


def encode_cursor(customer_id: str) -> str:
    """An opaque page cursor (the last customer id of a page).

    >>> decode_cursor(encode_cursor("c-1"))
    'c-1'
    """
    return base64.urlsafe_b64encode(customer_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        text = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad_request("cursor is not one this API returned") from None
    if not text or len(text) > MAX_ID or not text.isprintable():
        raise bad_request("cursor is not one this API returned")
    return text


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_PAGE
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise bad_request(f"limit must be an integer between 1 and {MAX_PAGE}")
    return limit


async def members(request: web.Request) -> web.Response:
    """One page of a segment's members, in customer_id order."""
    name = request.match_info["name"]
    limit = _limit(request)
    cursor = request.query.get("cursor")
    params = {"limit": str(limit)}
    if cursor:  # an empty cursor is the first page
        params["after"] = decode_cursor(cursor)
    status, body = await upstream(request).get(
        "segmenter", "/segments/" + quote(name, safe=""), params
    )
    if status == 404:
        raise not_found(f"no segment {name!r}")
    if status != 200:
        raise ServiceDown("segmenter", "rejected the page request", 502)
    after = body.get("next_after")
    return web.json_response(
        {
            "segment": name,
            "size": body["size"],
            "members": body["members"],
            "next_cursor": encode_cursor(after) if after else None,
        }
    )


async def kpis(request: web.Request) -> web.Response:
    """Campaign KPIs per segment × playbook × variant, optionally filtered."""
    _, rows = await upstream(request).get("dispatcher", "/kpis")
    if not isinstance(rows, list):
        raise ServiceDown("dispatcher", "KPIs are not a list", 502)
    for key in ("segment", "playbook", "variant"):
        wanted = request.query.get(key)
        if wanted is not None:
            rows = [r for r in rows if r.get(key) == wanted]
    return web.json_response({"kpis": rows})


# -- middleware and app ------------------------------------------------------------------
@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as the JSON envelope."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = exc.reason if exc.status != 404 else f"no route {request.path!r}"
        # RFC 9110 §15.5.6: a 405 says which methods the resource has.
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(error_body(code, message), status=exc.status, headers=headers)
    except Exception as exc:  # a bug: log the route, not the path (customer ids)
        route = request.match_info.route.resource
        log.exception(
            "request failed",
            extra={
                "fields": {"route": getattr(route, "canonical", "?"), "error": type(exc).__name__}
            },
        )
        return web.json_response(error_body("internal", "internal error"), status=500)
