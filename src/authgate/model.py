"""Token attributes: validation of what a caller asks for, and the stored record.

A record is a plain dict (stored as JSON); `Entry` is its compiled, immutable form
that the hot path keeps in its cache.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from .errors import InvalidInput

_T = TypeVar("_T")

KEY_TYPES = ("r--", "-w-", "--d", "rw-", "r-d", "-wd", "rwd")
# What a caller sets on a token; a rotation copies exactly these to the new token.
ATTRIBUTES = (
    "name", "description", "kind", "key_type", "roles", "org", "project", "space", "feature",
    "user_id", "permissions", "ip_allowlist", "app_ids", "expires_at",
)  # fmt: skip
KINDS = ("query", "management")
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+:\-]{0,127}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_.:\-]{0,63}$")
_SCOPE = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-*]+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_LIST = 64

IDENTITY_FIELDS = ("org", "project", "space", "feature", "user_id")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(field: str, value: Any, *, required: bool, limit: int) -> str:
    if value is None or value == "":
        if required:
            raise InvalidInput(field, "is required")
        return ""
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    if _CONTROL.search(value):
        raise InvalidInput(field, "must not contain control characters or line breaks")
    if len(value) > limit:
        raise InvalidInput(field, f"must be at most {limit} characters")
    return value


def _ident(field: str, value: Any, *, required: bool, pattern: re.Pattern[str] = _IDENT) -> str:
    text = _text(field, value, required=required, limit=128)
    if text and not pattern.match(text):
        extra = "_.-" if pattern is _IDENT else "_.@+:-"
        raise InvalidInput(field, f"{text!r} may hold only letters, digits and {extra}")
    return text


def _list(field: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        raise InvalidInput(field, "must be a list")
    if len(value) > MAX_LIST:
        raise InvalidInput(field, f"must have at most {MAX_LIST} entries")
    return list(value)


def _each(field: str, value: Any, pattern: re.Pattern[str], what: str) -> list[str]:
    out: list[str] = []
    for item in _list(field, value):
        if not isinstance(item, str) or not pattern.match(item.strip()):
            raise InvalidInput(field, f"{item!r} is not a valid {what}")
        if item.strip() not in out:
            out.append(item.strip())
    return out


def validate_spec(spec: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """Check every attribute a caller may set; return the clean values or raise InvalidInput."""
    allowed = {*ATTRIBUTES, "expires_in"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise InvalidInput(unknown[0], "is not a token attribute")
    now = time.time() if now is None else now
    key_type = spec.get("key_type")
    if key_type == "---":
        raise InvalidInput("key_type", "'---' grants nothing; choose at least one of r, w, d")
    if key_type not in KEY_TYPES:
        raise InvalidInput("key_type", f"must be one of {', '.join(KEY_TYPES)}")
    kind = spec.get("kind", "query")
    if kind is None or kind == "":
        kind = "query"
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidInput("kind", "must be 'query' or 'management'")
    networks = []
    for item in _list("ip_allowlist", spec.get("ip_allowlist")):
        try:
            networks.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise InvalidInput("ip_allowlist", f"{item!r} is not an IP address or CIDR") from None
    expires_at = spec.get("expires_at")
    if expires_at is not None:
        if isinstance(expires_at, str):
            try:
                parsed = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
            except ValueError:
                raise InvalidInput("expires_at", "must be an ISO 8601 time") from None
            if parsed.tzinfo is None:
                raise InvalidInput("expires_at", "must carry a time zone (e.g. Z)")
            expires_at = parsed.timestamp()
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise InvalidInput("expires_at", "must be an ISO 8601 time")
        if expires_at <= now:
            raise InvalidInput("expires_at", "must be in the future")
    expires_in = spec.get("expires_in")
    if expires_in is not None:
        if expires_at is not None:
            raise InvalidInput("expires_in", "give expires_in or expires_at, not both")
        if (
            not isinstance(expires_in, int | float)
            or isinstance(expires_in, bool)
            or not (0 < expires_in <= 10 * 365 * 86400)
        ):
            raise InvalidInput("expires_in", "must be a positive duration of at most 10 years")
        expires_at = now + float(expires_in)
    return {
        "name": _text("name", spec.get("name"), required=True, limit=100),
        "description": _text("description", spec.get("description"), required=False, limit=500),
        "kind": kind,
        "key_type": key_type,
        "roles": _each("roles", spec.get("roles"), _ROLE, "role"),
        "org": _ident("org", spec.get("org"), required=True),
        "project": _ident("project", spec.get("project"), required=True),
        "space": _ident("space", spec.get("space"), required=False),
        "feature": _ident("feature", spec.get("feature"), required=False),
        "user_id": _ident("user_id", spec.get("user_id"), required=False, pattern=_USER),
        "permissions": _each("permissions", spec.get("permissions"), _SCOPE, "permission scope"),
        "ip_allowlist": networks,
        "app_ids": _each("app_ids", spec.get("app_ids"), _IDENT, "app id"),
        "expires_at": None if expires_at is None else float(expires_at),
    }


def status_of(record: Mapping[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    if record.get("revoked_at") is not None:
        return "revoked"
    expires_at = record.get("expires_at")
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


def public_view(
    record: Mapping[str, Any], usage: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What lists, shows and the management API return: never the token or its hash."""
    out = {k: v for k, v in record.items() if k != "hash"}
    for key in ("created_at", "expires_at", "revoked_at"):
        out[key] = iso(record.get(key))
    usage = usage or {}
    out["last_used_at"] = iso(usage.get("last_used_at"))
    out["request_count"] = int(usage.get("count", 0))
    out["status"] = status_of(record)
    return out


@dataclass(frozen=True, slots=True)
class Entry:
    """A token record compiled for the hot path.

    Values many tokens have in common (org, project, roles, the identity header pairs, empty
    sets) are shared between entries rather than copied: 100k cached tokens stay small.
    """

    id: str
    kind: str
    environment: str
    key_type: str
    roles: frozenset[str]
    org: str
    project: str
    permissions: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    app_ids: frozenset[str]
    expires_at: float | None
    revoked: bool
    headers: tuple[tuple[bytes, bytes], ...]  # identity headers shared by many tokens
    user_header: tuple[bytes, bytes]  # X-User-Id
    id_header: tuple[bytes, bytes]  # X-Token-Id

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Entry:
        roles = tuple(record.get("roles") or ())
        token_id = record["id"]
        headers = _shared(
            (
                _header(b"X-Org-Id", record["org"]),
                _header(b"X-Project-Id", record["project"]),
                _header(b"X-Space-Id", record.get("space") or ""),
                _header(b"X-Feature-Id", record.get("feature") or ""),
                _header(b"X-User-Roles", ",".join(roles)),
                _header(b"X-Key-Type", record["key_type"]),
            )
        )
        return cls(
            id=token_id,
            kind=_shared(record.get("kind", "query")),
            environment=_shared(record.get("environment", "live")),
            key_type=_shared(record["key_type"]),
            roles=_shared(frozenset(roles)),
            org=_shared(record["org"]),
            project=_shared(record["project"]),
            permissions=_shared(frozenset(record.get("permissions") or ())),
            networks=tuple(
                ipaddress.ip_network(n, strict=False) for n in record.get("ip_allowlist") or ()
            ),
            app_ids=_shared(frozenset(record.get("app_ids") or ())),
            expires_at=record.get("expires_at"),
            revoked=record.get("revoked_at") is not None,
            headers=headers,
            user_header=_header(b"X-User-Id", record.get("user_id") or ""),
            id_header=(b"X-Token-Id", token_id.encode()),
        )


# Shared immutable values for `Entry`; bounded, so distinct values cannot grow it forever.
_SHARED: dict[Any, Any] = {}
_SHARED_MAX = 10_000


def _shared(value: _T) -> _T:
    found = _SHARED.get(value)
    if found is not None:
        return found  # type: ignore[no-any-return]
    if len(_SHARED) < _SHARED_MAX:
        _SHARED[value] = value
    return value


def _header(name: bytes, value: str) -> tuple[bytes, bytes]:
    return _shared((name, value.encode()))


def ip_allowed(
    networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
) -> bool:
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == n.version and address in n for n in networks)
