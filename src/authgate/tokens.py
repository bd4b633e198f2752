"""Token values: `<prefix><32 base62 random><6 base62 CRC32 checksum>`, and their ids.

Only `hash_token` output is ever stored; the value itself is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)
RANDOM_LEN = 32  # 32 * log2(62) = 190.5 bits
CHECKSUM_LEN = 6  # 62**6 > 2**32
DISPLAY_RANDOM = 4
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        out.append(BASE62[rem])
    return "".join(reversed(out))


# Every number below 62**2 as two base62 digits: a checksum is three of them.
_B62_PAIRS = [a + b for a in BASE62 for b in BASE62]


def checksum(body: str) -> str:
    """Fixed-width base62 CRC32 of prefix+random (what `_b62(crc, 6)` spells, by pairs:
    checked on every request whose token is not cached)."""
    high, low = divmod(zlib.crc32(body.encode()), 62**2)
    high, middle = divmod(high, 62**2)
    return _B62_PAIRS[high] + _B62_PAIRS[middle] + _B62_PAIRS[low]


def generate(prefix: str) -> str:
    random_part = "".join(secrets.choice(BASE62) for _ in range(RANDOM_LEN))
    body = prefix + random_part
    return body + checksum(body)


def is_well_formed(token: str, prefix: str) -> bool:
    """Prefix, length, charset and checksum: everything that can be checked without Redis."""
    if len(token) != len(prefix) + RANDOM_LEN + CHECKSUM_LEN or not token.startswith(prefix):
        return False
    rest = token[len(prefix) :]
    if not _BASE62_SET.issuperset(rest):
        return False
    return hmac.compare_digest(checksum(token[:-CHECKSUM_LEN]), token[-CHECKSUM_LEN:])


def display_prefix(token: str, prefix: str) -> str:
    """The prefix plus the first four random characters, e.g. `min_qqMU`."""
    return token[: len(prefix) + DISPLAY_RANDOM]


def hash_token(pepper: bytes, token: str) -> str:
    """HMAC-SHA256 of the token under the server-side pepper, hex: what Redis keys carry."""
    return hmac.digest(pepper, token.encode(), "sha256").hex()


_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class Hasher:
    """HMAC-SHA256 (RFC 2104) under one key, with the two padded key blocks hashed once.

    `digest(token)` equals `hmac.digest(pepper, token, "sha256")` at half its cost: the
    hot path hashes every token it sees.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, pepper: bytes) -> None:
        key = hashlib.sha256(pepper).digest() if len(pepper) > 64 else pepper
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, token: str) -> bytes:
        inner = self._inner.copy()
        inner.update(token.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def new_id(now: float | None = None) -> str:
    """`tok_` + a ULID: 48-bit millisecond time, 80 random bits, Crockford base32, sortable."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, rem = divmod(value, 32)
        chars.append(_CROCKFORD[rem])
    return "tok_" + "".join(reversed(chars))


def looks_like_id(text: str) -> bool:
    return len(text) == 30 and text.startswith("tok_") and all(c in _CROCKFORD for c in text[4:])
