"""Identifiers of simulated customers: unique ids, email normalisation, blocked values, keys.

Every identifier is derived from the customer's index through a seeded 64-bit bijection, so
ids are unique across the whole population (no birthday collisions, whatever its size) yet
reveal nothing about the index or persona.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_MASK64 = (1 << 64) - 1

#: Values producers send when they have no real identifier; identity must never link on them.
BLOCKED_DEVICE_IDS = ("unknown", "0", "null", "undefined", "00000000-0000-0000-0000-000000000000")
BLOCKED_EMAILS = ("unknown", "test@test.com", "null", "noreply@example.com")
BLOCKED_VALUES = frozenset(BLOCKED_DEVICE_IDS + BLOCKED_EMAILS)

#: Namespaces that keep the bijection's inputs of different id kinds apart.
NS_USER = 1
NS_EMAIL = 2
NS_DEVICE = 3
NS_ANON = 4
NS_SHARED = 5
NS_EVENT = 6


def scramble(seed: int, namespace: int, n: int) -> int:
    """A seeded bijection of 64-bit integers (distinct inputs give distinct outputs).

    >>> scramble(1, NS_USER, 5) == scramble(1, NS_USER, 5)
    True
    >>> len({scramble(7, NS_DEVICE, i) for i in range(1000)})
    1000
    """
    x = (n + (namespace << 56) + seed * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A seed for one customer's (or one pair's) random stream, independent of iteration order.

    >>> a, b, c = derive_seed(42, 3, 1), derive_seed(42, 3, 1), derive_seed(42, 3, 2)
    >>> a == b, a == c
    (True, False)
    """
    x = seed & _MASK64
    for p in parts:
        x = scramble(x, 0, p & _MASK64)
    return x


def normalize_email(email: str) -> str:
    """The comparable form of an email: trimmed and lower-cased.

    >>> normalize_email("  Ana.Silva83@Gmail.COM ")
    'ana.silva83@gmail.com'
    """
    return email.strip().lower()


def is_blocked(value: str) -> bool:
    """Whether ``value`` is a placeholder that must never link two profiles.

    >>> is_blocked("unknown"), is_blocked("Unknown"), is_blocked("u1")
    (True, True, False)
    """
    return value.strip().lower() in BLOCKED_VALUES


def event_key(event: Mapping[str, Any]) -> str:
    """The Kafka key of a raw event: the first present of user_id, anonymous_id, device_id, email.

    >>> event_key({"anonymous_id": "a1", "device_id": "d1"})
    'a1'
    >>> event_key({"user_id": None, "email": "x@y.z"})
    'x@y.z'
    """
    for name in ("user_id", "anonymous_id", "device_id", "email"):
        value = event.get(name)
        if value:
            return str(value)
    return ""


@dataclass(frozen=True)
class IdentityCluster:
    """Every identifier one true customer used (emails normalised); shared devices marked."""

    user_id: str | None
    emails: tuple[str, ...]
    device_ids: tuple[str, ...]
    anonymous_ids: tuple[str, ...]
    shared_device_ids: tuple[str, ...] = field(default=())

    def identifiers(self) -> frozenset[str]:
        """All identifier values of the cluster, shared devices included.

        >>> cluster = IdentityCluster("u1", ("a@b.c",), ("d1",), ("a1",))
        >>> sorted(cluster.identifiers())
        ['a1', 'a@b.c', 'd1', 'u1']
        """
        ids: set[str] = set(self.emails) | set(self.device_ids) | set(self.anonymous_ids)
        if self.user_id:
            ids.add(self.user_id)
        return frozenset(ids)

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to the ground-truth file."""
        return {
            "user_id": self.user_id,
            "emails": list(self.emails),
            "device_ids": list(self.device_ids),
            "anonymous_ids": list(self.anonymous_ids),
            "shared_device_ids": list(self.shared_device_ids),
        }
