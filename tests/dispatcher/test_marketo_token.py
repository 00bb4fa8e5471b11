"""Marketo access tokens: fetched from the identity endpoint with client credentials, reused
until shortly before ``expires_in`` runs out, refreshed then, and refreshed and the call sent
again when Marketo answers 601 (invalid) or 602 (expired). Marketo answers these errors with
HTTP 200 and ``success: false`` (REST API > Error Codes), which is what the fake answers."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from services.dispatcher.adapters import CallFailed, MarketoCRM, MarketoToken, Rejected
from services.dispatcher.core import Request
from services.dispatcher.vendors import (
    VendorSettings,
    check_routes,
    crm_adapter,
    with_local_stand_ins,
)

BASE = "https://123-ABC-456.mktorest.com"


class FakeMarketo:
    """Identity endpoint plus leads.json; tokens t1, t2, ... each valid for ``lifetime`` s."""

    def __init__(self, lifetime: int = 3599, refuse: dict[str, str] | None = None) -> None:
        self.lifetime = lifetime
        self.issued: list[str] = []
        self.refuse = dict(refuse or {})  # token -> Marketo error code to answer with
        self.calls: list[str | None] = []  # bearer of each API call
        self.identity_queries: list[dict[str, str]] = []

    def __call__(self, r: httpx.Request) -> httpx.Response:
        if r.url.path == "/identity/oauth/token":
            self.identity_queries.append(dict(r.url.params))
            if r.url.params.get("client_secret") != "shh":
                return httpx.Response(401, json={"error": "invalid_client"})
            token = f"t{len(self.issued) + 1}"
            self.issued.append(token)
            return httpx.Response(
                200,
                json={
                    "access_token": token,
                    "token_type": "bearer",
                    "expires_in": self.lifetime,
                    "scope": "api@x",
                },
            )
        bearer = r.headers.get("Authorization", "").removeprefix("Bearer ") or None
        self.calls.append(bearer)
        code = self.refuse.get(bearer or "")
        if code or bearer not in self.issued:
            code = code or "601"
            text = {"601": "Access token invalid", "602": "Access token expired"}[code]
            return httpx.Response(
                200,
                json={
                    "requestId": "r",
                    "success": False,
                    "errors": [{"code": code, "message": text}],
                },
            )
        return httpx.Response(
            200,
            json={"requestId": "r", "success": True, "result": [{"id": 7, "status": "updated"}]},
        )


def sync(n: int = 0) -> Request:
    return Request(
        key=f"sf-k{n}",
        customer_id="c1",
        channel="crm_property",
        playbook="P",
        step="s",
        segment="S",
        variant="A",
        campaign_id="camp",
        template=None,
        subject=None,
        body=None,
        properties={"segflow_risk": "high"},
    )


def adapter(fake: FakeMarketo, now: list[float]) -> tuple[MarketoCRM, MarketoToken]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    tokens = MarketoToken(client, f"{BASE}/identity", "cid", "shh", clock=lambda: now[0])
    return MarketoCRM(client, BASE, None, token_source=tokens), tokens


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_one_token_serves_calls_until_shortly_before_it_expires_then_a_new_one() -> None:
    fake, now = FakeMarketo(lifetime=3599), [1000.0]
    crm, tokens = adapter(fake, now)

    async def scenario() -> None:
        await crm.send(sync(1))
        await crm.send(sync(2))
        now[0] += 3599 - 59  # inside the last minute of t1: refreshed before the call
        await crm.send(sync(3))

    run(scenario())
    assert fake.calls == ["t1", "t1", "t2"]
    assert fake.identity_queries[0] == {
        "grant_type": "client_credentials",
        "client_id": "cid",
        "client_secret": "shh",
    }
    assert tokens.refreshes == 2 and "shh" not in repr(tokens)


@pytest.mark.parametrize("code", ["601", "602"])
def test_a_refused_token_is_replaced_and_the_call_sent_again(code: str) -> None:
    fake, now = FakeMarketo(refuse={"t1": code}), [0.0]
    crm, _ = adapter(fake, now)
    sent = run(crm.send(sync()))
    assert sent.status == 200
    assert fake.calls == ["t1", "t2"] and fake.issued == ["t1", "t2"]


def test_a_token_refused_twice_is_a_retry_later_not_a_loop() -> None:
    fake, now = FakeMarketo(refuse={"t1": "602", "t2": "602"}), [0.0]
    crm, _ = adapter(fake, now)
    with pytest.raises(CallFailed, match="602"):
        run(crm.send(sync()))
    assert fake.calls == ["t1", "t2"]


def test_wrong_client_credentials_fail_permanently_naming_the_settings() -> None:
    fake = FakeMarketo()
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    tokens = MarketoToken(client, f"{BASE}/identity", "cid", "wrong")
    crm = MarketoCRM(client, BASE, None, token_source=tokens)
    with pytest.raises(Rejected, match="MARKETO_CLIENT_ID") as exc:
        run(crm.send(sync()))
    assert "wrong" not in str(exc.value) and fake.calls == []


def test_settings_build_the_token_source_and_the_start_check_accepts_it() -> None:
    from segflow.errors import ConfigError
    from services.dispatcher.app import DispatcherSettings
    from services.dispatcher.playbooks import DEFAULT_DIR, load_book
    from services.dispatcher.vendors import list_names

    book = load_book([DEFAULT_DIR])
    ids = dict(
        crm_kind="marketo",
        crm_base_url=BASE,
        email_base_url="http://127.0.0.1:1",
        marketo_lists={n: "1" for n in list_names(book)},
        marketo_campaigns={"crm_task": "2", "support_escalation": "3"},
    )
    with pytest.raises(ConfigError, match="SEGFLOW_DISPATCHER_MARKETO_CLIENT_ID"):
        bare = DispatcherSettings(**ids)  # type: ignore[arg-type]
        check_routes(with_local_stand_ins(bare, bare, book), book)
    cfg = DispatcherSettings(
        **ids,
        marketo_client_id="cid",
        marketo_client_secret="shh",  # type: ignore[arg-type]
    )
    check_routes(with_local_stand_ins(cfg, cfg, book), book)
    crm = crm_adapter(
        VendorSettings(**cfg.model_dump()), httpx.AsyncClient(), "marketo", BASE, None
    )
    assert isinstance(crm, MarketoCRM) and crm.tokens is not None
    assert crm.tokens.url == f"{BASE}/identity/oauth/token"
