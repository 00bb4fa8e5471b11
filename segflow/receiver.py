"""Local stand-ins for the dispatcher's APIs: a real HTTP server and a real SMTP server.

:class:`Receiver` is an aiohttp server on 127.0.0.1 (its own thread and event loop) that
answers the SendGrid, HubSpot and Salesforce paths segflow uses and the signed webhook.

It is vendor-faithful: every request is validated with :mod:`services.dispatcher.contracts`
(the checks the contract tests use) and an invalid one is answered as the vendor answers it
(Salesforce 400 ``[{"errorCode": "INVALID_FIELD", ...}]``, HubSpot 400 with its ``errors``,
SendGrid 400 ``{"errors": [...]}``) with no effect. It is stricter than the vendors on purpose
for requests they accept but that do nothing (a task about nobody, a list add of unknown ids):
those are the silent failures the demo must surface. Lookups answer records (every customer has
a CRM contact here), upserts answer the vendor's shapes, and :attr:`Receiver.vendor_counts`
counts what the vendor would have created (per external id / unique property; one email per
accepted mail send).

It also records every request, de-duplicates by ``Idempotency-Key`` unless ``dedupe=False``
(a repeated key gets 200 and no second effect; the real vendors ignore that header), and answers
on cue: 429 with ``Retry-After``, 500, 503 outages for a while, a stall longer than the
client's timeout, or a dropped connection after the request took effect.

:class:`SMTPReceiver` is an aiosmtpd server that checks RFC 5322 (``contracts.check_smtp``,
554 when it fails), records messages and de-duplicates by ``Message-ID``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiosmtpd.controller import Controller

from services.dispatcher import contracts
from services.dispatcher.signing import verify


@dataclass(frozen=True)
class Cue:
    """One scripted answer: an HTTP status (with headers), sent ``delay`` seconds late.

    The request takes effect (or not) on arrival; the delay only holds the answer back, so a
    client that times out has really delivered: the lost-answer case idempotency covers."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    drop: bool = False  # close the connection instead of answering (after ``delay``)


@dataclass
class Seen:
    at: float
    method: str
    path: str
    key: str | None
    status: int
    headers: dict[str, str]
    body: Any
    effect: bool  # True when this request was the one that took effect
    violations: list[Any] = field(default_factory=list)  # contract violations (then 4xx)


@dataclass
class Receiver:
    latency: float = 0.0
    webhook_secret: bytes = b"segflow-local-webhook-secret"
    requests: list[Seen] = field(default_factory=list)
    # de-duplicate by the Idempotency-Key header (segflow's own stand-in behaviour); False
    # behaves as the real vendors do: only their own idempotent writes (upserts by external or
    # unique id, memberships) apply once, and every accepted mail send is an email
    dedupe: bool = True
    # drop the answer to the first attempt of each write (it took effect; the client sees the
    # connection close): the lost-answer case exactly-once has to survive
    drop_first_answer: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, Any] = {}
        # vendor-side effects: (vendor, object, identity) -> how many were created (emails:
        # one per accepted send, by the idempotency key in custom_args)
        self.vendor_counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._hs_contacts: set[str] = set()
        self._mk_leads: set[int] = set()
        self._dropped: set[tuple[str, str, str | None]] = set()
        self._cues: collections.deque[Cue] = collections.deque()
        self._outage: dict[str, float] = {}  # path prefix → until (monotonic)
        self._effects: dict[str, Seen] = {}
        self.busy = 0  # requests being handled right now
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="receiver")
        self.port = 0

    # -- control -------------------------------------------------------------------------
    def start(self) -> Receiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cue(self, *cues: Cue) -> None:
        """Answer the next requests with these, in order (then normally again)."""
        with self._lock:
            self._cues.extend(cues)

    def outage(self, seconds: float = float("inf"), prefix: str = "/", status: int = 503) -> None:
        """Answer ``status`` to every request under ``prefix`` for ``seconds`` (or until
        :meth:`end_outage`)."""
        with self._lock:
            self._outage[prefix] = time.monotonic() + seconds
            self._outage_status = status

    def end_outage(self) -> None:
        with self._lock:
            self._outage.clear()

    # -- inspection ----------------------------------------------------------------------
    def effects(self) -> dict[str, Seen]:
        """Idempotency key → the request that took effect (once per key, by construction)."""
        with self._lock:
            return dict(self._effects)

    def effects_by_vendor(self) -> dict[str, int]:
        """Actions that took effect, per vendor (sendgrid, hubspot, salesforce, webhook)."""
        with self._lock:
            return dict(
                collections.Counter(
                    contracts.vendor_of(s.path) or s.path.strip("/").split("/")[0]
                    for s in self._effects.values()
                )
            )

    def rejected(self) -> int:
        """Requests refused for breaking the vendor's contract."""
        with self._lock:
            return sum(1 for r in self.requests if r.violations)

    def attempts(self) -> collections.Counter[str]:
        """Raw requests per idempotency key (every try, whatever the answer)."""
        with self._lock:
            return collections.Counter(r.key for r in self.requests if r.key)

    def replays(self) -> int:
        """Requests for a key that had already taken effect (the receiver absorbed them)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.key
                and not r.effect
                and r.status == 200
                and r.key in self._effects
                and self._effects[r.key].at < r.at
            )

    def wait_for(self, keys: set[str], timeout: float = 30.0) -> bool:
        """Wait until every key in ``keys`` has taken effect."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if keys <= self.effects().keys():
                return True
            time.sleep(0.05)
        return keys <= self.effects().keys()

    # -- the server ----------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.Response:
        with self._lock:
            self.busy += 1
        try:
            return await self._answer(request)
        finally:
            with self._lock:
                self.busy -= 1

    def idle(self) -> bool:
        with self._lock:
            return self.busy == 0

    async def _answer(self, request: web.Request) -> web.Response:
        raw = await request.read()
        key = request.headers.get("Idempotency-Key")
        path = request.path
        now = time.monotonic()
        with self._lock:
            # cues script the answers to actions' writes (they carry the key); lookups and
            # association calls are answered normally
            keyed = bool(key) and request.method != "GET"
            cue = self._cues.popleft() if self._cues and keyed else None
            down = any(path.startswith(p) and now < until for p, until in self._outage.items())
        if cue is None and down:
            cue = Cue(self._outage_status)
        if self.latency:
            await asyncio.sleep(self.latency)
        status = cue.status if cue is not None else self._success(request.method, path)
        headers = dict(cue.headers) if cue is not None else {}
        # signature and timestamp (an old capture is refused); a replay inside the tolerance
        # carries an idempotency key already taken, so it has no effect
        if (
            path == "/webhook"
            and status < 300
            and not verify(self.webhook_secret, raw, dict(request.headers), time.time())
        ):
            status = 401
        body: Any
        try:
            body = await request.json() if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        answer: Any = None
        violations: list[contracts.Violation] = []
        if status < 300 and contracts.vendor_of(path):
            # the vendor validates before anything takes effect
            violations = contracts.check_http(request.method, str(request.rel_url), body)
            if violations:
                status, answer = contracts.vendor_error(violations)
        effect = False
        write = request.method != "GET"
        with self._lock:
            replayed = False
            if 200 <= status < 300 and key and write and self.dedupe:
                if key in self._effects:
                    status, headers = 200, {"Idempotent-Replayed": "true"}
                    answer, replayed = self._answers.get(key), True
                else:
                    effect = True
            if 200 <= status < 300 and not replayed:
                status, answer = self._vendor_answer(request.method, request.rel_url, body, status)
                if effect and key:
                    self._answers[key] = answer
            seen = Seen(
                time.time(), request.method, path, key, status, dict(request.headers), body, effect
            )
            seen.violations = violations
            self.requests.append(seen)
            if effect and key:
                self._effects[key] = seen
        if cue is not None and cue.delay:
            await asyncio.sleep(cue.delay)
        drop = cue is not None and cue.drop
        if self.drop_first_answer and request.method != "GET" and 200 <= status < 300:
            with self._lock:
                call = (request.method, str(request.rel_url), key)
                drop = drop or call not in self._dropped
                self._dropped.add(call)
        if drop and request.transport is not None:
            # the request took effect; the client never hears back (connection closed)
            request.transport.abort()
        if answer is None:
            answer = {"id": key, "status": status}
        if status == 204:
            return web.Response(status=204, headers=headers)
        return web.json_response(answer, status=status, headers=headers)

    # -- the vendors' side effects and answers -------------------------------------------
    def _vendor_answer(self, method: str, url: Any, body: Any, status: int) -> tuple[int, Any]:
        """What the vendor records and answers for a valid request (called under the lock)."""
        path = url.path
        parts = path.strip("/").split("/")
        vendor = contracts.vendor_of(path)
        if vendor == "sendgrid":
            pers = (body or {}).get("personalizations") or [{}]
            k = (pers[0].get("custom_args") or {}).get("idempotency_key", "")
            self.vendor_counts[("sendgrid", "mail", k)] += 1  # SendGrid sends every request
            return status, None
        if vendor == "hubspot":
            if method == "GET" and parts[3] == "contacts":
                rid = hubspot_record_id(parts[4])
                self._hs_contacts.add(rid)
                return 200, {"id": rid, "properties": {"hubspot_owner_id": None}}
            if path.endswith("/batch/upsert"):
                results = []
                for item in body["inputs"]:
                    ident = ("hubspot", parts[3], item["id"])
                    new = ident not in self.vendor_counts
                    if new:
                        self.vendor_counts[ident] += 1
                    results.append(
                        {"id": hubspot_record_id(item["id"]), "new": new, "properties": {}}
                    )
                return 200, {"status": "COMPLETE", "results": results}
            if path.endswith("/memberships/add"):
                added = [r for r in body if r in self._hs_contacts]
                for r in added:
                    self.vendor_counts[("hubspot", f"list:{parts[3]}", r)] = 1
                return 200, {
                    "recordsIdsAdded": added,
                    "recordIdsMissing": [r for r in body if r not in self._hs_contacts],
                    "recordIdsRemoved": [],
                }
            return 200, {"id": parts[-1]}
        if vendor == "marketo":
            ok = {"requestId": "segflow#receiver", "success": True}
            if method == "GET":  # Get Leads by Filter Type: every customer has a lead here
                cid = url.query.get("filterValues", "")
                lead = int(hubspot_record_id(cid)) % 10**9
                self._mk_leads.add(lead)
                return 200, {**ok, "result": [{"id": lead}]}
            if parts[2] == "leads.json":  # Sync Leads, updateOnly by segflowCustomerId
                return 200, {
                    **ok,
                    "result": [
                        {
                            "id": int(hubspot_record_id(str(x.get(body["lookupField"])))) % 10**9,
                            "status": "updated",
                        }
                        for x in body["input"]
                    ],
                }
            if parts[2] == "lists":
                result = []
                for x in body["input"]:
                    known = x["id"] in self._mk_leads
                    if known:
                        self.vendor_counts[("marketo", f"list:{parts[3]}", str(x["id"]))] = 1
                    result.append(
                        {"id": x["id"], "status": "added"}
                        if known
                        else {
                            "id": x["id"],
                            "status": "skipped",
                            "reasons": [{"code": "1004", "message": "Lead not found"}],
                        }
                    )
                return 200, {**ok, "result": result}
            if parts[2] == "campaigns":  # every request runs the campaign's flow again
                tokens = {t["name"]: t["value"] for t in body["input"].get("tokens") or []}
                k = tokens.get("{{my.segflowKey}}", "")
                self.vendor_counts[("marketo", "trigger", k)] += len(body["input"]["leads"])
                return 200, {**ok, "result": [{"id": int(parts[3])}]}
        if vendor == "salesforce":
            obj = parts[4]
            if method == "GET":
                return 200, {"Id": salesforce_record_id("Contact", parts[6]), "OwnerId": None}
            if len(parts) == 7:  # upsert by external id
                ident = ("salesforce", obj, unquote(parts[6]))
                if obj == "CampaignMember":
                    pair = ("salesforce", "member", f"{body['CampaignId']}:{body['ContactId']}")
                    if ident not in self.vendor_counts and pair in self.vendor_counts:
                        return 400, [
                            {
                                "message": "Already a campaign member.",
                                "errorCode": "DUPLICATE_VALUE",
                                "fields": [],
                            }
                        ]
                    self.vendor_counts[pair] = 1
                if obj == "Contact":  # updateOnly: the receiver holds every customer's Contact
                    return 200, {"id": salesforce_record_id(obj, parts[6]), "created": False}
                created = ident not in self.vendor_counts
                if created:
                    self.vendor_counts[ident] += 1
                rid = salesforce_record_id(obj, parts[6])
                return (201 if created else 200), {
                    "id": rid,
                    "success": True,
                    "errors": [],
                    "created": created,
                }
            return 201, {"id": salesforce_record_id(obj, str(len(self.requests))), "success": True}
        return status, None

    @staticmethod
    def _success(method: str, path: str) -> int:
        if path.startswith("/v3/mail/send"):
            return 202
        if method in ("GET", "PATCH", "PUT") or path.endswith("/batch/upsert"):
            return 200
        return 201


def hubspot_record_id(value: str) -> str:
    """A stable numeric HubSpot record id for a customer id or an idempotency key."""
    return str(int(hashlib.sha256(value.encode()).hexdigest()[:12], 16))


def salesforce_record_id(obj: str, value: str) -> str:
    prefix = {"Contact": "003", "Task": "00T", "Case": "500", "CampaignMember": "00v"}.get(
        obj, "a0X"
    )
    digits = str(int(hashlib.sha256(value.encode()).hexdigest()[:14], 16))[:12].rjust(12, "0")
    return f"{prefix}{digits}AAA"


class _SMTPHandler:
    def __init__(self, owner: SMTPReceiver) -> None:
        self.owner = owner

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return self.owner._receive(envelope)


@dataclass
class SMTPReceiver:
    """aiosmtpd on 127.0.0.1; ``fail_next`` answers 451 (retry later) that many times."""

    messages: list[dict[str, str]] = field(default_factory=list)
    fail_next: int = 0
    rejected: list[list[str]] = field(default_factory=list)  # RFC 5322 problems per message

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: collections.Counter[str] = collections.Counter()

    def start(self) -> SMTPReceiver:
        from segflow.runtime.broker import free_port

        self.controller = Controller(_SMTPHandler(self), hostname="127.0.0.1", port=free_port())
        self.controller.start()
        self.port = self.controller.port
        return self

    def stop(self) -> None:
        self.controller.stop()

    def _receive(self, envelope: Any) -> str:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return "451 4.3.0 try again later"
            problems = contracts.check_smtp(envelope.original_content or envelope.content)
            if problems:
                self.rejected.append([str(p) for p in problems])
                return "554 5.6.0 " + "; ".join(p.message for p in problems)[:200]
            msg = message_from_bytes(envelope.content)
            mid = str(msg["Message-ID"])
            self._ids[mid] += 1
            self.messages.append(
                {
                    "message_id": mid,
                    "to": str(msg["To"]),
                    "subject": str(msg["Subject"]),
                    "key": str(msg["Idempotency-Key"]),
                }
            )
        return "250 OK"

    def unique(self) -> set[str]:
        with self._lock:
            return set(self._ids)


def main() -> None:
    """Run the HTTP receiver as a process (for bench/): ``GET /__stats`` returns counts."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="segflow's local API receiver")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    r = Receiver(latency=args.latency)

    async def stats(_: web.Request) -> web.Response:
        with r._lock:
            body = {
                "requests": len(r.requests),
                "effects": len(r._effects),
                "first": min((s.at for s in r._effects.values()), default=None),
                "last": max((s.at for s in r._effects.values()), default=None),
            }
        body["replays"] = r.replays()
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/__stats", stats)
        app.router.add_route("*", "/{tail:.*}", r._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096).start()
        print(f"receiver on 127.0.0.1:{args.port} latency {args.latency}s", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
