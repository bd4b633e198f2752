"""URIs as nginx routes on them, and the spellings no upstream may read differently.

`normalise` reproduces nginx's `$uri`: every percent-escape decoded once (`%2F` included),
repeated slashes merged, `.` and `..` segments resolved; `%00`, a bad escape or `..` above
the root make nginx answer 400, so they are errors here too. Paths are kept as `str` holding
one character per byte (latin-1), so nothing is lost and re-encoding is exact.

Whatever its length, a path costs a few C-level passes (`unescape`, `re`, `str` methods);
only a path that has dot or empty segments to resolve is walked segment by segment, and
that walk is capped at `MAX_SEGMENTS`.
"""

from __future__ import annotations

import binascii
import re

MAX_SEGMENTS = 128  # of a path whose dot segments must be resolved one by one
# Characters left as they are when the authorised path is encoded again for the upstream.
_SAFE = "/-._~!$&'()*+,;=:@"
_PLAIN = bytes(c for c in range(128) if chr(c).isalnum() or chr(c) in _SAFE)
# encode: each byte as three (itself or '%', then two hex digits or NUL fillers).
_HEX = b"0123456789ABCDEF"
_PERCENT = bytes.maketrans(b"%", b"=")
_FIRST = bytes(c if c in _PLAIN else 0x25 for c in range(256))
_HIGH = bytes(0 if c in _PLAIN else _HEX[c >> 4] for c in range(256))
_LOW = bytes(0 if c in _PLAIN else _HEX[c & 15] for c in range(256))
# Unreserved characters (ALPHA DIGIT - . _ ~), '/' and '\': every upstream decodes an
# escape of one to the character itself, so a raw path in normal form escapes none.
_UNRESERVED = bytes(c for c in range(128) if chr(c).isalnum() or chr(c) in "-._~/\\")
# Each two hex digits, in either case, and the character they escape; `unescape` decodes
# up to _FEW_ESCAPES escapes through it.
_HEX_PAIRS = {
    f"{a}{b}": chr(int(a + b, 16))
    for a in "0123456789abcdefABCDEF"
    for b in "0123456789abcdefABCDEF"
}
_FEW_ESCAPES = 8
# A `.` or `..` segment.
_DOT_SEGMENT = re.compile(r"/\.\.?(?=/|\Z)")


class BadPath(ValueError):
    """nginx would refuse this URI with 400, or authgate will not read it."""


def unescape(text: str) -> str:
    """`text` with every `%XX` decoded once (bytes as latin-1 characters); a '%' not
    followed by two hex digits is an error (nginx answers 400 to such a path). A few
    escapes are decoded one by one (`str.find` finds them), more in C by
    `unescape_loosely`, whose passes cost the whole text's length."""
    at = text.find("%")
    if at == -1:
        return text
    out: list[str] = []
    last = 0
    for _ in range(_FEW_ESCAPES):
        char = _HEX_PAIRS.get(text[at + 1 : at + 3])
        if char is None:
            raise BadPath("invalid percent-escape")
        out += (text[last:at], char)
        last = at + 3
        at = text.find("%", last)
        if at == -1:
            out.append(text[last:])
            return "".join(out)
    decoded = unescape_loosely(text)
    if len(decoded) != len(text) - 2 * text.count("%"):
        raise BadPath("invalid percent-escape")
    return decoded


def unescape_loosely(text: str) -> str:
    """`text` with every valid `%XX` decoded once, in C: binascii's quoted-printable decoder
    reads `=XX`, so literal '=' become `=3D` and '%' become '='. Where a '%' is not an
    escape the result is approximate (that '%' reads as '='); `unescape` refuses those."""
    if "%" not in text:
        return text
    data = text.encode("latin-1")
    if b"=" in data:
        data = data.replace(b"=", b"=3D")
    return binascii.a2b_qp(data.translate(_PERCENT)).decode("latin-1")


def normalise(raw_path: str) -> str:
    """nginx's `$uri` for a raw (still percent-encoded) path without its query."""
    # Single characters first: `in` finds one with memchr, a pair with a slower scan.
    if (
        raw_path.startswith("/")
        and raw_path.isascii()
        and "%" not in raw_path
        and ("." not in raw_path or "/." not in raw_path)
        and "//" not in raw_path
    ):
        return raw_path  # the common case: nothing to do
    if not raw_path.startswith("/"):
        raise BadPath("path must start with '/'")
    decoded = unescape(raw_path)
    if "\x00" in decoded:
        raise BadPath("NUL in path")
    while "//" in decoded:
        decoded = decoded.replace("//", "/")
    if "." not in decoded or "/." not in decoded or _DOT_SEGMENT.search(decoded) is None:
        return decoded
    if decoded.count("/") > MAX_SEGMENTS:
        raise BadPath(f"more than {MAX_SEGMENTS} segments with dot segments to resolve")
    out: list[str] = []
    trailing = False
    for seg in decoded.split("/")[1:]:
        trailing = False
        if seg == "" or seg == ".":
            trailing = True
            continue
        if seg == "..":
            if not out:
                raise BadPath("'..' above the root")
            out.pop()
            trailing = True
            continue
        out.append(seg)
    path = "/" + "/".join(out)
    if trailing and out:
        path += "/"
    return path


def normal_path(raw_path: str) -> str:
    """The decoded path of a raw path already in the normal form authgate judges, or
    BadPath saying why it is not: where the proxy forwards the raw path, an upstream that
    resolves or decodes it itself must read the very path that was judged."""
    if not raw_path.startswith("/"):
        raise BadPath("path must start with '/'")
    if "//" in raw_path:
        raise BadPath("raw path not in normal form: repeated slashes")
    if "." in raw_path and "/." in raw_path and _DOT_SEGMENT.search(raw_path) is not None:
        raise BadPath("raw path not in normal form: a dot segment")
    if "%" not in raw_path:
        return raw_path
    decoded = unescape(raw_path)
    if "\x00" in decoded:
        raise BadPath("NUL in path")
    # Each escape of an unreserved character, '/' or '\' turns one character outside that
    # set ('%') into one inside it: count the characters outside, before and after.
    before = len(raw_path.encode("latin-1").translate(None, _UNRESERVED))
    if before != len(decoded.encode("latin-1").translate(None, _UNRESERVED)):
        raise BadPath(
            "raw path not in normal form: an escaped '/', '\\' or unreserved character "
            "(%2F, %2E, %73 ...)"
        )
    return decoded


def encode(path: str) -> str:
    """The normalised path, percent-encoded again so it reaches the upstream unchanged.
    In C: three bytes per byte, interleaved, then the NUL fillers dropped."""
    data = path.encode("latin-1")
    if not data.translate(None, _PLAIN):  # the common case: nothing to escape
        return path
    out = bytearray(3 * len(data))
    out[0::3] = data.translate(_FIRST)
    out[1::3] = data.translate(_HIGH)
    out[2::3] = data.translate(_LOW)
    return out.translate(None, b"\x00").decode("latin-1")


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
