"""CPU cost of the vendor contract checks the receiver now runs on every request.

    .venv/bin/python bench/bench_contracts.py [--n 2000]

Builds one request per vendor call kind (the adapters' real bodies, captured with httpx's
MockTransport) and times ``contracts.check_http`` / ``check_smtp`` on each, single-threaded.
Prints microseconds per check and the load average (the machine is shared: numbers under load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from services.dispatcher import contracts  # noqa: E402
from services.dispatcher.adapters import MapContacts, SMTPEmail  # noqa: E402
from services.dispatcher.core import Request  # noqa: E402
from services.dispatcher.vendors import VendorSettings, make_adapters  # noqa: E402


def request(channel: str) -> Request:
    return Request(
        key="sf-" + "a" * 32,
        customer_id="c-42",
        channel=channel,
        playbook="AtRisk-60d",
        step="s",
        segment="AtRisk-60d",
        variant="A",
        campaign_id="atrisk-60d-winback",
        template="d-atrisk-reengage",
        subject="We miss you, Ada",
        body="Segment AtRisk-60d; no engagement 48 h after the re-engagement email.",
        variables={"first_name": "Ada", "cta": "Come back"},
        list_id="vip",
        properties={"segflow_lifecycle": "at_risk"},
    )


def answer(r: httpx.Request) -> httpx.Response:
    p = r.url.path
    if r.method == "GET" and "/contacts/" in p:
        return httpx.Response(200, json={"id": "5101", "properties": {}})
    if r.method == "GET" and "/sobjects/" in p:
        return httpx.Response(200, json={"Id": "003000000000042AAA"})
    if r.method == "GET":
        return httpx.Response(200, json={"success": True, "result": [{"id": 77}]})
    if p.endswith("/batch/upsert"):
        return httpx.Response(200, json={"results": [{"id": "9001"}]})
    if p.startswith("/rest/"):
        status = {"leads.json": "updated", "lists": "added"}.get(p.split("/")[3])
        return httpx.Response(200, json={"success": True, "result": [{"id": 77, "status": status}]})
    return httpx.Response(202 if "mail" in p else 201, json={})


def captured() -> list[tuple[str, str, str, Any]]:
    v = VendorSettings(
        hubspot_lists={"vip": "314"},
        hubspot_owner_id="1",
        salesforce_campaigns={"vip": "701000000000314AAA"},
        marketo_lists={"vip": "314"},
        marketo_campaigns={"crm_task": "1", "support_escalation": "2"},
        sendgrid_templates={"d-atrisk-reengage": "d-" + "1" * 32},
        sendgrid_asm_group_id=7,
    )
    out: list[tuple[str, str, str, Any]] = []

    async def go(kind: str, channel: str) -> None:
        seen: list[httpx.Request] = []

        def handler(r: httpx.Request) -> httpx.Response:
            seen.append(r)
            return answer(r)

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            router = make_adapters(
                v,
                client,
                MapContacts({"c-42": "ada@example.com"}),
                crm_kind=kind,
                base_url="https://x.example",
                sender="r@mail.example.com",
            )
            adapter = router.for_channel(channel)
            assert adapter is not None
            await adapter.send(request(channel))
        for r in seen:
            body = json.loads(r.content) if r.content else None
            out.append(
                (
                    f"{kind if channel != 'email' else 'sendgrid'} {channel}",
                    r.method,
                    str(r.url),
                    body,
                )
            )

    for kind in ("hubspot", "salesforce", "marketo"):
        for ch in ("crm_property", "crm_task", "crm_list", "support_escalation"):
            asyncio.run(go(kind, ch))
    asyncio.run(go("hubspot", "email"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    rows = captured()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (numbers under load)")
    for name, method, url, body in rows:
        assert not contracts.check_http(method, url, body), (name, method, url)
        t0 = time.perf_counter()
        for _ in range(args.n):
            contracts.check_http(method, url, body)
        us = (time.perf_counter() - t0) / args.n * 1e6
        path = httpx.URL(url).path
        print(f"{name:32} {method:5} {path[:60]:60} {us:8.1f} us/check")
    msg = SMTPEmail("127.0.0.1", 1, "r@mail.example.com", MapContacts({})).message(
        request("smtp"), "ada@example.com"
    )
    raw = msg.as_bytes()
    assert not contracts.check_smtp(raw)
    t0 = time.perf_counter()
    for _ in range(args.n):
        contracts.check_smtp(raw)
    print(
        f"{'smtp RFC 5322':32} {'DATA':5} {'':60} "
        f"{(time.perf_counter() - t0) / args.n * 1e6:8.1f} us/check"
    )
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
