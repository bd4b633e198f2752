"""URIs as nginx routes on them.

`normalise` reproduces nginx's `$uri`: every percent-escape decoded once (`%2F` included),
repeated slashes merged, `.` and `..` segments resolved; `%00`, a bad escape or `..` above
the root make nginx answer 400, so they are errors here too. Paths are kept as `str` holding
one character per byte (latin-1), so nothing is lost and re-encoding is exact.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

_HEX = frozenset(b"0123456789abcdefABCDEF")
# Characters left as they are when the authorised path is encoded again for the upstream.
_SAFE = "/-._~!$&'()*+,;=:@"
_PLAIN = re.compile(r"[A-Za-z0-9/\-._~!$&'()*+,;=:@]*")


class BadPath(ValueError):
    """nginx would refuse this URI with 400."""


def _decode(raw: bytes) -> bytes:
    if b"%" not in raw:
        out = raw
    else:
        buf = bytearray()
        i, n = 0, len(raw)
        while i < n:
            c = raw[i]
            if c == 0x25:  # %
                if i + 2 >= n:
                    raise BadPath("truncated percent-escape")
                h1, h2 = raw[i + 1], raw[i + 2]
                if h1 not in _HEX or h2 not in _HEX:
                    raise BadPath("invalid percent-escape")
                buf.append(int(raw[i + 1 : i + 3], 16))
                i += 3
            else:
                buf.append(c)
                i += 1
        out = bytes(buf)
    if b"\x00" in out:
        raise BadPath("NUL in path")
    return out


def normalise(raw_path: str | bytes) -> str:
    """nginx's `$uri` for a raw (still percent-encoded) path without its query."""
    if (
        isinstance(raw_path, str)
        and raw_path.startswith("/")
        and raw_path.isascii()
        and "%" not in raw_path
        and "//" not in raw_path
        and "/." not in raw_path
    ):
        return raw_path  # the common case, without the bytes round trip below
    raw = raw_path.encode("latin-1") if isinstance(raw_path, str) else raw_path
    if not raw.startswith(b"/"):
        raise BadPath("path must start with '/'")
    if b"%" not in raw and b"//" not in raw and b"/." not in raw:
        return raw.decode("latin-1")  # the common case: nothing to do
    decoded = _decode(raw)
    parts = decoded.split(b"/")
    out: list[bytes] = []
    trailing = False
    for seg in parts[1:]:
        trailing = False
        if seg == b"" or seg == b".":
            trailing = True
            continue
        if seg == b"..":
            if not out:
                raise BadPath("'..' above the root")
            out.pop()
            trailing = True
            continue
        out.append(seg)
    path = b"/" + b"/".join(out)
    if trailing and out:
        path += b"/"
    return path.decode("latin-1")


def encode(path: str) -> str:
    """The normalised path, percent-encoded again so it reaches the upstream unchanged."""
    if _PLAIN.fullmatch(path):  # the common case: nothing to escape
        return path
    return quote(path.encode("latin-1"), safe=_SAFE)


def split_uri(uri: str) -> tuple[str, str]:
    """`/path?query` -> (raw path, raw query); an absolute URL loses its scheme and host."""
    if not uri.startswith("/"):
        scheme, sep, rest = uri.partition("://")
        if not sep or not scheme.isalpha():
            raise BadPath("not a path or absolute URL")
        slash = rest.find("/")
        query_mark = rest.find("?")
        if slash == -1 or (query_mark != -1 and query_mark < slash):
            uri = "/" + (rest[query_mark:] if query_mark != -1 else "")
        else:
            uri = rest[slash:]
    path, _, query = uri.partition("?")
    path = path.partition("#")[0]
    return path, query.partition("#")[0]


def query_pairs(query: str) -> list[tuple[str, str, str]]:
    """(decoded key, decoded value, raw pair) for every `&`-separated pair."""
    out = []
    for raw in query.split("&"):
        if not raw:
            continue
        key, _, value = raw.partition("=")
        if "%" not in raw and "+" not in raw and raw.isascii():
            out.append((key, value, raw))  # nothing to decode (the common case)
            continue
        out.append(
            (
                unquote_to_bytes(key.replace("+", " ")).decode("latin-1"),
                unquote_to_bytes(value.replace("+", " ")).decode("latin-1"),
                raw,
            )
        )
    return out
