"""The console's routes on the gateway: pages, login, and the JSON reads under /v1/console/."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from segflow.api import console as c
from segflow.api.console.audit import AuditIndex, AuditReader
from segflow.api.console.timeline import membership_timeline, recent_events
from segflow.api.gateway import (
    SETTINGS,
    GatewayError,
    ServiceDown,
    _customer_id,
    _found,
    bad_request,
    not_found,
    upstream,
)

log = logging.getLogger("segflow.api.console")

SESSIONS = web.AppKey("console_sessions", c.Sessions)
HISTORY = web.AppKey("console_history", c.SizeHistory)
REPLAYING = web.AppKey("console_replaying", asyncio.Lock)  # one what-if replay at a time
AUDIT = web.AppKey("console_audit", AuditIndex)  # only when SEGFLOW_API_AUDIT is on
MAX_DEFINITIONS = 512 * 1024  # bytes of YAML a check, replay or publish accepts

#: Paths served without a token (the login form and the static assets: no data in them).
PUBLIC_PREFIXES = ("/console/static/",)
PUBLIC_PATHS = frozenset({"/console/login"})


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def is_page(path: str) -> bool:
    return path in ("/console", "/console/")


def role(request: web.Request) -> str:
    from segflow.api.gateway import ROLE

    return str(request.get(ROLE, c.VIEWER))


def require_editor(request: web.Request) -> None:
    if role(request) != c.EDITOR:
        raise GatewayError(403, "forbidden", "publishing needs the editor token (this is a viewer)")
    from segflow.api.gateway import VIA_COOKIE

    if request.get(VIA_COOKIE) and request.headers.get(c.CSRF_HEADER) != "1":
        raise GatewayError(
            403, "forbidden", f"console requests that change state need {c.CSRF_HEADER}"
        )


# -- pages and login -------------------------------------------------------------------------
async def index(request: web.Request) -> web.Response:
    if request.path == "/console":
        raise web.HTTPFound("/console/")
    text = (c.STATIC / "index.html").read_text()
    return web.Response(text=text, content_type="text/html", headers=c.SECURITY_HEADERS)


async def login_form(request: web.Request) -> web.Response:
    return c.login_page()


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    token = str(form.get("token", ""))
    settings = request.app[SETTINGS]
    viewer = settings.token.get_secret_value() if settings.token else ""
    editor = settings.editor_token.get_secret_value() if settings.editor_token else ""
    granted = c.role_for_token(token, viewer, editor) if token else None
    if granted is None:
        return c.login_page("That token is not valid for this console.", status=401)
    sid = request.app[SESSIONS].create(granted)
    resp = web.HTTPSeeOther("/console/")
    resp.set_cookie(
        c.COOKIE,
        sid,
        httponly=True,
        samesite="Strict",
        path="/",
        max_age=int(c.SESSION_TTL),
        secure=request.secure,
    )
    raise resp


async def logout(request: web.Request) -> web.Response:
    sid = request.cookies.get(c.COOKIE)
    if sid:
        request.app[SESSIONS].drop(sid)
    resp = web.HTTPSeeOther("/console/login")
    resp.del_cookie(c.COOKIE, path="/")
    raise resp


async def session(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "role": role(request),
            "can_publish": role(request) == c.EDITOR and settings.definitions is not None,
            "can_publish_playbooks": role(request) == c.EDITOR and settings.playbooks is not None,
            "sample_interval": settings.console_sample_interval,
        }
    )


# -- segments --------------------------------------------------------------------------------
async def _flow(request: web.Request, hours: int) -> dict[str, Any]:
    status, body = await upstream(request).get("segmenter", "/console/flow", {"hours": str(hours)})
    if status != 200 or not isinstance(body, dict):
        raise ServiceDown("segmenter", "console flow not available", 502)
    return body


async def segments_overview(request: web.Request) -> web.Response:
    up = upstream(request)
    (_, listing), flow = await asyncio.gather(up.get("segmenter", "/segments"), _flow(request, 24))
    history = request.app[HISTORY]
    now_ms = int(time.time() * 1000)
    books = c.playbooks_by_segment(request.app[SETTINGS].playbooks)
    rows = []
    for seg in listing["segments"]:
        name = seg["name"]
        f = flow["segments"].get(name, {"entered": [], "exited": []})
        rows.append(
            {
                "name": name,
                "size": seg["size"],
                "priority": seg.get("priority"),
                "description": seg.get("description") or "",
                "deprecated": bool(seg.get("deprecated")),
                "playbooks": [p["name"] for p in books.get(name, [])],
                "size_history": history.series(name),
                "entered_per_hour": f["entered"],
                "exited_per_hour": f["exited"],
                "entered_last_hour": f["entered"][-1] if f["entered"] else 0,
                "exited_last_hour": f["exited"][-1] if f["exited"] else 0,
                "drift": history.drift(name, seg["size"], now_ms),
            }
        )
    return web.json_response(
        {
            "definition_version": listing["definition_version"],
            "watermark": flow.get("watermark"),
            "sampled_at": now_ms,
            "segments": rows,
        }
    )


async def segment_detail(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    up = upstream(request)
    (_, listing), flow, (_, kpis) = await asyncio.gather(
        up.get("segmenter", "/segments"), _flow(request, 72), up.get("dispatcher", "/kpis")
    )
    seg = next((s for s in listing["segments"] if s["name"] == name), None)
    if seg is None:
        raise not_found(f"no segment {name!r}")
    settings = request.app[SETTINGS]
    path = c.definitions_path(settings.definitions)
    try:
        text = path.read_text()
    except OSError:
        text = ""
    checked = c.check_definitions(text) if text else {"version": None}
    f = flow["segments"].get(name, {"entered": [], "exited": []})
    history = request.app[HISTORY]
    return web.json_response(
        {
            "name": name,
            "size": seg["size"],
            "priority": seg.get("priority"),
            "description": seg.get("description") or "",
            "definition_version": listing["definition_version"],
            "file_version": checked.get("version"),
            "yaml": c.segment_yaml(text).get(name),
            "playbooks": c.playbooks_by_segment(settings.playbooks).get(name, []),
            "entered_per_hour": f["entered"],
            "exited_per_hour": f["exited"],
            "watermark": flow.get("watermark"),
            "size_history": history.series(name),
            "drift": history.drift(name, seg["size"], int(time.time() * 1000)),
            "kpis": [k for k in kpis if k.get("segment") == name] if isinstance(kpis, list) else [],
        }
    )


async def segment_members(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    q = request.query
    params: dict[str, str] = {}
    for key, low, high in (("limit", 1, 1000), ("offset", 0, 10_000_000)):
        if key in q:
            try:
                value = int(q[key])
            except ValueError:
                value = low - 1
            if not low <= value <= high:
                raise bad_request(f"{key} must be an integer between {low} and {high}")
            params[key] = str(value)
    sort = q.get("sort", "churn")
    if sort not in ("churn", "id"):
        raise bad_request("sort must be 'churn' or 'id'")
    params["sort"] = sort
    if q.get("q"):
        params["q"] = q["q"]
    status, body = await upstream(request).get(
        "segmenter", f"/console/segments/{c.safe_path(name)}/members", params
    )
    if status == 404:
        raise not_found(f"no segment {name!r}")
    if status != 200:
        raise ServiceDown("segmenter", "rejected the members request", 502)
    return web.json_response(body)


# -- a customer: the audit log -----------------------------------------------------------------
async def customer_audit(request: web.Request) -> web.Response:
    cid = _customer_id(request)
    up = upstream(request)
    path = "/customers/" + c.safe_path(cid)
    calls = [
        up.get("identity", path),
        up.get("scorer", path),
        up.get("segmenter", path),
        up.get("dispatcher", path),
        up.get("segmenter", f"/console/customers/{c.safe_path(cid)}/memberships"),
    ]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    ident, scored, segs, acts, hist = (_found(*a) for a in answers)  # type: ignore[misc]
    audit = request.app.get(AUDIT)
    known = audit is not None and audit.knows(cid)
    if ident is None and scored is None and segs is None and not known:
        raise not_found(f"no customer {cid!r}")
    explained = {s["segment"]: s for s in (segs or {}).get("segments", [])}
    changes = audit.changes(cid) if audit is not None else []
    merges = audit.merges(cid) if audit is not None else []
    timeline = membership_timeline(changes, (hist or {}).get("memberships", []), explained)
    for mg in merges:
        timeline.append({"at": mg["occurred_at"], "kind": "merged", **mg})
    for a in (acts or {}).get("settled", []) + (acts or {}).get("pending", []):
        timeline.append({"at": a["decided_at"], "kind": "action", **a})
    for a in (acts or {}).get("assignments", []):
        timeline.append({"at": a["decided_at"], "kind": "assigned", **a})
    if ident and ident.get("first_seen_at"):
        timeline.append({"at": ident["first_seen_at"], "kind": "first_seen"})
    timeline.sort(key=lambda e: (e["at"] or 0, e["kind"]), reverse=True)
    scores = dict(scored) if scored else None
    features = scores.pop("features", None) if scores else None
    if scores is not None:
        scores.pop("customer_id", None)
    return web.json_response(
        {
            "customer_id": cid,
            "first_seen_at": ident.get("first_seen_at") if ident else None,
            "identifiers": ident.get("identifiers") if ident else [],
            "merges": merges,
            "merged_into": audit.merged_into(cid) if audit is not None else None,
            "history": "complete" if audit is not None else "latest entry and exit per segment",
            "recent_events": recent_events(features),
            "scores": scores,
            "features": features,
            "primary_segment": (segs or {}).get("primary_segment"),
            "definition_version": (segs or {}).get("definition_version"),
            "segments": (segs or {}).get("segments", []),
            "suppressions": (acts or {}).get("suppressions", []),
            "timeline": timeline,
        }
    )


# -- definitions: check, what-if, publish -----------------------------------------------------
async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_DEFINITIONS:
        raise bad_request(f"definitions are limited to {MAX_DEFINITIONS} bytes")
    try:
        body = await request.json()
    except ValueError:
        raise bad_request('expected a JSON body {"yaml": "..."}') from None
    if not isinstance(body, dict) or not isinstance(body.get("yaml"), str):
        raise bad_request('expected a JSON body {"yaml": "..."}')
    if len(body["yaml"].encode()) > MAX_DEFINITIONS:
        raise bad_request(f"definitions are limited to {MAX_DEFINITIONS} bytes")
    return body


async def _yaml_body(request: web.Request) -> str:
    text: str = (await _body(request))["yaml"]
    return text


async def definitions(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    path = c.definitions_path(settings.definitions)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ServiceDown(
            "segmenter", f"definitions file unreadable: {exc.strerror}", 502
        ) from None
    checked = c.check_definitions(text)
    return web.json_response(
        {
            "yaml": text,
            "version": checked["version"],
            "publishable": settings.definitions is not None,
        }
    )


async def check(request: web.Request) -> web.Response:
    body = await _body(request)
    if _kind(body) == "playbook":
        return web.json_response(c.check_playbooks(body["yaml"]))
    return web.json_response(c.check_definitions(body["yaml"]))


def _kind(body: dict[str, Any]) -> str:
    kind = body.get("kind", "segments")
    if kind not in ("segments", "playbook"):
        raise bad_request("kind must be 'segments' or 'playbook'")
    return str(kind)


async def playbooks(request: web.Request) -> web.Response:
    files = c.playbook_files(request.app[SETTINGS].playbooks)
    out = []
    for name, path in files.items():
        try:
            out.append({"file": name, "yaml": path.read_text()})
        except OSError:
            continue
    return web.json_response({"playbooks": out})


async def whatif(request: web.Request) -> web.Response:
    body = await _body(request)
    text: str = body["yaml"]
    kind = _kind(body)
    checked = c.check_playbooks(text) if kind == "playbook" else c.check_definitions(text)
    if not checked["valid"]:  # an answer, not an error: the check says what is wrong
        return web.json_response({"check": checked, "diff": None})
    settings = request.app[SETTINGS]
    current = c.definitions_path(settings.definitions)
    lock = request.app[REPLAYING]
    if lock.locked():  # a replay reads the whole recorded history: never several at once
        raise GatewayError(503, "service_unavailable", "a what-if replay is already running")
    async with lock:
        try:
            diff = await c.run_replay(
                text,
                current,
                settings.replay_timeout,
                kind,
                c.playbook_spec(settings.playbooks),
            )
        except RuntimeError as exc:
            raise GatewayError(502, "bad_gateway", f"replay failed: {exc}") from None
    return web.json_response({"check": checked, "diff": diff})


async def publish(request: web.Request) -> web.Response:
    require_editor(request)
    settings = request.app[SETTINGS]
    if settings.definitions is None:
        raise GatewayError(
            409, "conflict", "publishing is off: the gateway has no SEGFLOW_API_DEFINITIONS file"
        )
    text = await _yaml_body(request)
    checked = c.check_definitions(text)
    if not checked["valid"]:  # nothing written; the running version stays
        return web.json_response({"check": checked, "published": False})
    c.publish_definitions(Path(settings.definitions), text)
    log.info("definitions published", extra={"fields": {"version": checked["version"]}})
    return web.json_response({"check": checked, "published": True})


async def publish_playbook(request: web.Request) -> web.Response:
    require_editor(request)
    settings = request.app[SETTINGS]
    if settings.playbooks is None:
        raise GatewayError(
            409, "conflict", "publishing playbooks is off: the gateway has no SEGFLOW_API_PLAYBOOKS"
        )
    files = c.playbook_files(settings.playbooks)
    name = request.match_info["file"]
    if name not in files:
        raise not_found(f"no playbook file {name!r} (the files are: {', '.join(files)})")
    text = await _yaml_body(request)
    checked = c.check_playbook_book(text, name, files)
    if not checked["valid"]:  # nothing written; the dispatcher keeps running what it runs
        return web.json_response({"check": checked, "published": False})
    c.publish_definitions(files[name], text)
    log.info("playbook published", extra={"fields": {"file": name, "version": checked["version"]}})
    return web.json_response({"check": checked, "published": True})


# -- the sampler and the routes ----------------------------------------------------------------
def _warm(settings: Any) -> None:
    """Parse the definitions and playbook files once at start (the pages reuse the result
    until the files change), so the first page view does not pay for it."""
    try:
        text = c.definitions_path(settings.definitions).read_text()
        c.check_definitions(text)
        c.segment_yaml(text)
        c.playbooks_by_segment(settings.playbooks)
    except Exception:  # noqa: BLE001 (a page says what is wrong with them, later)
        log.debug("console warm-up failed", exc_info=True)


async def _sample(app: web.Application) -> None:
    history = app[HISTORY]
    interval = app[SETTINGS].console_sample_interval
    await asyncio.to_thread(_warm, app[SETTINGS])
    while True:
        try:
            from segflow.api.gateway import UPSTREAM

            status, body = await app[UPSTREAM].get("segmenter", "/segments", timeout=interval * 2)
            if status == 200 and isinstance(body, dict):
                history.add(int(time.time() * 1000), dict(body.get("sizes") or {}))
        except GatewayError:
            pass  # the segmenter is down: a gap in the chart
        await asyncio.sleep(interval)


def add_routes(app: web.Application) -> None:
    app[SESSIONS] = c.Sessions()
    app[HISTORY] = c.SizeHistory()
    app[REPLAYING] = asyncio.Lock()

    async def sampler_ctx(app: web.Application) -> Any:
        task = asyncio.create_task(_sample(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(sampler_ctx)
    settings = app[SETTINGS]
    if settings.audit:
        app[AUDIT] = AuditIndex()

        async def audit_ctx(app: web.Application) -> Any:
            reader = AuditReader(app[AUDIT]).start()
            yield
            await asyncio.to_thread(reader.stop)

        app.cleanup_ctx.append(audit_ctx)
    r = app.router
    r.add_get("/console", index)
    r.add_get("/console/", index)
    r.add_get("/console/login", login_form)
    r.add_post("/console/login", login)
    r.add_post("/console/logout", logout)
    r.add_get("/console/static/{name}", c.static_file)
    r.add_get("/v1/console/session", session)
    r.add_get("/v1/console/segments", segments_overview)
    r.add_get("/v1/console/segments/{name}", segment_detail)
    r.add_get("/v1/console/segments/{name}/members", segment_members)
    r.add_get("/v1/console/customers/{customer_id}", customer_audit)
    r.add_get("/v1/console/definitions", definitions)
    r.add_put("/v1/console/definitions", publish)
    r.add_post("/v1/console/definitions/check", check)
    r.add_post("/v1/console/whatif", whatif)
    r.add_get("/v1/console/playbooks", playbooks)
    r.add_put("/v1/console/playbooks/{file}", publish_playbook)
