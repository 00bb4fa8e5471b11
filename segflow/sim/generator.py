"""The simulation: customers with latent scripts, stepped day by day into delivered events.

Pure: no clock, no environment, no I/O. Time is the simulated span given in :class:`SimConfig`.
Each customer owns three random streams seeded from ``(seed, customer index)`` (behaviour,
noise, actions), so a customer's events do not depend on how many customers there are, on the
step size, or on whether noise is switched on.

>>> sim = Simulation(SimConfig(customers=5, days=3, seed=1))
>>> items = list(sim.run())
>>> items == list(Simulation(SimConfig(customers=5, days=3, seed=1)).run())
True
>>> all(a.delivered_at <= b.delivered_at for a, b in zip(items, items[1:]))
True
"""

from __future__ import annotations

import math
import random
from bisect import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from segflow.sim.behaviour import (
    _DOMAINS,
    _FIRST,
    _HOURS,
    _LAST,
    _PLANS,
    _PROVIDER_TYPES,
    _STREAM_ACTIONS,
    _STREAM_BEHAVIOUR,
    _STREAM_IDS,
    _STREAM_NOISE,
    _STREAM_PAIR,
    _TIMEZONES,
    _WEEKDAYS,
    EMAIL_CHANNELS,
    HIGH_VALUE_ZIPS,
    MINUTE,
    RESPONSIVE_CHANNELS,
    SECOND,
    Behaviour,
    _cdf,
    _shouted,
)
from segflow.sim.behaviour import (
    DAY as DAY,
)
from segflow.sim.behaviour import (
    DEFAULT_START_MS as DEFAULT_START_MS,
)
from segflow.sim.behaviour import (
    HOUR as HOUR,
)
from segflow.sim.identities import (
    NS_ANON,
    NS_DEVICE,
    NS_EMAIL,
    NS_SHARED,
    NS_USER,
    IdentityCluster,
    derive_seed,
    normalize_email,
    scramble,
)
from segflow.sim.noise import Item, NoiseConfig, deliver
from segflow.sim.personas import DEFAULT_MIX, PERSONAS, Persona, normalize_mix
from segflow.sim.scripts import Script as Script
from segflow.sim.scripts import _draw_script, _to_utc


@dataclass(frozen=True)
class SimConfig:
    """What to simulate: population, span, seed, persona mix, noise and treatment response."""

    customers: int = 1000
    days: int = 90
    seed: int = 0
    start_ms: int = DEFAULT_START_MS
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    #: Probability that a responsive at-risk customer is rescued by its first sent action.
    treatment_effect: float = 0.4
    #: Probability that a pair of neighbouring customers shares one device.
    shared_device_rate: float = 0.05
    #: Fraction of customers with a second (work) email.
    second_email_rate: float = 0.3
    #: Fraction of customers whose email bounces.
    bounce_rate: float = 0.02
    #: Weekdays (Monday = 0) on which the newsletter goes out at 10:00 local time.
    newsletter_weekdays: tuple[int, ...] = (1, 3)

    def __post_init__(self) -> None:
        if self.customers < 0 or self.days < 0:
            raise ValueError("customers and days must not be negative")
        if self.customers >= 1 << 24:
            raise ValueError("at most 16,777,215 customers")
        if not 0.0 <= self.treatment_effect <= 1.0:
            raise ValueError("treatment_effect must be in [0, 1]")

    @property
    def end_ms(self) -> int:
        """The end of the simulated span (exclusive)."""
        return self.start_ms + self.days * DAY


@dataclass(frozen=True)
class ActionOutcome:
    """What applying one dispatch action did to the simulated customer."""

    customer: str | None
    applied: bool
    rescued: bool
    reason: str


class Customer(Behaviour):
    """One simulated customer: identifiers, latent script and generation state."""

    __slots__ = (
        "idx",
        "key",
        "persona",
        "script",
        "rng",
        "noise_random",
        "arng",
        "seed",
        "user_id",
        "emails",
        "email_raw",
        "devices",
        "device_cdf",
        "anon_ids",
        "anon_count",
        "tz_ms",
        "hours",
        "weekdays",
        "props",
        "activity",
        "open_factor",
        "amount_mu",
        "currency",
        "next_purchase_day",
        "subscribed",
        "email_ok",
        "seq",
        "tickets",
        "ticket_pos",
        "cancel_sent",
        "shared_device_ids",
        "year0_ms",
        "all_device_ids",
        "start_ms",
        "id_bits",
        "next_special",
    )

    def __init__(
        self, config: SimConfig, idx: int, persona: Persona, shared: tuple[str, float] | None
    ) -> None:
        seed = config.seed
        self.idx = idx
        self.key = f"c{idx:07d}"
        self.persona = persona
        self.seed = seed
        self.start_ms = config.start_ms
        rng = random.Random(derive_seed(seed, idx, _STREAM_BEHAVIOUR))
        self.rng = rng
        self.noise_random = random.Random(derive_seed(seed, idx, _STREAM_NOISE)).random
        self.arng = random.Random(derive_seed(seed, idx, _STREAM_ACTIONS))
        self.seq = 0
        self.id_bits = random.Random(derive_seed(seed, idx, _STREAM_IDS)).getrandbits
        r = rng.random
        # identity
        is_lead = persona.name == "new_lead_no_content"
        self.user_id = None if is_lead else f"u{scramble(seed, NS_USER, idx):016x}"
        first = _FIRST[int(r() * len(_FIRST))]
        last = _LAST[int(r() * len(_LAST))]
        tag = scramble(seed, NS_EMAIL, idx) % 10**12
        primary = f"{first}.{last}{tag}@{_DOMAINS[int(r() * len(_DOMAINS))]}"
        emails = [primary]
        if not is_lead and r() < config.second_email_rate:
            emails.append(f"{first[0]}{last}{tag}@work-{tag % 997}.example.com")
        self.emails = emails
        # raw forms as producers send them: sometimes with capitals (identity must normalise)
        self.email_raw = [e if r() < 0.9 else _shouted(e) for e in emails]
        n_dev = 1 if is_lead else 1 + (r() < 0.55) + (r() < 0.25)
        # device state: [device_id, anonymous_id, logged_in, anonymous sessions left]
        self.anon_ids: list[str] = []
        self.anon_count = 0
        self.devices: list[list[Any]] = []
        weights = [0.6, 0.3, 0.1][:n_dev]
        for k in range(n_dev):
            did = f"d{scramble(seed, NS_DEVICE, idx * 16 + k):016x}"
            self.devices.append([did, self._new_anon(), False, int(r() * 3)])
        self.shared_device_ids: list[str] = []
        if shared is not None:
            self.devices.append([shared[0], self._new_anon(), False, int(r() * 2)])
            weights.append(shared[1])
            self.shared_device_ids.append(shared[0])
        self.all_device_ids = [d[0] for d in self.devices]
        self.device_cdf = _cdf(tuple(weights))
        tz_name, tz_h = _TIMEZONES[int(r() * len(_TIMEZONES))]
        self.tz_ms = tz_h * HOUR
        profile = int(r() * 3)
        # the local hour profile turned into UTC hours, so a day's events stay in its UTC day
        self.hours = _to_utc(_HOURS[profile], tz_h)
        self.weekdays = _WEEKDAYS[profile]
        tier = "high" if r() < persona.high_clv_prob else "standard"
        zip_code = (
            HIGH_VALUE_ZIPS[int(r() * len(HIGH_VALUE_ZIPS))]
            if r() < (0.35 if tier == "high" else 0.05)
            else f"{10000 + int(r() * 89999)}"
        )
        self.props = {
            "zip": zip_code,
            "timezone": tz_name,
            "first_name": first.capitalize(),
            "plan": _PLANS[2 if tier == "high" else int(r() * 2)],
        }
        self.activity = 0.6 + 0.8 * r()
        self.open_factor = 0.6 + 0.8 * r()
        mean_amount = persona.amount_mean * (3.0 if tier == "high" else 1.0) * (0.7 + 0.6 * r())
        self.amount_mu = math.log(mean_amount) - 0.5 * 0.25**2 if mean_amount > 0 else 0.0
        self.currency = "EUR" if tz_h in (0, 1) else "USD"
        self.subscribed = True
        self.email_ok = r() >= config.bounce_rate
        self.cancel_sent = False
        start_year = datetime.fromtimestamp(config.start_ms / 1000, UTC).year
        self.year0_ms = int(datetime(start_year, 1, 1, tzinfo=UTC).timestamp() * 1000)
        self.script = _draw_script(persona, tier, rng, config)
        interval = persona.purchase_interval_days
        self.next_purchase_day = r() * interval if interval else math.inf
        self.tickets = sorted(t for burst in self.script.bursts for t in burst)
        self.ticket_pos = 0
        self.next_special = config.start_ms  # computed on the first day

    # -- identity -------------------------------------------------------------------------------
    def _new_anon(self) -> str:
        n = (self.idx << 12) | min(self.anon_count, 4095)
        anon = f"a{scramble(self.seed, NS_ANON, n):016x}"
        self.anon_count += 1
        self.anon_ids.append(anon)
        return anon

    def identity(self) -> IdentityCluster:
        """The true identity cluster: every identifier this customer used."""
        return IdentityCluster(
            user_id=self.user_id,
            emails=tuple(normalize_email(e) for e in self.emails),
            device_ids=tuple(self.all_device_ids),
            anonymous_ids=tuple(dict.fromkeys(self.anon_ids)),
            shared_device_ids=tuple(self.shared_device_ids),
        )

    def identifiers(self) -> list[str]:
        """Identifiers that resolve to this customer (shared devices excluded)."""
        own = [d for d in self.all_device_ids if d not in self.shared_device_ids]
        ids = [e for e in (normalize_email(x) for x in self.emails)] + own + self.anon_ids
        return [self.user_id, *ids] if self.user_id else ids

    def _eid(self) -> str:
        return f"{self.id_bits(80):020x}"

    # -- latent levels --------------------------------------------------------------------------
    def levels(self, t: int) -> tuple[float, float, float, bool]:
        """(session, feature, email multipliers, purchases allowed) at time ``t``."""
        s = self.script
        if s.churn_at is not None and t >= s.churn_at:
            return 0.0, 0.0, 0.0, False
        restored = s.restored_at is not None and t >= s.restored_at
        name = s.persona
        if s.decline_at is not None and t >= s.decline_at and not restored:
            if name == "gradual_churner":
                m = 0.5 ** ((t - s.decline_at) / (s.half_life_ms or DAY))
                return m, m, m, m >= 0.6
            if name == "silent_decline":
                return 0.35, 0.0, 1.0, True
            if name == "reactivated" and s.dormant_end is not None and t < s.dormant_end:
                return 0.0, 0.0, 0.0, False
        if name == "seasonal" and s.season is not None:
            doy = ((t - self.year0_ms) // DAY) % 365
            if (doy - s.season[0]) % 365 >= s.season[1]:
                return 0.05, 0.05, 0.3, False
        elif name == "new_lead_no_content" and s.signup_at is not None:
            if t < s.signup_at - 10 * DAY:
                return 0.0, 0.0, 0.0, False
            if t < s.signup_at:
                return 1.0, 0.0, 0.0, False
            return 0.3, 0.0, 1.0, False
        return 1.0, 1.0, 1.0, True

    def purchase_interval(self, t: int) -> float:
        """Days between purchases at ``t`` (weekly → biweekly after a frequency drop)."""
        s = self.script
        base = self.persona.purchase_interval_days or math.inf
        if (
            s.persona == "purchase_frequency_drop"
            and s.decline_at is not None
            and t >= s.decline_at
            and not (s.restored_at is not None and t >= s.restored_at)
        ):
            return base * 2
        return base

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        d0: int,
        d1: int,
        start_ms: int,
        dows: list[int],
        campaigns: list[str | None],
        out: list[dict[str, Any]],
    ) -> None:
        """Append this customer's events of simulated days ``d0 .. d1 - 1`` to ``out``."""
        rng = self.rng
        r = rng.random
        p = self.persona
        script = self.script
        base = p.sessions_per_day * self.activity
        weekdays = self.weekdays
        plain = script.persona in ("loyal_power_user", "steady_buyer") and script.churn_at is None
        ticket_rate = p.tickets_per_day
        session = self._session
        local_time = self._local_time
        exp = math.exp
        send_hour = (10 - self.tz_ms // HOUR) % 24
        for day in range(d0, d1):
            day_ms = start_ms + day * DAY
            end = day_ms + DAY
            mid = day_ms + DAY // 2
            if plain:
                sm = fm = em = 1.0
                buy_ok = True
            else:
                sm, fm, em, buy_ok = self.levels(mid)
            # sessions: a Poisson number, at hours drawn from the customer's profile
            lam = base * weekdays[dows[day]] * sm
            if lam > 0:
                limit = exp(-lam)
                x = r()
                while x > limit:
                    session(local_time(day_ms), fm, out)
                    x *= r()
            # purchases on schedule
            while self.next_purchase_day < day + 1:
                if buy_ok:
                    self._purchase(local_time(day_ms), out)
                self.next_purchase_day += self.purchase_interval(mid) * (0.85 + 0.3 * r())
            # newsletter at 10:00 local time
            campaign = campaigns[day]
            if (
                campaign is not None
                and em > 0
                and self.subscribed
                and (script.signup_at is None or mid >= script.signup_at)
            ):
                self._newsletter(
                    day_ms + send_hour * HOUR + int(r() * 30 * MINUTE), campaign, em, out
                )
            # background support tickets (rarely escalated)
            if r() < ticket_rate * sm:
                sentiment = max(-1.0, min(1.0, rng.gauss(0.2, 0.4)))
                self._ticket(local_time(day_ms), sentiment, sentiment < -0.5 and r() < 0.2, out)
            if end > self.next_special:
                self._specials(day_ms, end, out)
        # rates are set per day; at a scripted transition drop what its exact time forbids
        lo, hi = start_ms + d0 * DAY, start_ms + (d1 + 1) * DAY
        if out and any(
            t is not None and lo <= t < hi
            for t in (script.decline_at, script.churn_at, script.signup_at, script.dormant_end)
        ):
            out[:] = [e for e in out if self._allowed(e)]

    def _allowed(self, event: dict[str, Any]) -> bool:
        """Whether the latent script allows ``event`` at its own time."""
        kind = event["event_type"]
        if kind in _PROVIDER_TYPES:
            return True
        sm, fm, em, _ = self.levels(event["occurred_at"])
        if kind == "feature_use":
            return fm > 0
        if kind in ("email_open", "email_click", "email_unsubscribe"):
            return em > 0
        return sm > 0

    # -- closed loop ----------------------------------------------------------------------------
    def act(
        self, action: Mapping[str, Any], at: int, effect: float, out: list[dict[str, Any]]
    ) -> ActionOutcome:
        """Respond to one dispatch action at ``at`` (see :meth:`Simulation.apply_action`)."""
        s = self.script
        status = str(action.get("status", ""))
        channel = str(action.get("channel", ""))
        s.actions.append(
            {
                "at": at,
                "status": status,
                "channel": channel,
                "campaign_id": action.get("campaign_id"),
                "variant": action.get("variant"),
                "segment": action.get("segment"),
            }
        )
        if status != "sent":
            return ActionOutcome(self.key, False, False, f"status {status or 'missing'}")
        if channel not in RESPONSIVE_CHANNELS:
            return ActionOutcome(self.key, False, False, f"channel {channel or 'missing'}")
        arng = self.arng
        rescued = False
        if self.persona.responsive and s.at_risk(at) and not s.rescue_drawn:
            s.rescue_drawn = True
            if arng.random() < effect:
                restored = at + DAY + int(arng.random() * 2 * DAY)
                if s.churn_at is None or restored < s.churn_at:
                    rescued = True
                    s.restored_at = restored
                    s.churn_at = None
                    s.churn_kind = None
                    self.next_purchase_day = min(
                        self.next_purchase_day, (restored - self.start_ms) / DAY
                    )
        if channel in EMAIL_CHANNELS:
            sm, _fm, em, _ = self.levels(at)
            p_open = 1.0 if rescued else self.persona.open_rate * self.open_factor * em
            p_click = 1.0 if rescued else self.persona.click_rate * self.open_factor * em
            campaign = str(action.get("campaign_id") or action.get("playbook") or "retention")
            variant = action.get("variant")
            self._email(
                at + SECOND,
                campaign,
                None if variant is None else str(variant),
                p_open,
                p_click,
                out,
                arng,
            )
        return ActionOutcome(self.key, True, rescued, "rescued" if rescued else "no effect")


class Simulation:
    """A population stepped through simulated time, delivering events in delivery order.

    Use :meth:`run` for a whole span, or :meth:`step` and :meth:`apply_action` for a closed
    loop. Items delivered late may come out of a later step than the day they occurred in.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        mix = normalize_mix(config.mix)
        names = list(mix)
        cdf = _cdf(tuple(mix[n] for n in names))
        self.customers: list[Customer] = []
        self._index: dict[str, Customer] = {}
        for idx in range(config.customers):
            pick = random.Random(derive_seed(config.seed, idx, 0)).random()
            persona = PERSONAS[names[min(bisect(cdf, pick), len(names) - 1)]]
            shared = None
            pair = idx // 2
            if (idx ^ 1) < config.customers:
                prng = random.Random(derive_seed(config.seed, pair, _STREAM_PAIR))
                if prng.random() < config.shared_device_rate:
                    shared = (f"d{scramble(config.seed, NS_SHARED, pair):016x}", 0.25)
            c = Customer(config, idx, persona, shared)
            self.customers.append(c)
        for c in self.customers:
            self._register(c)
        self.day = 0
        self._carry: list[tuple[int, int, int, Item]] = []
        self._injected: list[tuple[int, int, int, Item]] = []
        start_dow = datetime.fromtimestamp(config.start_ms / 1000, UTC).weekday()
        self._dows = [(start_dow + d) % 7 for d in range(config.days)]
        self._campaigns: list[str | None] = []
        for d in range(config.days):
            if self._dows[d] in config.newsletter_weekdays:
                date = datetime.fromtimestamp((config.start_ms + d * DAY) / 1000, UTC)
                self._campaigns.append(f"newsletter-{date:%Y-%m-%d}")
            else:
                self._campaigns.append(None)

    def _register(self, c: Customer) -> None:
        for ident in c.identifiers():
            self._index.setdefault(ident, c)

    @property
    def now_ms(self) -> int:
        """The generation frontier: everything before it has been generated."""
        return self.config.start_ms + self.day * DAY

    @property
    def finished(self) -> bool:
        """Whether the whole span has been generated."""
        return self.day >= self.config.days

    def step(self, days: int = 1) -> list[Item]:
        """Generate the next ``days`` days; return items delivered before the new frontier.

        When the span is finished, every item still in flight (late ones) is returned too.
        """
        cfg = self.config
        d0 = self.day
        d1 = min(d0 + days, cfg.days)
        ready = self._carry
        ready.extend(self._injected)
        self._injected = []
        events: list[dict[str, Any]] = []
        noise = cfg.noise
        start = cfg.start_ms
        dows = self._dows
        campaigns = self._campaigns
        for c in self.customers:
            c.generate(d0, d1, start, dows, campaigns, events)
            if events:
                c.seq = deliver(events, c.idx, c.key, c.noise_random, noise, c.seq, ready)
                events.clear()
            if c.anon_count and c.anon_ids[-1] not in self._index:
                self._register(c)
        self.day = d1
        if self.finished:
            self._carry = []
        else:
            frontier = self.now_ms
            self._carry = [x for x in ready if x[0] >= frontier]
            ready = [x for x in ready if x[0] < frontier]
        ready.sort()
        return [x[3] for x in ready]

    @property
    def pending(self) -> bool:
        """Whether items are in flight (late deliveries or responses to actions)."""
        return bool(self._carry or self._injected)

    def run(self, window_days: int = 7) -> Iterator[Item]:
        """Generate the whole (remaining) span, yielding items in delivery order."""
        while True:
            yield from self.step(window_days)
            if self.finished and not self.pending:
                return

    def resolve(self, identifier: str) -> Customer | None:
        """The customer an identifier truly belongs to (user_id, any email, own device or
        anonymous id, or the simulator key ``c0000123``); shared devices resolve to nobody."""
        if identifier.startswith("c") and identifier[1:].isdigit():
            i = int(identifier[1:])
            return self.customers[i] if 0 <= i < len(self.customers) else None
        return self._index.get(identifier) or self._index.get(normalize_email(identifier))

    def apply_action(
        self, identifier: str, action: Mapping[str, Any], at_ms: int | None = None
    ) -> ActionOutcome:
        """Let the customer behind ``identifier`` respond to a dispatch action.

        ``action`` is shaped like ``DispatchResult`` (status, channel, campaign_id, variant,
        decided_at). Only ``status == "sent"`` reaches the customer: email channels produce
        ``email_sent`` and, with the persona's rates, ``email_open``/``email_click`` carrying the
        action's campaign_id and variant. The first sent action that finds a responsive persona
        at risk draws once: with probability ``treatment_effect`` the customer is restored 1–3
        days later (churn cancelled, behaviour back to baseline). Holdouts are recorded in the
        ground truth and change nothing. An ``at_ms`` before the frontier is moved to it.
        """
        c = self.resolve(identifier)
        if c is None:
            return ActionOutcome(None, False, False, "unknown identifier")
        decided = action.get("decided_at")
        at = at_ms if at_ms is not None else int(decided) if decided is not None else self.now_ms
        at = max(at, self.now_ms)
        events: list[dict[str, Any]] = []
        outcome = c.act(action, at, self.config.treatment_effect, events)
        if events:
            c.seq = deliver(
                events, c.idx, c.key, c.noise_random, self.config.noise, c.seq, self._injected
            )
        return outcome
