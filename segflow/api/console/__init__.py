"""The retention console: a browser UI served by the API gateway, over the gateway's own data.

Pages (``/console/``, one HTML page with plain JavaScript and SVG charts, every asset shipped
in this package under ``static/``; nothing is fetched from elsewhere):

* **Segments** — size now, size over time (sampled by the gateway), entries and exits per hour,
  a drift flag (the ``SegflowSegmentSizeDrift`` alert's rule: the size moved by more than
  max(25 %, 50) in the last hour), definition version, priority, description, playbooks;
* **a segment** — its definition (YAML), members (paged, filtered by customer id, sorted by
  churn), entries and exits per hour, the campaign KPIs of its playbooks;
* **a customer** — the audit log: hashed identifiers, scores with the top contributing
  features, every membership with its explanation, every dispatch decision, as one timeline;
* **campaigns** — KPIs per segment × playbook × variant with uplift vs holdout and its 95 %
  interval;
* **what-if** — edit the definitions, check them with the loader ``segflow segments check``
  uses, replay recorded history with them (``segflow replay``) and, as an editor, publish.

Auth: the same bearer token as the API, or ``POST /console/login`` with a token, which sets an
HttpOnly, SameSite=Strict session cookie. ``SEGFLOW_API_TOKEN`` is a viewer (read only);
``SEGFLOW_API_EDITOR_TOKEN`` may also publish definitions. Requests authenticated by the
cookie that change something must carry ``X-Segflow-Console: 1`` (a header a cross-site form
cannot send). The JSON routes under ``/v1/console/`` are documented in ``openapi.yaml``.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import os
import secrets
import sys
import tempfile
import time
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "segflow_session"
SESSION_TTL = 12 * 3600.0
CSRF_HEADER = "X-Segflow-Console"
HOUR_MS = 3_600_000
#: Sampled segment sizes kept for the size-over-time chart (at the sampling interval).
HISTORY_POINTS = 2880
VIEWER, EDITOR = "viewer", "editor"


# -- sessions and roles --------------------------------------------------------------------
class Sessions:
    """Console sessions in memory: id -> (role, expiry). A restart logs everybody out."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[str, float]] = {}

    def create(self, role: str) -> str:
        now = time.monotonic()
        self._by_id = {k: v for k, v in self._by_id.items() if v[1] > now}
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = (role, now + SESSION_TTL)
        return sid

    def role(self, sid: str) -> str | None:
        found = self._by_id.get(sid)
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)


def role_for_token(given: str, viewer: str, editor: str) -> str | None:
    """Which role a token grants (constant-time comparisons), None when it grants none."""
    raw = given.strip().encode()
    is_editor = bool(editor) and hmac.compare_digest(raw, editor.encode())
    is_viewer = bool(viewer) and hmac.compare_digest(raw, viewer.encode())
    return EDITOR if is_editor else VIEWER if is_viewer else None


# -- size history --------------------------------------------------------------------------
class SizeHistory:
    """Segment sizes sampled by the gateway every few seconds (wall clock), for the charts and
    the drift flag. In memory: the chart starts when the gateway does."""

    def __init__(self, points: int = HISTORY_POINTS) -> None:
        self.samples: deque[tuple[int, dict[str, int]]] = deque(maxlen=points)
        self.version: str | None = None

    def add(self, at_ms: int, sizes: dict[str, int]) -> None:
        self.samples.append((at_ms, dict(sizes)))

    def series(self, name: str, max_points: int = 120) -> list[list[int]]:
        pts = [[t, s.get(name, 0)] for t, s in self.samples]
        if len(pts) > max_points:
            step = len(pts) / max_points
            pts = [pts[int(i * step)] for i in range(max_points - 1)] + [pts[-1]]
        return pts

    def drift(self, name: str, now_size: int, now_ms: int) -> dict[str, Any]:
        """The alert rule on the sampled history: |size - size an hour ago| > max(25 % of the
        size an hour ago, 50); before an hour of history, against the oldest sample."""
        base = None
        for t, s in self.samples:
            if t <= now_ms - HOUR_MS or base is None:
                base = (t, s.get(name, 0))
            else:
                break
        if base is None:
            return {"flag": False, "baseline": None, "baseline_at": None, "limit": None}
        limit = max(0.25 * base[1], 50.0)
        return {
            "flag": abs(now_size - base[1]) > limit,
            "baseline": base[1],
            "baseline_at": base[0],
            "limit": limit,
        }


# -- definitions and playbooks (files the gateway reads) -----------------------------------
def definitions_path(configured: Path | None) -> Path:
    if configured is not None:
        return configured
    from services.segmenter.settings import SegmenterConfig

    return SegmenterConfig().definitions  # SEGFLOW_SEGMENTER_DEFINITIONS, or the default


_BOOKS: dict[str, tuple[tuple[tuple[str, int], ...], dict[str, list[dict[str, Any]]]]] = {}


def playbooks_by_segment(spec: str | None) -> dict[str, list[dict[str, Any]]]:
    """The playbooks per segment, parsed again only when a file changed (by mtime): pages
    ask for them on every refresh."""
    stamp: list[tuple[str, int]] = []
    for f in playbook_files(spec).values():
        try:
            stamp.append((str(f), f.stat().st_mtime_ns))
        except OSError:
            stamp.append((str(f), -1))
    key = playbook_spec(spec)
    cached = _BOOKS.get(key)
    if cached is not None and cached[0] == tuple(stamp):
        return cached[1]
    found = _playbooks_by_segment(key)
    _BOOKS[key] = (tuple(stamp), found)
    return found


def _playbooks_by_segment(spec: str) -> dict[str, list[dict[str, Any]]]:
    from services.dispatcher.playbooks import PlaybookError, load_book

    try:
        book = load_book(Path(p) for p in spec.split(",") if p)
    except (PlaybookError, OSError):
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for p in book.playbooks:
        out.setdefault(p.segment, []).append(
            {
                "name": p.name,
                "version": str(p.version),
                "steps": [f"{s.id} ({s.channel})" for s in p.steps],
                "variants": [v.name for v in p.experiment.variants],
                "holdout": p.experiment.holdout,
            }
        )
    return out


@lru_cache(maxsize=8)
def segment_yaml(text: str) -> dict[str, str]:
    """Each segment's own lines of a definitions file (comments above it included)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(root, yaml.MappingNode):
        return {}
    lines = text.splitlines()
    out: dict[str, str] = {}
    for key, value in root.value:
        if key.value != "segments" or not isinstance(value, yaml.SequenceNode):
            continue
        items = value.value
        for i, item in enumerate(items):
            if not isinstance(item, yaml.MappingNode):
                continue
            name = next((v.value for k, v in item.value if k.value == "name"), None)
            start = item.start_mark.line
            end = items[i + 1].start_mark.line if i + 1 < len(items) else item.end_mark.line + 1
            while start > 0 and lines[start - 1].strip().startswith("#"):
                start -= 1
            if i + 1 < len(items):  # the next item's comments belong to it
                while end > start and (
                    not lines[end - 1].strip() or lines[end - 1].strip().startswith("#")
                ):
                    end -= 1
            if isinstance(name, str):
                out[name] = "\n".join(lines[start:end]).rstrip() + "\n"
    return out


def check_definitions(text: str) -> dict[str, Any]:
    """What ``segflow segments check`` says about a definitions text, as data (remembered
    for the last few texts: pages ask about the running file on every refresh)."""
    return dict(_check_definitions(text))


@lru_cache(maxsize=8)
def _check_definitions(text: str) -> dict[str, Any]:
    from services.segmenter.dsl import DefinitionError, parse

    try:
        defs = parse(text)
    except DefinitionError as exc:
        return {
            "valid": False,
            "version": None,
            "segments": [],
            "problems": [
                {"line": p.line, "field": p.field, "message": p.message} for p in exc.problems
            ],
        }
    return {
        "valid": True,
        "version": str(defs.version),
        "segments": [s.name for s in defs.segments],
        "problems": [],
    }


def playbook_spec(configured: str | None) -> str:
    from services.dispatcher.playbook_settings import PlaybookSettings

    return configured or PlaybookSettings().playbooks  # SEGFLOW_DISPATCHER_PLAYBOOKS or default


def playbook_files(spec: str | None) -> dict[str, Path]:
    """The playbook files the dispatcher loads, by file name."""
    files: dict[str, Path] = {}
    for part in playbook_spec(spec).split(","):
        if not part:
            continue
        path = Path(part)
        for f in sorted(path.glob("*.yaml")) if path.is_dir() else [path]:
            files[f.name] = f
    return files


def check_playbooks(text: str) -> dict[str, Any]:
    """What the dispatcher's loader says about one playbook file, as data (the loader stops
    at the first problem: ``file:line: field: problem``)."""
    from services.dispatcher.playbooks import PlaybookError, parse_documents

    try:
        found, _policy = parse_documents(text, "playbook")
    except PlaybookError as exc:
        _src, line, rest = (str(exc).split(":", 2) + ["", ""])[:3]
        field, _, message = rest.strip().partition(": ")
        return {
            "valid": False,
            "version": None,
            "segments": [],
            "problems": [
                {
                    "line": int(line) if line.isdigit() else 1,
                    "field": field or "(file)",
                    "message": message or str(exc),
                }
            ],
        }
    return {
        "valid": True,
        "version": ", ".join(f"{p.name} v{p.version}" for p in found) or None,
        "segments": sorted({p.segment for p in found}),
        "problems": [],
    }


def check_playbook_book(text: str, name: str, files: dict[str, Path]) -> dict[str, Any]:
    """:func:`check_playbooks` of a new text for file ``name``, then the whole book as the
    dispatcher would load it with that file replaced (playbook names unique across files)."""
    checked = check_playbooks(text)
    if not checked["valid"]:
        return checked
    from services.dispatcher.playbooks import PlaybookError, parse_documents

    mine = {p.name for p in parse_documents(text, name)[0]}
    for other, path in files.items():
        if other == name:
            continue
        try:
            theirs = {p.name for p in parse_documents(path.read_text(), other)[0]}
        except (PlaybookError, OSError):
            continue  # that file's own problem; the dispatcher reports it
        for dup in sorted(mine & theirs):
            line = next(
                (i for i, ln in enumerate(text.splitlines(), 1) if dup in ln and "playbook" in ln),
                1,
            )
            return {
                "valid": False,
                "version": None,
                "segments": [],
                "problems": [
                    {
                        "line": line,
                        "field": "playbook",
                        "message": f"duplicate playbook name {dup!r}: {other} has one",
                    }
                ],
            }
    return checked


# -- what-if: `segflow replay` over recorded history ---------------------------------------
async def run_replay(
    text: str, current: Path, timeout: float, kind: str = "segments", playbooks: str = ""
) -> dict[str, Any]:
    """Run ``segflow replay --segments NEW --json`` (or ``--playbooks NEW`` for a playbook
    file; reads the recorded topics, sends nothing) in a child process; its JSON difference,
    or raises RuntimeError with its message."""
    with tempfile.TemporaryDirectory(prefix="segflow-whatif-") as tmp:
        new = Path(tmp) / "whatif.yaml"
        new.write_text(text)
        argv = [
            sys.executable,
            "-m",
            "segflow.cli",
            "replay",
            "--playbooks" if kind == "playbook" else "--segments",
            str(new),
            "--current-segments",
            str(current),
            "--json",
        ]
        if playbooks:
            argv += ["--current-playbooks", playbooks]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"replay took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError(message[-1] if message else f"replay exited {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


def publish_definitions(path: Path, text: str) -> None:
    """Replace the definitions file atomically (the segmenter polls its mtime and reloads)."""
    tmp = path.with_name(f".{path.name}.console-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- pages -----------------------------------------------------------------------------------
def login_page(message: str = "", status: int = 200) -> web.Response:
    text = (STATIC / "login.html").read_text()
    note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return web.Response(
        text=text.replace("<!--message-->", note),
        status=status,
        content_type="text/html",
        headers=SECURITY_HEADERS,
    )


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

STATIC_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".html": "text/html",
}


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    path = (STATIC / name).resolve()
    if path.parent != STATIC or not path.is_file() or path.suffix not in STATIC_TYPES:
        raise web.HTTPNotFound()
    return web.Response(
        body=path.read_bytes(),
        content_type=STATIC_TYPES[path.suffix],
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


def safe_path(cid: str) -> str:
    return quote(cid, safe="")


# The handlers live in segflow.api.gateway (they use its Upstream and errors); this module
# keeps what does not depend on the gateway so it can be unit-tested alone.
__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "EDITOR",
    "VIEWER",
    "Sessions",
    "SizeHistory",
    "check_definitions",
    "definitions_path",
    "login_page",
    "playbooks_by_segment",
    "publish_definitions",
    "role_for_token",
    "run_replay",
    "segment_yaml",
    "static_file",
]
