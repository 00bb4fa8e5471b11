"""Wiring the API into ``segflow up`` and ``segflow demo``: the services' query ports, the
gateway as a supervised process, its token, and a short tour of the API for the demo."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from segflow.api.gateway import SERVICE_PORT_ENV
from segflow.supervisor import Supervisor


def service_env(name: str, port: int) -> dict[str, str]:
    """The variable that turns on a service's query endpoint on ``port``."""
    return {SERVICE_PORT_ENV[name]: str(port)} if name in SERVICE_PORT_ENV else {}


def add_gateway(
    sup: Supervisor,
    ports: dict[str, int] | dict[str, list[int]],
    port: int,
    token: str,
    host: str = "127.0.0.1",
    extra: dict[str, str] | None = None,
) -> str:
    """Supervise ``python -m segflow.api`` in front of the services on ``ports`` (one port,
    or one per instance of a scaled service); its URL. ``extra``: more ``SEGFLOW_API_*``
    settings (e.g. the console's editor token)."""
    env = {
        "SEGFLOW_API_TOKEN": token,
        "SEGFLOW_API_HOST": host,
        "SEGFLOW_API_PORT": str(port),
        "SEGFLOW_API_AUDIT": "1",  # the console's customer timeline reads the topics
        **{f"SEGFLOW_API_{n.upper()}_URL": _urls(p) for n, p in ports.items()},
        **(extra or {}),
    }
    sup.add("api", [sys.executable, "-m", "segflow.api"], env)
    return f"http://{host}:{port}"


def _urls(ports: int | list[int]) -> str:
    """``http://127.0.0.1:<port>``, comma-separated for several instances."""
    return ",".join(f"http://127.0.0.1:{p}" for p in ([ports] if isinstance(ports, int) else ports))


def local_token(state_dir: Path) -> tuple[str, str]:
    """``SEGFLOW_API_TOKEN`` if set, else a token kept in ``<state_dir>/api-token`` (created
    with mode 0600 on first use); returns it and where it came from."""
    given = os.environ.get("SEGFLOW_API_TOKEN")
    if given:
        return given, "SEGFLOW_API_TOKEN"
    path = state_dir / "api-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip(), str(path)


def wait_ready(url: str, timeout: float = 60.0) -> bool:
    """Poll ``/v1/health`` until every service answers (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


class TourError(RuntimeError):
    """The API did not answer a tour request with 200."""


def _get(api: httpx.Client, path: str, **params: Any) -> Any:
    resp = api.get(path, params=params)
    if resp.status_code != 200:
        raise TourError(f"GET {path}: HTTP {resp.status_code} {resp.text[:200]}")
    return resp.json()


def tour(url: str, token: str) -> tuple[list[str], dict[str, Any]]:
    """Ask the API what a user would (segments, the largest segment's first member's profile,
    KPIs); returns printable lines and a summary. Raises TourError or httpx.HTTPError."""
    lines: list[str] = []
    summary: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as api:
        segs = _get(api, "/v1/segments")["segments"]
        summary["segments"] = {s["name"]: s["size"] for s in segs}
        kpis = _get(api, "/v1/campaigns/kpis")["kpis"]
        summary["kpi_rows"] = len(kpis)
        summary["kpis"] = kpis
        lines.append(
            f"GET /v1/segments: {len(segs)} segments; GET /v1/campaigns/kpis: "
            f"{len(kpis)} rows (segment × playbook × variant)"
        )
        lines += kpi_lines(kpis)
        biggest = max(segs, key=lambda s: s["size"]) if segs else None
        if biggest and biggest["size"]:
            name = quote(biggest["name"], safe="")
            cid = _get(api, f"/v1/segments/{name}/members", limit=1)["members"][0]
            p = _get(api, f"/v1/customers/{quote(cid, safe='')}")
            member = [m["segment"] for m in (p["segments"] or {}).get("memberships", [])]
            churn = (p["scores"] or {}).get("churn_probability")
            lines.append(
                f"GET /v1/customers/{cid}: {len(p['identifiers'])} hashed identifiers, "
                f"{len(p['features'] or {})} features, churn probability {churn}, "
                f"segments: {', '.join(member) or '-'}"
            )
            summary["profile"] = {"customer_id": cid, "segments": member, "churn": churn}
    return lines, summary


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def kpi_lines(kpis: list[dict[str, Any]]) -> list[str]:
    """The KPI rows as a table: conversion and churn per assigned customer (intention to
    treat), uplift = conversion minus the holdout's, with its 95 % interval."""
    out = [
        f"  {'segment':26} {'playbook':24} {'variant':8} {'assigned':>8} {'sent':>6} "
        f"{'conv':>6} {'churn':>6}  uplift vs holdout [95% CI]"
    ]
    for k in kpis:
        ci = k.get("uplift_ci")
        uplift = (
            f"{100 * k['uplift']:+.1f} pts [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
            if k.get("uplift") is not None and ci
            else "-"
        )
        out.append(
            f"  {k['segment'][:26]:26} {k['playbook'][:24]:24} {k['variant'][:8]:8} "
            f"{k.get('assigned', 0):8,} {k.get('sent', 0):6,} "
            f"{_pct(k.get('conversion_rate')):>6} {_pct(k.get('churn_rate')):>6}  {uplift}"
        )
    return out


def demo_token() -> tuple[str, bool]:
    """The demo's API token: ``SEGFLOW_API_TOKEN`` if set, else a fresh one (generated=True)."""
    given = os.environ.get("SEGFLOW_API_TOKEN")
    return (given, False) if given else (secrets.token_urlsafe(18), True)


def announce(url: str, token: str, generated: bool) -> str:
    """The demo's line about the API (the token only when the demo made it up)."""
    shown = token if generated else "$SEGFLOW_API_TOKEN"
    return (
        f"      HTTP API: {url}/v1 (spec {url}/v1/openapi.yaml), token {shown}\n"
        f'        e.g. curl -H "Authorization: Bearer {shown}" {url}/v1/segments\n'
        f"      Console: {url}/console/ (sign in with the same token; read only)"
    )


def explore(url: str, token: str, generated: bool, say: Any, wait: bool | None = None) -> None:
    """The end of the demo: point to the console as the place to explore the results. In an
    interactive terminal the stack stays up until Ctrl-C (``wait``; default: stdin is a TTY
    and ``SEGFLOW_DEMO_NO_WAIT`` is unset)."""
    shown = token if generated else "$SEGFLOW_API_TOKEN"
    say(f"      Explore the results in the console: {url}/console/ (token {shown})")
    if wait is None:
        wait = sys.stdin.isatty() and not os.environ.get("SEGFLOW_DEMO_NO_WAIT")
    if not wait:
        say("      (the console runs while the stack does: `segflow up` keeps one running)")
        return
    say("      The stack stays up for the console; press Ctrl-C to stop it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("")


def demo_tour(url: str, token: str, say: Any) -> dict[str, Any]:
    """Run :func:`tour` and print it; a failure is reported, not raised."""
    try:
        lines, summary = tour(url, token)
    except (TourError, httpx.HTTPError, KeyError, IndexError) as exc:
        say(f"API tour failed: {exc}")
        return {"error": str(exc)}
    for line in lines:
        say(f"API {line}")
    return summary
