"""The dispatcher's pure steps for what it learns of a customer besides segment changes
(split out of :mod:`services.dispatcher.core`, which was at the 600-line limit):

* :func:`observe` — an outcome or profile event (identified events): suppression,
  engagement, time zone and first name, attribution to KPIs (last touch);
* :func:`set_attributes` — the customer's attributes (``segflow.attributes``) the playbooks'
  templates read.

Same contract as the core's steps: ``(state, input, now) -> (state, effects)``, the same
object back when nothing changed.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.dispatcher.core import _flag, forget
from services.dispatcher.model import (
    FORGET_EVENTS,
    PROFILE_PROPERTIES,
    TERMINAL,
    TRUE,
    UNKNOWN_CUSTOMER_TYPES,
    Customer,
    Effect,
    Observation,
    replace,
)
from services.dispatcher.playbooks import Book


def set_attributes(
    customer: Customer | None, customer_id: str, attributes: Mapping[str, str], book: Book
) -> Customer | None:
    """The customer's attributes changed (segflow.attributes): keep those the playbooks'
    templates read, for rendering (``{{product_tier}}``); None stays None when none is read.

    >>> from services.dispatcher.playbooks import Book, Playbook, Step
    >>> book = Book((Playbook("p", "S", (Step("m", "email", subject="For {{product_tier}}"),)),))
    >>> set_attributes(None, "c", {"product_tier": "enterprise", "zip": "1"}, book).attrs
    (('product_tier', 'enterprise'),)
    >>> set_attributes(None, "c", {"zip": "1"}, book) is None
    True
    """
    wanted = book.template_traits
    picked = {k: str(v) for k, v in attributes.items() if k in wanted}
    if customer is None and not picked:
        return None
    c = customer or Customer(customer_id)
    attrs = dict(c.attrs)
    attrs.update(picked)
    if attrs == dict(c.attrs):
        return c
    return replace(c, attrs=tuple(sorted(attrs.items())))


# -- observe -----------------------------------------------------------------------------------
def observe(
    customer: Customer | None,
    ev: Observation,
    now: int,
    book: Book,
    keep_in_flight: bool = False,
) -> tuple[Customer | None, list[Effect]]:
    """Apply an outcome or profile event. Returns the same object when nothing changed (the
    shell then writes nothing); None stays None for events that concern no known customer.
    ``keep_in_flight``: see :func:`forget`."""
    props = dict(ev.properties)
    out: list[Effect] = []
    et = ev.event_type
    relevant = et in UNKNOWN_CUSTOMER_TYPES or any(k in props for k in PROFILE_PROPERTIES)
    if customer is None and not relevant:
        return None, []
    c = customer or Customer(ev.customer_id)
    if et in FORGET_EVENTS:
        return forget(c, now, keep_in_flight)
    if "forgotten" in c.suppressions:
        return c, []
    sup = set(c.suppressions)
    if et == "email_unsubscribe":
        sup.add("unsubscribed")
    elif et == "email_bounce":
        sup.add("bounced")
    if "do_not_contact" in props:
        if props["do_not_contact"].lower() in TRUE:
            sup.add("do_not_contact")
        else:
            sup.discard("do_not_contact")
    if sup != c.suppressions:
        c = replace(c, suppressions=frozenset(sup))
    attrs = dict(c.attrs)
    if props.get("first_name"):
        attrs["first_name"] = props["first_name"]
    if (
        ev.product_id
        and et in ("purchase", "cart_view", "cart_abandon", "page_view")
        and customer is not None
    ):
        attrs["product_recommended"] = ev.product_id
    tz = props.get("timezone") or c.timezone
    if attrs != dict(c.attrs) or tz != c.timezone:
        c = replace(c, attrs=tuple(sorted(attrs.items())), timezone=tz)
    if (
        et in book.policy.engagement_events
        and any(a.status not in TERMINAL for a in c.actions)
        and (c.last_engagement_at is None or ev.occurred_at > c.last_engagement_at)
    ):
        c = replace(c, last_engagement_at=ev.occurred_at)
    c = _attribute(c, ev, book, out)
    if c == customer:
        return customer, []
    return c, out


def _attribute(c: Customer, ev: Observation, book: Book, out: list[Effect]) -> Customer:
    """Credit outcomes to assignments inside the attribution window (last touch)."""
    window = book.policy.attribution_ms
    kpi = {
        "email_open": "opened",
        "email_click": "clicked",
        "purchase": "converted",
        "email_unsubscribe": "unsubscribed",
        "subscription_cancel": "churned",
    }.get(ev.event_type)
    if kpi is None:
        return c
    candidates = [
        i
        for i, a in enumerate(c.assignments)
        if a.decided_at <= ev.occurred_at <= a.decided_at + window
        and (
            ev.campaign_id is None
            or ev.campaign_id == a.campaign_id
            or kpi in ("converted", "churned")
        )
        and (ev.variant is None or kpi in ("converted", "churned") or ev.variant == a.variant)
    ]
    if not candidates:
        return c
    latest = max(candidates, key=lambda i: c.assignments[i].decided_at)
    if kpi == "clicked":  # a click implies the email was opened
        c = _flag(c, latest, "opened", out)
    return _flag(c, latest, kpi, out)
