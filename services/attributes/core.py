"""Customer attributes, folded per customer (pure: no Kafka, clock or environment).

Traits arrive on ``identify`` events (from the collector, ``segflow produce`` or ``segflow
attributes load``, after identity resolved the customer) as the event's ``properties``. They
are folded into one record per customer: a later trait overwrites an earlier one, traits not
mentioned are kept. PII is kept out before anything is stored:

* ``email`` never reaches here (identity hashes it and drops the raw value);
* traits whose name says they are contact details or a person's name or address — email,
  phone, names, address lines, birthday, and :data:`PII_TRAITS` in general — are dropped,
  unless listed in ``plain`` (``SEGFLOW_ATTRIBUTES_PLAIN_TRAITS``, e.g. ``first_name`` for
  ``{{first_name}}`` in templates: then stored in clear, erased by forget, documented as PII).
  Email addresses and phone numbers for sending belong in the contact vault (issue 16), not here;
* a value that looks like an email address is dropped whatever its trait is called.

>>> a = fold(None, "c1", {"plan": "pro", "Zip": "94027", "phone": "+1 555", "first_name": "Ana"},
...          1000, "identify")
>>> a.attributes
{'plan': 'pro', 'zip': '94027'}
>>> fold(a, "c1", {"plan": "enterprise"}, 2000, "crm").attributes
{'plan': 'enterprise', 'zip': '94027'}
>>> fold(None, "c1", {"first_name": "Ana"}, 1, "crm", plain=frozenset({"first_name"})).attributes
{'first_name': 'Ana'}
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Trait names (normalised: lower case, non-alphanumerics as ``_``) kept out as PII.
PII_TRAITS = frozenset(
    {
        "email",
        "email_address",
        "phone",
        "phone_number",
        "mobile",
        "mobile_phone",
        "name",
        "first_name",
        "firstname",
        "last_name",
        "lastname",
        "full_name",
        "username",
        "address",
        "street",
        "street_address",
        "address_line1",
        "address_line2",
        "address_line_1",
        "address_line_2",
        "address_street",
        "birthday",
        "birthdate",
        "date_of_birth",
        "ssn",
        "tax_id",
        "ip",
        "ip_address",
        "password",
    }
)
#: Properties the collector or the loader adds that are not traits.
NOT_TRAITS = frozenset({"segflow_source"})
_EMAILISH = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NONWORD = re.compile(r"[^a-z0-9]+")
MAX_ATTRIBUTES = 64  # per customer: a CRM export with hundreds of columns is cut (and counted)
MAX_VALUE = 256  # characters per value


def trait_name(raw: str) -> str:
    """``"Product Tier"`` -> ``"product_tier"``; camelCase split (``firstName`` -> ``first_name``).

    >>> trait_name("Product Tier"), trait_name("firstName"), trait_name("postal-code")
    ('product_tier', 'first_name', 'postal_code')
    """
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", raw.strip())
    return _NONWORD.sub("_", snake.lower()).strip("_")


@dataclass(frozen=True)
class Attributes:
    """A customer's attributes (a CustomerAttributes record)."""

    customer_id: str
    attributes: Mapping[str, str]
    updated_at: int
    sources: tuple[str, ...] = ()
    dropped: tuple[str, ...] = field(default=(), compare=False)  # PII traits kept out (names)

    def to_record(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "attributes": dict(self.attributes),
            "updated_at": self.updated_at,
            "sources": list(self.sources),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Attributes:
        return cls(
            str(record["customer_id"]),
            dict(record.get("attributes") or {}),
            int(record.get("updated_at") or 0),
            tuple(record.get("sources") or ()),
        )


def clean(
    traits: Mapping[str, Any], plain: Collection[str] = frozenset()
) -> tuple[dict[str, str], list[str]]:
    """The traits that may be stored (names normalised, values strings) and the names dropped.

    >>> clean({"Email": "a@b.io", "owner": "sam@corp.io", "seats": 3, "tier": " gold "})
    ({'seats': '3', 'tier': 'gold'}, ['email', 'owner'])
    """
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for raw, value in traits.items():
        name = trait_name(str(raw))
        if not name or name in NOT_TRAITS or value is None:
            continue
        text = str(value).strip()
        if name in PII_TRAITS and name not in plain:
            dropped.append(name)
            continue
        if _EMAILISH.match(text) and name not in plain:
            dropped.append(name)
            continue
        kept[name] = text[:MAX_VALUE]
    return kept, dropped


def fold(
    current: Attributes | None,
    customer_id: str,
    traits: Mapping[str, Any],
    at: int,
    source: str,
    plain: Collection[str] = frozenset(),
) -> Attributes:
    """Apply one event's traits: later values win; traits not mentioned are kept.

    An event older than the stored ``updated_at`` still fills traits the customer does not
    have, but does not overwrite newer values (events arrive out of order)."""
    kept, dropped = clean(traits, plain)
    attrs = dict(current.attributes) if current is not None else {}
    newer = current is None or at >= current.updated_at
    for k, v in kept.items():
        if newer or k not in attrs:
            attrs[k] = v
    if len(attrs) > MAX_ATTRIBUTES:
        attrs = dict(sorted(attrs.items())[:MAX_ATTRIBUTES])
    sources = tuple(sorted({*(current.sources if current else ()), source}))
    updated = max(at, current.updated_at) if current is not None else at
    return Attributes(customer_id, attrs, updated, sources, tuple(dropped))


def merge(survivor: Attributes | None, absorbed: Attributes, survivor_id: str) -> Attributes:
    """An identity merge: the absorbed profile's attributes move to the survivor; where both
    have a trait, the more recently updated record's value wins.

    >>> s = Attributes("s", {"plan": "pro"}, 2000, ("identify",))
    >>> a = Attributes("a", {"plan": "free", "zip": "94027"}, 1000, ("crm",))
    >>> m = merge(s, a, "s")
    >>> m.customer_id, m.attributes, m.sources
    ('s', {'plan': 'pro', 'zip': '94027'}, ('crm', 'identify', 'merge'))
    """
    if survivor is None:
        return Attributes(
            survivor_id,
            dict(absorbed.attributes),
            absorbed.updated_at,
            tuple(sorted({*absorbed.sources, "merge"})),
        )
    older, newer = (
        (absorbed, survivor) if survivor.updated_at >= absorbed.updated_at else (survivor, absorbed)
    )
    attrs = {**older.attributes, **newer.attributes}
    return Attributes(
        survivor_id,
        attrs,
        max(survivor.updated_at, absorbed.updated_at),
        tuple(sorted({*survivor.sources, *absorbed.sources, "merge"})),
    )


def traits_of(event: Mapping[str, Any]) -> tuple[dict[str, str], str] | None:
    """The traits and their source of an IdentifiedEvent's event, or None when it has none
    (only ``identify`` events carry traits; ``properties.segflow_source`` names the source).

    >>> props = {"plan": "pro", "segflow_source": "crm"}
    >>> traits_of({"event_type": "identify", "properties": props})
    ({'plan': 'pro', 'segflow_source': 'crm'}, 'crm')
    >>> traits_of({"event_type": "page_view", "properties": {"plan": "pro"}}) is None
    True
    """
    if event.get("event_type") != "identify":
        return None
    props = event.get("properties") or {}
    if not props:
        return None
    return dict(props), str(props.get("segflow_source") or "identify")
