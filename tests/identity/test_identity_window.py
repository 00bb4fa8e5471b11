"""The one-process de-duplication window (pure): global across partitions, expiry by the
event-time low watermark, undo of an aborted transaction."""

from __future__ import annotations

from services.identity.dedup import chunk_hashes
from services.identity.window import CHUNK_IDS, HOUR_MS, SeenWindow

DAY = 86_400_000


def keys(window: SeenWindow) -> list[str]:
    return [key for key, _, _ in window.pending_chunks()]


def expire(window: SeenWindow, chunks: dict[str, bytes]) -> list[str]:
    """What the shell does at a tick: the expired chunks' keys, their ids forgotten."""
    out = []
    for hour, ks in window.expired():
        for k in ks:
            window.forget_ids(hour, chunk_hashes(chunks[k]))
            out.append(k)
    return out


def test_a_duplicate_is_caught_on_any_partition() -> None:
    w = SeenWindow(window_ms=DAY)
    assert w.add(0, 1, 10, offset=0)
    assert not w.add(3, 1, 10, offset=7)  # same event id under another key
    assert not w.add(0, 1, 10, offset=1)
    assert len(w) == 1


def test_old_event_ids_expire_by_event_time_and_are_accepted_again() -> None:
    w = SeenWindow(window_ms=DAY)
    chunks: dict[str, bytes] = {}
    for h, t in ((1, 0), (2, DAY), (3, 2 * DAY)):
        w.add(0, h, t, offset=h)
        for key, _, hashes in w.pending_chunks():
            chunks[key] = hashes
    w.on_commit()
    # low watermark 2 days: horizon 1 day; hour [0, 1 h) ended before it, [24 h, 25 h) did not
    assert expire(w, chunks) == ["0:0:1"]
    assert 1 not in w and 2 in w and 3 in w
    assert w.add(0, 1, 0, offset=9)  # accepted again


def test_expiry_waits_for_the_partition_that_is_behind() -> None:
    # Partition 1 is 20 days ahead of partition 0 (a backlog): an id seen on partition 0 must
    # stay until partition 0 itself has moved past the window, because its duplicate may
    # still be unread there.
    w = SeenWindow(window_ms=7 * DAY)
    w.add(0, 1, 3 * DAY, offset=0)
    w.add(1, 2, 23 * DAY, offset=0)
    chunks = {k: h for k, _, h in w.pending_chunks()}
    assert expire(w, chunks) == []
    w.advance(0, 10 * DAY)
    assert expire(w, chunks) == []  # the hour of 3 days ends at 3 d + 1 h > 10 d - 7 d
    w.advance(0, 10 * DAY + HOUR_MS)
    assert expire(w, chunks) == [f"0:{3 * DAY}:0"]


def test_nothing_expires_after_a_restore_until_the_partitions_show_where_they_are() -> None:
    w = SeenWindow(window_ms=10)
    w.load("2:0:5", [1, 2])
    w.load(f"0:{5 * HOUR_MS}:0", [3])
    assert len(w) == 3 and w.watermark is None and w.expired() == []
    assert not w.add(1, 2, 5 * HOUR_MS, offset=0)  # restored ids are duplicates on any partition
    assert w.expired() == [(0, ["2:0:5"])]


def test_an_aborted_transaction_forgets_its_ids_and_puts_back_its_expiries() -> None:
    w = SeenWindow(window_ms=HOUR_MS)
    w.load("0:0:0", [1])
    w.advance(0, 3 * HOUR_MS)
    w.on_commit()
    assert w.expired() == [(0, ["0:0:0"])]
    w.forget_ids(0, [1])
    w.add(0, 2, 3 * HOUR_MS, offset=4)
    assert keys(w) == [f"0:{3 * HOUR_MS}:4"]
    assert w.on_abort() == ["0:0:0"]  # the shell loads it again from the rolled-back store
    assert 2 not in w and w.chunks == {}
    assert w.marks == {0: 3 * HOUR_MS}
    w.load("0:0:0", [1])
    assert 1 in w and w.add(0, 2, 3 * HOUR_MS, offset=4)  # re-read after the abort


def test_later_batches_rewrite_the_open_chunk_until_it_is_full() -> None:
    w = SeenWindow(window_ms=DAY)
    written: dict[str, bytes] = {}
    h = 0
    for batch in range(3):
        for _ in range(CHUNK_IDS // 2):
            h += 1
            w.add(0, h, HOUR_MS + batch, offset=h)
        written.update((k, v) for k, _, v in w.pending_chunks())
        w.on_commit()
    # batches 1 and 2 fill the chunk keyed by the first offset; batch 3 starts another
    assert {k: len(v) // 8 for k, v in written.items()} == {
        f"0:{HOUR_MS}:1": CHUNK_IDS,
        f"0:{HOUR_MS}:{CHUNK_IDS + 1}": CHUNK_IDS // 2,
    }
    assert sorted(x for v in written.values() for x in chunk_hashes(v)) == list(range(1, h + 1))
    assert w.chunks == {HOUR_MS: list(written)}


def test_an_aborted_rewrite_of_the_open_chunk_is_undone() -> None:
    w = SeenWindow(window_ms=DAY)
    w.add(0, 1, 10, offset=0)
    [(key, _, first)] = list(w.pending_chunks())
    w.on_commit()
    w.add(0, 2, 10, offset=1)
    assert [v for _, _, v in w.pending_chunks()] == [first + (2).to_bytes(8, "big")]
    w.on_abort()
    w.add(0, 3, 10, offset=1)  # the batch re-read differently: the chunk as committed + 3
    assert [(k, v) for k, _, v in w.pending_chunks()] == [(key, first + (3).to_bytes(8, "big"))]
