"""The gateway against the real services' endpoints (fed by their real handlers): auth, a
customer's profile against each service's own state, paging, and services that are down."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from api.conftest import TOKEN, Stack, closed_port, gateway_for
from segflow.api import cli as api_cli
from segflow.api.app import create_app
from segflow.api.gateway import GatewaySettings
from segflow.errors import ConfigError
from services.scorer.core import PRIOR_SHARE_FEATURE
from services.scorer.features import FEATURE_NAMES


def _members(stack: Stack, segment: str) -> list[str]:
    return sorted(
        cid
        for cid, st in stack.pipeline.segmenter.states.items()
        if (m := st.memberships.get(segment)) is not None and m.active
    )


def _customer_with_user_id(stack: Stack) -> tuple[str, dict[str, str]]:
    """A customer every service knows, with the raw identifiers the simulator sent for it."""
    p = stack.pipeline
    for cid, raw in sorted(p.raw_ids.items()):
        if (
            "user_id" in raw
            and "p:" + cid in p.identity.store
            and cid in p.segmenter.states
            and p.scorer.states.get(cid) is not None
            and p.dispatcher.customer(cid)
        ):
            return cid, raw
    raise AssertionError("no customer known to every service")


# -- auth --------------------------------------------------------------------------------
def test_requests_without_the_right_bearer_token_get_401_json(stack: Stack) -> None:
    cases = {
        None: "missing bearer token",
        "Bearer wrong": "invalid bearer token",
        f"Bearer {TOKEN}x": "invalid bearer token",
        f"Basic {TOKEN}": "missing bearer token",
        "Bearer": "missing bearer token",
    }
    with httpx.Client(base_url=stack.gateway.url) as client:
        for header, message in cases.items():
            headers = {"Authorization": header} if header is not None else {}
            resp = client.get("/v1/segments", headers=headers)
            assert resp.status_code == 401, header
            assert resp.json() == {"error": {"code": "unauthorized", "message": message}}
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert client.get("/v1/segments", headers={"Authorization": f"bearer {TOKEN}"}).is_success
        assert client.get("/v1/health").status_code == 200  # public, for probes
        assert client.get("/v1/openapi.yaml").status_code == 200


def test_the_gateway_refuses_to_start_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SEGFLOW_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="SEGFLOW_API_TOKEN is not set"):
        create_app(GatewaySettings())
    assert api_cli.main(["--port", "0"]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err


def test_insecure_mode_serves_without_a_token(stack: Stack) -> None:
    gateway = gateway_for(stack.urls, token=None)
    try:
        resp = httpx.get(gateway.url + "/v1/segments")
        assert resp.status_code == 200 and resp.json()["segments"]
    finally:
        gateway.stop()


# -- the profile ---------------------------------------------------------------------------
def test_a_profile_matches_what_each_service_holds(stack: Stack) -> None:
    p = stack.pipeline
    cid, raw = _customer_with_user_id(stack)
    with stack.client() as client:
        resp = client.get(f"/v1/customers/{cid}")
    assert resp.status_code == 200
    body = resp.json()
    # Identifiers: exactly the identity profile's nodes, hashed; no raw value anywhere.
    nodes = p.identity.store.get("p:" + cid)["identifiers"]
    assert [(i["type"][0], i["hash"]) for i in body["identifiers"]] == [
        (n[0], n[2:]) for n in nodes
    ]
    for value in raw.values():
        assert value not in resp.text
    assert "@" not in resp.text
    # Features and scores: the scorer's full feature vector, a probability, explanations.
    # every behavioural feature, plus how much of the churn score is still the cold-start prior
    assert set(body["features"]) == {*FEATURE_NAMES, PRIOR_SHARE_FEATURE}
    assert 0.0 <= body["scores"]["churn_probability"] <= 1.0
    assert len(body["scores"]["top_features"]) == 5
    assert body["scores"]["as_of"] >= p.scorer.states.get(cid)["last_event_ms"]
    # Memberships: the segmenter's active ones, each with its conditions.
    active = {n for n, m in p.segmenter.states[cid].memberships.items() if m.active}
    got = body["segments"]["memberships"]
    assert {m["segment"] for m in got} == active and all(m["member"] for m in got)
    assert all(m["conditions"] for m in got)
    assert body["segments"]["primary_segment"] == p.segmenter.states[cid].primary
    # Actions: the dispatcher's ledger.
    ledger = p.dispatcher.customer(cid)
    assert len(body["actions"]["pending"]) + len(body["actions"]["settled"]) == len(ledger.actions)
    with stack.client() as client:
        every = client.get(f"/v1/customers/{cid}", params={"segments": "all"}).json()
    assert len(every["segments"]["memberships"]) == len(p.segmenter.defs.segments)


def test_an_identifier_resolves_to_its_customer(stack: Stack) -> None:
    cid, raw = _customer_with_user_id(stack)
    with stack.client() as client:
        for id_type, value in raw.items():
            resp = client.get("/v1/identities/resolve", params={"type": id_type, "value": value})
            if id_type == "user_id" or resp.status_code == 200:
                # weak ids may have stopped linking (shared devices), a user id never does
                assert resp.json() == {"customer_id": cid, "type": id_type}
        missing = client.get("/v1/identities/resolve", params={"type": "user_id", "value": "zz"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        blank = client.get("/v1/identities/resolve", params={"type": "user_id", "value": " "})
        assert blank.status_code == 400


def test_unknown_customers_and_bad_ids_are_json_errors(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.get("/v1/customers/c-does-not-exist")
        assert resp.status_code == 404
        assert resp.json() == {
            "error": {"code": "not_found", "message": "no customer 'c-does-not-exist'"}
        }
        assert client.get("/v1/customers/" + "x" * 201).status_code == 400
        resp = client.get("/v1/nowhere")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
        resp = client.post("/v1/segments")
        assert resp.status_code == 405
        assert resp.json()["error"]["code"] == "method_not_allowed"


# -- segments and paging -------------------------------------------------------------------
def test_segment_list_sizes_match_the_segmenter(stack: Stack) -> None:
    with stack.client() as client:
        body = client.get("/v1/segments").json()
    sizes = {s["name"]: s["size"] for s in body["segments"]}
    assert sizes == stack.pipeline.segmenter.segment_sizes()
    assert body["definition_version"] == stack.pipeline.segmenter.defs.version


@pytest.mark.parametrize("limit", [1, 3, 1000])
def test_paging_walks_every_member_once_in_order(stack: Stack, limit: int) -> None:
    name = max(stack.pipeline.segmenter.segment_sizes().items(), key=lambda kv: kv[1])[0]
    truth = _members(stack, name)
    assert len(truth) > 3  # enough for several pages
    seen: list[str] = []
    pages = 0
    cursor = None
    with stack.client() as client:
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor is not None:
                params["cursor"] = cursor
            page = client.get(f"/v1/segments/{name}/members", params=params).json()
            pages += 1
            assert len(page["members"]) <= limit and page["size"] == len(truth)
            seen += page["members"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == truth
    assert pages == -(-len(truth) // limit)  # no empty last page


def test_bad_paging_parameters_are_400(stack: Stack) -> None:
    name = next(n for n, s in stack.pipeline.segmenter.segment_sizes().items() if s)
    with stack.client() as client:
        for params in (
            {"limit": 0},
            {"limit": 1001},
            {"limit": "ten"},
            {"cursor": "!!!"},
            {"cursor": "_w"},
        ):
            resp = client.get(f"/v1/segments/{name}/members", params=params)
            assert resp.status_code == 400, params
            assert resp.json()["error"]["code"] == "bad_request"
        resp = client.get("/v1/segments/No Such/members")
        assert resp.status_code == 404
        assert resp.json()["error"]["message"] == "no segment 'No Such'"


def test_kpis_are_the_dispatchers_and_filter_by_segment(stack: Stack) -> None:
    with stack.client() as client:
        rows = client.get("/v1/campaigns/kpis").json()["kpis"]
        ledger = stack.pipeline.dispatcher.kpis()
        assert {(r["segment"], r["playbook"], r["variant"]) for r in rows} == set(ledger)
        for r in rows:
            assert r["assigned"] == ledger[(r["segment"], r["playbook"], r["variant"])].get(
                "assigned", 0
            )
        seg = rows[0]["segment"]
        only = client.get("/v1/campaigns/kpis", params={"segment": seg}).json()["kpis"]
        assert only and {r["segment"] for r in only} == {seg}


# -- services down ---------------------------------------------------------------------------
@pytest.fixture
def down(stack: Stack) -> Iterator[Any]:
    """``down(*services)``: a gateway on which those services are unreachable."""
    gateways = []

    def make(*services: str, **extra: Any) -> httpx.Client:
        urls = dict(stack.urls)
        for s in services:
            urls[s] = f"http://127.0.0.1:{closed_port()}"
        g = gateway_for(urls, **extra)
        gateways.append(g)
        return httpx.Client(
            base_url=g.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )

    yield make
    for g in gateways:
        g.stop()


def test_a_service_down_is_a_503_naming_it(stack: Stack, down: Any) -> None:
    cid, raw = _customer_with_user_id(stack)
    expectations = {
        "scorer": f"/v1/customers/{cid}",
        "segmenter": "/v1/segments",
        "dispatcher": "/v1/campaigns/kpis",
        "identity": f"/v1/identities/resolve?type=user_id&value={raw['user_id']}",
    }
    for service, path in expectations.items():
        with down(service) as client:
            resp = client.get(path)
            assert resp.status_code == 503, (service, resp.text)
            assert resp.json()["error"] == {
                "code": "service_unavailable",
                "message": f"{service} is unavailable: connection refused",
                "service": service,
            }
            health = client.get("/v1/health")
            assert health.status_code == 503
            states = {n: s["status"] for n, s in health.json()["services"].items()}
            assert states == {n: ("down" if n == service else "ok") for n in states}
    with down("segmenter", "dispatcher") as client:
        err = client.get(f"/v1/customers/{cid}").json()["error"]
        assert err["service"] == "segmenter" and "dispatcher" in err["message"]


class _Fake(BaseHTTPRequestHandler):
    mode = "html500"

    def do_GET(self) -> None:  # noqa: N802
        if self.mode == "slow":
            time.sleep(2)
        body = b"<html>oops</html>"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("mode", "status", "message"),
    [
        ("html500", 502, "scorer answered badly: HTTP 500, not JSON"),
        ("slow", 503, "scorer is unavailable: timed out"),
    ],
)
def test_a_scorer_answering_badly_or_slowly(
    stack: Stack, mode: str, status: int, message: str
) -> None:
    handler = type("Fake", (_Fake,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = {**stack.urls, "scorer": f"http://127.0.0.1:{server.server_port}"}
    gateway = gateway_for(urls, timeout=0.5)
    cid, _ = _customer_with_user_id(stack)
    try:
        resp = httpx.get(
            f"{gateway.url}/v1/customers/{cid}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert resp.status_code == status
        assert resp.json()["error"]["message"] == message
        assert resp.json()["error"]["service"] == "scorer"
    finally:
        gateway.stop()
        server.shutdown()


# -- the services' own endpoints -----------------------------------------------------------
def test_service_endpoints_answer_json_errors(stack: Stack) -> None:
    for service, url in stack.urls.items():
        health = httpx.get(url + "/health").json()
        assert health["service"] == service and health["status"] == "ok"
        resp = httpx.get(url + "/customers/c-nobody")
        assert resp.status_code == 404
        assert set(resp.json()["error"]) == {"code", "message"}
        assert httpx.post(url + "/health").status_code == 405
    resp = httpx.get(stack.urls["segmenter"] + "/segments/ReEngageAtRisk?limit=-1")
    assert resp.status_code == 400
    assert json.loads(resp.text)["error"]["message"] == (
        "limit must be an integer between 1 and 10000"
    )


# -- wiring ----------------------------------------------------------------------------------
def test_up_keeps_a_private_token_unless_one_is_given(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segflow.api.wiring import local_token

    monkeypatch.delenv("SEGFLOW_API_TOKEN", raising=False)
    token, source = local_token(tmp_path)
    assert len(token) >= 24 and source == str(tmp_path / "api-token")
    assert (tmp_path / "api-token").stat().st_mode & 0o777 == 0o600
    assert local_token(tmp_path) == (token, source)  # the same token on the next `up`
    monkeypatch.setenv("SEGFLOW_API_TOKEN", "from-env")
    assert local_token(tmp_path) == ("from-env", "SEGFLOW_API_TOKEN")
