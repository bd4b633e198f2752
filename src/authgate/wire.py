"""The wire encoding of answers: the only module that knows header lines and CRLF.

Header names are sent in canonical case (`X-Org-Id`, `Content-Length`): ingress-nginx's
Lua and Envoy's header allow-lists compare them case-sensitively.

An allowed answer carries the identity headers (SPEC §2) and, for the data-plane server,
its header lines already encoded (`Headers.encoded`); the lines many tokens share are
encoded once. A denial is the JSON error body, or on the nginx dialects an empty 401/403
with the real status and the body in `X-Authgate-*` headers (`fold`).
"""

from __future__ import annotations

import orjson

from .decisions import MESSAGES, NGINX_FOLD
from .model import Entry
from .plane import Answer, Decision

# Control characters but the tab: none may reach a response header (CR/LF would split it).
_CONTROLS = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
IDENTITY_BLOCKS = 4096  # identity header sets (shared by many tokens) kept encoded
_LENGTH_0 = b"\r\nContent-Length: 0"
_BODIES: dict[str, bytes] = {}  # error bodies without details, made once per code


class Headers(list[tuple[bytes, bytes]]):
    """Response headers that also carry their HTTP/1.1 form, `encoded`: the `name: value`
    lines joined by CRLF, without control characters. Made for allowed answers, whose
    identity lines that many tokens share are encoded once; the data-plane server writes
    `encoded`."""

    __slots__ = ("encoded",)
    encoded: bytes


def safe_lines(data: bytes, breaks: int) -> bool:
    """Whether the only control characters in `data` (header lines) are `breaks` CR LF
    pairs, the ones that end or join its lines: then no value can split the response."""
    return len(data) - len(data.translate(None, _CONTROLS)) == 2 * breaks


class AnswerWriter:
    """Turns decisions into answers; keeps the encoded identity blocks."""

    def __init__(self) -> None:
        # id(Entry.headers) -> (those headers, their lines encoded, or None when a value holds
        # a control character). The headers are kept to tell a reused id apart; they are
        # shared by every token of the same org, project, roles … (`model._shared`).
        self._blocks: dict[int, tuple[tuple[tuple[bytes, bytes], ...], bytes | None]] = {}

    def allowed(self, entry: Entry, uri: bytes, query: bytes, path_encoded: bool = False) -> Answer:
        """200 with the identity headers, the authorised URI and the clean query (the end
        of the URI). `path_encoded`: the URI's path is `paths.encode`'s, which holds no control
        character, so only the query is checked."""
        items = [
            *entry.headers,
            entry.user_header,
            entry.id_header,
            (b"X-Authgate-Uri", uri),
            (b"X-Authgate-Query", query),
            (b"Content-Length", b"0"),
        ]
        block = self._identity_block(entry.headers)
        (user_name, user), (id_name, token_id) = entry.user_header, entry.id_header
        sent = query if path_encoded else uri
        if block is None or not safe_lines(user + token_id + sent, 0) or not uri.endswith(query):
            return (200, items, b"")  # the server's own check refuses it
        encoded = Headers(items)
        encoded.encoded = b"".join(
            (
                block,
                user_name,
                b": ",
                user,
                b"\r\n",
                id_name,
                b": ",
                token_id,
                b"\r\nX-Authgate-Uri: ",
                uri,
                b"\r\nX-Authgate-Query: ",
                query,
                _LENGTH_0,
            )
        )
        return (200, encoded, b"")

    @staticmethod
    def denied(decision: Decision, fold: bool) -> Answer:
        """The error answer; folded to what nginx's auth_request accepts when `fold`."""
        body = error_body(decision)
        if not fold:
            return json_answer(decision.status, body)
        headers = [
            (b"X-Authgate-Status", str(decision.status).encode()),
            (b"X-Authgate-Error", body),
            (b"Content-Length", b"0"),
        ]
        return (NGINX_FOLD[decision.status], headers, b"")

    def _identity_block(self, pairs: tuple[tuple[bytes, bytes], ...]) -> bytes | None:
        """Shared identity header lines (`Entry.headers`), each ending in CRLF."""
        found = self._blocks.get(id(pairs))
        if found is not None and found[0] is pairs:
            return found[1]
        lines = b"".join([name + b": " + value + b"\r\n" for name, value in pairs])
        block = lines if safe_lines(lines, len(pairs)) else None
        if len(self._blocks) >= IDENTITY_BLOCKS:
            self._blocks.clear()
        self._blocks[id(pairs)] = (pairs, block)
        return block


def error_body(decision: Decision) -> bytes:
    """`{"error": {"code", "message", "details"}}` for a denial."""
    if not decision.details:
        body = _BODIES.get(decision.code)
        if body is None:
            body = _BODIES[decision.code] = _dump(decision)
        return body
    return _dump(decision)


def _dump(decision: Decision) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "code": decision.code,
                "message": MESSAGES[decision.code],
                "details": decision.details,
            }
        }
    )


def json_answer(status: int, body: bytes) -> Answer:
    return (
        status,
        [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())],
        body,
    )
