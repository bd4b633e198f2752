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
_LEADING_SPACES = re.compile(r"& +")
_KEY_ENDS = "=&[\x00 "  # what may follow a name at the end of a key


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
        # The first letters of each name, lower-case: no key can fold to it without them;
        # and each name as the folded view can spell it (its '_' also as ' ' or '['),
        # grouped by those letters.
        self._stems = {re.split(r"[_.\-]", n.lower())[0] for n in self.names}
        spellings = {v for n in self.names for v in _spellings(n.lower().translate(_FOLD))}
        self._spellings = {
            "&" + stem: sorted("&" + v for v in spellings if v.startswith(stem))
            for stem in self._stems
        }

    def read(self, query: str, token: str | None) -> tuple[list[str], dict[str, list[str]], str]:
        """(app_id values, token values by source label, the query without its token
        pairs), values decoded. `token`: the one a header carries, if any. Raises
        BadRequest when the query cannot be read safely, or carries the token anywhere
        but in its own parameters (`x=pwt=…`, `??pwt=`, an encoded copy), where it would
        reach the upstream and the logs."""
        if query.count("&") + query.count(";") >= self.max_pairs:
            raise BadRequest(f"query: more than {self.max_pairs} pairs")
        escaped = "%" in query
        if not escaped and token is None:
            lowered = query.lower()
            if not any(stem in lowered for stem in self._stems):
                return [], {}, query  # no key can name app_id or a token parameter
        raw = "&" + query
        apps: list[str] = []
        found: dict[str, list[str]] = {}
        cuts: list[tuple[int, int]] = []  # token pairs, as slices of `raw`
        exact = 0
        for name in self.names:
            marker = "&" + name
            if marker not in raw:
                continue
            if raw.count(marker) > MAX_FOUND:
                raise BadRequest(f"query: more than {MAX_FOUND} keys starting {name!r}")
            at = raw.find(marker)
            while at != -1:
                start = at + len(marker)
                if start == len(raw) or raw[start] in "=&":
                    end = raw.find("&", start)
                    end = len(raw) if end == -1 else end
                    value = _value(raw[start + 1 : end])
                    exact += 1
                    if name == APP_ID:
                        apps.append(value)
                    else:
                        cuts.append((at, end))
                        if value := value.strip():
                            found.setdefault(self.tokens[name], []).append(value)
                at = raw.find(marker, start)
        decoded, view = _views(query)
        if self.strict and self._spelled(view) > exact:
            raise BadRequest("query: a key that some parsers read as app_id or a token parameter")
        if token is None and found:
            token = next(iter(found.values()))[0]
        if token is not None and len(token) >= 24:  # shorter ones are refused anyway
            expected = sum(values.count(token) for values in found.values())
            if query.count(token) > expected or (
                escaped and decoded.count(token.encode("latin-1")) > expected
            ):
                raise BadRequest("query: the token appears outside its own parameter")
        if cuts:
            kept, last = [], 0
            for start, end in cuts:
                kept.append(raw[last:start])
                last = end
            kept.append(raw[last:])
            query = "".join(kept).lstrip("&")
        return apps, found, query

    def _spelled(self, view: str) -> int:
        """How many keys of the query's folded view (`_views`) a common parser reads as
        one of the names, the exact ones included."""
        if "& " in view:
            view = _LEADING_SPACES.sub("&", view)
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
                    count += after == len(view) or view[after] in _KEY_ENDS
                    at = view.find(key, after)
        return count


def _views(query: str) -> tuple[bytes, str]:
    """The query decoded once as form data ('+' a space), and its folded view: decoded,
    lower-case, '.' and '-' as '_', pairs split on '&' and ';', keys ended by '=', where
    decoded '&', ';' and '=' (from %26, %3B, %3D) split nothing. In C: the separators
    become control bytes and '%' becomes '=' for binascii's quoted-printable decoder,
    which reads `=XX`; a '%' that is no escape reads as a plain character."""
    decoded = binascii.a2b_qp(query.encode("latin-1").translate(_RAW))
    return decoded, "&" + decoded.translate(_VIEW).decode("latin-1")


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
