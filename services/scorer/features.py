"""Per-customer behavioural state in event time, and the features computed from it (pure).

A customer's state is a plain dict shaped like the Avro record ``io.segflow.ScorerState``:
scalar recency timestamps and lifetime counters, plus ``buckets``, a zlib-compressed block of
daily buckets for the last :data:`RING` (128) days (a ring indexed by ``day % RING``;
``head_day`` is the newest day in it). Each day holds one saturating 8-bit count per signal
(:data:`SIGNALS`) and two 32-bit floats (revenue, sum of ticket sentiment). Raw events are
never kept, so the state is bounded whatever the event rate.

Features are computed *as of* a time ``as_of``: window ``N`` days covers the UTC day of
``as_of`` and the ``N - 1`` days before it. Everything a window or ``idle_days_*`` feature
needs is in the buckets, so features as of a past time can be recomputed exactly (the churn
model's matured training examples are built that way, see :mod:`services.scorer.core`).

>>> st = new_state("c1", 10 * DAY)
>>> for day, kind in [(10, "email_open"), (11, "email_open"), (12, "purchase")]:
...     ev = {"event_type": kind, "occurred_at": day * DAY + HOUR, "amount": 9.5}
...     store_buckets(st, apply_event(st, ev))
>>> f = compute(st, 12 * DAY + 2 * HOUR).values
>>> f["opens_7d"], f["purchases_3d"], f["revenue_7d"], f["days_since_open"], f["idle_days_open"]
(2.0, 1.0, 9.5, 1.0417, 1.0)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.scorer.layout import (
    _ACT_MASK,
    _ACTIVE,
    _ACTIVITY,
    _ACTIVITY_TYPES,
    _BLOB_BYTES,
    _CART_VIEWS,
    _CLICKS,
    _COUNT_BYTES,
    _CUR_FLAT,
    _CUR_LEN,
    _EMAILS_SENT,
    _FEATURE_USE,
    _IDLE_COLS,
    _LAST_FIELDS,
    _LEGACY_BYTES,
    _N_COLS,
    _O_BT,
    _O_CH,
    _O_IDLE,
    _O_SC,
    _O_TR,
    _OPENS,
    _PAGE_VIEWS,
    _PRIOR_FLAT,
    _PURCHASES,
    _RECENCY_OF_TYPE,
    _REV,
    _ROWS,
    _SESSIONS,
    _SLOTS,
    _SMALL_FLAT,
    _TREND_COLS,
    _WEEK_ROWS_ABS,
    _WEEK_X,
    _WEEK_XX,
    _WIN_FLAT,
    BTYD_FEATURES,
    IDLE_CAP_DAYS,
    MAX_CHANGE,
    N_SIG,
    RECENCY,
    SCALAR_ONLY,
    C,
    S,
)
from services.scorer.layout import DAY as DAY
from services.scorer.layout import EVENT_SIGNAL as EVENT_SIGNAL
from services.scorer.layout import FEATURE_NAMES as FEATURE_NAMES
from services.scorer.layout import HOUR as HOUR
from services.scorer.layout import LEGACY_RING as LEGACY_RING
from services.scorer.layout import MINUTE as MINUTE
from services.scorer.layout import NEVER_DAYS as NEVER_DAYS
from services.scorer.layout import QUALIFYING as QUALIFYING
from services.scorer.layout import RING as RING
from services.scorer.layout import SIGNALS as SIGNALS
from services.scorer.layout import State as State


def new_state(customer_id: str, first_seen_ms: int) -> State:
    """An empty state for a customer first seen at ``first_seen_ms``."""
    return {
        "customer_id": customer_id,
        "head_day": first_seen_ms // DAY,
        "buckets": b"",
        "first_seen_ms": first_seen_ms,
        "last_event_ms": first_seen_ms,
        **{f"last_{n}_ms": None for n in RECENCY},
        "signup_ms": None,
        "last_cancel_ms": None,
        "unsubscribed": False,
        "bounced": False,
        "high_value_zip": False,
        "lifetime_events": 0,
        "lifetime_logins": 0,
        "lifetime_feature_use": 0,
        "lifetime_purchases": 0,
        "lifetime_revenue": 0.0,
        "purchase_interval_fast": 0.0,
        "purchase_interval_slow": 0.0,
        "purchase_gaps": 0,
        **new_btyd(),
        "pending": False,
        "scored_as_of": None,
        "emitted_as_of": None,
        "emitted_churn": -1.0,
        "emitted_engagement": -1.0,
        "emitted_stage": "",
        "emitted_cluster": -1,
        "emitted_fingerprint": 0,
    }


class Buckets:
    """The decompressed daily buckets: ``counts[slot, signal]`` (uint8, saturating) and
    ``floats[slot, 0 = revenue | 1 = sentiment sum]`` (float32), views on one bytearray."""

    __slots__ = ("raw", "counts", "floats")

    def __init__(self, raw: bytearray) -> None:
        self.raw = raw
        self.counts: npt.NDArray[np.uint8] = np.frombuffer(
            raw, dtype=np.uint8, count=_COUNT_BYTES
        ).reshape(RING, N_SIG)
        self.floats: npt.NDArray[np.float32] = np.frombuffer(
            raw, dtype=np.float32, count=RING * 2, offset=_COUNT_BYTES
        ).reshape(RING, 2)

    @classmethod
    def load(cls, blob: bytes, head_day: int | None = None) -> Buckets:
        """Decompress a state's ``buckets`` field (empty bytes: all zero). A block written
        with the former 120-day ring is converted when its ``head_day`` is given."""
        if not blob:
            return cls(bytearray(_BLOB_BYTES))
        raw = bytearray(zlib.decompress(blob))
        if len(raw) == _LEGACY_BYTES and head_day is not None:
            return cls._from_legacy(raw, head_day)
        if len(raw) != _BLOB_BYTES:
            raise ValueError(f"bucket block has {len(raw)} bytes, expected {_BLOB_BYTES}")
        return cls(raw)

    @classmethod
    def of(cls, st: State) -> Buckets:
        """The buckets of a state (converting a 120-day block)."""
        return cls.load(st["buckets"], int(st["head_day"]))

    @classmethod
    def _from_legacy(cls, raw: bytearray, head_day: int) -> Buckets:
        n = LEGACY_RING
        counts = np.frombuffer(raw, dtype=np.uint8, count=n * N_SIG).reshape(n, N_SIG)
        floats = np.frombuffer(raw, dtype=np.float32, count=n * 2, offset=n * N_SIG).reshape(n, 2)
        days = head_day - np.arange(n)
        b = cls(bytearray(_BLOB_BYTES))
        b.counts[days % RING] = counts[days % n]
        b.floats[days % RING] = floats[days % n]
        return b

    def dump(self) -> bytes:
        """The compressed block (raw deflate of the counts and floats)."""
        return zlib.compress(self.raw, 1)

    def copy(self) -> Buckets:
        return Buckets(bytearray(self.raw))


def advance(b: Buckets, st: State, day: int) -> None:
    """Move the ring's head to ``day``, clearing the slots of the days skipped."""
    head = int(st["head_day"])
    if day <= head:
        return
    if day - head >= RING:
        b.counts[:] = 0
        b.floats[:] = 0
    else:
        slots = np.arange(head + 1, day + 1) % RING
        b.counts[slots] = 0
        b.floats[slots] = 0
    st["head_day"] = day


def apply_event(
    st: State,
    event: Mapping[str, Any],
    b: Buckets | None = None,
    qualifying: frozenset[str] = _ACTIVITY_TYPES,
) -> Buckets:
    """Add one event (already accepted by the watermark) to ``st`` in place; returns the
    buckets (decompressed from ``st`` when ``b`` is None). Call :func:`store_buckets` to write
    them back. Events older than the ring only update scalars. ``qualifying``: the event types
    the ``btyd_*`` summary counts (see :data:`QUALIFYING`).
    """
    if b is None:
        b = Buckets.of(st)
    t = int(event["occurred_at"])
    kind = str(event["event_type"])
    day = t // DAY
    if day > st["head_day"]:
        advance(b, st, day)
    in_ring = day > st["head_day"] - RING
    slot = day % RING
    sig = EVENT_SIGNAL.get(kind)
    if sig is None and kind not in SCALAR_ONLY:
        sig = S["other_events"]
    counts = b.counts
    if kind in qualifying:
        sigs = [EVENT_SIGNAL[k] for k in qualifying if k in EVENT_SIGNAL]
        _qualifying(st, t, not in_ring or not counts[slot, sigs].any())
    if sig is not None and in_ring and counts[slot, sig] < 255:
        counts[slot, sig] += 1
    st["lifetime_events"] += 1
    if t > st["last_event_ms"]:
        st["last_event_ms"] = t
    if t < st["first_seen_ms"]:
        st["first_seen_ms"] = t
    if kind == "purchase":
        amount = event.get("amount")
        value = float(amount) if amount is not None and math.isfinite(amount) else 0.0
        if in_ring:
            b.floats[slot, 0] += value
        _purchase(st, t, value)
    elif kind == "support_ticket":
        sentiment = event.get("sentiment")
        if in_ring and sentiment is not None:
            b.floats[slot, 1] += float(sentiment)
        if event.get("escalated"):
            if in_ring and counts[slot, S["escalations"]] < 255:
                counts[slot, S["escalations"]] += 1
            _latest(st, "last_escalation_ms", t)
    elif kind == "login":
        st["lifetime_logins"] += 1
    elif kind == "feature_use":
        st["lifetime_feature_use"] += 1
    elif kind == "identify":
        if st["signup_ms"] is None or t < st["signup_ms"]:
            st["signup_ms"] = t
    elif kind == "subscription_cancel":
        _latest(st, "last_cancel_ms", t)
    elif kind == "email_unsubscribe":
        st["unsubscribed"] = True
    elif kind == "email_bounce":
        st["bounced"] = True
    if kind in _ACTIVITY_TYPES:  # after _purchase, which needs the previous purchase time
        _latest(st, "last_active_ms", t)
        rec = _RECENCY_OF_TYPE.get(kind)
        if rec is not None:
            _latest(st, f"last_{rec}_ms", t)
    return b


def upgrade(st: State) -> bool:
    """Convert a state written with the 120-day ring in place; whether it was one."""
    blob = st["buckets"]
    if not blob or len(zlib.decompress(blob)) != _LEGACY_BYTES:
        return False
    st["buckets"] = Buckets.of(st).dump()
    return True


def store_buckets(st: State, b: Buckets) -> None:
    """Write decompressed buckets back into the state (compressing them)."""
    st["buckets"] = b.dump()


def high_value_zip(st: State, event: Mapping[str, Any], zips: frozenset[str]) -> None:
    """Remember whether the customer's latest known zip (``properties.zip``) is high value."""
    props = event.get("properties") or {}
    z = props.get("zip")
    if z is not None:
        st["high_value_zip"] = z in zips


def _latest(st: State, field: str, t: int) -> None:
    old = st[field]
    if old is None or t > old:
        st[field] = t


def new_btyd() -> State:
    """The empty qualifying-activity summary (fields of ``io.segflow.ScorerState``)."""
    return {
        "q_first_ms": None,
        "q_last_ms": None,
        "q_days": 0,
        "q_gaps": 0,
        "q_gap_sum": 0.0,
        "q_gap_sumsq": 0.0,
    }


def _qualifying(st: State, t: int, new_day: bool) -> None:
    """Count a qualifying event in the summary: distinct days, the first and last, and the
    sum and sum of squares of the gaps (days) between consecutive distinct days. A late event
    on an earlier day than the last counts its day (``new_day``: nothing qualifying on it
    yet) but changes no gap (the sequence is not rebuilt)."""
    if "q_days" not in st:
        st.update(new_btyd())
    last = st["q_last_ms"]
    day = t // DAY
    if last is None:
        st["q_first_ms"] = st["q_last_ms"] = t
        st["q_days"] = 1
        return
    last_day = last // DAY
    if day > last_day:
        gap = float(day - last_day)
        st["q_gaps"] += 1
        st["q_gap_sum"] += gap
        st["q_gap_sumsq"] += gap * gap
        st["q_days"] += 1
        st["q_last_ms"] = t
    elif day == last_day:
        st["q_last_ms"] = max(last, t)
    else:
        st["q_days"] += 1 if new_day else 0
        if t < st["q_first_ms"]:
            st["q_first_ms"] = t


def _purchase(st: State, t: int, value: float) -> None:
    """Lifetime totals and the purchase interval (EWMAs of the gaps in days: alpha 0.5 for the
    current interval, 0.05 for the customer's baseline).

    Only in-order purchases update the intervals (a late one is counted, not re-sequenced).
    """
    last = st["last_purchase_ms"]
    st["lifetime_purchases"] += 1
    st["lifetime_revenue"] += value
    if last is not None and t > last:
        gap = (t - last) / DAY
        if st["purchase_gaps"] == 0:
            st["purchase_interval_fast"] = st["purchase_interval_slow"] = gap
        else:
            st["purchase_interval_fast"] += 0.5 * (gap - st["purchase_interval_fast"])
            st["purchase_interval_slow"] += 0.05 * (gap - st["purchase_interval_slow"])
        st["purchase_gaps"] += 1
    if last is None or t > last:
        st["last_purchase_ms"] = t


@dataclass(frozen=True)
class Features:
    """Features of one customer as of ``as_of``: ``vector`` in :data:`FEATURE_NAMES` order."""

    as_of: int
    vector: npt.NDArray[np.float64]

    @property
    def values(self) -> dict[str, float]:
        """Name → value (rounded to 4 decimals, as emitted)."""
        return dict(zip(FEATURE_NAMES, np.round(self.vector, 4).tolist(), strict=True))


def day_matrix(st: State, as_of: int, b: Buckets | None = None) -> npt.NDArray[np.float64]:
    """Per-day values going back from the day of ``as_of`` (row k = k days before it), with
    the derived columns of :data:`COLUMNS`; days after ``as_of`` or outside the ring are 0."""
    if b is None:
        b = Buckets.of(st)
    head = int(st["head_day"])
    day = as_of // DAY
    slots = _SLOTS[day % RING]
    m = np.empty((RING, _N_COLS), dtype=np.float64)
    m[:, :N_SIG] = b.counts.take(slots, axis=0)
    m[:, _REV : _REV + 2] = b.floats.take(slots, axis=0)
    if day != head:  # some rows are after the head or older than the ring
        if day > head:
            m[: min(RING, day - head)] = 0.0  # days after the head (nothing there yet)
        else:
            m[max(0, RING - (head - day)) :] = 0.0  # days the ring no longer holds
    act = m[:, :N_SIG] @ _ACT_MASK
    m[:, _ACTIVITY] = act
    m[:, _ACTIVE] = act > 0
    return m


def active_days(st: State, as_of: int, b: Buckets | None = None) -> list[bool]:
    """Whether the customer was active on each day going back from the day of ``as_of``
    (item k = k days before it; the :data:`RING` days the buckets hold)."""
    if b is None:
        b = Buckets.of(st)
    head = int(st["head_day"])
    day = as_of // DAY
    act: list[bool] = (b.counts.take(_SLOTS[day % RING], axis=0) @ _ACT_MASK > 0).tolist()
    if day > head:
        n = min(RING, day - head)
        act[:n] = [False] * n
    elif day < head:
        n = min(RING, head - day)
        act[RING - n :] = [False] * n
    return act


def compute(st: State, as_of: int, b: Buckets | None = None) -> Features:
    """Every feature of :data:`FEATURE_NAMES` as of ``as_of`` (epoch ms)."""
    m = day_matrix(st, as_of, b)
    cs = np.cumsum(m, axis=0)
    flat = cs[_ROWS].ravel()
    vec = np.empty(len(FEATURE_NAMES))
    vec[:_O_CH] = flat[_WIN_FLAT]
    cur = flat[_CUR_FLAT]
    base = (flat[_PRIOR_FLAT] - cur) / 28.0
    cur /= _CUR_LEN
    # rate change vs the prior 28 days: -1 stopped, 0 same (or both zero), capped at +10
    vec[_O_CH:_O_IDLE] = np.minimum((cur - base) / np.maximum(base, 1e-9), MAX_CHANGE)
    # idle days: leading days with nothing (the cumulative sum is still zero)
    idle = np.minimum((cs[:, _IDLE_COLS] == 0).sum(axis=0), IDLE_CAP_DAYS)
    vec[_O_IDLE:_O_SC] = idle
    vec[_O_SC:_O_TR] = _scalars(st, as_of, flat[_SMALL_FLAT].tolist())
    _trend(cs, idle, vec)
    vec[_O_BT:] = _btyd(st, as_of)
    return Features(as_of, vec)


def compute_many(
    states: Sequence[State], as_ofs: Sequence[int], buckets: Sequence[Buckets]
) -> npt.NDArray[np.float64]:
    """:func:`compute` for many customers at once (one row each, the same values): the
    day matrices are stacked so the sums, changes and idle days are a few array operations
    for all of them instead of a few per customer."""
    k = len(states)
    m = np.empty((k, RING, _N_COLS), dtype=np.float64)
    for i, (st, as_of, b) in enumerate(zip(states, as_ofs, buckets, strict=True)):
        head = int(st["head_day"])
        day = as_of // DAY
        slots = _SLOTS[day % RING]
        mi = m[i]
        mi[:, :N_SIG] = b.counts.take(slots, axis=0)
        mi[:, _REV : _REV + 2] = b.floats.take(slots, axis=0)
        if day > head:
            mi[: min(RING, day - head)] = 0.0
        elif day < head:
            mi[max(0, RING - (head - day)) :] = 0.0
    act = m[:, :, :N_SIG] @ _ACT_MASK
    m[:, :, _ACTIVITY] = act
    m[:, :, _ACTIVE] = act > 0
    cs = np.cumsum(m, axis=1)
    flat = cs[:, _ROWS, :].reshape(k, -1)
    out = np.empty((k, len(FEATURE_NAMES)))
    out[:, :_O_CH] = flat[:, _WIN_FLAT]
    cur = flat[:, _CUR_FLAT]
    base = (flat[:, _PRIOR_FLAT] - cur) / 28.0
    cur /= _CUR_LEN
    out[:, _O_CH:_O_IDLE] = np.minimum((cur - base) / np.maximum(base, 1e-9), MAX_CHANGE)
    idle = np.minimum((cs[:, :, _IDLE_COLS] == 0).sum(axis=1), IDLE_CAP_DAYS)
    out[:, _O_IDLE:_O_SC] = idle
    small = flat[:, _SMALL_FLAT].tolist()
    for i, (st, as_of) in enumerate(zip(states, as_ofs, strict=True)):
        out[i, _O_SC:_O_TR] = _scalars(st, as_of, small[i])
        _trend(cs[i], idle[i], out[i])
        out[i, _O_BT:] = _btyd(st, as_of)
    return out


def _trend(
    cs: npt.NDArray[np.float64], idle: npt.NDArray[np.float64], vec: npt.NDArray[np.float64]
) -> None:
    """The :data:`TREND_FEATURES` from the cumulative day matrix (in place; plain floats:
    a handful of numbers is cheaper in Python than in numpy calls)."""
    c56 = cs[55].tolist()
    c14 = cs[13].tolist()
    log = math.log
    out = [
        log((c14[c] + 1.0) / ((c56[c] - c14[c]) / 3.0 + 1.0))  # 42 days before, per 14
        for c in _TREND_COLS
    ]
    cum = cs[_WEEK_ROWS_ABS, _ACTIVITY].tolist()
    weeks = [cum[0]] + [cum[i] - cum[i - 1] for i in range(1, 8)]
    out.append(log((weeks[0] + 1.0) / (max(weeks) + 1.0)))
    out.append(sum(x * math.log1p(w) for x, w in zip(_WEEK_X, weeks, strict=True)) / _WEEK_XX)
    active56, sessions, purchases = c56[_ACTIVE], c56[_SESSIONS], c56[_PURCHASES]
    idle_active, idle_purchase = min(float(idle[0]), 60.0), min(float(idle[1]), 60.0)
    per_session = 1.0 / max(sessions, 1.0)
    opens = c56[_OPENS]
    out += [
        active56,
        sessions,
        purchases,
        log((idle_active + 1.0) / (56.0 / max(active56, 1.0) + 1.0)),
        log((idle_purchase + 1.0) / (56.0 / max(purchases, 0.5) + 1.0)),
        c56[_FEATURE_USE] * per_session,
        c56[_PAGE_VIEWS] * per_session,
        c56[_CART_VIEWS] * per_session,
        c56[_REV] / max(purchases, 1.0),
        opens / max(c56[_EMAILS_SENT], 1.0),
        c56[_CLICKS] / max(opens, 1.0),
    ]
    first = int(idle[0])  # rows before it have no activity: sum the 56 days from it on
    days = min(56, RING - first)
    out.append(days / max(float(cs[min(first + 55, RING - 1), _ACTIVE]), 1.0) if days > 0 else 56.0)
    vec[_O_TR:_O_BT] = out


def _btyd(st: State, as_of: int) -> list[float]:
    """The :data:`BTYD_FEATURES` computed from the state (the ``bgnbd_*`` ones 0)."""
    last = st.get("q_last_ms")
    if last is None or st["q_first_ms"] is None:
        return [NEVER_DAYS] + [0.0] * (len(BTYD_FEATURES) - 1)
    repeat = float(max(st["q_days"] - 1, 0))
    first_day, last_day = st["q_first_ms"] // DAY, last // DAY
    since = max(0.0, (as_of - last) / DAY)
    gaps = st["q_gaps"]
    mean = st["q_gap_sum"] / gaps if gaps else 0.0
    sd = math.sqrt(max(st["q_gap_sumsq"] / gaps - mean * mean, 0.0)) if gaps else 0.0
    z = (since - mean) / max(sd, mean / 2.0, 1.0) if gaps else 0.0
    return [
        since,
        repeat,
        float(last_day - first_day),
        max(0.0, as_of / DAY - first_day),
        mean,
        sd,
        z,
        max(0.0, math.log1p(since) - math.log(2.0)) * math.log1p(repeat),
        0.0,
        0.0,
        0.0,
    ]


def _scalars(st: State, as_of: int, small: list[float]) -> list[float]:
    out = [
        NEVER_DAYS if t is None else max(0.0, (as_of - t) / DAY)
        for t in [st[f] for f in _LAST_FIELDS]
    ]
    append = out.append
    signup = st["signup_ms"]
    append(NEVER_DAYS if signup is None else max(0.0, (as_of - signup) / DAY))
    append(max(0.0, (as_of - st["first_seen_ms"]) / DAY))
    s7, n7, s14, n14, s28, n28, opens, sent = small
    append(s7 / n7 if n7 else 0.0)
    append(s14 / n14 if n14 else 0.0)
    append(s28 / n28 if n28 else 0.0)
    append(opens / sent if sent else 0.0)
    fast, slow = st["purchase_interval_fast"], st["purchase_interval_slow"]
    append(fast)
    append(slow)
    last_p = st["last_purchase_ms"]
    if slow > 0 and last_p is not None:
        append(min(MAX_CHANGE, max(fast, (as_of - last_p) / DAY) / slow - 1.0))
    else:
        append(0.0)
    n_p = st["lifetime_purchases"]
    revenue = st["lifetime_revenue"]
    append(revenue / n_p if n_p else 0.0)
    append(n_p)
    append(revenue)
    append(st["lifetime_feature_use"])
    append(st["lifetime_logins"])
    append(1.0 if st["unsubscribed"] else 0.0)
    append(1.0 if st["bounced"] else 0.0)
    append(1.0 if cancelled(st) else 0.0)
    append(1.0 if st["high_value_zip"] else 0.0)
    return out


def cancelled(st: State) -> bool:
    """Whether the customer's latest word is a cancellation (no activity since)."""
    c = st["last_cancel_ms"]
    if c is None:
        return False
    active = st["last_active_ms"]
    return active is None or active <= c


def active_between(st: State, start: int, end: int, b: Buckets | None = None) -> bool:
    """Whether any activity falls on the days of ``[start, end)`` (day boundaries, ms),
    judged from the buckets (late events included)."""
    m = day_matrix(st, end - 1, b)
    n = (end - start) // DAY
    return bool(m[:n, C["active_days"]].any())


FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
