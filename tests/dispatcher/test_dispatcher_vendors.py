"""Vendor ids and credentials are checked at start: a routed real endpoint without credentials,
or a routed step without its vendor id, stops the dispatcher with the setting to set."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from segflow.errors import ConfigError
from services.dispatcher.adapters import CallFailed, MapContacts, Rejected, SendGridEmail
from services.dispatcher.app import AsyncRunner, DispatcherSettings, build_router
from services.dispatcher.core import Request
from services.dispatcher.playbooks import DEFAULT_DIR, load_book
from services.dispatcher.vendors import check_routes, list_names, template_names

BOOK = load_book([DEFAULT_DIR])
REAL = dict(
    crm_base_url="https://api.hubapi.com",
    email_base_url="https://api.sendgrid.com",
    webhook_url="https://hooks.example.com/segflow",
)


def configured(**kw: Any) -> DispatcherSettings:
    base: dict[str, Any] = dict(
        REAL,
        crm_token="pat-na1-x",
        email_api_key="SG.x",
        webhook_secret="s3cret-for-real",
        hubspot_lists={n: str(10 + i) for i, n in enumerate(sorted(list_names(BOOK)))},
        hubspot_owner_id="12345",
        sendgrid_templates={t: "d-" + "0" * 31 + "1" for t in template_names(BOOK)},
        sendgrid_asm_group_id=42,
    )
    base.update(kw)
    return DispatcherSettings(**base)


def test_a_fully_configured_real_deployment_starts() -> None:
    check_routes(configured(), BOOK)


@pytest.mark.parametrize(
    ("drop", "setting", "detail"),
    [
        ("crm_token", "SEGFLOW_DISPATCHER_CRM_TOKEN", "https://api.hubapi.com"),
        ("email_api_key", "SEGFLOW_DISPATCHER_EMAIL_API_KEY", "https://api.sendgrid.com"),
        ("webhook_secret", "SEGFLOW_DISPATCHER_WEBHOOK_SECRET", "hooks.example.com"),
        ("hubspot_lists", "SEGFLOW_DISPATCHER_HUBSPOT_LISTS", "loyal-customers"),
        ("hubspot_owner_id", "SEGFLOW_DISPATCHER_HUBSPOT_OWNER_ID", "owner"),
        ("sendgrid_templates", "SEGFLOW_DISPATCHER_SENDGRID_TEMPLATES", "d-atrisk-reengage"),
        ("sendgrid_asm_group_id", "SEGFLOW_DISPATCHER_SENDGRID_ASM_GROUP_ID", "unsubscribe"),
    ],
)
def test_start_is_refused_naming_the_missing_setting(drop: str, setting: str, detail: str) -> None:
    cfg = configured()
    cfg = DispatcherSettings(
        **{**cfg.model_dump(), drop: DispatcherSettings.model_fields[drop].default}
    )
    with pytest.raises(ConfigError) as exc:
        check_routes(cfg, BOOK)
    assert setting in str(exc.value) and detail in str(exc.value)
    assert "pat-na1-x" not in str(exc.value) and "SG.x" not in str(exc.value)  # no secrets


def test_salesforce_needs_campaign_record_ids_for_lists() -> None:
    cfg = configured(crm_kind="salesforce")
    with pytest.raises(ConfigError, match="SEGFLOW_DISPATCHER_SALESFORCE_CAMPAIGNS"):
        check_routes(cfg, BOOK)
    names = sorted(list_names(BOOK))
    ok = configured(
        crm_kind="salesforce",
        salesforce_campaigns={n: f"701{i:012d}AAA" for i, n in enumerate(names)},
    )
    check_routes(ok, BOOK)


def test_the_environment_carries_the_vendor_id_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGFLOW_DISPATCHER_HUBSPOT_LISTS", json.dumps({"vip": "314"}))
    monkeypatch.setenv("SEGFLOW_DISPATCHER_SENDGRID_ASM_GROUP_ID", "9")
    cfg = DispatcherSettings()
    assert cfg.hubspot_lists == {"vip": "314"} and cfg.sendgrid_asm_group_id == 9
    assert cfg.email_on_ambiguous == "at_most_once"  # the documented default for email


def test_build_router_refuses_before_any_call(tmp_path: Path) -> None:
    runner = AsyncRunner()
    try:
        with pytest.raises(ConfigError, match="SEGFLOW_DISPATCHER_CRM_TOKEN"):
            build_router(configured(crm_token=None), runner, playbooks=BOOK)
        # local endpoints (the receiver) get stand-in ids of the vendor's shape
        router, client = build_router(DispatcherSettings(), runner, playbooks=BOOK)
        runner.run(client.aclose())
        assert router.crm is not None
    finally:
        runner.close()


def mail_request() -> Request:
    return Request(
        key="sf-k9",
        customer_id="c1",
        channel="email",
        playbook="P",
        step="mail",
        segment="S",
        variant="A",
        campaign_id="camp",
        template="d-" + "1" * 32,
        subject="Hi",
        body=None,
    )


@pytest.mark.parametrize(
    ("failure", "at_most_once", "at_least_once"),
    [
        (httpx.ReadTimeout("lost"), Rejected, CallFailed),
        (httpx.RemoteProtocolError("dropped"), Rejected, CallFailed),
        (httpx.ConnectError("refused"), CallFailed, CallFailed),  # never sent: retry is safe
        (500, Rejected, CallFailed),
        (503, CallFailed, CallFailed),  # not accepted: retry is safe
        (429, CallFailed, CallFailed),
    ],
)
def test_email_policy_on_an_ambiguous_failure(
    failure: Any, at_most_once: type[Exception], at_least_once: type[Exception]
) -> None:
    def handler(r: httpx.Request) -> httpx.Response:
        if isinstance(failure, Exception):
            raise failure
        return httpx.Response(failure)

    for policy, expected in (("at_most_once", at_most_once), ("at_least_once", at_least_once)):
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        email = SendGridEmail(
            client,
            "http://x",
            "k",
            "f@x.example",
            MapContacts({"c1": "a@b.example"}),
            asm_group_id=1,
            on_ambiguous=policy,  # type: ignore[arg-type]
        )
        with pytest.raises(expected) as exc:
            asyncio.run(email.send(mail_request()))
        if expected is Rejected:
            assert str(exc.value).startswith("ambiguous:")


def test_marketo_needs_static_list_and_smart_campaign_ids() -> None:
    with pytest.raises(ConfigError) as exc:
        check_routes(configured(crm_kind="marketo"), BOOK)
    assert "SEGFLOW_DISPATCHER_MARKETO_LISTS" in str(exc.value)
    assert "SEGFLOW_DISPATCHER_MARKETO_CAMPAIGNS" in str(exc.value)
    ok = configured(
        crm_kind="marketo",
        marketo_lists={n: str(500 + i) for i, n in enumerate(sorted(list_names(BOOK)))},
        marketo_campaigns={"crm_task": "1001", "support_escalation": "1002"},
    )
    check_routes(ok, BOOK)


def test_customer_risk_segment_records_need_salesforce() -> None:
    book = load_book([DEFAULT_DIR, DEFAULT_DIR / "salesforce"])
    with pytest.raises(ConfigError, match="SEGFLOW_DISPATCHER_CRM_KIND: crm_segment"):
        check_routes(configured(), book)
    names = sorted(list_names(book))
    campaigns = {n: f"701{i:012d}AAA" for i, n in enumerate(names)}
    check_routes(configured(crm_kind="salesforce", salesforce_campaigns=campaigns), book)


def crm_request(channel: str) -> Request:
    return Request(
        key="sf-k7",
        customer_id="c1",
        channel=channel,
        playbook="P",
        step="s",
        segment="S",
        variant="A",
        campaign_id="camp",
        template=None,
        subject="Call",
        body=None,
        list_id="vip",
        properties={"segflow_status": "x"},
    )


def run_with(adapter_of: Any, answers: Any, channel: str) -> Any:
    async def go() -> Any:
        client = httpx.AsyncClient(transport=httpx.MockTransport(answers))
        return await adapter_of(client).send(crm_request(channel))

    return asyncio.run(go())


def test_a_hubspot_list_add_of_an_unknown_record_is_not_sent() -> None:
    """HubSpot answers 200 and lists the id in recordIdsMissing: nobody was added."""
    from services.dispatcher.adapters import HubSpotCRM

    def answers(r: httpx.Request) -> httpx.Response:
        if r.method == "GET":
            return httpx.Response(200, json={"id": "5101", "properties": {}})
        return httpx.Response(200, json={"recordIdsMissing": ["5101"], "recordsIdsAdded": []})

    with pytest.raises(Rejected, match="not_added"):
        run_with(
            lambda c: HubSpotCRM(c, "http://x", "t", lists={"vip": "314"}), answers, "crm_list"
        )


def test_a_salesforce_campaign_member_that_already_exists_counts_as_sent() -> None:
    from services.dispatcher.adapters import SalesforceCRM

    def answers(r: httpx.Request) -> httpx.Response:
        if r.method == "GET":
            return httpx.Response(200, json={"Id": "003000000000042AAA"})
        return httpx.Response(
            400, json=[{"errorCode": "DUPLICATE_VALUE", "message": "Already a campaign member."}]
        )

    crm = lambda c: SalesforceCRM(c, "http://x", "t", campaigns={"vip": "701" + "0" * 15})  # noqa: E731
    assert run_with(crm, answers, "crm_list").status == 400  # sent: the member exists


@pytest.mark.parametrize(
    ("code", "error"), [("1004", Rejected), ("606", CallFailed), ("601", CallFailed)]
)
def test_marketo_errors_in_a_200_answer_are_failures(code: str, error: type[Exception]) -> None:
    """Marketo reports errors with HTTP 200 and success: false (1004 lead not found; 606 rate
    limit; 601 access token invalid): never recorded as sent."""
    from services.dispatcher.adapters import MarketoCRM

    def answers(r: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"success": False, "errors": [{"code": code, "message": "no"}]}
        )

    with pytest.raises(error, match=f"marketo {code}"):
        run_with(lambda c: MarketoCRM(c, "http://x", "t"), answers, "crm_property")


class _DropAfterData:
    """An SMTP server that takes the message and closes the connection before answering."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.received += 1
        server.transport.close()
        return "250 OK"


@pytest.mark.parametrize(
    ("policy", "expected"), [("at_most_once", Rejected), ("at_least_once", CallFailed)]
)
def test_smtp_policy_when_the_answer_to_data_is_lost(
    policy: str, expected: type[Exception]
) -> None:
    from aiosmtpd.controller import Controller

    from segflow.runtime.broker import free_port
    from services.dispatcher.adapters import SMTPEmail

    handler = _DropAfterData()
    ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        smtp = SMTPEmail(
            "127.0.0.1",
            ctl.port,
            "r@mail.example.com",
            MapContacts({"c1": "a@b.example"}),
            timeout=5,
            on_ambiguous=policy,  # type: ignore[arg-type]
        )
        with pytest.raises(expected) as exc:
            asyncio.run(smtp.send(mail_request()))
    finally:
        ctl.stop()
    assert handler.received == 1  # the message went out: the failure is ambiguous
    if expected is Rejected:
        assert str(exc.value).startswith("ambiguous:")


def test_email_to_a_real_endpoint_needs_the_contact_vault_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from segflow.runtime.settings import Settings
    from segflow.runtime.vault import generate_key
    from services.dispatcher.app import Dispatcher
    from services.dispatcher.contacts import VaultContacts

    settings = Settings(bootstrap_servers="127.0.0.1:1")
    monkeypatch.delenv("SEGFLOW_VAULT_KEY", raising=False)
    with pytest.raises(ConfigError, match="SEGFLOW_VAULT_KEY") as exc:
        Dispatcher(settings, configured(), book=BOOK)
    assert "email" in str(exc.value)
    # the demo's address pattern is refused for real endpoints too
    with pytest.raises(ConfigError, match="SEGFLOW_DISPATCHER_CONTACT_PATTERN"):
        Dispatcher(settings, configured(contact_pattern="{customer_id}@x.invalid"), book=BOOK)
    key = generate_key()
    monkeypatch.setenv("SEGFLOW_VAULT_KEY", key)
    d = Dispatcher(settings, configured(), book=BOOK)
    try:
        assert isinstance(d.vault, VaultContacts)
        assert d.router.email is not None and d.router.email.contacts is d.vault  # type: ignore[attr-defined]
    finally:
        d.close()
    monkeypatch.setenv("SEGFLOW_VAULT_KEY", "too-short")
    with pytest.raises(ConfigError, match="SEGFLOW_VAULT_KEY") as bad:
        Dispatcher(settings, configured(), book=BOOK)
    assert "too-short" not in str(bad.value)
