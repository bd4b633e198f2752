"""What the data plane's modules share: the ASGI types, a request as read, a decision.

It sits below `reading` (a request becomes an `AuthRequest`), `authorizer` (an
`AuthRequest` becomes a `Decision`) and `wire` (a `Decision` becomes bytes), so none of
them imports another for its types.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .decisions import CODES
from .model import Entry

log = logging.getLogger("authgate")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
MAX_HEADERS = 100  # request headers; more are refused (431 by the server, 400 otherwise)


@dataclass(slots=True)
class AuthRequest:
    method: str
    path: str  # normalised, as nginx's $uri
    query: str  # raw query string
    client_ip: IPAddress | None
    candidates: dict[str, list[str]]  # source label -> values found
    fold: bool = False  # nginx dialect: 404/503 travel as 401/403 + headers
    app_ids: list[str] = field(default_factory=list)  # the query's app_id values, decoded
    forward_query: str = ""  # the query without its token parameters, for the upstream
    raw_path: str = ""  # the raw path, when it was found in normal form (raw dialects)


@dataclass(slots=True)
class Decision:
    status: int
    code: str  # "OK" when allowed
    check: int  # SPEC §2 row that decided; 0 when allowed
    details: dict[str, Any] = field(default_factory=dict)
    entry: Entry | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 200


def deny(code: str, check: int, **details: Any) -> Decision:
    return Decision(CODES[code], code, check, details)


class BadRequest(Exception):
    """The request cannot be read as every common upstream would read it (400)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
