"""Every request of every step of every default playbook, per vendor, against the vendor's
published contract (``services.dispatcher.contracts``: SendGrid's OpenAPI extract through
``jsonschema``; HubSpot's and Salesforce's documented rules written as code; RFC 5322 through the
standard library's parser).

The adapters run against ``httpx.MockTransport`` (HTTP) and a real aiosmtpd server (SMTP); the
mock answers lookups the way the vendor does, so multi-call actions (lookup, upsert, associate)
are checked call by call.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from segflow.runtime.broker import free_port
from services.dispatcher import contracts
from services.dispatcher.adapters import MapContacts
from services.dispatcher.core import Request
from services.dispatcher.playbooks import DEFAULT_DIR, load_book, render
from services.dispatcher.vendors import VendorSettings, make_adapters

BOOK = load_book([DEFAULT_DIR])
# the Salesforce-only playbooks (CustomerRiskSegment__c on every risk segment entry and exit)
SF_BOOK = load_book([DEFAULT_DIR / "salesforce"])
CONTACTS = MapContacts({"c-42": "ada@example.com"})


def vendor_settings() -> VendorSettings:
    """The vendor ids an operator configures (the values the demo uses)."""
    lists = sorted({s.list_id for p in BOOK.playbooks for s in p.steps if s.list_id})
    templates = sorted(
        {s.template for p in BOOK.playbooks for s in p.steps if s.template}
        | {
            dict(f)["template"]
            for p in BOOK.playbooks
            for v in p.experiment.variants
            for _, f in v.overrides
            if "template" in dict(f)
        }
    )
    return VendorSettings(
        hubspot_lists={name: str(1000 + i) for i, name in enumerate(lists)},
        hubspot_owner_id="7001",
        salesforce_campaigns={name: f"701{i:012d}AAA" for i, name in enumerate(lists)},
        salesforce_owner_id="005000000000001AAA",
        marketo_lists={name: str(2000 + i) for i, name in enumerate(lists)},
        marketo_campaigns={"crm_task": "3001", "support_escalation": "3002"},
        sendgrid_templates={t: "d-" + f"{i:032x}" for i, t in enumerate(templates)},
        sendgrid_asm_group_id=4242,
    )


def requests_of_default_playbooks(book: Any = BOOK) -> list[Request]:
    """What ``core.request_for`` renders for each step, once per experiment variant."""
    out = []
    for pb in book.playbooks:
        for variant in pb.experiment.variants:
            for step in pb.steps:
                step = variant.apply(step)
                variables = dict(pb.defaults)
                # the change's explanation (observed feature values) and the profile
                variables.update(churn_probability="0.83", days_since_purchase="23")
                variables.update(activity_14d_vs_prior42_log_ratio="-1.2")
                variables.update(first_name="Ada", segment=pb.segment, playbook=pb.name)
                variables.update(variant=variant.name)
                variables.update({k: render(v, variables) for k, v in step.variables})
                out.append(
                    Request(
                        key=f"sf-{abs(hash((pb.name, variant.name, step.id))):032x}"[:35],
                        customer_id="c-42",
                        channel=step.channel,
                        playbook=pb.name,
                        step=step.id,
                        segment=pb.segment,
                        variant=variant.name,
                        campaign_id=pb.campaign_id or pb.name,
                        template=step.template,
                        subject=None if step.subject is None else render(step.subject, variables),
                        body=None if step.body is None else render(step.body, variables),
                        variables=variables,
                        list_id=step.list_id,
                        properties={k: render(v, variables) for k, v in step.properties},
                        task_priority=step.task_priority,
                    )
                )
    return out


REQUESTS = requests_of_default_playbooks()
SF_REQUESTS = requests_of_default_playbooks(SF_BOOK)


def vendor_answer(r: httpx.Request) -> httpx.Response:
    """What the vendor answers a well-formed call (lookups return the record)."""
    path = r.url.path
    if r.method == "GET" and path.startswith("/crm/v3/objects/contacts/"):
        return httpx.Response(200, json={"id": "5101", "properties": {"hubspot_owner_id": "7002"}})
    if r.method == "GET" and "/sobjects/Contact/" in path:
        return httpx.Response(
            200, json={"Id": "003000000000042AAA", "OwnerId": "005000000000002AAA"}
        )
    if path.endswith("/batch/upsert"):
        return httpx.Response(200, json={"status": "COMPLETE", "results": [{"id": "9001"}]})
    if path.startswith("/v3/mail/send"):
        return httpx.Response(202)
    if path.startswith("/rest/v1/"):  # Marketo: 200 with success and per-record results
        status = {"leads.json": "updated", "lists": "added"}.get(path.split("/")[3])
        result = [{"id": 77, "status": status}] if status else [{"id": 77}]
        return httpx.Response(200, json={"requestId": "r#1", "success": True, "result": result})
    if "/sobjects/" in path:
        return httpx.Response(201, json={"id": "a0X000000000001AAA", "success": True, "errors": []})
    return httpx.Response(200, json={})


def captured(vendor: str, req: Request) -> list[tuple[str, str, Any]]:
    seen: list[tuple[str, str, Any]] = []

    def handler(r: httpx.Request) -> httpx.Response:
        seen.append((r.method, str(r.url), json.loads(r.content) if r.content else None))
        return vendor_answer(r)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            router = make_adapters(
                vendor_settings(),
                client,
                CONTACTS,
                crm_kind=vendor if vendor in ("salesforce", "marketo") else "hubspot",
                base_url="https://api.vendor.example",
                sender="retention@mail.segflow.example",
            )
            adapter = router.for_channel(req.channel)
            assert adapter is not None
            await adapter.send(req)

    asyncio.run(go())
    return seen


def cases(channels: set[str]) -> list[Any]:
    return [
        pytest.param(r, id=f"{r.playbook}/{r.variant}/{r.step}")
        for r in REQUESTS
        if r.channel in channels
    ]


CRM = {"crm_property", "crm_task", "crm_list", "support_escalation"}


def test_the_default_playbooks_use_every_vendor_channel() -> None:
    assert {r.channel for r in REQUESTS} >= CRM | {"email"}


def assert_accepted(vendor: str, calls: list[tuple[str, str, Any]]) -> None:
    assert [m for m, _, _ in calls if m != "GET"], "no write request was made"
    for method, url, body in calls:
        assert contracts.vendor_of(httpx.URL(url).path) == vendor, url
        problems = contracts.check_http(method, url, body)
        assert not problems, f"{method} {url} {json.dumps(body)[:400]}:\n" + "\n".join(
            map(str, problems)
        )


@pytest.mark.parametrize("req", cases({"email"}))
def test_sendgrid_accepts_every_email_step(req: Request) -> None:
    assert_accepted("sendgrid", captured("sendgrid", req))


@pytest.mark.parametrize("req", cases(CRM))
def test_hubspot_accepts_every_crm_step(req: Request) -> None:
    assert_accepted("hubspot", captured("hubspot", req))


SF_CASES = [pytest.param(r, id=f"{r.playbook}/{r.step}") for r in SF_REQUESTS]


@pytest.mark.parametrize("req", cases(CRM) + SF_CASES)
def test_salesforce_accepts_every_crm_step(req: Request) -> None:
    assert_accepted("salesforce", captured("salesforce", req))


def test_every_risk_segment_entry_and_exit_upserts_its_customer_risk_segment_record() -> None:
    """Seed 000 §3.4: one CustomerRiskSegment__c per customer and segment, upserted on entry
    and on exit, with segment_name, created_on, last_triggered, churn_score,
    engagement_decay and last_purchase_date."""
    risk = {pb.segment for pb in BOOK.playbooks if not pb.segment.startswith("Lifecycle")}
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for req in SF_REQUESTS:
        ((method, url, body),) = [c for c in captured("salesforce", req) if c[0] != "GET"]
        path = httpx.URL(url).path
        assert method == "PATCH" and "/sobjects/CustomerRiskSegment__c/Segflow_Key__c/" in path
        transition = "entered" if body["In_Segment__c"] else "exited"
        seen[(req.segment, transition)] = {**body, "path": path}
    assert set(seen) == {(s, t) for s in risk for t in ("entered", "exited")}
    for seg in risk:
        entry, exit_ = seen[(seg, "entered")], seen[(seg, "exited")]
        assert entry["path"] == exit_["path"]  # the same record, updated
        assert entry["Segment_Name__c"] == seg and entry["Contact__c"].startswith("003")
        assert entry["Churn_Score__c"] == 0.83 and entry["Engagement_Decay__c"] == -1.2
        assert "Created_On__c" in entry and "Created_On__c" not in exit_
        assert entry["Last_Purchase_Date__c"] < entry["Created_On__c"]


@pytest.mark.parametrize("req", cases(CRM))
def test_marketo_accepts_every_crm_step(req: Request) -> None:
    assert_accepted("marketo", captured("marketo", req))


class _Capture:
    def __init__(self) -> None:
        self.raw: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.raw.append(envelope.original_content or envelope.content)
        return "250 OK"


@pytest.fixture(scope="module")
def smtp_capture() -> Any:
    cap = _Capture()
    ctl = Controller(cap, hostname="127.0.0.1", port=free_port())
    ctl.start()
    try:
        yield cap, ctl.port
    finally:
        ctl.stop()


_lock = threading.Lock()


@pytest.mark.parametrize("req", cases({"email"}))
def test_every_email_step_sent_by_smtp_is_an_rfc5322_message(
    req: Request, smtp_capture: Any
) -> None:
    from services.dispatcher.adapters import SMTPEmail

    cap, port = smtp_capture
    with _lock:
        cap.raw.clear()
        smtp = SMTPEmail("127.0.0.1", port, "retention@mail.segflow.example", CONTACTS)
        asyncio.run(smtp.send(req))
        assert len(cap.raw) == 1
        problems = contracts.check_smtp(cap.raw[0])
    assert not problems, "\n".join(map(str, problems))


def idempotent_at_vendor(method: str, url: str) -> bool:
    """A write the vendor applies once however often it arrives: an upsert by a unique property
    or external id (PATCH /sobjects/{obj}/{extField}/{key}; HubSpot batch/upsert), a PATCH of
    a record by a unique property, or a PUT of a membership or association."""
    path = httpx.URL(url).path
    if path == "/rest/v1/leads.json" or path.startswith("/rest/v1/lists/"):
        return True  # Marketo: updateOnly by the lookup field (body checked below); list adds
    return method in ("PUT", "PATCH") or path.endswith("/batch/upsert")


# a Marketo campaign request is not idempotent: the ambiguity policy applies to it instead
IDEMPOTENT_CASES = [
    pytest.param(vendor, *p.values, id=f"{vendor}:{p.id}")
    for vendor in ("hubspot", "salesforce", "marketo")
    for p in cases(CRM)
    if not (vendor == "marketo" and p.values[0].channel in ("crm_task", "support_escalation"))
]


@pytest.mark.parametrize(("vendor", "req"), IDEMPOTENT_CASES)
def test_every_crm_write_is_idempotent_at_the_vendor(vendor: str, req: Request) -> None:
    calls = captured(vendor, req)
    writes = [(m, u, b) for m, u, b in calls if m != "GET"]
    assert writes and all(idempotent_at_vendor(m, u) for m, u, _ in writes), writes
    for _, url, body in writes:
        if url.endswith("/rest/v1/leads.json"):
            assert body["action"] == "updateOnly" and body["lookupField"] == "segflowCustomerId"


@pytest.mark.parametrize("req", cases({"crm_property"}))
def test_hubspot_property_sync_sets_custom_segment_for_templates(req: Request) -> None:
    """Seed 000 §4.1: HubSpot email templates branch on the contact's ``custom_segment``."""
    writes = [b for m, _, b in captured("hubspot", req) if m == "PATCH"]
    assert [w["properties"].get("custom_segment") for w in writes] == [req.segment]
