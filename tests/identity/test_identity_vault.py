"""The contact vault on the identity side, without a broker: what the handler writes to
``segflow.contacts.vault`` for new addresses, phones, merges and forget requests; and the
vault's cryptography (envelope encryption, binding to the customer, master key rotation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from segflow.errors import ConfigError
from segflow.runtime.loop import Incoming, Output
from segflow.runtime.serde import Serde
from segflow.runtime.settings import Settings
from segflow.runtime.topics import TOPICS
from segflow.runtime.vault import (
    ContactPoints,
    Keyring,
    VaultError,
    VaultSettings,
    generate_key,
    local_key,
)
from services.identity.app import IdentityService

NOW_MS = 1_800_000_000_000
KEY = generate_key()


def service() -> IdentityService:
    settings = Settings(bootstrap_servers="127.0.0.1:1", hash_secret="test-secret")
    return IdentityService(settings, clock=lambda: NOW_MS / 1000, keyring=Keyring.from_text(KEY))


def handle(svc: IdentityService, topic: Any = TOPICS.events, **value: Any) -> list[Output]:
    if topic is TOPICS.events:
        value = {"event_type": "login", "occurred_at": NOW_MS - 1000, **value}
    outputs = list(svc.handle(Incoming(topic, "t", 0, 0, "k", value, None, [])))
    serde = Serde.from_settings(svc.settings)
    for out in outputs:  # everything encodes with its topic's schema
        if out.value is not None:
            serde.encode(out.topic, out.value)
    return outputs


def vault(outputs: list[Output]) -> list[Output]:
    return [o for o in outputs if o.topic is TOPICS.contact_vault]


def opened(out: Output) -> ContactPoints:
    return Keyring.from_text(KEY).open(out.value)


def test_a_raw_email_and_phone_go_to_the_vault_encrypted_and_leave_the_event() -> None:
    svc = service()
    outs = handle(
        svc, event_id="e1", user_id="u1", email=" Ana@Example.ORG ", properties={"phone": "+1 555"}
    )
    (ident,) = [o for o in outs if o.topic is TOPICS.identified]
    (rec,) = vault(outs)
    assert rec.key == ident.key
    assert opened(rec) == ContactPoints(("ana@example.org",), ("+1 555",))
    assert b"ana" not in rec.value["sealed"] + rec.value["wrapped_key"]
    assert ident.value["event"]["email"] is None and ident.value["event"]["properties"] == {}
    for o in outs:  # no other output carries them in clear
        if o.topic is not TOPICS.contact_vault:
            assert "ana@example" not in repr(o.value).lower() and "555" not in repr(o.value)


def test_an_address_already_primary_writes_nothing_and_a_new_one_becomes_primary() -> None:
    svc = service()
    first = vault(handle(svc, event_id="e1", user_id="u1", email="ana@example.org"))[0]
    assert vault(handle(svc, event_id="e2", user_id="u1", email="ANA@example.org")) == []
    (second,) = vault(handle(svc, event_id="e3", user_id="u1", email="ana@work.example"))
    assert opened(second).emails == ("ana@work.example", "ana@example.org")
    ring = Keyring.from_text(KEY)  # the customer keeps one data key
    assert ring.unwrap(second.value) == ring.unwrap(first.value)


def test_placeholder_and_test_addresses_are_not_contact_points() -> None:
    svc = service()
    assert vault(handle(svc, event_id="e1", user_id="u1", email="test@test.com")) == []
    assert vault(handle(svc, event_id="e2", user_id="u1", email="unknown")) == []


def test_a_merge_moves_the_absorbed_profiles_points_to_the_survivor_and_deletes_its_key() -> None:
    svc = service()
    older = vault(
        handle(
            svc,
            event_id="e1",
            anonymous_id="a1",
            email="old@example.org",
            occurred_at=NOW_MS - 9000,
        )
    )[0]
    younger = vault(handle(svc, event_id="e2", user_id="u1", email="new@example.org"))[0]
    outs = handle(svc, event_id="e3", user_id="u1", anonymous_id="a1")
    (merge,) = [o for o in outs if o.topic is TOPICS.merges]
    assert (merge.value["survivor_id"], merge.key) == (older.key, younger.key)
    moved = {o.key: o.value for o in vault(outs)}
    assert moved[younger.key] is None  # tombstone: the absorbed data key is gone
    survivor = Keyring.from_text(KEY).open(moved[older.key])
    assert survivor.emails == ("old@example.org", "new@example.org")


def test_forget_tombstones_the_vault_record() -> None:
    svc = service()
    rec = vault(handle(svc, event_id="e1", user_id="u1", email="ana@example.org"))[0]
    outs = handle(
        svc,
        TOPICS.forget,
        request_id="fr-1",
        customer_id=rec.key,
        requested_at=NOW_MS,
        reason=None,
    )
    assert [(o.key, o.value) for o in vault(outs)] == [(rec.key, None)]
    assert svc.vault is not None and svc.vault.get(rec.key) is None


def test_without_a_master_key_there_is_no_vault_and_emails_are_only_hashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SEGFLOW_VAULT_KEY", raising=False)
    assert VaultSettings().keyring() is None
    settings = Settings(bootstrap_servers="127.0.0.1:1", hash_secret="test-secret")
    svc = IdentityService(settings, clock=lambda: NOW_MS / 1000)
    assert svc.vault is None
    outs = handle(svc, event_id="e1", user_id="u1", email="ana@example.org")
    assert vault(outs) == [] and "ana@" not in repr([o.value for o in outs])


def test_records_are_bound_to_their_customer_and_to_the_master_key() -> None:
    ring = Keyring.from_text(KEY)
    rec = ring.seal("c-1", ContactPoints(("ana@example.org",)), NOW_MS)
    with pytest.raises(VaultError):  # copied under another customer's key
        ring.open({**rec, "customer_id": "c-2"})
    with pytest.raises(VaultError):  # another master key
        Keyring.from_text(generate_key()).open(rec)
    with pytest.raises(VaultError):  # tampered ciphertext
        ring.open({**rec, "sealed": rec["sealed"][:-1] + bytes([rec["sealed"][-1] ^ 1])})


def test_rotation_reads_records_of_the_previous_key_and_reseals_under_the_new_one() -> None:
    old = Keyring.from_text(KEY)
    rec = old.seal("c-1", ContactPoints(("ana@example.org",)), NOW_MS)
    new_key = generate_key()
    rotated = Keyring.from_text(new_key, KEY)
    assert rotated.open(rec).primary_email == "ana@example.org"
    again = rotated.reseal(rec, "c-1", ContactPoints(("ana@example.org",)), NOW_MS)
    assert again["key_id"] == rotated.current_id != rec["key_id"]
    assert Keyring.from_text(new_key).open(again).primary_email == "ana@example.org"


def test_a_malformed_master_key_names_the_setting_and_not_the_value() -> None:
    with pytest.raises(ConfigError, match="SEGFLOW_VAULT_KEY") as info:
        Keyring.from_text("not-a-key-s3cr3t")
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigError, match="SEGFLOW_VAULT_PREVIOUS_KEYS"):
        Keyring.from_text(KEY, "short")
    assert "ana" not in repr(ContactPoints(("ana@example.org",)))


def test_a_local_stack_keeps_its_vault_key_private_and_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEGFLOW_VAULT_KEY", raising=False)
    key, where = local_key(tmp_path)
    assert local_key(tmp_path) == (key, where) and where.endswith("vault-key")
    assert (tmp_path / "vault-key").stat().st_mode & 0o777 == 0o600
    Keyring.from_text(key)  # a usable key
    monkeypatch.setenv("SEGFLOW_VAULT_KEY", KEY)
    assert local_key(tmp_path) == (KEY, "SEGFLOW_VAULT_KEY")


def test_an_invalid_event_with_an_address_is_dead_lettered_without_it() -> None:
    svc = service()
    outs = handle(
        svc,
        event_id="e9",
        user_id="u1",
        email="ana@example.org",
        properties={"phone": "+1 555", "zip": "10115"},
        occurred_at=NOW_MS + 10 * 86_400_000,  # beyond the allowed clock skew
    )
    (letter,) = [o for o in outs if o.topic is TOPICS.dlq]
    assert letter.value["reason"] == "future_event"
    kept = Serde.from_settings(svc.settings).decode(TOPICS.events, letter.value["original_value"])
    assert kept["email"] is None and kept["properties"] == {"zip": "10115"}
    assert kept["user_id"] == "u1"  # the rest is kept for a replay
    assert b"ana@" not in letter.value["original_value"] and vault(outs) == []
    # keyed by the address: the key is not kept either
    record = Incoming(
        TOPICS.events, "t", 0, 0, "ana@example.org",
        {"event_id": "e10", "event_type": "login", "occurred_at": NOW_MS + 10 * 86_400_000,
         "email": "ana@example.org", "properties": {}},
        None, [],
    )  # fmt: skip
    (letter,) = list(svc.handle(record))
    assert letter.key is None
