"""The console's server side without a browser: login and session cookie, roles, publishing,
the definitions check (against ``segflow segments check`` itself), the size-drift rule, and the
gateway fixes schemathesis asked for (405 with Allow, empty cursor, any customer_id)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from api.conftest import TOKEN, Stack, gateway_for
from segflow.api import console
from segflow.api.console import SizeHistory, segment_yaml
from services.segmenter.app import DEFAULT_DEFINITIONS

EDITOR = "editor-" + TOKEN


@pytest.fixture
def editor_gateway(stack: Stack, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    definitions = tmp_path / "segments.yaml"
    definitions.write_text(DEFAULT_DEFINITIONS.read_text())
    gw = gateway_for(stack.urls, editor_token=EDITOR, definitions=definitions)
    try:
        yield gw.url, definitions
    finally:
        gw.stop()


def test_login_sets_an_httponly_strict_cookie_that_reads_but_cannot_publish(
    editor_gateway: tuple[str, Path],
) -> None:
    url, definitions = editor_gateway
    with httpx.Client(base_url=url) as browser:
        # no session: the page redirects to the login form, the data routes answer 401
        page = browser.get("/console/")
        assert page.status_code == 303 and page.headers["location"] == "/console/login"
        assert browser.get("/v1/console/segments").status_code == 401
        wrong = browser.post("/console/login", data={"token": "nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        assert "segflow_session" not in browser.cookies
        ok = browser.post("/console/login", data={"token": TOKEN})
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie  # the session id, not the token
        assert browser.get("/v1/console/session").json()["role"] == "viewer"
        assert browser.get("/v1/console/segments").status_code == 200
        before = definitions.read_text()
        refused = browser.put(
            "/v1/console/definitions",
            json={"yaml": before + "\n"},
            headers={"X-Segflow-Console": "1"},
        )
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert definitions.read_text() == before
        # sign out: the session is gone server-side too
        sid = browser.cookies["segflow_session"]
        browser.post("/console/logout")
        assert (
            httpx.get(url + "/v1/console/segments", cookies={"segflow_session": sid}).status_code
            == 401
        )


def test_an_editor_publishes_valid_definitions_only(editor_gateway: tuple[str, Path]) -> None:
    url, definitions = editor_gateway
    original = definitions.read_text()
    changed = original.replace('version: "2026.12.3"', 'version: "2026.12.99"')
    assert changed != original
    with httpx.Client(base_url=url) as browser:
        browser.post("/console/login", data={"token": EDITOR})
        assert browser.get("/v1/console/session").json() == {
            "role": "editor",
            "can_publish": True,
            "can_publish_playbooks": False,  # no SEGFLOW_API_PLAYBOOKS for this gateway
            "sample_interval": 5.0,
        }
        # so publishing a playbook is off, and says why
        off = browser.put(
            "/v1/console/playbooks/lifecycle.yaml",
            json={"yaml": "playbook: x\n"},
            headers={"X-Segflow-Console": "1"},
        )
        assert off.status_code == 409 and "SEGFLOW_API_PLAYBOOKS" in off.json()["error"]["message"]
        # a cookie session must send the console's header (a cross-site form cannot)
        csrf = browser.put("/v1/console/definitions", json={"yaml": changed})
        assert csrf.status_code == 403 and "X-Segflow-Console" in csrf.json()["error"]["message"]
        assert definitions.read_text() == original
        bad = browser.put(
            "/v1/console/definitions",
            json={"yaml": changed.replace("priority: 100", "priority: high", 1)},
            headers={"X-Segflow-Console": "1"},
        ).json()
        assert bad["published"] is False and bad["check"]["problems"]
        assert definitions.read_text() == original
        good = browser.put(
            "/v1/console/definitions", json={"yaml": changed}, headers={"X-Segflow-Console": "1"}
        ).json()
        assert good["published"] is True and good["check"]["version"].startswith("2026.12.99")
        assert definitions.read_text() == changed
    # the editor token works as a bearer token too
    resp = httpx.put(
        url + "/v1/console/definitions",
        json={"yaml": original},
        headers={"Authorization": f"Bearer {EDITOR}"},
    )
    assert resp.status_code == 200 and definitions.read_text() == original


def test_publishing_is_off_without_a_definitions_file(stack: Stack) -> None:
    gw = gateway_for(stack.urls, editor_token=EDITOR)
    try:
        resp = httpx.put(
            gw.url + "/v1/console/definitions",
            json={"yaml": DEFAULT_DEFINITIONS.read_text()},
            headers={"Authorization": f"Bearer {EDITOR}"},
        )
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "conflict"
    finally:
        gw.stop()


def test_check_reports_what_segflow_segments_check_prints(stack: Stack, tmp_path: Path) -> None:
    text = DEFAULT_DEFINITIONS.read_text()
    broken = text.replace("priority: 100", "priority: high", 1).replace(
        'escalations_7d, op: ">="', 'escalations_7d, op: "~"', 1
    )
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    cli = subprocess.run(
        [sys.executable, "-m", "segflow.cli", "segments", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1
    expected = [line.removeprefix(f"{path}:") for line in cli.stdout.splitlines()]
    with stack.client() as client:
        body = client.post("/v1/console/definitions/check", json={"yaml": broken}).json()
        assert body["valid"] is False
        got = [f"{p['line']}: {p['field']}: {p['message']}" for p in body["problems"]]
        assert got == expected and len(got) >= 2
        ok = client.post("/v1/console/definitions/check", json={"yaml": text}).json()
        assert ok["valid"] is True and "Support Escalation" in ok["segments"]
        assert client.post("/v1/console/definitions/check", json=["x"]).status_code == 400


def test_405_names_the_allowed_methods(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.delete("/v1/segments")
        assert resp.status_code == 405
        assert set(resp.headers["allow"].split(",")) == {"GET", "HEAD"}
        resp = client.post("/v1/console/definitions", json={"yaml": ""})
        assert resp.status_code == 405
        assert set(resp.headers["allow"].split(",")) == {"GET", "HEAD", "PUT"}


def test_an_empty_cursor_is_the_first_page_and_any_customer_id_is_looked_up(
    stack: Stack,
) -> None:
    name = next(n for n, s in stack.pipeline.segmenter.segment_sizes().items() if s)
    with stack.client() as client:
        first = client.get(f"/v1/segments/{name}/members", params={"limit": 3}).json()
        empty = client.get(f"/v1/segments/{name}/members", params={"limit": 3, "cursor": ""})
        assert empty.status_code == 200 and empty.json() == first
        # schema-valid ids the services do not know are 404s, control characters included
        for cid in ("c-\x01\x7f", "\u2028", "a b"):
            resp = client.get("/v1/customers/" + quote(cid, safe=""))
            assert resp.status_code == 404, cid
        assert client.get("/v1/customers/" + "x" * 201).status_code == 400


def test_drift_flag_follows_the_alert_rule() -> None:
    h = SizeHistory()
    hour = console.HOUR_MS
    h.add(0, {"S": 100, "T": 1000})
    h.add(hour // 2, {"S": 120, "T": 1100})
    h.add(hour, {"S": 140, "T": 1200})
    # an hour on: S moved 55 from 100 (limit max(25, 50) = 50): drift; T moved 240 < 250
    assert h.drift("S", 155, hour)["flag"] is True
    assert h.drift("S", 150, hour)["flag"] is False
    assert h.drift("T", 1240, hour) == {
        "flag": False,
        "baseline": 1000,
        "baseline_at": 0,
        "limit": 250.0,
    }
    assert h.drift("T", 1251, hour)["flag"] is True
    assert SizeHistory().drift("S", 10, 0)["flag"] is False


def test_each_segments_yaml_is_its_own_lines() -> None:
    text = DEFAULT_DEFINITIONS.read_text()
    parts = segment_yaml(text)
    assert "Support Escalation" in parts and "Re-engaged" in parts
    block = parts["Support Escalation"]
    assert "name: Support Escalation" in block and "name: High-CLV" not in block
    assert block.lstrip().startswith("#")  # the comment above the segment is its own
    assert all(part in text for part in parts.values())


def test_the_demo_points_to_the_console() -> None:
    from segflow.api import wiring

    said: list[str] = []
    assert "Console: http://127.0.0.1:9/console/" in wiring.announce(
        "http://127.0.0.1:9", "t", True
    )
    wiring.explore("http://127.0.0.1:9", "tok", True, said.append, wait=False)
    assert (
        said[0]
        == "      Explore the results in the console: http://127.0.0.1:9/console/ (token tok)"
    )
    said.clear()
    wiring.explore("http://127.0.0.1:9", "secret", False, said.append, wait=False)
    assert "secret" not in " ".join(said) and "$SEGFLOW_API_TOKEN" in said[0]
