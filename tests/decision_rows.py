"""The client requests every proxy suite sends, and the decision-table denials they must
reach the client as: one table for nginx and for each proxy in front of authgate. Token
names refer to the tokens each suite creates (`ro`, `rw`, `expiring`, …); `via` names the
proxy instance or site a request goes through (`redis_down`: an authgate without Redis,
`authgate_down`: an address nothing answers on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

SCOPED = "/minimal/api/rest/v1/acme/tunes/items"
SYSTEM = "/minimal/api/system/health"
APPS = "/minimal/rest/apps/v1/data"
REPORTS = "/minimal/api/reports/q1"  # needs permission read:reports (the suites' routes)
OTHER = "/minimal/api/status"  # no route: class default


@dataclass(frozen=True)
class Call:
    """One client request."""

    path: str
    method: str = "GET"
    header: str | None = None  # token name sent in X-Power-Token
    pwt: tuple[str, ...] = ()  # token names sent as pwt parameters, in order
    query: str = ""  # other query parameters
    via: str = "main"  # the proxy instance or site


def both(name: str, path: str = SCOPED, **kw: Any) -> Call:
    """A request carrying token `name` in both default sources."""
    return Call(path, header=name, pwt=(name,), **kw)


# Every denial of the decision table, as the client must see it through any proxy.
DENIED = [
    pytest.param(Call(SCOPED), 401, "TOKEN_MISSING", id="missing"),
    pytest.param(Call(SCOPED, header="ro"), 401, "TOKEN_MISSING", id="both-mode-missing-pwt"),
    pytest.param(Call(SCOPED, pwt=("ro",)), 401, "TOKEN_MISSING", id="both-mode-missing-header"),
    pytest.param(Call(SCOPED, header="ro", pwt=("rw",)), 401, "TOKEN_MISMATCH", id="mismatch"),
    pytest.param(
        Call(SCOPED, header="ro", pwt=("ro", "rw")), 401, "TOKEN_MISMATCH", id="mismatch-two-pwt"
    ),
    pytest.param(both("short"), 404, "TOKEN_INVALID", id="malformed-length"),
    pytest.param(both("bad_checksum"), 404, "TOKEN_INVALID", id="malformed-checksum"),
    pytest.param(both("other_prefix"), 404, "TOKEN_INVALID", id="malformed-other-prefix"),
    pytest.param(both("never_created"), 404, "TOKEN_INVALID", id="unknown"),
    pytest.param(both("deleted"), 404, "TOKEN_INVALID", id="unknown-deleted"),
    pytest.param(both("revoked"), 404, "TOKEN_INVALID", id="revoked"),
    pytest.param(both("expiring"), 401, "TOKEN_EXPIRED", id="expired"),
    pytest.param(both("ip_denied"), 403, "IP_NOT_ALLOWED", id="ip-not-allowed"),
    pytest.param(
        both("ro", "/minimal/api/rest/v1/other/tunes/items"),
        403,
        "SCOPE_MISMATCH",
        id="scope-mismatch-org",
    ),
    pytest.param(
        both("app", APPS, query="app_id=app-2"), 403, "SCOPE_MISMATCH", id="scope-mismatch-app"
    ),
    pytest.param(
        both("ro", method="POST"), 403, "INSUFFICIENT_KEY_TYPE", id="key-type-post-read-only"
    ),
    pytest.param(
        both("rw", method="DELETE"), 403, "INSUFFICIENT_KEY_TYPE", id="key-type-delete-no-d"
    ),
    pytest.param(
        both("rwd", method="PROPFIND"), 403, "INSUFFICIENT_KEY_TYPE", id="key-type-other-method"
    ),
    pytest.param(both("ro", SYSTEM), 403, "ADMIN_REQUIRED", id="admin-required"),
    pytest.param(both("ro", REPORTS), 403, "INSUFFICIENT_PERMISSIONS", id="permissions"),
    pytest.param(both("ro", via="redis_down"), 503, "UNAVAILABLE", id="redis-unavailable"),
    pytest.param(both("ro", via="authgate_down"), 503, "UNAVAILABLE", id="authgate-unreachable"),
]


# Requests every proxy must let through to the upstream.
ALLOWED = [
    pytest.param(both("ro"), id="read-scoped"),
    pytest.param(both("ro", method="HEAD"), id="head"),
    pytest.param(both("ro", method="OPTIONS"), id="options"),
    pytest.param(both("rw", method="POST"), id="write"),
    pytest.param(both("rwd", method="DELETE"), id="delete"),
    pytest.param(both("admin", SYSTEM), id="system-admin"),
    pytest.param(both("perm", REPORTS), id="permissions"),
    pytest.param(both("ip_ok"), id="ip-allowed"),
    pytest.param(both("app", APPS, query="app_id=app-1"), id="app-bound"),
    pytest.param(both("ro", APPS, query="app_id=any"), id="app-unbound-token"),
    pytest.param(both("ro", OTHER), id="default-route"),
]


# A client's own proxy headers, each naming another request than the one it sends: the
# request must be judged as sent (`code`), whatever the spoofed header says.
SPOOFED_ORIGINAL = [
    pytest.param(both("ro", SYSTEM), ("X-Original-URI", SCOPED), "ADMIN_REQUIRED", id="uri"),
    pytest.param(
        both("ro", SYSTEM), ("X-Original-URL", f"http://x{SCOPED}"), "ADMIN_REQUIRED", id="url"
    ),
    pytest.param(
        both("ro", SYSTEM), ("X-Forwarded-Uri", SCOPED), "ADMIN_REQUIRED", id="forwarded-uri"
    ),
    pytest.param(
        both("ro", method="POST"),
        ("X-Original-Method", "GET"),
        "INSUFFICIENT_KEY_TYPE",
        id="method",
    ),
    pytest.param(
        both("ro", method="POST"),
        ("X-Forwarded-Method", "GET"),
        "INSUFFICIENT_KEY_TYPE",
        id="forwarded-method",
    ),
]
