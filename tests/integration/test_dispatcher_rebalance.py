"""Calls under way when partitions move on a clean rebalance are made once (issue #15).

The dispatcher runs as one instance; a second joins while calls are under way at a slow
receiver (every HTTP call answered 1 s late), then is stopped with SIGTERM while calls are
under way again. The range assignor's rebalances are eager: each one revokes every partition
of every member first, so both moves take partitions away from an instance with calls under
way. The loop's ``before_revoke`` lets the dispatcher finish those calls and commit their
outcomes before the partitions go: no new owner finds them ``in_flight``.

Checked at the receivers, by *attempts* (every HTTP request, every SMTP message received),
not by the effects they de-duplicate: every action was called exactly once. The inputs,
playbooks and run checks are test_dispatcher_scale_out's.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from segflow.receiver import Receiver, SMTPReceiver
from segflow.runtime.settings import Settings
from segflow.runtime.testing import isolated_settings
from segflow.runtime.topics import TOPICS
from tests.integration.test_dispatcher_scale_out import (
    EXTRA,
    Run,
    assigned,
    check_run,
    dispatcher_env,
    drained,
    results,
    segment_changes,
)
from tests.integration.test_scale_out import (  # noqa: F401 (fleets: the fixture)
    Fleet,
    Fleets,
    by_customer,
    fleets,
    send,
    settled,
)

pytestmark = pytest.mark.broker


def calls_under_way(receiver: Receiver, fleet: Fleet, at_least: int) -> None:
    """Wait until ``at_least`` actions took effect and the receiver is answering calls."""
    deadline = time.monotonic() + 90
    while len(receiver.effects()) < at_least or receiver.idle():
        assert time.monotonic() < deadline, f"fewer than {at_least} calls within 90 s"
        fleet.check_alive()
        time.sleep(0.05)


def paced(s: Settings, chunks: list[list[Any]]) -> None:
    """Input as it would come in production: a few records at a time (pacing, not waiting
    for anything)."""
    for chunk in chunks:
        send(s, TOPICS.segment_changes, chunk, by_customer)
        time.sleep(0.3)


def waited_for(fleet: Fleet, instance: str, s_prefix: str) -> list[int]:
    """Per revoke of ``instance``: the calls it had under way (its JSON log)."""
    out: list[int] = []
    for path in fleet.logs.glob(f"*-{s_prefix}{instance}.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"finishing calls before revoke"' in line:
                out.append(int(json.loads(line)["calls"]))
    return out


def test_calls_under_way_when_an_instance_joins_or_stops_cleanly_are_made_once(
    kafka_bootstrap: str,
    fleets: Fleets,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    extra = tmp_path / "winback.yaml"
    extra.write_text(EXTRA)
    data = segment_changes()
    s = isolated_settings(kafka_bootstrap, "disp-move")
    fleet = fleets.new("move")
    receiver, smtp = Receiver(latency=1.0).start(), SMTPReceiver().start()
    try:
        env = dispatcher_env(s, receiver, smtp, extra, SEGFLOW_DISPATCHER_BATCH_SIZE="10")
        fleet.start("services.dispatcher", s, "0", env)
        assigned(fleet, s, ["0"])
        third = len(data) // 3
        send(s, TOPICS.segment_changes, data[:third], by_customer)
        calls_under_way(receiver, fleet, 20)
        # the second third a little at a time while "1" starts and joins (seconds on a loaded
        # box): "0" keeps starting calls, and has some under way when the join revokes it
        second = data[third : 2 * third]
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(paced, s, [second[i : i + 10] for i in range(0, len(second), 10)])
            fleet.start("services.dispatcher", s, "1", env)  # joins: "0" gives partitions away
            assigned(fleet, s, ["0", "1"])
            sending.result()
        # the rest a little at a time while "1" stops: "0" keeps starting calls, and has
        # some under way when the rebalance that follows the stop revokes it
        rest = data[2 * third :]
        chunks = [rest[i : i + 15] for i in range(0, len(rest), 15)]
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(paced, s, chunks)
            calls_under_way(receiver, fleet, len(receiver.effects()) + 10)
            stopped = fleet.procs.pop("1")
            try:  # stops cleanly: "1" finishes its calls, "0" is revoked, takes everything
                stopped.terminate()
                assert stopped.wait(60) == 0, "the stopped instance did not exit cleanly"
            finally:
                stopped.kill()
            sending.result()
        drained(s, fleet)
        settled(lambda: results(s), fleet, quiet=3.0)
        fleet.stop()
        run = Run(s, receiver, smtp)
    finally:
        fleet.stop()
        receiver.stop()
        smtp.stop()
    under_way = waited_for(fleet, "0", s.topic_prefix)
    twice = {k: n for k, n in run.attempts.items() if n > 1}
    smtp_twice = {k: n for k, n in run.smtp_ids.items() if n > 1}
    print(
        f"sent {len(run.sent())}, HTTP attempts {sum(run.attempts.values())}, "
        f"SMTP {sum(run.smtp_ids.values())}, calls under way at revokes of '0': {under_way}, "
        f"made twice: HTTP {len(twice)}, SMTP {len(smtp_twice)}"
    )
    check_run(run, "moves")
    owned = fleet.owned(s)
    assert owned.get("1"), f"the joining instance never owned a partition: {owned}"
    # both rebalances revoked "0" with calls under way (what would be made twice otherwise)
    assert len(under_way) >= 2 and all(n > 0 for n in under_way[:2]), under_way
    # every call made once: HTTP requests per idempotency key, SMTP messages per Message-ID
    assert not twice, f"{len(twice)} HTTP calls made more than once, e.g. {list(twice)[:3]}"
    assert not smtp_twice, f"{len(smtp_twice)} SMTP messages sent more than once"
    assert run.replays == 0
    assert not run.unknown, "a clean move left calls started and unsettled"
