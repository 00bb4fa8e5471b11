"""Durations as people write them in segment definitions and playbooks: ``30m``, ``48h``,
``7d``, ``1.5d``, ``500ms``, ``2w``. One parser for every file segflow reads.

A bare number is refused (``90``: seconds? days?), except ``0``, which means no delay.

>>> parse_duration("48h"), parse_duration("1.5d"), parse_duration(0)
(172800000, 129600000, 0)
>>> parse_duration(90)
Traceback (most recent call last):
...
ValueError: 90 is not a duration: write a number with a unit, e.g. 30m, 48h, 7d (ms, s, m, h, d, w)
"""

from __future__ import annotations

import re
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
EXPECTED = "write a number with a unit, e.g. 30m, 48h, 7d (ms, s, m, h, d, w)"


def parse_duration(value: Any) -> int:
    """Milliseconds in ``value``; ``ValueError`` naming the expected form otherwise."""
    if value == 0 and not isinstance(value, bool):
        return 0
    m = _DURATION.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{value!r} is not a duration: {EXPECTED}")
    return int(float(m.group(1)) * UNIT_MS[m.group(2)])
