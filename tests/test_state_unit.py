"""ChangelogStore's undo log, without a broker."""

from __future__ import annotations

from segflow.runtime.serde import SchemaStore, Serde
from segflow.runtime.settings import Settings
from segflow.runtime.state import ChangelogStore
from segflow.runtime.topics import TOPICS


def make() -> ChangelogStore:
    return ChangelogStore(
        Settings(bootstrap_servers="unused:1"), TOPICS.scores, Serde(SchemaStore.from_dir())
    )


def test_abort_rolls_back_to_the_last_commit() -> None:
    store = make()
    store.put("a", {"v": 1})
    store.on_commit()
    store.put("a", {"v": 2})
    store.put("b", {"v": 3})
    store.delete("a")
    store.on_abort()
    assert dict(store.items()) == {"a": {"v": 1}}


def test_commit_keeps_changes_and_put_returns_the_changelog_record() -> None:
    store = make()
    out = store.put("k", {"v": 1})
    assert (out.topic, out.key, out.value) == (TOPICS.scores, "k", {"v": 1})
    store.on_commit()
    store.on_abort()
    assert store.get("k") == {"v": 1}
    tomb = store.delete("k")
    assert tomb.value is None and "k" not in store


def test_a_key_written_to_an_explicit_partition_keeps_it_until_its_tombstone_commits() -> None:
    store = make()
    key = next(k for k in (f"chunk-{i}" for i in range(50)) if store.partition_of(k) != 3)
    assert store.put(key, {"v": 1}, partition=3).partition == 3
    store.on_commit()
    tomb = store.delete(key)
    assert tomb.partition == 3  # the tombstone goes where the key lives
    store.on_abort()  # the delete is undone: the key is back, still in partition 3
    assert store.get(key) == {"v": 1} and store.partition_of(key) == 3
    store.delete(key)
    store.on_commit()
    # forgotten once the tombstone is committed (keys that come and go would otherwise
    # leave one entry each behind); written again, it may go anywhere
    assert key not in store and store.partition_of(key) != 3
    assert store.put(key, {"v": 2}).partition == store.partition_of(key)
