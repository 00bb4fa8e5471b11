"""The scorer's internal API answers from what it published at its last commit: a customer's
state of one commit scored with the model of that same commit, never a batch half applied.

Each batch gives every customer one login, an hour after the previous batch's, and the churn
model learns one example in place half-way through the batch (as the deployment's learner
does). In a committed state the login count kept beside the daily buckets
(``lifetime_logins``) equals the logins the buckets hold (``logins_3d``: every login is within
three days), and the state of batch ``n`` (its last login at ``T0 + n`` hours) goes with the
model version and watermark the scorer had when batch ``n`` committed. A read of the live
state mid-batch breaks both: the scalars move with each event while the buckets are written
back once per batch, and the model learns between two customers' events.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from segflow.runtime.records import Incoming
from segflow.runtime.settings import Settings
from segflow.runtime.state import partition_for
from segflow.runtime.topics import TOPICS
from services.scorer import api
from services.scorer.app import ScorerService
from services.scorer.core import MODEL_INPUTS, Scorer
from services.scorer.features import DAY, HOUR, Buckets
from services.scorer.model import ChurnModel

T0 = 1_704_067_200_000
CUSTOMERS = [f"c{i:03d}" for i in range(200)]
WATCHED = ("c007", "c150")  # one handled before the mid-batch learning, one after


def login(cid: str, t: int, eid: str) -> Incoming:
    event = {"event_id": eid, "event_type": "login", "occurred_at": t}
    value = {"customer_id": cid, "event": event, "email_hash": None, "identified_at": t}
    part = partition_for(cid, 4)  # (identity writes it keyed by the customer id)
    return Incoming(TOPICS.identified, "identified", part, 0, cid, value, None, [])


def example(n: int) -> dict[str, float]:
    return {name: float((n + i) % 5) for i, (name, _) in enumerate(MODEL_INPUTS)}


@pytest.fixture
def svc() -> ScorerService:
    settings = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="scorer-snap.")
    service = ScorerService(settings, clock=lambda: (T0 + 10 * DAY) / 1000)
    service.scorer.sink = None  # one instance learning in place: no learner topic here
    return service


class Commits:
    """What the scorer had at each commit, recorded by the test from the service itself."""

    def __init__(self) -> None:
        self.versions: dict[int, str] = {}
        self.watermarks: dict[int, int | None] = {}
        self.models: dict[int, bytes] = {}
        self.states: dict[tuple[int, str], dict[str, Any]] = {}
        self.own: dict[tuple[int, str], int | None] = {}  # the customer's partition's

    def record(self, svc: ScorerService, n: int) -> None:
        model = svc.scorer.model
        self.versions[n], self.watermarks[n] = model.version, svc.scorer.watermark
        self.models[n] = model.to_bytes()
        for cid in WATCHED:
            self.states[(n, cid)] = dict(svc.states.get(cid) or {})
            self.own[(n, cid)] = svc.scorer.watermark_of(partition_for(cid, 4))


def batch(svc: ScorerService, n: int, commits: Commits, pause: bool = False) -> None:
    """One transaction as the loop runs it: the handler, before_commit, the commit hooks."""
    t = T0 + n * HOUR
    for i, cid in enumerate(CUSTOMERS):
        if i == len(CUSTOMERS) // 2:
            svc.scorer.model.learn(example(n), n % 3 == 0)  # in place, as the learner does
        list(svc.handle(login(cid, t, f"e{n}-{cid}")))
        if pause and i % 10 == 0:
            time.sleep(0)  # let the request threads in mid-batch
    list(svc.before_commit())
    commits.record(svc, n)  # before the hooks: a reader may see the commit at once
    svc.states.on_commit()
    svc.models.on_commit()
    svc.on_commit()


def problems_of(body: dict[str, Any], commits: Commits) -> list[str]:
    """What is wrong with one /customers answer: a state not of one commit, or a state and
    a model (or watermark) of two different commits."""
    n = (body["last_event_at"] - T0) // HOUR
    f = body["features"]
    out = []
    if not f["lifetime_logins"] == f["logins_3d"] == n + 1:
        out.append(
            f"state of no commit: batch {n}, {f['lifetime_logins']} logins counted, "
            f"{f['logins_3d']} in the buckets"
        )
    if body["model_version"] != commits.versions.get(n):
        out.append(
            f"state of batch {n} scored with {body['model_version']} "
            f"(committed with {commits.versions.get(n)})"
        )
    return out


def test_requests_during_batches_see_one_commit_state_and_model(svc: ScorerService) -> None:
    commits = Commits()
    batch(svc, 0, commits)
    server = api.start(svc, 0)
    stop = threading.Event()
    problems: list[str] = []
    seen: Counter[str] = Counter()
    answers: list[dict[str, Any]] = []

    def hammer() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            while not stop.is_set():
                for cid in WATCHED:
                    answer = client.get(f"/customers/{cid}")
                    seen["requests"] += 1
                    if answer.status_code != 200:
                        problems.append(f"{cid}: {answer.status_code} {answer.text}")
                        continue
                    body = answer.json()
                    answers.append(body)
                    problems.extend(problems_of(body, commits))
                health = client.get("/health").json()
                version, watermark = health["model_version"], health["watermark"]
                n = [k for k, w in commits.watermarks.items() if w == watermark]
                if health["customers"] != len(CUSTOMERS) or not n:
                    problems.append(f"health of no commit: {health}")
                elif commits.versions[n[0]] != version:
                    problems.append(f"watermark of batch {n[0]} with model {version}")

    readers = [threading.Thread(target=hammer) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for n in range(1, 31):
            batch(svc, n, commits, pause=True)
    finally:
        stop.set()
        for t in readers:
            t.join(30)
        server.stop()
    assert problems == [], problems[:5]
    batches = {(b["last_event_at"] - T0) // HOUR for b in answers}
    assert seen["requests"] >= 30 and len(batches) >= 5, (seen, sorted(batches))
    # Each answer is the score of that commit's state by that commit's model, as the loop's
    # own scoring computes it (from the recorded state and a copy of the model).
    for body in answers[:: max(1, len(answers) // 40)]:
        n = (body["last_event_at"] - T0) // HOUR
        st = commits.states[(n, body["customer_id"])]
        scorer = Scorer(svc.scorer.config, model=ChurnModel.from_bytes(commits.models[n]))
        wm = commits.own[(n, body["customer_id"])]
        as_of = max(st["last_event_ms"], st["scored_as_of"] or 0, wm or 0)
        expected = scorer.record(st["customer_id"], scorer.score(st, as_of, Buckets.of(st)), 0)
        assert body["as_of"] == as_of
        assert body["churn_probability"] == expected["churn_probability"], (n, body)
        assert body["features"] == expected["features"]
        assert body["top_features"] == expected["top_features"]
        assert body["cluster"] == expected["cluster"]


def test_a_batch_is_served_once_committed_never_half_and_never_if_aborted(
    svc: ScorerService,
) -> None:
    commits = Commits()
    batch(svc, 0, commits)
    batch(svc, 1, commits)
    server = api.start(svc, 0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            before = client.get("/customers/c007").json()
            health = client.get("/health").json()
            assert problems_of(before, commits) == [] and before["last_event_at"] == T0 + HOUR
            # Half a batch handled and the model learning in place: not committed.
            for i, cid in enumerate(CUSTOMERS[:100]):
                if i == 50:
                    svc.scorer.model.learn(example(2), True)
                list(svc.handle(login(cid, T0 + 2 * HOUR, f"e2-{cid}")))
            assert client.get("/customers/c007").json() == before
            assert client.get("/health").json() == health
            # What a read of the live state answers now (as the API did before): a half-
            # applied state, scored by a model that is not the one of its commit.
            live = svc.states.get("c007")
            assert live is not None
            sc = svc.scorer
            torn = sc.record("c007", sc.score(live, T0 + 2 * HOUR, Buckets.of(live)), 0)
            torn["last_event_at"] = live["last_event_ms"]
            assert problems_of(torn, commits) != []
            svc.states.on_abort()  # the transaction failed: never served
            svc.on_abort()
            assert client.get("/customers/c007").json() == before
            batch(svc, 2, commits)
            after = client.get("/customers/c007").json()
            assert after["last_event_at"] == T0 + 2 * HOUR and problems_of(after, commits) == []
            assert client.get("/health").json()["model_version"] == commits.versions[2]
            # A revoked partition's customers are no longer served.
            gone = svc.states.partition_of("c007")
            svc.states.on_revoke({gone})
            svc.on_revoke({gone})
            assert client.get("/customers/c007").status_code == 404
            kept = [c for c in CUSTOMERS if svc.states.partition_of(c) != gone]
            assert client.get("/health").json()["customers"] == len(kept)
            assert client.get(f"/customers/{kept[0]}").status_code == 200
    finally:
        server.stop()


def test_the_published_state_is_a_copy_the_loop_never_writes(svc: ScorerService) -> None:
    commits = Commits()
    batch(svc, 0, commits)
    publisher = api.ScorerPublisher(svc)
    with publisher.table.read() as view:
        held = view["c007"]
        assert held is not svc.states.get("c007") and held == svc.states.get("c007")
        assert isinstance(held["buckets"], bytes)  # immutable; each request decompresses its own
        frozen = dict(held)
        batch(svc, 1, commits)  # the loop writes the customer's state meanwhile
        batch(svc, 2, commits)
        assert view["c007"] == frozen and view.extra.model.version == commits.versions[0]
    batch(svc, 3, commits)  # the request is gone: this commit is published, whole
    with publisher.table.read() as view:
        assert view["c007"]["last_event_ms"] == T0 + 3 * HOUR
        assert view.extra.model.version == commits.versions[3]
        assert view["c007"] == svc.states.get("c007")
