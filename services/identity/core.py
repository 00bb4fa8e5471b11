"""Identity stitching (pure): a graph of hashed identifiers and the profiles that own them.

Every identifier (user_id, email, anonymous_id, device_id) is a *node* owned by exactly one
*profile*; the profile's opaque ``customer_id`` is what the event is re-keyed by. An event that
carries identifiers owned by two profiles merges them (the older profile survives) unless a
rule forbids it. The state is a mapping of string keys to entries shaped like the Avro record
``io.segflow.IdentityStateEntry`` (the shell mirrors it to a compacted changelog)::

    n:<node id>      node     customer_id = owning profile; seen_with = profiles it conflicted
                              with (a weak identifier stops linking at its link limit)
    p:<customer_id>  profile  created_at = event time of its first event (age, for survivors);
                              identifiers = its node ids
    e:<event_id>     seen     created_at = the event's occurred_at: ``link``'s own
                              de-duplication (``dedup=True``; the services de-duplicate with
                              8-byte hashes instead, services/identity/window.py, and read
                              these entries only from changelogs of earlier releases)

A node id is ``<t>:<hash>`` with ``t`` one of ``u`` (user_id), ``e`` (email), ``a``
(anonymous_id), ``d`` (device_id), strongest first, and ``hash`` whatever the shell's keyed
hash function returns: no raw identifier is ever stored. This module never sees a secret, the
clock or the environment: time is the event's ``occurred_at``, hashing is an argument.

Rules (:class:`Rules`, all configurable):

* **strong identifiers** (``exclusive``: user_id and email by default) never merge two profiles
  that both already hold values of that type (their values necessarily differ: a value has one
  owner). The event then goes to the profile of its strongest identifier, and a
  :class:`Conflict` is reported.
* **per-profile limits** (``limits``): a profile accepts at most N values of a type (one
  user_id, three emails, 100 anonymous ids, 20 devices). An identifier refused by a full
  profile stays unowned and a :class:`LimitHit` is reported. Limits apply to new
  attachments; a merge allowed by the strong rule is never refused for a weak limit.
* **link limits** (``link_limits``): a weak identifier that conflicted with ``N`` other
  profiles (a device shared by several customers) stops linking: it no longer picks a
  profile or causes a merge; an event carrying nothing else still goes to its owner.
* **blocked values** (``blocked_values``, ``blocked_patterns``): placeholders such as ``null``,
  ``unknown``, ``0`` or test emails are dropped before anything is linked.

>>> rules = Rules()
>>> h = lambda t, v: v                     # identity "hash", for the examples only
>>> state: dict[str, Entry] = {}
>>> def run(eid, t, **ids):
...     ev = {"event_id": eid, "occurred_at": t, **ids}
...     step = link(state, IdentityInput(eid, t, identifiers(ev, rules, h)), rules)
...     apply(state, step.writes)
...     return step
>>> a = run("e1", 1, anonymous_id="a1", device_id="d1").customer_id       # browsing
>>> b = run("e2", 2, user_id="u1").customer_id                             # elsewhere
>>> a != b
True
>>> step = run("e3", 3, user_id="u1", anonymous_id="a1")                  # login: merge
>>> step.customer_id == a, step.outcomes[0].absorbed == (b,)               # older survives
(True, True)
>>> run("e3", 3, user_id="u1").outcomes                                    # replayed
(Duplicate(event_id='e3'),)
>>> run("e4", 4, user_id="u2", device_id="d1").customer_id == a            # shared device
False
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

Entry = dict[str, Any]
#: (identifier type, normalised value) -> hash; the shell's is keyed with the secret.
Hasher = Callable[[str, str], str]

#: Identifier types, strongest first, and their one-letter codes in node ids.
TYPES = ("user_id", "email", "anonymous_id", "device_id")
CODES = {"user_id": "u", "email": "e", "anonymous_id": "a", "device_id": "d"}
TYPE_OF_CODE = {code: name for name, code in CODES.items()}
_RANK = {"u": 0, "e": 1, "a": 2, "d": 3}
_STRONG = ("u", "e")

DAY_MS = 86_400_000

DEFAULT_BLOCKED_VALUES = frozenset(
    {
        "",
        "0",
        "-1",
        "null",
        "none",
        "nil",
        "nan",
        "n/a",
        "na",
        "-",
        "unknown",
        "undefined",
        "anonymous",
        "00000000-0000-0000-0000-000000000000",
    }
)
DEFAULT_BLOCKED_PATTERNS = (
    r"^(test|noreply|no-reply|donotreply|do-not-reply)@",
    r"@(test|invalid)\.(com|org|net)$",
    r"@mailinator\.com$",
)


@dataclass(frozen=True)
class Rules:
    """The stitching rules; every field has a working default."""

    limits: Mapping[str, int] = field(
        default_factory=lambda: {"user_id": 1, "email": 3, "anonymous_id": 100, "device_id": 20}
    )
    exclusive: frozenset[str] = frozenset({"user_id"})
    link_limits: Mapping[str, int] = field(
        default_factory=lambda: {"anonymous_id": 1, "device_id": 1}
    )
    blocked_values: frozenset[str] = DEFAULT_BLOCKED_VALUES
    blocked_patterns: tuple[str, ...] = DEFAULT_BLOCKED_PATTERNS
    dedup_window_ms: int = 7 * DAY_MS

    def __post_init__(self) -> None:
        for name in (*self.limits, *self.exclusive, *self.link_limits):
            if name not in CODES:
                raise ValueError(f"unknown identifier type {name!r} (expected one of {TYPES})")
        if any(v < 1 for v in (*self.limits.values(), *self.link_limits.values())):
            raise ValueError("limits must be at least 1")
        if self.dedup_window_ms < 0:
            raise ValueError("dedup_window_ms must not be negative")

    @cached_property
    def _pattern(self) -> re.Pattern[str] | None:
        return (
            re.compile("|".join(f"(?:{p})" for p in self.blocked_patterns))
            if (self.blocked_patterns)
            else None
        )

    @cached_property
    def _code_limits(self) -> dict[str, int]:
        return {CODES[t]: n for t, n in self.limits.items()}

    @cached_property
    def _code_links(self) -> dict[str, int]:
        return {CODES[t]: n for t, n in self.link_limits.items()}

    @cached_property
    def _code_exclusive(self) -> tuple[str, ...]:
        return tuple(CODES[t] for t in TYPES if t in self.exclusive)

    def is_blocked(self, value: str) -> bool:
        """Whether a normalised value is a placeholder that must never link anything.

        >>> r = Rules()
        >>> [r.is_blocked(v) for v in ("unknown", "0", "test@test.com", "ana@gmail.com")]
        [True, True, True, False]
        """
        if value.lower() in self.blocked_values:
            return True
        return self._pattern is not None and self._pattern.search(value) is not None


def normalize(id_type: str, value: object) -> str:
    """The comparable form of an identifier: trimmed; emails also lower-cased.

    >>> normalize("email", "  Ana.Silva@GMAIL.com "), normalize("user_id", " U-17 ")
    ('ana.silva@gmail.com', 'U-17')
    """
    text = str(value).strip()
    return text.lower() if id_type == "email" else text


def identifiers(
    event: Mapping[str, Any],
    rules: Rules,
    hasher: Hasher,
    cache: MutableMapping[tuple[str, str], str] | None = None,
) -> tuple[str, ...]:
    """The event's usable node ids, strongest first: normalised, blocked values dropped, hashed.

    ``cache`` (owned and bounded by the caller) remembers raw value -> node id ("" = blocked).

    >>> identifiers({"user_id": "u1", "device_id": "unknown", "email": " A@B.io"}, Rules(),
    ...             lambda t, v: v)
    ('u:u1', 'e:a@b.io')
    """
    out: list[str] = []
    for name in TYPES:
        raw = event.get(name)
        if raw is None:
            continue
        node = cache.get((name, raw)) if cache is not None else None
        if node is None:
            value = normalize(name, raw)
            node = "" if rules.is_blocked(value) else CODES[name] + ":" + hasher(name, value)
            if cache is not None:
                cache[(name, raw)] = node
        if node and node not in out:
            out.append(node)
    return tuple(out)


def customer_id_for(event_id: str, founder: str, attempt: int = 0) -> str:
    """A new profile's id: opaque, derived from the founding event (a replay gives the same).

    >>> customer_id_for("e1", "u:abc")
    'c-4674d48819cd1931'
    """
    seed = f"{event_id}\x00{founder}\x00{attempt}".encode()
    return "c-" + hashlib.sha256(seed).hexdigest()[:16]


# -- inputs and outputs -----------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityInput:
    """One event as the graph sees it: its id, event time and node ids (strongest first)."""

    event_id: str
    occurred_at: int
    identifiers: tuple[str, ...]


@dataclass(frozen=True)
class Merged:
    """Profiles ``absorbed`` joined ``survivor``; ``causes[i]`` linked ``absorbed[i]``."""

    survivor: str
    absorbed: tuple[str, ...]
    causes: tuple[str, ...]
    event_id: str
    occurred_at: int


@dataclass(frozen=True)
class Conflict:
    """A rule kept two profiles apart: both hold ``identifier_type`` (strong)."""

    identifier_type: str
    kept: str  # the profile the event went to
    other: str | None  # the profile left apart (None: a second value refused by the profile)
    via: str  # node id of the event's identifier that pointed at ``other``


@dataclass(frozen=True)
class LimitHit:
    """An identifier was not linked: a profile's per-type limit or its own link limit."""

    identifier_type: str
    limit: str  # "profile" or "link"


@dataclass(frozen=True)
class Relinked:
    """A weak identifier that only weak evidence had placed in ``previous`` moved to the
    event's profile, because the event ties it to a strong identifier held elsewhere."""

    identifier_type: str
    previous: str


@dataclass(frozen=True)
class Duplicate:
    """The event id was already seen within the de-duplication window; the event is dropped."""

    event_id: str


@dataclass(frozen=True)
class NewProfile:
    customer_id: str


@dataclass(frozen=True)
class ForgottenHit:
    """The event carries a user_id or email of a forgotten customer; it is dropped."""

    event_id: str
    identifier_type: str


LinkOutcome = Merged | Conflict | LimitHit | Relinked | Duplicate | NewProfile | ForgottenHit
Write = tuple[str, Entry | None]


@dataclass(frozen=True)
class Linked:
    """The result of one event: where it goes (None when dropped), what happened, state writes."""

    customer_id: str | None
    outcomes: tuple[LinkOutcome, ...]
    writes: tuple[Write, ...]


def apply(state: MutableMapping[str, Entry], writes: Iterable[Write]) -> None:
    """Apply a step's writes to a plain dict (tests; the shell writes through its store)."""
    for key, value in writes:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


# -- the step ---------------------------------------------------------------------------------


class _Profile:
    __slots__ = ("cid", "created_at", "ids", "new", "dirty")

    def __init__(self, cid: str, created_at: int, ids: list[str], new: bool) -> None:
        self.cid = cid
        self.created_at = created_at
        self.ids = ids
        self.new = new
        self.dirty = new

    def count(self, code: str) -> int:
        return sum(1 for i in self.ids if i[0] == code)

    def older_than(self, other: _Profile) -> bool:
        return (self.created_at, self.cid) < (other.created_at, other.cid)


class _Tx:
    """Reads through pending writes; collects the step's writes in order."""

    __slots__ = ("state", "pending")

    def __init__(self, state: Mapping[str, Entry]) -> None:
        self.state = state
        self.pending: dict[str, Entry | None] = {}

    def get(self, key: str) -> Entry | None:
        if key in self.pending:
            return self.pending[key]
        return self.state.get(key)

    def put(self, key: str, value: Entry | None) -> None:
        self.pending[key] = value


def _load(tx: _Tx, cid: str) -> _Profile:
    entry = tx.get("p:" + cid)
    if entry is None:  # a node pointing at a missing profile: treat as an empty one
        return _Profile(cid, 0, [], False)
    return _Profile(cid, entry.get("created_at") or 0, list(entry.get("identifiers") or ()), False)


def link(
    state: Mapping[str, Entry], item: IdentityInput, rules: Rules, dedup: bool = True
) -> Linked:
    """Place one event in the identity graph; the state is read, never mutated.

    ``item.identifiers`` are node ids, strongest first (as :func:`identifiers` returns them).

    >>> s: dict[str, Entry] = {}
    >>> step = link(s, IdentityInput("e1", 10, ("u:x", "a:y")), Rules())
    >>> apply(s, step.writes)
    >>> sorted(k[:2] for k in s), s["n:a:y"]["customer_id"] == step.customer_id
    (['e:', 'n:', 'n:', 'p:'], True)
    """
    seen: tuple[Write, ...] = ()
    if dedup:  # False: the caller de-duplicated already (identity's front stage)
        seen_key = "e:" + item.event_id
        if seen_key in state:
            return Linked(None, (Duplicate(item.event_id),), ())
        seen = ((seen_key, {"kind": "seen", "created_at": item.occurred_at}),)
    ids = item.identifiers
    if not ids:
        raise ValueError(f"event {item.event_id} has no identifier")
    get = state.get
    nodes = [get("n:" + i) for i in ids]
    for i, node in zip(ids, nodes, strict=True):
        if node is not None and node["kind"] == FORGOTTEN:
            return Linked(None, (ForgottenHit(item.event_id, TYPE_OF_CODE[i[0]]),), ())
    # Fast path (most events): every identifier already owned by one profile, nothing to anchor.
    first = nodes[0]
    if first is not None:
        cid = first["customer_id"]
        strong = ids[0][0] in _STRONG
        for node in nodes:
            if node is None or node["customer_id"] != cid or (strong and not node.get("anchored")):
                break
        else:
            return Linked(cid, (), seen)
    return _link_slow(state, item, rules, seen, dict(zip(ids, nodes, strict=True)))


def _link_slow(
    state: Mapping[str, Entry],
    item: IdentityInput,
    rules: Rules,
    seen: tuple[Write, ...],
    nodes: dict[str, Entry | None],
) -> Linked:
    tx = _Tx(state)
    for write in seen:
        tx.put(*write)
    outcomes: list[LinkOutcome] = []
    links = rules._code_links
    ids = sorted(nodes, key=lambda i: _RANK[i[0]])
    usable = [
        i
        for i in ids
        if not (
            (node := nodes[i]) is not None
            and i[0] in links
            and len(node.get("seen_with") or ()) >= links[i[0]]
        )
    ]
    if not usable:  # only identifiers that stopped linking: the event goes to their owner
        owner = nodes[ids[0]]
        assert owner is not None
        return Linked(owner["customer_id"], (), seen)

    limits = rules._code_limits
    exclusive = rules._code_exclusive
    strong_event = usable[0][0] in _STRONG
    home: _Profile | None = None
    absorbed: list[tuple[_Profile, str]] = []
    conflicted: list[tuple[str, str | None, str]] = []  # (node id, other cid, type code)
    attached: list[str] = []
    touched: dict[str, _Profile] = {}  # profiles that lost a relinked identifier

    def attach(profile: _Profile, node_id: str) -> bool:
        code = node_id[0]
        limit = limits.get(code)
        if limit is not None and profile.count(code) >= limit:
            if code in _STRONG:
                conflicted.append((node_id, None, code))
            else:
                outcomes.append(LimitHit(TYPE_OF_CODE[code], "profile"))
            return False
        profile.ids.append(node_id)
        profile.dirty = True
        attached.append(node_id)
        return True

    for node_id in usable:
        node = nodes[node_id]
        owner = node["customer_id"] if node is not None else None
        if home is None:
            if owner is None:
                home = _Profile("", item.occurred_at, [], True)
                attach(home, node_id)
            else:
                home = _load(tx, owner)
            continue
        if owner is None:
            attach(home, node_id)
            continue
        if owner == home.cid or any(p.cid == owner for p, _ in absorbed):
            continue
        other = touched.get(owner) or _load(tx, owner)
        clash = next((c for c in exclusive if home.count(c) and other.count(c)), None) or next(
            (c for c in _STRONG if c in limits and home.count(c) + other.count(c) > limits[c]),
            None,
        )
        if clash is not None:
            assert node is not None
            if strong_event and node_id[0] not in _STRONG and not node.get("anchored"):
                # Only weak evidence put it there (e.g. a device shared with someone else):
                # an event carrying a strong identifier moves it to its rightful profile.
                if attach(home, node_id):
                    other.ids.remove(node_id)
                    other.dirty = True
                    touched[owner] = other
                    outcomes.append(Relinked(TYPE_OF_CODE[node_id[0]], owner))
                continue
            conflicted.append((node_id, owner, clash))
            continue
        if home.new:  # the event's new profile was never visible: just join ``other``
            pending, home = home.ids, other
            for pid in pending:
                attached.remove(pid)
                attach(home, pid)
            continue
        survivor, gone = (home, other) if home.older_than(other) else (other, home)
        survivor.ids.extend(gone.ids)
        survivor.dirty = True
        absorbed.append((gone, node_id))
        home = survivor

    assert home is not None
    if home.new:
        attempt = 0
        cid = customer_id_for(item.event_id, usable[0])
        while tx.get("p:" + cid) is not None:
            attempt += 1
            cid = customer_id_for(item.event_id, usable[0], attempt)
        home.cid = cid
        outcomes.append(NewProfile(cid))
    cid = home.cid
    for gone, _via in absorbed:
        tx.put("p:" + gone.cid, None)
        for nid in gone.ids:
            old = tx.get("n:" + nid) or {}
            tx.put("n:" + nid, {**old, "kind": "node", "customer_id": cid})
    for nid in attached:
        tx.put("n:" + nid, {"kind": "node", "customer_id": cid, "anchored": strong_event})
    if strong_event:  # the event's identifiers now sit with its strong identifier
        for nid in usable:
            entry = tx.get("n:" + nid)
            if entry is not None and entry["customer_id"] == cid and not entry.get("anchored"):
                tx.put("n:" + nid, {**entry, "anchored": True})
    for profile in (home, *touched.values()):
        if profile.dirty:
            tx.put(
                "p:" + profile.cid,
                {"kind": "profile", "created_at": profile.created_at, "identifiers": profile.ids},
            )
    for nid, other_cid, code in conflicted:
        outcomes.append(Conflict(TYPE_OF_CODE[code], cid, other_cid, nid))
        limit = links.get(nid[0])
        node = tx.get("n:" + nid)
        if limit is None or node is None or node.get("customer_id") == cid:
            continue
        seen_with = list(node.get("seen_with") or ())
        if cid not in seen_with and len(seen_with) < limit:
            seen_with.append(cid)
            tx.put("n:" + nid, {**node, "seen_with": seen_with})
            if len(seen_with) >= limit:
                outcomes.append(LimitHit(TYPE_OF_CODE[nid[0]], "link"))
    if absorbed:
        outcomes.insert(
            0,
            Merged(
                cid,
                tuple(g.cid for g, _ in absorbed),
                tuple(v for _, v in absorbed),
                item.event_id,
                item.occurred_at,
            ),
        )
    return Linked(cid, tuple(outcomes), tuple(tx.pending.items()))


# -- de-duplication window ----------------------------------------------------------------------


FORGOTTEN = "forgotten"


def forget(state: Mapping[str, Entry], customer_id: str, at: int) -> tuple[Write, ...]:
    """Erase a customer's profile and identifiers (a GDPR request).

    Weak identifiers (devices, anonymous ids) are freed. The keyed hashes of the profile's
    user_id and email stay as ``forgotten`` markers, so a later event carrying them is dropped
    instead of building the profile again (and being contacted again). Nothing else about
    the customer is kept.

    >>> s: dict[str, Entry] = {}
    >>> apply(s, link(s, IdentityInput("e1", 10, ("u:x", "a:y")), Rules()).writes)
    >>> cid = s["n:u:x"]["customer_id"]
    >>> apply(s, forget(s, cid, 20))
    >>> sorted(k for k in s if not k.startswith("e:")), s["n:u:x"]["kind"]
    (['n:u:x'], 'forgotten')
    >>> link(s, IdentityInput("e2", 30, ("u:x", "a:z")), Rules()).customer_id is None
    True
    """
    profile = state.get("p:" + customer_id)
    ids = list(profile.get("identifiers") or ()) if profile is not None else []
    writes: list[Write] = []
    for i in ids:
        node = state.get("n:" + i)
        if node is None or node.get("customer_id") != customer_id:
            continue  # moved to another profile since
        if i[0] in _STRONG:
            writes.append(("n:" + i, {"kind": FORGOTTEN, "created_at": at}))
        else:
            writes.append(("n:" + i, None))
    if profile is not None:
        writes.append(("p:" + customer_id, None))
    return tuple(writes)


def partition(state: Mapping[str, Entry]) -> dict[str, frozenset[str]]:
    """customer_id -> its node ids, from the node entries (tests and diagnostics).

    >>> p = partition({"n:u:1": {"customer_id": "c1"}, "n:a:2": {"customer_id": "c1"}})
    >>> sorted(p["c1"])
    ['a:2', 'u:1']
    """
    out: dict[str, set[str]] = {}
    for key, entry in state.items():
        if key[:2] == "n:" and entry.get("customer_id"):
            out.setdefault(entry["customer_id"], set()).add(key[2:])
    return {k: frozenset(v) for k, v in out.items()}


def strong_values(ids: Sequence[str], code: str) -> list[str]:
    """The node ids of one type among ``ids``.

    >>> strong_values(["u:1", "e:x", "e:y"], "e")
    ['e:x', 'e:y']
    """
    return [i for i in ids if i[0] == code]
