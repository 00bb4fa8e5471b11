"""The contact vault's cryptography: envelope encryption of a customer's contact points.

Contact points (email addresses; phone numbers where an event carries ``properties.phone``)
are kept encrypted, not hashed, because the dispatcher must send to them. Each customer has a
random 256-bit **data key**; it seals the contact points with AES-256-GCM and is itself stored
**wrapped** (AES-256-GCM) by the **master key** from ``SEGFLOW_VAULT_KEY``. Both ciphertexts
take the customer id as additional authenticated data, so a record copied under another
customer's key does not decrypt. The record (``io.segflow.ContactVaultEntry``) lives on the
compacted topic ``segflow.contacts.vault``, written by the identity service and read only by
the dispatcher.

Forgetting a customer writes a tombstone: the record held the only copy of the customer's
data key, so the contact points are crypto-shredded once the log cleaner has removed the
earlier records (the topic bounds that with ``max.compaction.lag.ms``); every reader drops the
key at once.

Master key rotation: set the new key in ``SEGFLOW_VAULT_KEY`` and the old one(s) in
``SEGFLOW_VAULT_PREVIOUS_KEYS`` (comma-separated). Records name the master key that wrapped
their data key (``key_id``), so both stay readable; identity re-wraps a customer's data key
with the current master key the next time it writes that customer's record. Drop an old key
only once no record names it.

>>> ring = Keyring.from_text(generate_key())
>>> rec = ring.seal("c-1", ContactPoints(("ada@example.com",)), now_ms=0)
>>> ring.open(rec).primary_email
'ada@example.com'
>>> b"ada" in rec["sealed"] + rec["wrapped_key"]
False
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from segflow.errors import ConfigError

KEY_SETTING = "SEGFLOW_VAULT_KEY"
PREVIOUS_SETTING = "SEGFLOW_VAULT_PREVIOUS_KEYS"
#: Contact points kept per type (most recent first).
KEEP = 5
_NONCE = 12


class VaultSettings(BaseSettings):
    """``SEGFLOW_VAULT_KEY`` (urlsafe base64 of 32 random bytes: ``python -m
    segflow.runtime.vault``) and ``SEGFLOW_VAULT_PREVIOUS_KEYS`` (comma-separated)."""

    model_config = SettingsConfigDict(env_prefix="SEGFLOW_VAULT_", extra="ignore", frozen=True)

    key: SecretStr | None = None
    previous_keys: SecretStr | None = None

    def keyring(self) -> Keyring | None:
        """The keyring, or None when no master key is set."""
        if self.key is None or not self.key.get_secret_value().strip():
            return None
        previous = self.previous_keys.get_secret_value() if self.previous_keys else ""
        return Keyring.from_text(self.key.get_secret_value(), previous)


class VaultError(Exception):
    """A record that does not open with the keys at hand (never says anything about them)."""


def generate_key() -> str:
    """A new master key as ``SEGFLOW_VAULT_KEY`` takes it."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def local_key(state_dir: Path) -> tuple[str, str]:
    """``SEGFLOW_VAULT_KEY`` if set, else a key kept in ``<state_dir>/vault-key`` (created with
    mode 0600 on first use, so a local stack's vault stays readable across restarts); returns
    it and where it came from (``segflow up``)."""
    given = os.environ.get(KEY_SETTING)
    if given:
        return given, KEY_SETTING
    path = state_dir / "vault-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(generate_key() + "\n")
    return path.read_text().strip(), str(path)


def _parse(text: str, setting: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode())
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(
            f"{setting}: expected the urlsafe base64 of 32 random bytes (44 characters; "
            "`python -m segflow.runtime.vault` prints a new one)"
        )
    return raw


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"segflow-vault-key-id\x00" + key).hexdigest()[:16]


@dataclass(frozen=True)
class ContactPoints:
    """A customer's contact points, most recent first."""

    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()

    @property
    def primary_email(self) -> str | None:
        return self.emails[0] if self.emails else None

    def seen(self, email: str | None = None, phone: str | None = None) -> ContactPoints:
        """With ``email`` / ``phone`` as the most recent (the same object when nothing moves)."""
        emails, phones = self.emails, self.phones
        if email and (not emails or emails[0] != email):
            emails = (email, *(e for e in emails if e != email))[:KEEP]
        if phone and (not phones or phones[0] != phone):
            phones = (phone, *(p for p in phones if p != phone))[:KEEP]
        if emails is self.emails and phones is self.phones:
            return self
        return ContactPoints(emails, phones)

    def absorb(self, other: ContactPoints) -> ContactPoints:
        """A merge: this profile's points first, then the absorbed profile's."""
        emails = tuple(dict.fromkeys((*self.emails, *other.emails)))[:KEEP]
        phones = tuple(dict.fromkeys((*self.phones, *other.phones)))[:KEEP]
        return ContactPoints(emails, phones)

    def __repr__(self) -> str:  # never print the points themselves (logs, tracebacks)
        return f"ContactPoints(<{len(self.emails)} emails, {len(self.phones)} phones>)"


class Keyring:
    """The master key (wraps new data keys) and previous master keys (read only)."""

    def __init__(self, current: bytes, previous: list[bytes] | None = None) -> None:
        self.current_id = key_id(current)
        self._keys = {key_id(k): AESGCM(k) for k in [*(previous or []), current]}

    @classmethod
    def from_text(cls, current: str, previous: str = "") -> Keyring:
        old = [_parse(p, PREVIOUS_SETTING) for p in previous.split(",") if p.strip()]
        return cls(_parse(current, KEY_SETTING), old)

    def __repr__(self) -> str:
        return f"Keyring(current={self.current_id}, keys={len(self._keys)})"

    # -- data keys ----------------------------------------------------------------------------
    def unwrap(self, record: dict[str, Any]) -> bytes:
        """The customer's data key from its record."""
        master = self._keys.get(str(record["key_id"]))
        if master is None:
            raise VaultError(
                f"vault record wrapped by master key {record['key_id']}, which is neither "
                f"{KEY_SETTING} nor in {PREVIOUS_SETTING}"
            )
        blob = bytes(record["wrapped_key"])
        aad = b"data-key\x00" + str(record["customer_id"]).encode()
        try:
            return master.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except InvalidTag:
            raise VaultError("vault data key does not unwrap (wrong key or tampered)") from None

    def _wrap(self, customer_id: str, data_key: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        aad = b"data-key\x00" + customer_id.encode()
        return nonce + self._keys[self.current_id].encrypt(nonce, data_key, aad)

    # -- records ------------------------------------------------------------------------------
    def seal(
        self,
        customer_id: str,
        points: ContactPoints,
        now_ms: int,
        data_key: bytes | None = None,
    ) -> dict[str, Any]:
        """The vault record of ``points`` (a new data key unless one is given)."""
        data_key = data_key or AESGCM.generate_key(bit_length=256)
        plain = json.dumps({"email": list(points.emails), "phone": list(points.phones)}).encode()
        nonce = os.urandom(_NONCE)
        aad = b"contacts\x00" + customer_id.encode()
        return {
            "customer_id": customer_id,
            "key_id": self.current_id,
            "wrapped_key": self._wrap(customer_id, data_key),
            "sealed": nonce + AESGCM(data_key).encrypt(nonce, plain, aad),
            "updated_at": now_ms,
        }

    def open(self, record: dict[str, Any]) -> ContactPoints:
        """The contact points of a record (raises :class:`VaultError`)."""
        data_key = self.unwrap(record)
        blob = bytes(record["sealed"])
        aad = b"contacts\x00" + str(record["customer_id"]).encode()
        try:
            plain = AESGCM(data_key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except InvalidTag:
            raise VaultError("vault record does not decrypt (tampered or moved)") from None
        doc = json.loads(plain)
        return ContactPoints(tuple(doc.get("email", ())), tuple(doc.get("phone", ())))

    def reseal(
        self, record: dict[str, Any] | None, customer_id: str, points: ContactPoints, now_ms: int
    ) -> dict[str, Any]:
        """``points`` sealed with the customer's existing data key (a new one if none)."""
        data_key = self.unwrap(record) if record is not None else None
        return self.seal(customer_id, points, now_ms, data_key)

    # -- in transit (identity's front stage -> its graph writer) --------------------------------
    def seal_transit(self, label: str, email: str | None, phone: str | None) -> bytes:
        """A raw email / phone sealed with the master key for one message (``label``, e.g. the
        event id, is the associated data): ``key id (16 ASCII) + nonce + ciphertext``.

        >>> k = Keyring(bytes(32))
        >>> k.open_transit("e1", k.seal_transit("e1", "a@b.io", None))
        ('a@b.io', None)
        """
        plain = json.dumps([email, phone]).encode()
        nonce = os.urandom(_NONCE)
        aad = b"transit\x00" + label.encode()
        sealed = self._keys[self.current_id].encrypt(nonce, plain, aad)
        return self.current_id.encode() + nonce + sealed

    def open_transit(self, label: str, blob: bytes) -> tuple[str | None, str | None]:
        """The (email, phone) of :meth:`seal_transit` (raises :class:`VaultError`)."""
        master = self._keys.get(blob[:16].decode("ascii", "replace"))
        if master is None:
            raise VaultError(
                f"contact points sealed by a master key that is neither {KEY_SETTING} nor in "
                f"{PREVIOUS_SETTING}"
            )
        body = blob[16:]
        try:
            plain = master.decrypt(body[:_NONCE], body[_NONCE:], b"transit\x00" + label.encode())
        except InvalidTag:
            raise VaultError("contact points in transit do not decrypt (tampered)") from None
        email, phone = json.loads(plain)
        return email, phone


if __name__ == "__main__":  # pragma: no cover - prints a fresh master key
    print(generate_key())
