"""The query as authgate reads it: only the pairs a decision needs, with C-level passes.

A decision needs `app_id` and the token query parameters (`pwt`). `QueryReader` finds
them with one regular-expression scan for '&' and a name, and (rule `query_spellings`)
refuses any other key that a common parser reads as one of them: letter case (`APP_ID`:
ASP.NET), '.', '-', ' ' or '[' for '_' and a `[…]` suffix or trailing space (`app.id`,
`app+id`, `app_id[]`: PHP, Rails), percent-encoded letters, leading spaces, and such a
key after a ';' (`x=1;app_id=…`: parsers that split pairs on ';'). No pair is split or
decoded in Python unless it is one of those, and a query with more than
`max_query_pairs` pairs is refused: a long query costs a few passes in C, not one Python
step per pair."""

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
# A query without escapes as `_views` would view it: both tables at once.
_PLAIN = bytes(_VIEW[_RAW[i]] for i in range(256))
_FOLD = str.maketrans({";": "&", ".": "_", "-": "_"})  # a name as the view spells it
_SPELLED = "query: a key that some parsers read as app_id or a token parameter"


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
        # Longest first, so a match names the longest name the key starts with.
        self.names = sorted([*tokens, APP_ID], key=len, reverse=True)
        self._labels = [tokens.get(n) for n in self.names]  # None for app_id
        # Keys starting with a name: one C-level scan whose cost does not depend on what
        # the values hold (its only literal prefix, '&', is looked for byte by byte).
        self._keys = re.compile("&(?:" + "|".join(f"({re.escape(n)})" for n in self.names) + ")")
        # Keys of the folded view (`_views`) a common parser reads as a name: the name with
        # each '_' also ' ' or '[', after leading spaces, before '=', '&', '[', NUL, ' ' or
        # the end.
        spellings = {v for n in self.names for v in _spellings(n.lower().translate(_FOLD))}
        longest_first = sorted(spellings, key=lambda v: (-len(v), v))
        alternatives = b"|".join(re.escape(v.encode()) for v in longest_first)
        self._spelled = re.compile(b"& *(?:" + alternatives + rb")(?=[=&\[\x00 ]|\Z)")
        # Token-free remainders of queries without escapes that passed the spelling check.
        self._passed: set[str] = set()

    def read(self, query: str, token: str | None) -> tuple[list[str], dict[str, list[str]], str]:
        """(app_id values, token values by source label, the query without its token
        pairs), values decoded. `token`: the one a header carries, if any. Raises
        BadRequest when the query cannot be read safely, or carries the token anywhere
        but in its own parameters (`x=pwt=…`, `??pwt=`, an encoded copy), where it would
        reach the upstream and the logs.

        One scan finds the keys starting with a name; the token pairs are cut out; what
        remains holds no token and is checked once for other spellings of the names (and
        remembered when short and without escapes)."""
        if "&" not in query and ";" not in query:  # one pair: the token's, often
            key, _, value = query.partition("=")
            label = self.tokens.get(key)
            if label is not None:
                value = _value(value).strip()
                return [], {label: [value]} if value else {}, ""
        pairs = query.count("&")
        if ";" in query:
            pairs += query.count(";")
        if pairs >= self.max_pairs:
            raise BadRequest(f"query: more than {self.max_pairs} pairs")
        raw = "&" + query
        found: dict[str, list[str]] = {}
        apps: list[str] = []
        kept: list[str] = []
        last = 0
        seen = [0] * len(self.names)
        search = self._keys.search
        match = search(raw)
        while match is not None:
            index = match.lastindex - 1  # type: ignore[operator]
            seen[index] += 1
            if seen[index] > MAX_FOUND:
                raise BadRequest(
                    f"query: more than {MAX_FOUND} keys starting {self.names[index]!r}"
                )
            at, start = match.span()
            match = search(raw, start)
            if start != len(raw) and raw[start] not in "=&":
                continue  # another key (`pwtx`, `app_id[]`): the spelling check reads it
            end = raw.find("&", start)
            if end == -1:
                end = len(raw)
            label = self._labels[index]
            if label is None:
                apps.append(_value(raw[start + 1 : end]))
                continue
            if value := _value(raw[start + 1 : end]).strip():
                found.setdefault(label, []).append(value)
            kept.append(raw[last:at])
            last = end
        rest = raw
        if kept:
            kept.append(raw[last:])
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
            return apps, found, ""
        escaped = "%" in rest
        if escaped and (checked or self.strict):
            decoded, view = _views(rest[1:])
            if checked and tail.encode("latin-1") in decoded:
                raise BadRequest("query: the token appears outside its own parameter")
        if not self.strict:
            return apps, found, rest[1:]
        if not escaped:
            # Remembered only when it provably holds no token (checked, no escapes).
            if len(rest) <= 256 and rest in self._passed:
                return apps, found, rest[1:]
            view = rest.encode("latin-1").translate(_PLAIN)
        if len(self._spelled.findall(view)) > len(apps):
            raise BadRequest(_SPELLED)
        if checked and not escaped and len(rest) <= 256:
            if len(self._passed) >= 4096:
                self._passed.clear()
            self._passed.add(rest)
        return apps, found, rest[1:]


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
