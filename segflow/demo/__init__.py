"""``segflow demo``: the whole product on the embedded default, in closed loop.

A real local Kafka broker, segflow's topics under a fresh prefix, the four services as
supervised processes, a local CRM/email/SMTP receiver, and the customer simulator: a week of
behaviour at a time goes to ``segflow.events``; the demo waits until every service has caught
up, feeds the week's dispatched actions back to the simulated customers (a re-engagement
email can rescue some of them), and moves on. The report compares what segflow did with the
simulator's ground truth, and ``demo-report.html`` draws segment sizes over time.

Modules: ``run`` (orchestration), ``reading`` (tails of segflow's topics and what was
observed), ``evaluate`` (against the ground truth), ``report`` (printed and HTML).
"""

from segflow.demo.evaluate import _capacity, _segment_quality
from segflow.demo.reading import Observed, Tail, _high, _sizes
from segflow.demo.run import (
    _groups,
    _metrics_ports,
    _port_free,
    _service_env,
    _wait_caught_up,
    run_demo,
)

__all__ = [
    "Observed",
    "Tail",
    "_capacity",
    "_groups",
    "_high",
    "_metrics_ports",
    "_port_free",
    "_segment_quality",
    "_service_env",
    "_sizes",
    "_wait_caught_up",
    "run_demo",
]
