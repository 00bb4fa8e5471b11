"""The internal APIs answer from the state published at each commit: requests hammering a
segmenter while it processes batches never see a batch half applied, and never get a 503.

Each batch moves every customer from one segment to the other (all Quiet, then all Active, ...);
only a torn read — some customers of the batch applied, others not — could show both segments
non-empty at once, or a member page that is neither everyone nor no one.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from segflow.runtime.internal_api import Routes
from segflow.runtime.loop import Incoming
from segflow.runtime.settings import Settings
from segflow.runtime.snapshot import Published
from segflow.runtime.topics import TOPICS
from services.identity import api as identity_api
from services.identity.app import IdentityService, IdentitySettings
from services.segmenter import api
from services.segmenter.app import Segmenter, SegmenterConfig

DEFS = """version: "1"
segments:
  - name: Quiet
    priority: 5
    enter: {feature: days_since_open, op: ">=", value: 10}
  - name: Active
    priority: 3
    enter: {feature: days_since_open, op: "<=", value: 2}
"""
T0 = 1_700_000_000_000
CUSTOMERS = [f"c{i:04d}" for i in range(300)]


def score(cid: str, at: int, days: float) -> Incoming:
    value = {
        "customer_id": cid,
        "as_of": at,
        "churn_probability": 0.1,
        "engagement_score": 1.0,
        "clv": 1.0,
        "cluster": None,
        "lifecycle_stage": "loyal",
        "features": {"days_since_open": days},
        "model_version": "t",
        "scored_at": 0,
    }
    return Incoming(TOPICS.scores, "snap.scores", 0, 0, cid, value, None, [])


def batch(seg: Segmenter, n: int) -> None:
    """One transaction as the loop runs it: every customer's score, then the commit hooks."""
    days = 12.0 if n % 2 == 0 else 1.0
    for i, cid in enumerate(CUSTOMERS):
        list(seg(score(cid, T0 + n * 1000, days)))
        if i % 20 == 0:
            time.sleep(0)  # let the request threads in mid-batch
    list(seg.before_commit())
    seg.store.on_commit()
    seg.on_commit()


@pytest.fixture
def seg(tmp_path: Path) -> Segmenter:
    path = tmp_path / "s.yaml"
    path.write_text(DEFS)
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="snap.")
    return Segmenter(settings, SegmenterConfig(definitions=path, reload_interval=3600))


def test_requests_during_processing_see_whole_commits_and_no_503(seg: Segmenter) -> None:
    batch(seg, 0)  # everyone Quiet, committed before the server starts
    server = api.serve(seg, 0, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.port}"
    everyone = sorted(CUSTOMERS)
    stop = threading.Event()
    problems: list[str] = []
    seen: Counter[str] = Counter()

    def hammer() -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            while not stop.is_set():
                for path in ("/segments", "/segments/Quiet?limit=10000", "/customers/c0007"):
                    answer = client.get(path)
                    seen["requests"] += 1
                    if answer.status_code != 200:
                        problems.append(f"{path}: {answer.status_code} {answer.text}")
                        continue
                    body = answer.json()
                    if path == "/segments":
                        sizes = (body["sizes"]["Quiet"], body["sizes"]["Active"])
                        seen[str(sizes)] += 1
                        if sizes not in ((300, 0), (0, 300)):
                            problems.append(f"sizes of a half-applied batch: {sizes}")
                    elif path.startswith("/segments/"):
                        if body["members"] not in ([], everyone):
                            problems.append(f"{len(body['members'])} of 300 members")
                    else:
                        members = [s["segment"] for s in body["segments"] if s["member"]]
                        if members != [body["primary_segment"]]:
                            problems.append(f"c0007: member of {members}, primary {body}")

    readers = [threading.Thread(target=hammer) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for n in range(1, 41):
            batch(seg, n)
    finally:
        stop.set()
        for t in readers:
            t.join(30)
        server.stop()
    assert problems == [], problems[:5]
    # the reads happened while the batches ran: both committed states were answered
    assert seen["(300, 0)"] > 0 and seen["(0, 300)"] > 0, seen
    assert seen["requests"] >= 30, seen


def test_an_uncommitted_batch_is_not_served_and_an_aborted_one_never(seg: Segmenter) -> None:
    batch(seg, 0)
    server = api.serve(seg, 0, host="127.0.0.1")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            for cid in CUSTOMERS:  # handled, not committed
                list(seg(score(cid, T0 + 5000, 1.0)))
            assert client.get("/segments").json()["sizes"] == {"Quiet": 300, "Active": 0}
            seg.store.on_abort()
            seg.on_abort()
            assert client.get("/segments").json()["sizes"] == {"Quiet": 300, "Active": 0}
            batch(seg, 1)
            assert client.get("/segments").json()["sizes"] == {"Quiet": 0, "Active": 300}
            assert client.get("/health").json()["watermark"] == T0 + 1000
    finally:
        server.stop()


def test_a_view_held_by_a_request_never_changes_and_the_next_one_has_every_commit() -> None:
    table: Published[int, int] = Published({f"k{i}": i for i in range(5000)}, 0)
    with table.read() as held:
        for n in range(1, 51):  # commits while a request holds its view: none of them shows
            table.publish({f"k{i}": -i for i in range(n * 100 - 100, n * 100)} | {"new": n}, n)
        assert dict(held.pairs()) == {f"k{i}": i for i in range(5000)} and held.extra == 0
    table.publish({}, 51)  # the request is gone: the next commit swaps
    with table.read() as view:
        assert view.extra == 51 and len(view) == 5001
        assert view["k4999"] == -4999 and view["k0"] == 0 and view["new"] == 50
    for n in range(52, 56):  # and the copy retired by the swap catches up with both
        table.publish({"new": None} if n == 53 else {}, n)
        with table.read() as view:
            assert view.extra == n and view["k4999"] == -4999
            assert ("new" in view) is (n < 53), n


def test_no_route_retries_a_read() -> None:
    calls: Counter[str] = Counter()

    def torn(_p: object, _q: object) -> dict[str, int]:
        calls["torn"] += 1
        raise RuntimeError("dictionary changed size during iteration")

    # every service reads a published view: a failure is a bug, not a race to retry
    for service in ("identity", "scorer", "segmenter", "dispatcher"):
        calls.clear()
        status, body = Routes(service).answer("/x", torn, {}, {})
        assert (status, body["error"]["code"], calls["torn"]) == (500, "internal", 1)


def test_identity_serves_the_committed_graph_only() -> None:
    settings = Settings(bootstrap_servers="127.0.0.1:1", hash_secret="snap-secret")
    svc = IdentityService(settings, IdentitySettings(), clock=lambda: T0 / 1000)

    def event(event_id: str, **ids: str) -> None:
        value = {"event_id": event_id, "event_type": "login", "occurred_at": T0 - 1000, **ids}
        list(svc.handle(Incoming(TOPICS.events, "events", 0, 0, "k", value, None, [])))

    server = identity_api.start(svc, 0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:

            def owner(**query: str) -> str | None:
                answer = client.get("/resolve", params=query)
                return answer.json()["customer_id"] if answer.status_code == 200 else None

            event("e1", user_id="u1")
            assert owner(type="user_id", value="u1") is None  # handled, not committed
            svc.store.on_commit()
            cid = owner(type="user_id", value="u1")
            assert cid is not None and client.get(f"/customers/{cid}").status_code == 200
            event("e2", user_id="u1", device_id="d1")
            svc.store.on_abort()  # the transaction failed: never served
            assert owner(type="device_id", value="d1") is None
            event("e3", user_id="u1", device_id="d1")
            svc.store.on_commit()
            assert owner(type="device_id", value="d1") == cid
            counts = client.get(f"/customers/{cid}").json()["identifier_counts"]
            assert counts == {"user_id": 1, "device_id": 1}
            assert client.get("/health").json()["state_entries"] == len(svc.store)
    finally:
        server.stop()
