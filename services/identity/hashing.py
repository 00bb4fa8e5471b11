"""Identity's keyed hashes and the Avro long encoding the shell splices (pure; moved out of
:mod:`services.identity.app`, which re-exports them)."""

from __future__ import annotations

import hashlib
import hmac

from services.identity import core


def node_hasher(secret: str) -> core.Hasher:
    """Keyed BLAKE2b (96 bits, hex) of ``type + value``: what the state stores per identifier.

    >>> h = node_hasher("s")
    >>> h("email", "a@b.io") == h("email", "a@b.io") != node_hasher("t")("email", "a@b.io")
    True
    >>> len(h("user_id", "u1"))
    24
    """
    key = hashlib.sha256(secret.encode()).digest()

    def digest(id_type: str, value: str) -> str:
        data = f"{id_type}\x00{value}".encode()
        return hashlib.blake2b(data, key=key, digest_size=12).hexdigest()

    return digest


def email_hash(secret: str, email: str) -> str:
    """HMAC-SHA256 (hex) of the trimmed, lower-cased email: ``IdentifiedEvent.email_hash``.

    >>> email_hash("s", " A@B.io ") == email_hash("s", "a@b.io")
    True
    """
    value = core.normalize("email", email).encode()
    return hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()


def _long(n: int) -> bytes:
    """Avro's zig-zag varint encoding of a long.

    >>> [_long(n).hex() for n in (0, -1, 1, 64, 1_800_000_000_000)]
    ['00', '01', '02', '8001', '80c0e285e368']
    """
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
