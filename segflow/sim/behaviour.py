"""What a simulated customer does on a day: sessions, purchases, newsletters and emails,
support tickets, scripted one-off events (moved out of ``generator.py``, unchanged: the
constants and the :class:`Behaviour` methods :class:`~segflow.sim.generator.Customer` uses).

Pure: no clock, no environment, no I/O.
"""

from __future__ import annotations

import math
import random
from bisect import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segflow.sim.personas import Persona
    from segflow.sim.scripts import Script
SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

#: 2024-01-01T00:00:00Z, the default start of the simulated span.
DEFAULT_START_MS = 1_704_067_200_000

#: Channels whose "sent" actions the customer notices; email ones also produce email events.
EMAIL_CHANNELS = frozenset({"email", "smtp"})
RESPONSIVE_CHANNELS = frozenset({"email", "smtp", "crm_task", "support_escalation", "webhook"})

_STREAM_BEHAVIOUR = 1
_STREAM_NOISE = 2
_STREAM_ACTIONS = 3
_STREAM_PAIR = 4
_STREAM_IDS = 5
_NEVER = 1 << 62
#: Events the email provider or billing emits whatever the customer does.
_PROVIDER_TYPES = frozenset({"email_sent", "email_bounce", "subscription_cancel", "identify"})

_TIMEZONES = (
    ("America/New_York", -5),
    ("America/Chicago", -6),
    ("America/Los_Angeles", -8),
    ("Europe/London", 0),
    ("Europe/Berlin", 1),
    ("Asia/Tokyo", 9),
    ("Australia/Sydney", 10),
)
_FIRST = (
    "ana",
    "ben",
    "chloe",
    "david",
    "emma",
    "felix",
    "grace",
    "hugo",
    "iris",
    "jonas",
    "kim",
    "leo",
    "maria",
    "noah",
    "olga",
    "paul",
    "quinn",
    "rosa",
    "sam",
    "tara",
)
_LAST = (
    "silva",
    "smith",
    "mueller",
    "tanaka",
    "garcia",
    "novak",
    "kowalski",
    "dubois",
    "rossi",
    "jensen",
    "okafor",
    "singh",
    "cohen",
    "larsen",
    "moreau",
    "ito",
)
_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "proton.me", "example.org")
#: Zip codes the ReEngageAtRisk rule scores as high value.
HIGH_VALUE_ZIPS = ("10007", "94027", "90210", "02108", "60611")
_FEATURES = ("reports", "dashboard", "export", "automation", "integrations", "search", "alerts")
_PLANS = ("basic", "pro", "enterprise")


def _cdf(weights: tuple[float, ...]) -> tuple[float, ...]:
    total = sum(weights)
    acc = 0.0
    out = []
    for w in weights:
        acc += w / total
        out.append(acc)
    out[-1] = 1.0
    return tuple(out)


# Local hour-of-day profiles and weekday factors (Monday first, mean 1).
_HOURS = (
    _cdf((1, 0.5, 0.3, 0.2, 0.2, 0.5, 2, 4, 8, 10, 10, 9, 7, 9, 10, 9, 8, 6, 4, 3, 3, 2, 2, 1)),
    _cdf((1, 0.5, 0.3, 0.2, 0.2, 0.3, 1, 2, 3, 3, 3, 4, 5, 4, 3, 3, 4, 6, 9, 11, 12, 10, 6, 3)),
    _cdf((4, 3, 2, 1, 0.5, 0.5, 1, 2, 3, 4, 4, 5, 5, 5, 5, 5, 5, 6, 7, 8, 9, 9, 8, 6)),
)
_WEEKDAYS = (
    (1.2, 1.25, 1.25, 1.2, 1.05, 0.55, 0.5),
    (0.9, 0.9, 0.95, 1.0, 1.1, 1.15, 1.0),
    (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
)


def _shouted(email: str) -> str:
    """An email as some producers send it: capitalised local part, upper-case domain.

    >>> _shouted("ana.silva1@gmail.com")
    'Ana.silva1@GMAIL.COM'
    """
    local, _, domain = email.partition("@")
    return f"{local.capitalize()}@{domain.upper()}"


def _poisson(r: Any, lam: float) -> int:
    """A Poisson draw for small ``lam`` (Knuth's product of uniforms)."""
    if lam <= 0:
        return 0
    limit = math.exp(-lam)
    k = 0
    p = r()
    while p > limit:
        k += 1
        p *= r()
    return k


class Behaviour:
    """The day-generating methods of :class:`~segflow.sim.generator.Customer` (a base
    class without state: the attributes are the customer's slots)."""

    if not TYPE_CHECKING:  # no __dict__ for Customer; mypy would check slots here alone
        __slots__ = ()

    if TYPE_CHECKING:  # the customer's state these methods use (Customer.__slots__)
        cancel_sent: bool
        next_special: int
        subscribed: bool
        amount_mu: float
        currency: str
        device_cdf: tuple[float, ...]
        devices: list[list[Any]]
        email_ok: bool
        email_raw: list[str]
        hours: tuple[float, ...]
        id_bits: Callable[[int], int]
        open_factor: float
        persona: Persona
        props: dict[str, Any]
        rng: random.Random
        script: Script
        ticket_pos: int
        tickets: list[int]
        user_id: str | None

        def _eid(self) -> str: ...
        def _new_anon(self) -> str: ...

    def _specials(self, day_ms: int, end: int, out: list[dict[str, Any]]) -> None:
        """Scripted one-off events of a day: escalated tickets, a lead's sign-up, cancellation."""
        r = self.rng.random
        script = self.script
        tickets = self.tickets
        while self.ticket_pos < len(tickets) and tickets[self.ticket_pos] < end:
            t = tickets[self.ticket_pos]
            self.ticket_pos += 1
            if t >= day_ms and (script.churn_at is None or t < script.churn_at):
                self._ticket(t, -0.45 - 0.5 * r(), True, out)
        # a lead signs up with its email on the device it browsed from
        signup = script.signup_at
        if signup is not None and day_ms <= signup < end:
            dev = self.devices[0]
            out.append(
                {
                    "event_id": self._eid(),
                    "event_type": "identify",
                    "occurred_at": signup,
                    "anonymous_id": dev[1],
                    "device_id": dev[0],
                    "email": self.email_raw[0],
                    "properties": dict(self.props),
                }
            )
        # churn by cancellation
        churn_at = script.churn_at
        if (
            churn_at is not None
            and not self.cancel_sent
            and day_ms <= churn_at < end
            and script.churn_kind == "cancel"
        ):
            self.cancel_sent = True
            out.append(
                {
                    "event_id": self._eid(),
                    "event_type": "subscription_cancel",
                    "occurred_at": churn_at,
                    "user_id": self.user_id,
                    "properties": {"plan": self.props["plan"]},
                }
            )
        upcoming = [t for t in (signup, churn_at) if t is not None and t >= end]
        if self.ticket_pos < len(tickets):
            upcoming.append(tickets[self.ticket_pos])
        self.next_special = min(upcoming, default=_NEVER)

    def _local_time(self, day_ms: int) -> int:
        r = self.rng.random
        return day_ms + bisect(self.hours, r()) * HOUR + int(r() * HOUR)

    def _session(self, t: int, fm: float, out: list[dict[str, Any]]) -> None:
        rng = self.rng
        r = rng.random
        append = out.append
        bits = self.id_bits

        def eid() -> str:
            return f"{bits(80):020x}"

        devices = self.devices
        dev = devices[bisect(self.device_cdf, r())] if len(devices) > 1 else devices[0]
        did, aid = dev[0], dev[1]
        uid = self.user_id
        logged = dev[2]
        p = self.persona
        if logged:
            append(
                {
                    "event_id": eid(),
                    "event_type": "session_start",
                    "occurred_at": t,
                    "user_id": uid,
                    "anonymous_id": aid,
                    "device_id": did,
                    "session_seconds": float(int(60 + rng.expovariate(1 / 420))),
                }
            )
            if r() < 0.5:
                t += 2 * SECOND + int(r() * 8 * SECOND)
                append(
                    {
                        "event_id": eid(),
                        "event_type": "login",
                        "occurred_at": t,
                        "user_id": uid,
                        "anonymous_id": aid,
                        "device_id": did,
                    }
                )
        else:
            append(
                {
                    "event_id": eid(),
                    "event_type": "session_start",
                    "occurred_at": t,
                    "anonymous_id": aid,
                    "device_id": did,
                }
            )
        n_pages = 1 + _poisson(r, p.pages_per_session - 1.0)
        login_at = -1
        if not logged and uid is not None:
            if dev[3] > 0:
                dev[3] -= 1
            else:
                login_at = int(r() * n_pages)
        for i in range(n_pages):
            t += 5 * SECOND + int(r() * 90 * SECOND)
            if i == login_at:
                append(
                    {
                        "event_id": eid(),
                        "event_type": "login",
                        "occurred_at": t,
                        "user_id": uid,
                        "anonymous_id": aid,
                        "device_id": did,
                    }
                )
                second = len(self.email_raw) > 1 and dev is not self.devices[0]
                email = self.email_raw[1] if second else self.email_raw[0]
                append(
                    {
                        "event_id": eid(),
                        "event_type": "identify",
                        "occurred_at": t + 50,
                        "user_id": uid,
                        "anonymous_id": aid,
                        "device_id": did,
                        "email": email,
                        "properties": dict(self.props),
                    }
                )
                dev[2] = logged = True
            if logged:
                append(
                    {
                        "event_id": eid(),
                        "event_type": "page_view",
                        "occurred_at": t,
                        "user_id": uid,
                        "anonymous_id": aid,
                        "device_id": did,
                    }
                )
            else:
                append(
                    {
                        "event_id": eid(),
                        "event_type": "page_view",
                        "occurred_at": t,
                        "anonymous_id": aid,
                        "device_id": did,
                    }
                )
        if logged:
            lam = p.features_per_session * fm
            if lam > 0:
                for _ in range(_poisson(r, lam)):
                    t += 10 * SECOND + int(r() * 120 * SECOND)
                    append(
                        {
                            "event_id": eid(),
                            "event_type": "feature_use",
                            "occurred_at": t,
                            "user_id": uid,
                            "anonymous_id": aid,
                            "device_id": did,
                            "feature": _FEATURES[int(r() * len(_FEATURES))],
                        }
                    )
            if r() < p.cart_view_prob:
                t += 10 * SECOND + int(r() * 60 * SECOND)
                product = f"p{int(r() * 200):03d}"
                append(
                    {
                        "event_id": eid(),
                        "event_type": "cart_view",
                        "occurred_at": t,
                        "user_id": uid,
                        "anonymous_id": aid,
                        "device_id": did,
                        "product_id": product,
                    }
                )
                if r() < 0.5:
                    append(
                        {
                            "event_id": eid(),
                            "event_type": "cart_abandon",
                            "occurred_at": t + 5 * MINUTE + int(r() * 25 * MINUTE),
                            "user_id": uid,
                            "anonymous_id": aid,
                            "device_id": did,
                            "product_id": product,
                        }
                    )
        # a cookie reset: the next sessions on this device start anonymous again
        if uid is not None and r() < 0.02:
            dev[1] = self._new_anon()
            dev[2] = False
            dev[3] = int(r() * 2)

    def _purchase(self, t: int, out: list[dict[str, Any]]) -> None:
        r = self.rng.random
        dev = self.devices[0]
        product = f"p{int(r() * 200):03d}"
        amount = round(self.rng.lognormvariate(self.amount_mu, 0.25), 2)
        out.append(
            {
                "event_id": self._eid(),
                "event_type": "cart_view",
                "occurred_at": t,
                "user_id": self.user_id,
                "device_id": dev[0],
                "product_id": product,
            }
        )
        out.append(
            {
                "event_id": self._eid(),
                "event_type": "purchase",
                "occurred_at": t + 30 * SECOND + int(r() * 5 * MINUTE),
                "user_id": self.user_id,
                "device_id": dev[0],
                "product_id": product,
                "amount": amount,
                "currency": self.currency,
            }
        )

    def _newsletter(self, t: int, campaign: str, em: float, out: list[dict[str, Any]]) -> None:
        self._email(
            t,
            campaign,
            None,
            self.persona.open_rate * self.open_factor * em,
            self.persona.click_rate * self.open_factor * em,
            out,
        )

    def _email(
        self,
        t: int,
        campaign: str,
        variant: str | None,
        p_open: float,
        p_click: float,
        out: list[dict[str, Any]],
        rng: random.Random | None = None,
    ) -> None:
        rng = rng or self.rng
        r = rng.random
        email = self.email_raw[0]
        out.append(
            {
                "event_id": self._eid(),
                "event_type": "email_sent",
                "occurred_at": t,
                "email": email,
                "campaign_id": campaign,
                "variant": variant,
            }
        )
        if not self.email_ok:
            out.append(
                {
                    "event_id": self._eid(),
                    "event_type": "email_bounce",
                    "occurred_at": t + 2 * SECOND + int(r() * 60 * SECOND),
                    "email": email,
                    "campaign_id": campaign,
                    "variant": variant,
                }
            )
            self.subscribed = False
            return
        if r() < p_open:
            t += MINUTE + int(rng.expovariate(1 / (3 * HOUR)))
            out.append(
                {
                    "event_id": self._eid(),
                    "event_type": "email_open",
                    "occurred_at": t,
                    "email": email,
                    "campaign_id": campaign,
                    "variant": variant,
                }
            )
            if r() < p_click / max(p_open, 1e-9):
                out.append(
                    {
                        "event_id": self._eid(),
                        "event_type": "email_click",
                        "occurred_at": t + 5 * SECOND + int(r() * 120 * SECOND),
                        "email": email,
                        "campaign_id": campaign,
                        "variant": variant,
                    }
                )
            elif r() < 0.003:
                out.append(
                    {
                        "event_id": self._eid(),
                        "event_type": "email_unsubscribe",
                        "occurred_at": t + 30 * SECOND,
                        "email": email,
                        "campaign_id": campaign,
                        "variant": variant,
                    }
                )
                self.subscribed = False

    def _ticket(self, t: int, sentiment: float, escalated: bool, out: list[dict[str, Any]]) -> None:
        r = self.rng.random
        ev: dict[str, Any] = {
            "event_id": self._eid(),
            "event_type": "support_ticket",
            "occurred_at": t,
            "email": self.email_raw[-1 if r() < 0.3 else 0],
            "sentiment": round(sentiment, 3),
            "escalated": escalated,
        }
        if self.user_id is not None and r() < 0.4:
            ev["user_id"] = self.user_id
        out.append(ev)
