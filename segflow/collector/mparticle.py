"""mParticle's server-to-server events API (``/v2/events``, ``/v2/bulkevents``) to
``BehaviorEvent`` records (pure), through the Segment mapping of :mod:`segflow.collector.core`.

An mParticle *batch* (one user: ``user_identities``, ``device_info``, ``mpid``,
``user_attributes``, ``events``) becomes Segment-shaped messages, which
:func:`~segflow.collector.core.map_message` maps as usual (event-name mapping, typed fields,
validation, the email kept out of ``properties``):

==================================  =====================================================
mParticle                           Segment message
==================================  =====================================================
``user_identities.customer_id``     ``userId``
``mpid``                            ``anonymousId`` (``mp:<mpid>``)
``user_identities.email``           ``context.traits.email`` (identity hashes it)
``device_info.ios_idfv`` /          ``context.device.id``
``android_uuid`` / ``device_application_stamp``
``user_attributes`` (non-empty)     one ``identify`` with them as traits, first
``custom_event``                    ``track`` named ``data.event_name``, properties
                                    ``data.custom_attributes``
``screen_view``                     ``screen`` named ``data.screen_name``
``commerce_event``                  ``track``: ``purchase`` → "Order Completed" (revenue
                                    ``transaction_attributes.revenue`` or the products'
                                    total), ``add_to_cart`` / ``view_detail`` → "Product
                                    Viewed"/"Cart Viewed" names, others by action name
``session_start``                   ``track`` "Session Started"
``data.source_message_id``          ``messageId``
``data.timestamp_unixtime_ms``      ``timestamp`` (the batch's when absent)
==================================  =====================================================

Other event types (``session_end``, ``application_state_transition``, …) are mapped as
``track`` calls named after the type, so nothing is silently dropped.

>>> msgs = to_segment({"mpid": 42, "user_identities": {"customer_id": "u1"},
...     "user_attributes": {"plan": "pro"},
...     "events": [{"event_type": "custom_event", "data": {"event_name": "Signed In",
...                 "source_message_id": "m1", "timestamp_unixtime_ms": 1704067200000}}]})
>>> [(m["type"], m.get("event"), m["userId"], m["anonymousId"]) for m in msgs]
[('identify', None, 'u1', 'mp:42'), ('track', 'Signed In', 'u1', 'mp:42')]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from segflow.collector import core

_COMMERCE = {
    "purchase": "Order Completed",
    "add_to_cart": "Cart Viewed",
    "view_detail": "Product Viewed",
    "checkout": "Checkout Started",
    "remove_from_cart": "Product Removed",
    "refund": "Order Refunded",
}


def _d(m: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = m.get(key)
    return v if isinstance(v, Mapping) else {}


def to_segment(batch: Any) -> list[dict[str, Any]]:
    """The Segment messages of one mParticle batch (raises MessageError for a non-object)."""
    if not isinstance(batch, Mapping):
        raise core.MessageError(
            f"expected an mParticle batch (a JSON object with events), got {type(batch).__name__}"
        )
    ids = _d(batch, "user_identities")
    dev = _d(batch, "device_info")
    base: dict[str, Any] = {}
    if ids.get("customer_id") is not None:
        base["userId"] = str(ids["customer_id"])
    if batch.get("mpid") is not None:
        base["anonymousId"] = f"mp:{batch['mpid']}"
    context: dict[str, Any] = {}
    device = next(
        (dev[k] for k in ("ios_idfv", "android_uuid", "device_application_stamp") if dev.get(k)),
        None,
    )
    if device is not None:
        context["device"] = {"id": str(device)}
    if isinstance(ids.get("email"), str) and ids["email"]:
        context["traits"] = {"email": ids["email"]}
    if context:
        base["context"] = context
    batch_ts = batch.get("timestamp_unixtime_ms")
    out: list[dict[str, Any]] = []
    attrs = _d(batch, "user_attributes")
    if attrs:
        ident = {**base, "type": "identify", "traits": dict(attrs)}
        if batch.get("batch_id") is not None:
            ident["messageId"] = f"mp-{batch['batch_id']}-attributes"
        if batch_ts is not None:
            ident["timestamp"] = batch_ts
        out.append(ident)
    events = batch.get("events")
    if events is None:
        events = []
    if not isinstance(events, list):
        raise core.MessageError("events: expected a list of mParticle events")
    for ev in events:
        out.append(_event(ev, base, batch_ts))
    return out


def _event(ev: Any, base: dict[str, Any], batch_ts: Any) -> dict[str, Any]:
    if not isinstance(ev, Mapping):
        return {**base, "type": "track"}  # map_message says what is wrong (no event name)
    data = _d(ev, "data")
    kind = ev.get("event_type")
    msg: dict[str, Any] = dict(base)
    if data.get("source_message_id") is not None:
        msg["messageId"] = str(data["source_message_id"])
    ts = data.get("timestamp_unixtime_ms", batch_ts)
    if ts is not None:
        msg["timestamp"] = ts
    props = dict(_d(data, "custom_attributes"))
    if kind == "screen_view":
        msg.update(type="screen", name=data.get("screen_name"), properties=props)
    elif kind == "commerce_event":
        action = _d(data, "product_action")
        name = str(action.get("action") or "commerce")
        products = action.get("products") if isinstance(action.get("products"), list) else []
        revenue = action.get("total_amount")
        if revenue is None:
            revenue = _d(action, "transaction_attributes").get("revenue")
        if revenue is not None:
            props["revenue"] = revenue
        if data.get("currency_code"):
            props["currency"] = data["currency_code"]
        if products and isinstance(products[0], Mapping) and products[0].get("id") is not None:
            props["product_id"] = str(products[0]["id"])
        msg.update(type="track", event=_COMMERCE.get(name, name), properties=props)
    elif kind == "custom_event":
        msg.update(type="track", event=data.get("event_name"), properties=props)
    elif kind == "session_start":
        msg.update(type="track", event="Session Started", properties=props)
    else:
        msg.update(type="track", event=str(kind or ""), properties=props)
    return msg


def map_batches(
    body: Any, bulk: bool, received_at: int, config: core.MappingConfig
) -> tuple[list[dict[str, Any]], list[core.Rejected]]:
    """Events and rejected messages of a ``/v2/events`` body (one batch) or a
    ``/v2/bulkevents`` body (a list of batches); indexes count messages across batches.

    >>> evs, bad = map_batches([{"user_identities": {"customer_id": "u1"}, "events": [
    ...     {"event_type": "commerce_event", "data": {"source_message_id": "m2",
    ...      "product_action": {"action": "purchase", "total_amount": 9.5,
    ...      "products": [{"id": "p1"}]}}},
    ...     {"event_type": "custom_event", "data": {}}]}], True, 1704067200000,
    ...     core.MappingConfig())
    >>> [(e["event_type"], e["amount"], e["product_id"]) for e in evs], bad[0].index
    ([('purchase', 9.5, 'p1')], 1)
    """
    if bulk:
        if not isinstance(body, list):
            raise core.MessageError("expected a JSON array of mParticle batches (/v2/bulkevents)")
        batches = body
    else:
        batches = [body]
    messages: list[dict[str, Any]] = []
    for b in batches:
        messages.extend(to_segment(b))
    events: list[dict[str, Any]] = []
    rejected: list[core.Rejected] = []
    for i, msg in enumerate(messages):
        try:
            events.append(core.map_message(msg, received_at, None, config))
        except core.MessageError as exc:
            mid = msg.get("messageId")
            rejected.append(core.Rejected(i, mid if isinstance(mid, str) else None, str(exc)))
    return events, rejected
