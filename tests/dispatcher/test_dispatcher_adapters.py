"""Adapters: request shapes, idempotency keys, error mapping (httpx MockTransport), real SMTP
and the real local receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from segflow.receiver import Cue, Receiver, SMTPReceiver
from services.dispatcher.adapters import (
    AiohttpClient,
    CallFailed,
    HubSpotCRM,
    MapContacts,
    Rejected,
    SalesforceCRM,
    SendGridEmail,
    SignedWebhook,
    SMTPEmail,
)
from services.dispatcher.core import Request
from services.dispatcher.signing import verify


def req(channel: str, **kw: Any) -> Request:
    base: dict[str, Any] = dict(
        key="sf-k1",
        customer_id="c1",
        channel=channel,
        playbook="AtRisk-60d",
        step="s",
        segment="AtRisk-60d",
        variant="A",
        campaign_id="camp",
        template="d-1",
        subject="Hi Ada",
        body="body",
        variables={"first_name": "Ada"},
        list_id="L1",
        properties={"segflow_status": "x"},
    )
    base.update(kw)
    return Request(**base)


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), timeout=1.0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def capture(
    status: int = 200, headers: dict[str, str] | None = None
) -> tuple[list[httpx.Request], httpx.AsyncClient]:
    seen: list[httpx.Request] = []

    def handler(r: httpx.Request) -> httpx.Response:
        seen.append(r)
        return httpx.Response(status, headers=headers or {}, json={})

    return seen, mock(handler)


def test_sendgrid_shape_carries_template_data_and_the_idempotency_key() -> None:
    seen, client = capture(202)
    email = SendGridEmail(
        client,
        "http://127.0.0.1:1",
        "SG.key",
        "from@x.invalid",
        MapContacts({"c1": "ada@example.invalid"}),
        templates={"d-1": TEMPLATE},
        asm_group_id=77,
    )
    sent = run(email.send(req("email")))
    r = seen[0]
    body = json.loads(r.content)
    assert (r.method, r.url.path, sent.status) == ("POST", "/v3/mail/send", 202)
    assert r.headers["Idempotency-Key"] == "sf-k1"
    assert r.headers["Authorization"] == "Bearer SG.key"
    assert body["template_id"] == TEMPLATE  # the configured SendGrid id of template "d-1"
    # a dynamic template's subject line is {{subject}}: the variant's subject travels as data
    assert body["personalizations"][0]["dynamic_template_data"] == {
        "first_name": "Ada",
        "subject": "Hi Ada",
    }
    assert "subject" not in body and "subject" not in body["personalizations"][0]
    assert body["personalizations"][0]["to"] == [{"email": "ada@example.invalid"}]
    assert body["personalizations"][0]["custom_args"]["idempotency_key"] == "sf-k1"
    assert "custom_args" not in body  # the spec types the top-level one as a string
    assert body["asm"] == {"group_id": 77}
    assert body["categories"] == ["segflow", "camp", "camp:A"]
    assert body["headers"]["Idempotency-Key"] == "sf-k1"
    with pytest.raises(Rejected, match="no_contact"):
        run(email.send(req("email", customer_id="unknown")))


TEMPLATE = "d-" + "ab" * 16
SF = "/services/data/v62.0/sobjects"


def crm_answers(r: httpx.Request) -> httpx.Response:
    """The CRM's answers: the contact lookups return its record ids; upserts the new id."""
    if r.method == "GET" and "/contacts/" in r.url.path:
        return httpx.Response(200, json={"id": "5101", "properties": {"hubspot_owner_id": None}})
    if r.method == "GET":
        return httpx.Response(200, json={"Id": "003000000000042AAA", "OwnerId": None})
    if r.url.path.endswith("/batch/upsert"):
        return httpx.Response(200, json={"results": [{"id": "9001"}]})
    return httpx.Response(201, json={})


@pytest.mark.parametrize(
    ("cls", "channel", "calls"),
    [
        (
            HubSpotCRM,
            "crm_property",
            [("PATCH", "/crm/v3/objects/contacts/c1", "idProperty=segflow_customer_id")],
        ),
        (
            HubSpotCRM,
            "crm_task",
            [
                ("GET", "/crm/v3/objects/contacts/c1", None),
                ("POST", "/crm/v3/objects/tasks/batch/upsert", ""),
                ("PUT", "/crm/v4/objects/tasks/9001/associations/default/contacts/5101", ""),
            ],
        ),
        (
            HubSpotCRM,
            "crm_list",
            [
                ("GET", "/crm/v3/objects/contacts/c1", None),
                ("PUT", "/crm/v3/lists/314/memberships/add", ""),
            ],
        ),
        (
            HubSpotCRM,
            "support_escalation",
            [
                ("GET", "/crm/v3/objects/contacts/c1", None),
                ("POST", "/crm/v3/objects/tickets/batch/upsert", ""),
                ("PUT", "/crm/v4/objects/tickets/9001/associations/default/contacts/5101", ""),
            ],
        ),
        (
            SalesforceCRM,
            "crm_property",
            [("PATCH", f"{SF}/Contact/Segflow_Customer_Id__c/c1", "updateOnly=true")],
        ),
        (
            SalesforceCRM,
            "crm_task",
            [
                ("GET", f"{SF}/Contact/Segflow_Customer_Id__c/c1", None),
                ("PATCH", f"{SF}/Task/Segflow_Idempotency_Key__c/sf-k1", ""),
            ],
        ),
        (
            SalesforceCRM,
            "crm_list",
            [
                ("GET", f"{SF}/Contact/Segflow_Customer_Id__c/c1", None),
                ("PATCH", f"{SF}/CampaignMember/Segflow_Idempotency_Key__c/sf-k1", ""),
            ],
        ),
        (
            SalesforceCRM,
            "support_escalation",
            [
                ("GET", f"{SF}/Contact/Segflow_Customer_Id__c/c1", None),
                ("PATCH", f"{SF}/Case/Segflow_Idempotency_Key__c/sf-k1", ""),
            ],
        ),
    ],
)
def test_crm_shapes(cls: Any, channel: str, calls: list[tuple[str, str, str | None]]) -> None:
    seen: list[httpx.Request] = []

    def handler(r: httpx.Request) -> httpx.Response:
        seen.append(r)
        return crm_answers(r)

    ids = {"lists": {"L1": "314"}} if cls is HubSpotCRM else {"campaigns": {"L1": "701" + "0" * 15}}
    crm = cls(mock(handler), "http://127.0.0.1:1", "tok", **ids)
    run(crm.send(req(channel)))
    assert [(r.method, r.url.path) for r in seen] == [(m, p) for m, p, _ in calls]
    for r, (_, _, query) in zip(seen, calls, strict=True):
        assert r.headers["Authorization"] == "Bearer tok"
        if query:
            assert r.url.query.decode() == query
        if r.method == "GET" or "/associations/" in r.url.path:
            assert "Idempotency-Key" not in r.headers  # lookups and associations carry no key
        else:
            assert r.headers["Idempotency-Key"] == "sf-k1"
    write = json.loads(seen[-1].content) if seen[-1].content else None
    if channel == "crm_task" and cls is HubSpotCRM:
        write = json.loads(seen[1].content)
        (item,) = write["inputs"]
        assert (item["idProperty"], item["id"]) == ("segflow_idempotency_key", "sf-k1")
        assert item["properties"]["hs_task_subject"] == "Hi Ada"
    if channel == "crm_task" and cls is SalesforceCRM:
        assert write["WhoId"] == "003000000000042AAA" and write["Subject"] == "Hi Ada"
    if channel == "crm_list" and cls is HubSpotCRM:
        assert write == ["5101"]  # the HubSpot record id, not segflow's customer id
    if channel == "crm_property" and cls is SalesforceCRM:
        assert write == {"Segflow_Status__c": "x", "Custom_Segment__c": "AtRisk-60d"}


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after"),
    [
        (429, {"Retry-After": "7"}, CallFailed, 7.0),
        (500, {}, CallFailed, None),
        (503, {"Retry-After": "2"}, CallFailed, 2.0),
        (400, {}, Rejected, None),
        (404, {}, Rejected, None),
    ],
)
def test_http_errors_map_to_retryable_or_permanent(
    status: int, headers: dict[str, str], error: type[Exception], retry_after: float | None
) -> None:
    _, client = capture(status, headers)
    with pytest.raises(error) as exc:
        run(HubSpotCRM(client, "http://127.0.0.1:1", None).send(req("crm_task")))
    if isinstance(exc.value, CallFailed):
        assert exc.value.retry_after == retry_after and exc.value.status == status


def test_409_means_the_receiver_already_has_the_key() -> None:
    _, client = capture(409)
    assert run(HubSpotCRM(client, "http://x", None).send(req("crm_property"))).status == 409


def test_timeouts_and_connection_errors_are_retryable() -> None:
    def slow(r: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=r)

    with pytest.raises(CallFailed, match="timeout"):
        run(HubSpotCRM(mock(slow), "http://x", None).send(req("crm_task")))
    client = httpx.AsyncClient(timeout=0.5)
    with pytest.raises(CallFailed, match="transport"):
        run(HubSpotCRM(client, "http://127.0.0.1:9", None).send(req("crm_task")))


def test_rate_limit_headers_come_back_as_a_pause() -> None:
    _, client = capture(202, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "3"})
    email = SendGridEmail(client, "http://x", None, "f@x.invalid", MapContacts({"c1": "a@b.c"}))
    assert run(email.send(req("email"))).pause == 3.0


def test_webhook_is_signed_verifiably() -> None:
    seen, client = capture(200)
    run(SignedWebhook(client, "http://127.0.0.1:1/webhook", b"s3cret").send(req("webhook")))
    r = seen[0]
    assert verify(
        b"s3cret", r.content, dict(r.headers), now=float(r.headers["X-Segflow-Timestamp"])
    )
    assert not verify(
        b"other", r.content, dict(r.headers), now=float(r.headers["X-Segflow-Timestamp"])
    )
    assert json.loads(r.content)["idempotency_key"] == "sf-k1"


def test_smtp_sends_with_the_key_as_message_id_and_retries_on_4xx(
    smtp_server: SMTPReceiver,
) -> None:
    smtp = SMTPEmail(
        "127.0.0.1",
        smtp_server.port,
        "from@x.invalid",
        MapContacts({"c1": "ada@example.invalid"}),
        timeout=5,
    )
    smtp_server.fail_next = 1
    with pytest.raises(CallFailed, match="smtp 451"):
        run(smtp.send(req("smtp")))
    assert run(smtp.send(req("smtp"))).status == 250
    run(smtp.send(req("smtp")))  # a retry after a lost answer: same Message-ID
    assert smtp_server.unique() == {"<sf-k1@x.invalid>"}  # RFC 5322: the sender's domain
    assert [m["to"] for m in smtp_server.messages] == ["ada@example.invalid"] * 2


def test_the_local_receiver_deduplicates_and_answers_on_cue(receiver: Receiver) -> None:
    async def go() -> list[int | str]:
        async with httpx.AsyncClient(timeout=0.3) as client:
            crm = HubSpotCRM(client, receiver.url, None)
            out: list[int | str] = []
            for _ in range(4):
                try:
                    out.append((await crm.send(req("crm_property"))).status or 0)
                except CallFailed as exc:
                    out.append(str(exc))
            return out

    receiver.cue(Cue(429, (("Retry-After", "1"),)), Cue(200, delay=1.0))
    out = run(go())
    assert out[0] == "http 429" and out[1].startswith("timeout")
    # the stalled request took effect although its answer was lost: retries are replays
    assert out[2:] == [200, 200]
    assert list(receiver.effects()) == ["sf-k1"]
    assert receiver.attempts()["sf-k1"] == 4


def test_the_aiohttp_client_sends_the_same_requests_and_maps_the_same_failures(
    receiver: Receiver,
) -> None:
    """The default client (aiohttp without httpx): JSON bodies, idempotency and auth headers,
    429 with Retry-After, a lost answer (timeout), a replay, a refused connection, a webhook
    the receiver verifies."""

    async def go() -> tuple[list[int | str], str]:
        client = AiohttpClient(limit=8, timeout=0.3)
        try:
            crm = HubSpotCRM(client, receiver.url, "tok")
            out: list[int | str] = []
            for _ in range(4):
                try:
                    out.append((await crm.send(req("crm_property"))).status or 0)
                except CallFailed as exc:
                    out.append(f"{exc} retry_after={exc.retry_after}")
            email = SendGridEmail(
                client,
                receiver.url,
                "key",
                "f@x.invalid",
                MapContacts({"c1": "a@b.c"}),
                templates={"d-1": TEMPLATE},
                asm_group_id=77,
            )
            out.append((await email.send(req("email", key="sf-k2"))).status or 0)
            hook = SignedWebhook(client, receiver.url + "/webhook", receiver.webhook_secret)
            out.append((await hook.send(req("webhook", key="sf-k3"))).status or 0)
            refused = HubSpotCRM(client, "http://127.0.0.1:9", None)
            try:
                await refused.send(req("crm_task"))
                down = "sent"
            except CallFailed as exc:
                down = str(exc)
            return out, down
        finally:
            await client.aclose()

    receiver.cue(Cue(429, (("Retry-After", "1"),)), Cue(200, delay=1.0))
    out, down = run(go())
    assert out[0] == "http 429 retry_after=1.0"
    assert str(out[1]).startswith("timeout")
    assert out[2:] == [200, 200, 202, 201]
    assert down.startswith("transport")
    effects = receiver.effects()
    crm = effects["sf-k1"]
    assert crm.method == "PATCH" and crm.body == {
        "properties": {"segflow_status": "x", "custom_segment": "AtRisk-60d"}
    }
    assert crm.headers["Authorization"] == "Bearer tok"
    assert crm.headers["Content-Type"] == "application/json"
    mail = effects["sf-k2"].body
    assert mail["personalizations"][0]["to"] == [{"email": "a@b.c"}]
    assert mail["personalizations"][0]["custom_args"]["idempotency_key"] == "sf-k2"
    assert effects["sf-k3"].status == 201  # the signature verified (401 otherwise)
    assert receiver.replays() == 2  # the lost answer took effect: both later tries replay
