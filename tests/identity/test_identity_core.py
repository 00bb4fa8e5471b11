"""The identity graph's rules, one behaviour per test (pure core, no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from services.identity import core
from services.identity.core import Conflict, Duplicate, LimitHit, Merged, Relinked, Rules


def PLAIN(_type: str, value: str) -> str:  # noqa: N802 - the "hash" is the value: readable ids
    return value


class Graph:
    """A test driver: feeds raw events to the core and applies its writes to a dict."""

    def __init__(self, rules: Rules | None = None) -> None:
        self.rules = rules or Rules()
        self.state: dict[str, core.Entry] = {}
        self.n = 0
        self.merged: dict[str, str] = {}

    def event(self, event_id: str | None = None, t: int | None = None, **ids: Any) -> core.Linked:
        self.n += 1
        eid = event_id or f"e{self.n}"
        ev = {"event_id": eid, "occurred_at": t if t is not None else self.n, **ids}
        nodes = core.identifiers(ev, self.rules, lambda ty, v: v)
        step = core.link(self.state, core.IdentityInput(eid, ev["occurred_at"], nodes), self.rules)
        core.apply(self.state, step.writes)
        for out in step.outcomes:
            if isinstance(out, Merged):
                for a in out.absorbed:
                    self.merged[a] = out.survivor
        return step

    def owner(self, node: str) -> str:
        return self.state["n:" + node]["customer_id"]

    def resolve(self, cid: str) -> str:
        while cid in self.merged:
            cid = self.merged[cid]
        return cid


def test_anonymous_browsing_then_login_merges_into_the_older_profile() -> None:
    g = Graph()
    anon = g.event(anonymous_id="a1", device_id="d1", t=100).customer_id
    known = g.event(user_id="u1", email="ana@x.io", t=200).customer_id
    assert anon != known
    step = g.event(user_id="u1", anonymous_id="a1", device_id="d1", t=300)
    merge = step.outcomes[0]
    assert isinstance(merge, Merged)
    assert step.customer_id == anon == merge.survivor  # the older (t=100) profile survives
    assert merge.absorbed == (known,) and merge.causes == ("a:a1",)
    assert {g.owner(n) for n in ("u:u1", "e:ana@x.io", "a:a1", "d:d1")} == {anon}
    assert f"p:{known}" not in g.state  # the absorbed profile is gone from the state


def test_survivor_is_the_older_profile_by_event_time_not_arrival() -> None:
    g = Graph()
    late_arriving_but_older = g.event(user_id="u1", t=50)
    newer = g.event(anonymous_id="a1", t=10)  # arrives second, occurred first
    step = g.event(user_id="u1", anonymous_id="a1", t=60)
    assert step.customer_id == newer.customer_id != late_arriving_but_older.customer_id


def test_customers_sharing_a_device_stay_apart_and_the_device_stops_linking() -> None:
    g = Graph()
    ana = g.event(user_id="ana", anonymous_id="a-ana", device_id="shared").customer_id
    bob = g.event(user_id="bob", anonymous_id="a-bob", device_id="shared")
    assert bob.customer_id != ana
    conflicts = [o for o in bob.outcomes if isinstance(o, Conflict)]
    assert [(c.identifier_type, c.kept, c.other, c.via) for c in conflicts] == [
        ("user_id", bob.customer_id, ana, "d:shared")
    ]
    assert LimitHit("device_id", "link") in bob.outcomes
    # A new cookie on the shared device no longer joins whoever used it first ...
    stranger = g.event(anonymous_id="a-new", device_id="shared").customer_id
    assert stranger not in (ana, bob.customer_id)
    # ... and Bob's later events on it raise no new conflict.
    again = g.event(user_id="bob", anonymous_id="a-bob", device_id="shared")
    assert again.customer_id == bob.customer_id
    assert not any(isinstance(o, Conflict) for o in again.outcomes)


def test_a_weak_identifier_placed_by_weak_evidence_moves_to_its_strong_identifier() -> None:
    g = Graph()
    ana = g.event(user_id="ana", anonymous_id="a-ana", device_id="shared").customer_id
    # Bob browses anonymously on Ana's device: the device links his cookie to Ana (no way to
    # know yet) ...
    assert g.event(anonymous_id="a-bob", device_id="shared").customer_id == ana
    # ... until he logs in: the cookie moves to Bob, the device is recognised as shared.
    step = g.event(user_id="bob", anonymous_id="a-bob", device_id="shared")
    assert step.customer_id != ana
    assert Relinked("anonymous_id", ana) in step.outcomes
    assert g.owner("a:a-bob") == step.customer_id
    assert "a:a-bob" not in g.state[f"p:{ana}"]["identifiers"]
    assert g.event(anonymous_id="a-bob").customer_id == step.customer_id


def test_an_event_with_two_user_ids_goes_to_the_strongest_first_and_counts_a_conflict() -> None:
    g = Graph()
    u1 = g.event(user_id="u1").customer_id
    u2 = g.event(user_id="u2").customer_id
    step = g.event(user_id="u2", email="x@y.io", anonymous_id="a9")
    step2 = g.event(email="x@y.io", anonymous_id="a9", user_id=None)
    assert step.customer_id == step2.customer_id == u2
    # an email linked to u2 cannot pull u1's profile in: two user_ids never merge
    step3 = g.event(user_id="u1", email="x@y.io")
    assert step3.customer_id == u1
    assert [o.identifier_type for o in step3.outcomes if isinstance(o, Conflict)] == ["user_id"]
    assert g.owner("e:x@y.io") == u2


def test_emails_are_strong_with_a_per_profile_limit() -> None:
    g = Graph(Rules(limits={"email": 2}))
    cid = g.event(user_id="u1", email="a@x.io").customer_id
    assert g.event(user_id="u1", email="b@x.io").customer_id == cid  # a second email joins
    step = g.event(user_id="u1", email="c@x.io")  # a third does not
    assert [o.identifier_type for o in step.outcomes if isinstance(o, Conflict)] == ["email"]
    assert "n:e:c@x.io" not in g.state
    # two profiles whose emails together exceed the limit never merge
    other = g.event(email="d@x.io", anonymous_id="a1").customer_id
    g.event(email="e@x.io", anonymous_id="a1")
    assert g.event(email="a@x.io", anonymous_id="a1").customer_id == cid
    assert g.owner("a:a1") == other


def test_exclusive_emails_never_merge_two_profiles_holding_different_emails() -> None:
    g = Graph(Rules(exclusive=frozenset({"user_id", "email"})))
    work = g.event(email="work@x.io").customer_id
    home = g.event(user_id="u1", email="home@x.io").customer_id
    step = g.event(user_id="u1", email="work@x.io")
    assert step.customer_id == home and g.owner("e:work@x.io") == work
    assert [o.identifier_type for o in step.outcomes if isinstance(o, Conflict)] == ["email"]


def test_per_profile_limit_on_anonymous_ids() -> None:
    g = Graph(Rules(limits={"anonymous_id": 2}))
    cid = g.event(user_id="u1", anonymous_id="a1").customer_id
    g.event(user_id="u1", anonymous_id="a2")
    step = g.event(user_id="u1", anonymous_id="a3")
    assert step.customer_id == cid
    assert LimitHit("anonymous_id", "profile") in step.outcomes
    assert "n:a:a3" not in g.state
    assert len([i for i in g.state[f"p:{cid}"]["identifiers"] if i[0] == "a"]) == 2


@pytest.mark.parametrize(
    "placeholder",
    ["unknown", " NULL ", "0", "", "undefined", "None", "00000000-0000-0000-0000-000000000000"],
)
def test_blocked_values_never_link_two_customers(placeholder: str) -> None:
    g = Graph()
    a = g.event(user_id="u1", device_id=placeholder).customer_id
    b = g.event(user_id="u2", device_id=placeholder).customer_id
    assert a != b and not any(k.startswith("n:d:") for k in g.state)


@pytest.mark.parametrize(
    "email", ["test@test.com", "noreply@example.com", "Test@Foo.io", "x@mailinator.com", "unknown"]
)
def test_test_emails_are_blocked(email: str) -> None:
    assert core.identifiers({"email": email, "user_id": "u1"}, Rules(), PLAIN) == ("u:u1",)


def test_blocked_values_and_patterns_are_configurable() -> None:
    rules = Rules(blocked_values=frozenset({"guest"}), blocked_patterns=(r"@corp\.test$",))
    ev = {"user_id": "GUEST", "email": "a@corp.test", "device_id": "unknown"}
    assert core.identifiers(ev, rules, PLAIN) == ("d:unknown",)


def test_a_duplicate_event_id_is_dropped_and_changes_nothing() -> None:
    g = Graph()
    first = g.event("e-1", user_id="u1", anonymous_id="a1")
    before = dict(g.state)
    again = g.event("e-1", user_id="u2", anonymous_id="a1")  # same id, even with other content
    assert again.customer_id is None and again.outcomes == (Duplicate("e-1"),)
    assert again.writes == () and g.state == before
    assert first.customer_id is not None


def test_customer_ids_are_opaque_and_identical_on_replay() -> None:
    events = [
        dict(anonymous_id="a1"),
        dict(user_id="u1", anonymous_id="a1"),
        dict(user_id="u2", device_id="d2"),
        dict(email="x@y.io"),
    ]
    runs = []
    for _ in range(2):
        g = Graph()
        runs.append([g.event(**ev).customer_id for ev in events])
    assert runs[0] == runs[1]
    assert all(c is not None and c.startswith("c-") and len(c) == 18 for c in runs[0])
    assert len(set(runs[0])) == 3


def test_identifiers_are_normalised_hashed_and_ordered_strongest_first() -> None:
    seen: list[tuple[str, str]] = []

    def hasher(t: str, v: str) -> str:
        seen.append((t, v))
        return f"h{len(seen)}"

    ev = {"device_id": " d1", "email": " Ana@X.IO ", "anonymous_id": "a1", "user_id": "U1"}
    assert core.identifiers(ev, Rules(), hasher) == ("u:h1", "e:h2", "a:h3", "d:h4")
    assert seen == [
        ("user_id", "U1"),
        ("email", "ana@x.io"),
        ("anonymous_id", "a1"),
        ("device_id", "d1"),
    ]


def test_rules_reject_unknown_identifier_types() -> None:
    with pytest.raises(ValueError, match="unknown identifier type"):
        Rules(limits={"phone": 1})
