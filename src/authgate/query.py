"""The query as authgate reads it: only the pairs a decision needs, with C-level passes.

A decision needs `app_id` and the token query parameters (`pwt`). `QueryReader` finds
them with `str.find`, and (rule `query_spellings`) refuses any other key that a common
parser reads as one of them: letter case (`APP_ID`: ASP.NET), '.', '-', ' ' or '[' for
'_' and a `[…]` suffix or trailing space (`app.id`, `app+id`, `app_id[]`: PHP, Rails),
percent-encoded letters, leading spaces, and such a key after a ';' (`x=1;app_id=…`:
parsers that split pairs on ';'). No pair is split or decoded in Python unless it is one
of those, and a query with more than `max_query_pairs` pairs is refused: a long query
costs a few passes in C, not one Python step per pair.
"""

from __future__ import annotations

import binascii
import re

from .paths import BadPath, unescape
from .plane import BadRequest

APP_ID = "app_id"
MAX_FOUND = 16  # keys starting with app_id or a token parameter's name
MAX_VALUE = 1024  # characters of an app_id or token value, still encoded
# For `_views`: separators to control bytes, '%' to '=' and '+' to ' ' before decoding;
# after it, decoded separators to \x04 (they split nothing), control bytes back to '&'
# (';' too) and '=', letters to lower case, '.' and '-' to '_'.
_RAW = bytes.maketrans(b"&;=%+", b"\x01\x02\x03= ")
_UPPER = bytes(range(0x41, 0x5B))
_VIEW = bytes.maketrans(b"&;=\x01\x02\x03.-" + _UPPER, b"\x04\x04\x04&&=__" + _UPPER.lower())
_FOLD = str.maketrans({";": "&", ".": "_", "-": "_"})  # a name as the view spells it
_LEADING_SPACES = re.compile(rb"& +")
_APP_MARKER = "&" + APP_ID
_FOLDED = b"%+;[ .-"  # a query without these spells a name only in another letter case
_SPELLED = "query: a key that some parsers read as app_id or a token parameter"
_KEY_ENDS = b"=&[\x00 "  # what may follow a name at the end of a key


class QueryReader:
    """Reads `app_id` and the token parameters of a raw query string.

    `tokens` maps each token query parameter to its source label. With `strict` (the
    `query_spellings` rule), a key spelling one of those names otherwise than exactly,
    after '&' or at the start, is refused; otherwise it is ignored, as a plain parser
    would ignore it."""

    def __init__(self, tokens: dict[str, str], strict: bool, max_pairs: int) -> None:
        self.tokens = tokens
        self.strict = strict
        self.max_pairs = max_pairs
        self.names = [*tokens, APP_ID]
        # ("&name", source label or None for app_id), for str.find on "&" + query
        self._markers = [("&" + n, tokens.get(n)) for n in self.names]
        self._token_markers = [("&" + n, label) for n, label in tokens.items()]
        # The app_id values of recent token-free remainders of queries (no escapes).
        self._seen: dict[str, tuple[str, ...]] = {}
        # The first letters of each name, lower-case: no key can fold to it without them;
        # and each name as the folded view can spell it (its '_' also as ' ' or '['),
        # grouped by those letters.
        self._stems = {re.split(r"[_.\-]", n.lower())[0] for n in self.names}
        spellings = {v for n in self.names for v in _spellings(n.lower().translate(_FOLD))}
        self._spellings = {
            b"&" + stem.encode(): sorted(b"&" + v.encode() for v in spellings if v.startswith(stem))
            for stem in self._stems
        }
        self._lower_markers = [m.encode() for m, _ in self._markers]

    def read(self, query: str, token: str | None) -> tuple[list[str], dict[str, list[str]], str]:
        """(app_id values, token values by source label, the query without its token
        pairs), values decoded. `token`: the one a header carries, if any. Raises
        BadRequest when the query cannot be read safely, or carries the token anywhere
        but in its own parameters (`x=pwt=…`, `??pwt=`, an encoded copy), where it would
        reach the upstream and the logs.

        The token pairs are cut out first; what remains holds no token and is read once
        for app_id and other spellings, and remembered (when short and without escapes)."""
        if query.count("&") + query.count(";") >= self.max_pairs:
            raise BadRequest(f"query: more than {self.max_pairs} pairs")
        raw = "&" + query
        found: dict[str, list[str]] = {}
        rest = raw
        for marker, label in self._token_markers:
            at = rest.find(marker)
            if at == -1:
                continue
            kept: list[str] = []
            last = seen = 0
            while at != -1:
                seen += 1
                if seen > MAX_FOUND:
                    raise BadRequest(f"query: more than {MAX_FOUND} keys starting {marker[1:]!r}")
                start = at + len(marker)
                if start == len(rest) or rest[start] in "=&":
                    end = rest.find("&", start)
                    if end == -1:
                        end = len(rest)
                    value = rest[start + 1 : end]
                    if "%" in value or "+" in value or len(value) > MAX_VALUE:
                        value = _value(value)
                    if value := value.strip():
                        found.setdefault(label, []).append(value)
                    kept.append(rest[last:at])
                    last = end
                    at = rest.find(marker, end)
                else:
                    at = rest.find(marker, start)
            if kept:
                kept.append(rest[last:])
                rest = "".join(kept)
        if token is None and found:
            token = next(iter(found.values()))[0]
        checked = token is not None and len(token) >= 24  # shorter ones are refused anyway
        # A copy of the token holds its last 12 characters (random and checksum): looking
        # for those bounds the search's cost whatever the query, and misses no copy.
        tail = token[-12:] if token is not None else ""
        if checked and tail in rest:
            raise BadRequest("query: the token appears outside its own parameter")
        if not rest:
            return [], found, ""
        escaped = "%" in rest
        # Remembered only when it provably holds no token (checked, no escapes).
        cacheable = checked and not escaped and len(rest) <= 256
        apps = self._seen.get(rest) if cacheable else None
        if apps is None:
            apps, decoded = self._rest(rest, escaped)
            if cacheable:
                if len(self._seen) >= 4096:
                    self._seen.clear()
                self._seen[rest] = apps
            if escaped and checked:
                if decoded is None:
                    decoded = _views(rest[1:])[0]
                if tail.encode("latin-1") in decoded:
                    raise BadRequest("query: the token appears outside its own parameter")
        return list(apps), found, rest[1:]

    def _rest(self, rest: str, escaped: bool) -> tuple[tuple[str, ...], bytes | None]:
        """The app_id values of "&" + a query without token pairs, and that query decoded
        when it had to be; BadRequest (strict) when a key spells app_id or a token
        parameter otherwise than exactly."""
        apps: list[str] = []
        at = rest.find(_APP_MARKER)
        seen = 0
        while at != -1:
            seen += 1
            if seen > MAX_FOUND:
                raise BadRequest(f"query: more than {MAX_FOUND} keys starting {APP_ID!r}")
            start = at + len(_APP_MARKER)
            if start == len(rest) or rest[start] in "=&":
                end = rest.find("&", start)
                if end == -1:
                    end = len(rest)
                apps.append(_value(rest[start + 1 : end]))
            at = rest.find(_APP_MARKER, start)
        decoded = None
        if self.strict:
            data = b"" if escaped else rest.encode("latin-1")
            if escaped or len(data.translate(None, _FOLDED)) != len(data):  # '+', ';', '.' …
                decoded, view = _views(rest[1:])
            else:  # only letter case can spell a name otherwise: look closer if it does
                view = data.lower()
                if not any(m in view for m in self._lower_markers):
                    return tuple(apps), None
            if self._spelled(view) > len(apps):
                raise BadRequest(_SPELLED)
        return tuple(apps), decoded

    def _spelled(self, view: bytes) -> int:
        """How many keys of the query's folded view (`_views`) a common parser reads as
        one of the names, the exact ones included."""
        if b" " in view and b"& " in view:
            view = _LEADING_SPACES.sub(b"&", view)
        count = 0
        for stem, spellings in self._spellings.items():
            if stem not in view:
                continue
            for key in spellings:
                seen = view.count(key)
                if not seen:
                    continue
                if seen > MAX_FOUND:
                    raise BadRequest(f"query: more than {MAX_FOUND} keys starting {key[1:]!r}")
                at = view.find(key)
                while at != -1:
                    after = at + len(key)
                    count += after == len(view) or view[after : after + 1] in _KEY_ENDS
                    at = view.find(key, after)
        return count


def _views(query: str) -> tuple[bytes, bytes]:
    """The query decoded once as form data ('+' a space), and its folded view: decoded,
    lower-case, '.' and '-' as '_', pairs split on '&' and ';', keys ended by '=', where
    decoded '&', ';' and '=' (from %26, %3B, %3D) split nothing. In C: the separators
    become control bytes and '%' becomes '=' for binascii's quoted-printable decoder,
    which reads `=XX`; a '%' that is no escape reads as a plain character."""
    decoded = binascii.a2b_qp(query.encode("latin-1").translate(_RAW))
    return decoded, b"&" + decoded.translate(_VIEW)


def _spellings(name: str) -> list[str]:
    """`name` with each '_' also written ' ' or '[' (PHP turns both into '_')."""
    out = [""]
    for ch in name:
        out = [o + c for o in out for c in ("_", " ", "[")] if ch == "_" else [o + ch for o in out]
    return out


def _value(text: str) -> str:
    """A pair's value decoded as form data; an escape that is not one is refused."""
    if len(text) > MAX_VALUE:
        raise BadRequest(f"query: an app_id or token value longer than {MAX_VALUE}")
    if "+" in text:
        text = text.replace("+", " ")
    try:
        return unescape(text)
    except BadPath:
        raise BadRequest("query: invalid percent-escape in app_id or a token") from None
