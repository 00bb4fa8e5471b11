"""A customer's audit log as the console shows it: every membership change with the
explanation it carried, and recent events by type. Pure functions over what the gateway
gathered from the services (no I/O)."""

from __future__ import annotations

from typing import Any


def stay_number(entry_id: str) -> int | None:
    tail = entry_id.rsplit("|", 1)[-1]
    return int(tail) if tail.isdigit() else None


def membership_timeline(
    changes: list[dict[str, Any]],
    memberships: list[dict[str, Any]],
    explained: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every membership change of a customer: the recorded changes (the audit index, oldest
    first) with the explanation each carried, completed by the segmenter's latest entry and
    exit per segment (so the current stay shows even before the index has read it). The
    entry of the current stay is ``active`` and carries the explanation of now (what
    ``segflow explain`` shows); older ones carry the one recorded when they happened."""
    current = {m["segment"]: m for m in memberships}
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, int]] = set()
    for ch in changes:
        seg, at, transition = ch["segment"], ch["occurred_at"], ch["transition"]
        conditions = [
            {
                k: e.get(k)
                for k in (
                    "path",
                    "feature",
                    "operator",
                    "observed",
                    "threshold",
                    "margin",
                    "passed",
                    "observed_text",
                    "threshold_text",
                )
            }
            for e in ch.get("explanation") or []
        ]
        if transition == "primary_changed":
            out.append(
                {
                    "at": at,
                    "kind": "primary",
                    "segment": ch.get("primary_segment"),
                    "previous": ch.get("previous_primary"),
                }
            )
            continue
        kind = "entered" if transition == "entered" else "exited"
        seen.add((kind, seg, at))  # (the index keeps one record per change_id)
        out.append(
            {
                "at": at,
                "kind": kind,
                "segment": seg,
                "active": False,
                "stay": stay_number(ch.get("entry_id") or ""),
                "reason": ch.get("reason") if kind == "exited" else None,
                "definition_version": ch.get("definition_version"),
                "rule": "enter" if kind == "entered" else f"exit ({ch.get('reason') or 'rule'})",
                "conditions": conditions,
                "primary": False,
                "recorded": True,
            }
        )
    for mb in memberships:  # the segmenter's latest entry and exit, if the index lacks them
        for kind, at in (("entered", mb["entered_at"]), ("exited", mb["exited_at"])):
            if at is None or (kind, mb["segment"], at) in seen:
                continue
            seen.add((kind, mb["segment"], at))
            out.append(
                {
                    "at": at,
                    "kind": kind,
                    "segment": mb["segment"],
                    "active": False,
                    "stay": mb["stays"] if kind == "entered" or not mb["active"] else None,
                    "reason": None,
                    "definition_version": None,
                    "rule": None,
                    "conditions": [],
                    "primary": False,
                    "recorded": False,
                }
            )
    for e in out:
        m = current.get(e.get("segment") or "")
        if m is None:
            continue
        e["stays"] = m["stays"]
        why = explained.get(m["segment"])
        if e["kind"] == "entered" and m["active"] and e["at"] == m["entered_at"]:
            e["active"] = True  # the current stay: explained as of now
            e["rule"] = why["rule"] if why else e["rule"]
            e["conditions"] = why["conditions"] if why else e["conditions"]
            e["primary"] = bool(why and why.get("primary"))
    return out


#: The scorer's windowed event counts shown as "recent events by type".
EVENT_WINDOWS = ("3d", "7d", "28d")


def recent_events(features: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Events by type over the last 3, 7 and 28 days of event time, from the scorer's
    windowed counts (``<signal>_<N>d``); types never seen in 28 days are left out."""
    from services.scorer.features import SIGNALS

    if not features:
        return []
    out = []
    for signal in SIGNALS:
        counts = {w: features.get(f"{signal}_{w}") for w in EVENT_WINDOWS}
        if any(counts.values()):
            out.append({"type": signal, "counts": counts})
    return out
