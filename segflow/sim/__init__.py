"""Customer simulator with ground truth: the data every segflow test, benchmark and demo uses.

The core (:mod:`~segflow.sim.generator`, :mod:`~segflow.sim.personas`,
:mod:`~segflow.sim.identities`, :mod:`~segflow.sim.noise`, :mod:`~segflow.sim.truth`) is pure:
time is simulated, randomness is seeded per customer. :mod:`~segflow.sim.sink` and
:mod:`~segflow.sim.cli` are the shell that writes to files or Kafka.
"""

from __future__ import annotations

from segflow.sim.generator import ActionOutcome, SimConfig, Simulation
from segflow.sim.identities import event_key
from segflow.sim.noise import Delivery, Item, Malformed, NoiseConfig
from segflow.sim.personas import DEFAULT_MIX, PERSONAS, parse_mix
from segflow.sim.truth import SEGMENTS, truth_records, write_truth

__all__ = [
    "DEFAULT_MIX",
    "PERSONAS",
    "SEGMENTS",
    "ActionOutcome",
    "Delivery",
    "Item",
    "Malformed",
    "NoiseConfig",
    "SimConfig",
    "Simulation",
    "event_key",
    "parse_mix",
    "truth_records",
    "write_truth",
]
