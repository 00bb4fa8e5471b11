"""Contact policy: frequency caps and cooldowns per customer and channel, quiet hours.

Pure functions over a customer's send history (``(channel, at_ms)`` pairs, across every
playbook) and a time passed in.

>>> from services.dispatcher.playbooks import Cap, Policy
>>> p = Policy(caps=(("email", (Cap(2, 86_400_000),)),), cooldowns=(("email", 3_600_000),))
>>> blocked(p, [("email", 0)], "email", 1_000_000)
'cooldown'
>>> blocked(p, [("email", 0), ("email", 4_000_000)], "email", 8_000_000)
'frequency_cap'
>>> blocked(p, [("email", 0), ("email", 4_000_000)], "email", 86_400_000) is None
True
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.dispatcher.playbooks import Policy


def blocked(
    policy: Policy, history: Iterable[tuple[str, int]], channel: str, now: int
) -> str | None:
    """Why a send on ``channel`` at ``now`` would break the policy, or None when it may go.

    A cap ``{max: N, per: W}`` allows at most N sends in any window (now − W, now]; a cooldown
    C requires C ms since the last send on the channel.
    """
    times = [at for ch, at in history if ch == channel and at <= now]
    cooldown = policy.cooldown_for(channel)
    if cooldown and times and now - max(times) < cooldown:
        return "cooldown"
    for cap in policy.caps_for(channel):
        if sum(1 for at in times if at > now - cap.per_ms) >= cap.max:
            return "frequency_cap"
    return None


def zone(name: str | None, default: str) -> ZoneInfo:
    """The customer's time zone, or ``default`` when unknown or invalid."""
    for candidate in (name, default, "UTC"):
        if not candidate:
            continue
        try:
            return ZoneInfo(candidate)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    return ZoneInfo("UTC")


def quiet_until(policy: Policy, channel: str, timezone: str | None, now: int) -> int | None:
    """End of the quiet period (epoch ms) when ``now`` falls inside it locally, else None.

    >>> from services.dispatcher.playbooks import Policy
    >>> p = Policy(quiet_start_min=21 * 60, quiet_end_min=8 * 60)
    >>> late = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000 + 23 * 3_600_000  # 23:00 UTC
    >>> (quiet_until(p, "email", "UTC", late) - late) // 3_600_000   # until 08:00 UTC
    9
    >>> quiet_until(p, "email", "America/New_York", late) is None   # 18:00 in New York
    True
    >>> quiet_until(p, "crm_task", "UTC", late) is None               # not a quiet channel
    True
    """
    start, end = policy.quiet_start_min, policy.quiet_end_min
    if start is None or end is None or start == end or channel not in policy.quiet_channels:
        return None
    tz = zone(timezone, policy.default_timezone)
    local = datetime.fromtimestamp(now / 1000, UTC).astimezone(tz)
    minute = local.hour * 60 + local.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if not inside:
        return None
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    wake = day + timedelta(minutes=end)
    if wake <= local:
        wake += timedelta(days=1)
    # Wall-clock arithmetic in a zone with DST: re-localise the target time.
    wake = wake.replace(tzinfo=None).replace(tzinfo=tz)
    return int(wake.timestamp() * 1000)
