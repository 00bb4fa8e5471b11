"""The graph writer's apply order (services/identity/order.py), without a broker: whatever the
interleaving of the input partitions' requests and watermarks, the applied order is the sorted
(order time, event_id, partition, offset) order; a restore from a commit checkpoint neither
applies a request twice nor loses one."""

from __future__ import annotations

import random

from services.identity.order import PartitionClocks, ReleaseBuffer


def partition_streams(seed: int) -> dict[int, list[tuple[str, int]]]:
    """3 input partitions of (event_id, occurred_at), roughly in time, some out of order."""
    rng = random.Random(seed)
    streams: dict[int, list[tuple[str, int]]] = {}
    for p in range(3):
        t, out = 1_000_000, []
        for i in range(200):
            t += rng.randint(0, 5_000)
            at = t - (rng.randint(0, 60_000) if rng.random() < 0.1 else 0)
            out.append((f"e{rng.randint(0, 10**6):07d}-{p}-{i}", at))
        streams[p] = out
    return streams


def links_topic(streams: dict[int, list[tuple[str, int]]], seed: int) -> list[tuple]:
    """What the fronts write, interleaved at random: requests and, after each, sometimes
    their partition's watermark; at the end every partition idle (watermark far ahead)."""
    rng = random.Random(seed)
    clocks = PartitionClocks(grace_ms=10_000)
    cursors = {p: 0 for p in streams}
    out: list[tuple] = []
    while any(cursors[p] < len(s) for p, s in streams.items()):
        p = rng.choice([p for p in streams if cursors[p] < len(streams[p])])
        for _ in range(rng.randint(1, 20)):  # a front's batch
            if cursors[p] == len(streams[p]):
                break
            eid, at = streams[p][cursors[p]]
            order = clocks.stamp(p, at, now_ms=10**12)
            out.append(("request", (order, eid, p, cursors[p])))
            cursors[p] += 1
        for q, mark in clocks.changed([p]).items():
            out.append(("watermark", q, mark))
        clocks.on_commit()
    for p in streams:
        out.append(("watermark", p, 10**12))
    return out


def apply_all(topic: list[tuple], partitions: int, crash_every: int = 0) -> list[str]:
    """The writer over ``topic``; with ``crash_every``, it loses its buffer that often and
    goes on from its last commit (commit point = oldest buffered offset + checkpoint)."""
    applied: list[str] = []
    buf = ReleaseBuffer(partitions)
    committed_offset, checkpoint, committed_applied = 0, None, 0
    offset, since_commit = 0, 0
    crashed: set[int] = set()
    while offset < len(topic):
        item = topic[offset]
        if item[0] == "watermark":
            if buf.advance(item[1], item[2]):
                applied += [k[1] for k, _ in buf.release()]
        else:
            key = item[1]
            if offset < buf.replay_until and key[0] < buf.released:
                pass  # applied by the last commit
            elif buf.is_late(key[0]):
                applied.append(key[1])
            else:
                buf.push(key, None, offset)
        offset += 1
        since_commit += 1
        if since_commit == 7:  # a commit
            oldest = buf.oldest_offset()
            checkpoint = buf.checkpoint(offset)
            committed_offset = offset if oldest is None else oldest
            committed_applied, since_commit = len(applied), 0
        if crash_every and offset % crash_every == 0 and offset not in crashed:
            crashed.add(offset)  # a crash: back to the last commit
            del applied[committed_applied:]
            buf = ReleaseBuffer(partitions)
            buf.restore(checkpoint)
            offset, since_commit = committed_offset, 0
    return applied


def test_the_applied_order_does_not_depend_on_the_interleaving() -> None:
    streams = partition_streams(1)
    reference = links_topic(streams, seed=0)
    expected = sorted(item[1] for item in reference if item[0] == "request")
    assert any(k[0] != streams[k[2]][k[3]][1] for k in expected), "some late events"
    for seed in range(5):
        assert apply_all(links_topic(streams, seed), 3) == [k[1] for k in expected]


def test_a_crash_goes_on_from_the_commit_without_doubles_or_losses() -> None:
    streams = partition_streams(2)
    topic = links_topic(streams, seed=3)
    expected = apply_all(topic, 3)
    assert len(expected) == 600
    for every in (23, 50, 111):
        assert apply_all(topic, 3, crash_every=every) == expected


def test_a_partition_without_a_watermark_holds_everything_back() -> None:
    buf = ReleaseBuffer(partitions=2)
    buf.push((5, "a", 0, 0), None, 0)
    assert not buf.advance(0, 10**12) and buf.release() == []
    assert buf.advance(1, 6) and [k[1] for k, _ in buf.release()] == ["a"]


def test_front_clock_forget_idle_and_future_events() -> None:
    clocks = PartitionClocks(grace_ms=1_000)
    assert clocks.stamp(0, 50_000, now_ms=100_000) == 50_000
    # a forget request (wall-clock time) is ordered at its time but moves no watermark
    assert clocks.stamp(0, 99_000, now_ms=100_000, advance=False) == 99_000
    assert clocks.watermark(0) == 49_000
    # an event stamped in the future is ordered at the front's clock
    assert clocks.stamp(0, 500_000, now_ms=100_000) == 100_000
    assert clocks.watermark(0) == 99_000
    # idle: the watermark follows the clock; an older event is ordered at it (late)
    clocks.idle(0, now_ms=200_000)
    assert clocks.stamp(0, 150_000, now_ms=200_000) == 199_000 and clocks.late == 1
    # an aborted transaction puts the watermarks back to the committed ones
    clocks.on_abort()
    assert clocks.watermark(0) == -(2**62)
