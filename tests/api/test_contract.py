"""Contract: every route in openapi.yaml is served, and every answer — success and error —
validates against the schema the spec documents for its status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from api.conftest import Stack
from api.openapi_check import load_spec, response_schema, validate
from segflow.api.app import create_app
from segflow.api.gateway import GatewaySettings

SPEC = load_spec()


def _some_member(stack: Stack) -> tuple[str, str]:
    """A segment with members and one of them that identity knows too."""
    known = stack.pipeline.identity.store
    for name in stack.pipeline.segmenter.segment_sizes():
        for cid, st in sorted(stack.pipeline.segmenter.states.items()):
            m = st.memberships.get(name)
            if m is not None and m.active and "p:" + cid in known:
                return name, cid
    raise AssertionError("the fixture population entered no segment")


#: For each documented route: the concrete requests (path, query, expected status) to make.
Plan = Callable[[Stack], list[tuple[str, dict[str, Any], int]]]
PLANS: dict[str, Plan] = {
    "/v1/health": lambda s: [("/v1/health", {}, 200)],
    "/v1/openapi.yaml": lambda s: [("/v1/openapi.yaml", {}, 200)],
    "/v1/customers/{customer_id}": lambda s: [
        (f"/v1/customers/{_some_member(s)[1]}", {}, 200),
        (f"/v1/customers/{_some_member(s)[1]}", {"segments": "all"}, 200),
        ("/v1/customers/c-0000000000000000", {}, 404),
        ("/v1/customers/" + "x" * 201, {}, 400),
        (f"/v1/customers/{_some_member(s)[1]}", {"segments": "some"}, 400),
    ],
    "/v1/identities/resolve": lambda s: [
        (
            "/v1/identities/resolve",
            {
                "type": "user_id",
                "value": next(v["user_id"] for v in s.pipeline.raw_ids.values() if "user_id" in v),
            },
            200,
        ),
        ("/v1/identities/resolve", {"type": "email", "value": "nobody@example.org"}, 404),
        ("/v1/identities/resolve", {"type": "phone", "value": "1"}, 400),
    ],
    "/v1/segments": lambda s: [("/v1/segments", {}, 200)],
    "/v1/segments/{name}/members": lambda s: [
        (f"/v1/segments/{_some_member(s)[0]}/members", {"limit": 2}, 200),
        ("/v1/segments/NoSuchSegment/members", {}, 404),
        (f"/v1/segments/{_some_member(s)[0]}/members", {"limit": 0}, 400),
    ],
    "/v1/campaigns/kpis": lambda s: [("/v1/campaigns/kpis", {}, 200)],
    "/v1/console/session": lambda s: [("/v1/console/session", {}, 200)],
    "/v1/console/segments": lambda s: [("/v1/console/segments", {}, 200)],
    "/v1/console/segments/{name}": lambda s: [
        (f"/v1/console/segments/{_some_member(s)[0]}", {}, 200),
        ("/v1/console/segments/NoSuchSegment", {}, 404),
    ],
    "/v1/console/segments/{name}/members": lambda s: [
        (f"/v1/console/segments/{_some_member(s)[0]}/members", {"limit": 2}, 200),
        (f"/v1/console/segments/{_some_member(s)[0]}/members", {"sort": "id", "q": "c-"}, 200),
        ("/v1/console/segments/NoSuchSegment/members", {}, 404),
        (f"/v1/console/segments/{_some_member(s)[0]}/members", {"sort": "size"}, 400),
    ],
    "/v1/console/customers/{customer_id}": lambda s: [
        (f"/v1/console/customers/{_some_member(s)[1]}", {}, 200),
        ("/v1/console/customers/c-0000000000000000", {}, 404),
        ("/v1/console/customers/" + "x" * 201, {}, 400),
    ],
    "/v1/console/definitions": lambda s: [("/v1/console/definitions", {}, 200)],
    "/v1/console/playbooks": lambda s: [("/v1/console/playbooks", {}, 200)],
}
#: Served but not API: the console's HTML pages, login form and static assets.
PAGES = {"/console", "/console/", "/console/login", "/console/logout", "/console/static/{name}"}


def test_the_gateway_serves_exactly_the_documented_routes() -> None:
    app = create_app(GatewaySettings(token="t"))
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None and r.resource.canonical not in PAGES
    }
    documented = {(m.upper(), path) for path, ops in SPEC["paths"].items() for m in ops}
    assert served == documented
    gets = {path for path, ops in SPEC["paths"].items() if "get" in ops}
    assert set(PLANS) == gets  # every documented GET route is exercised below
    writes = documented - {("GET", p) for p in gets}
    assert writes == {
        ("PUT", "/v1/console/definitions"),
        ("PUT", "/v1/console/playbooks/{file}"),
        ("POST", "/v1/console/definitions/check"),
        ("POST", "/v1/console/whatif"),
    }


@pytest.mark.parametrize("route", sorted(PLANS))
def test_every_answer_validates_against_the_spec(stack: Stack, route: str) -> None:
    with stack.client() as client:
        for path, query, status in PLANS[route](stack):
            resp = client.get(path, params=query)
            assert resp.status_code == status, (path, query, resp.text[:300])
            schema = response_schema(SPEC, route, status)
            if route == "/v1/openapi.yaml":
                assert resp.headers["content-type"].startswith("application/yaml")
                assert "openapi: 3.0.3" in resp.text
                continue
            assert resp.headers["content-type"].startswith("application/json")
            assert validate(SPEC, schema, resp.json()) == [], (path, query)


def test_every_protected_route_documents_and_answers_401(stack: Stack) -> None:
    error = {"$ref": "#/components/schemas/Error"}
    with stack.client(token=None) as client:
        for route, ops in SPEC["paths"].items():
            for method, op in ops.items():
                public = op.get("security") == []
                if method == "get":
                    path, query, _ = PLANS[route](stack)[0]
                    resp = client.get(path, params=query)
                else:
                    resp = client.request(method.upper(), route, json={"yaml": "version: 1"})
                if public:
                    assert resp.status_code in (200, 503)
                    continue
                assert "401" in op["responses"], (method, route)
                assert resp.status_code == 401, (method, route)
                assert validate(SPEC, error, resp.json()) == []


def test_validator_rejects_what_it_should() -> None:
    page = {"$ref": "#/components/schemas/MembersPage"}
    good = {"segment": "S", "size": 2, "members": ["a", "b"], "next_cursor": None}
    assert validate(SPEC, page, good) == []
    assert validate(SPEC, page, {**good, "size": -1}) == ["$.size: -1 < minimum 0"]
    assert validate(SPEC, page, {**good, "members": [1]}) == [
        "$.members[0]: expected string, got int 1"
    ]
    assert validate(SPEC, page, {**good, "extra": 1}) == ["$: unexpected property 'extra'"]
    assert validate(SPEC, page, {k: v for k, v in good.items() if k != "size"}) == [
        "$: missing required 'size'"
    ]
    assert validate(SPEC, page, {**good, "next_cursor": 5}) != []
    assert validate(SPEC, {"type": "integer"}, True) != []
    with pytest.raises(ValueError, match="does not support"):
        validate(SPEC, {"type": "string", "pattern": "x"}, "x")
