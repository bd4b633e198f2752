"""Token attributes, declared once, and the stored record.

`ATTRIBUTE_TABLE` is the one place a token attribute is described: its JSON type, what a
valid value is, its help text, whether a caller sets it at creation, whether it can be
changed later. Validation here, the OpenAPI document (`openapi.py`), the CLI's flags and
its displays (`cli.py`) all read it.

A record is a plain dict (stored as JSON); `Entry` is its compiled, immutable form that
the hot path keeps in its cache.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from .errors import InvalidInput, WrongType

_T = TypeVar("_T")

KEY_TYPES = ("r--", "-w-", "--d", "rw-", "r-d", "-wd", "rwd")
KINDS = ("query", "management")
# `status` of a token; the list filter also knows `expiring` (active, expiring within a week).
STATUSES = ("active", "disabled", "expired", "revoked")
EXPIRING_WITHIN = 7 * 86400.0
MAX_LIST = 64
MAX_EXPIRY = 10 * 365 * 86400.0
WILDCARD = "*"  # a management token's org/project/space: every value

_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+:\-]{0,127}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_.:\-]{0,63}$")
_SCOPE = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-*]+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

Kind = Literal["text", "ident", "choice", "list", "time", "bool"]


@dataclass(frozen=True, slots=True)
class Attribute:
    """One token attribute a caller may set or change."""

    name: str
    kind: Kind
    help: str
    required: bool = False  # at creation
    create: bool = True  # settable at creation
    patch: bool = False  # changeable afterwards (PATCH, `token update`)
    limit: int = 128  # longest text
    choices: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None  # ident, and each list item
    item: str = ""  # what one list entry is, for messages
    wildcard: bool = False  # `*` allowed (management tokens only)
    default: Any = None
    cli: str = ""  # the CLI option when it is not `--<name>`

    @property
    def flag(self) -> str:
        """The CLI option: `--user-id`, `--ip`."""
        return self.cli or "--" + self.name.replace("_", "-")

    @property
    def json_types(self) -> tuple[type, ...]:
        """What JSON value may carry it (a list may also be one comma-separated string)."""
        if self.kind == "list":
            return (list, str)
        if self.kind == "bool":
            return (bool,)
        return (str,)

    @property
    def expected(self) -> str:
        return {
            "list": "an array of strings",
            "bool": "true or false",
            "time": "an ISO 8601 time with a zone",
        }.get(self.kind, "a string")


ATTRIBUTE_TABLE: tuple[Attribute, ...] = (
    Attribute("name", "text", "A name people recognise.", required=True, patch=True, limit=100),
    Attribute("description", "text", "What the token is for.", patch=True, limit=500),
    Attribute(
        "kind", "choice", "`query` (for /auth) or `management` (for this API).",
        choices=KINDS, default="query",
    ),
    Attribute(
        "key_type", "choice",
        "r = GET/HEAD/OPTIONS, w = POST/PUT/PATCH, d = DELETE. `---` is refused.",
        required=True, choices=KEY_TYPES,
    ),
    Attribute(
        "roles", "list", "Roles; `admin` opens the System APIs.", pattern=_ROLE, item="role"
    ),
    Attribute(
        "org", "ident", "Organisation (`*`: every org, management tokens only).",
        required=True, pattern=_IDENT, wildcard=True,
    ),
    Attribute(
        "project", "ident", "Project (`*`: every project, management tokens only).",
        required=True, pattern=_IDENT, wildcard=True,
    ),
    Attribute("space", "ident", "Space (optional).", pattern=_IDENT, wildcard=True),
    Attribute("feature", "ident", "Feature (optional).", pattern=_IDENT),
    Attribute("user_id", "ident", "User the token acts for (optional).", pattern=_USER),
    Attribute(
        "permissions", "list", "Scopes such as `read:assets`.",
        patch=True, pattern=_SCOPE, item="permission scope",
    ),
    Attribute(
        "ip_allowlist", "list", "IPv4/IPv6 addresses and CIDRs; empty: any address.",
        patch=True, item="IP address or CIDR", cli="--ip",
    ),
    Attribute(
        "app_ids", "list", "Shared apps the token is bound to; empty: any app.",
        patch=True, pattern=_IDENT, item="app id", cli="--app-id",
    ),
    Attribute(
        "expires_at", "time", "ISO 8601 with a zone; null: never.", patch=True,
    ),
    Attribute(
        "enabled", "bool", "A disabled token is refused (TOKEN_DISABLED) until enabled again.",
        create=False, patch=True, default=True,
    ),
)  # fmt: skip
BY_NAME: dict[str, Attribute] = {a.name: a for a in ATTRIBUTE_TABLE}
# What a caller sets at creation; a rotation copies these (and `enabled`) to the new token.
ATTRIBUTES = tuple(a.name for a in ATTRIBUTE_TABLE if a.create)
PATCHABLE = tuple(a.name for a in ATTRIBUTE_TABLE if a.patch)
# Inputs that are not attributes: a duration instead of `expires_at`.
EXPIRES_IN_HELP = (
    "A duration with a unit (`90s`, `12h`, `30d`), at most 10 years; not with expires_at."
)
IDENTITY_FIELDS = ("org", "project", "space", "feature", "user_id")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(field: str, value: Any) -> float:
    """An ISO 8601 time with a zone (or epoch seconds from the store) as epoch seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise WrongType(field, "an ISO 8601 time with a zone")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidInput(
                field, "must be an ISO 8601 time (e.g. 2027-01-31T12:00:00Z)"
            ) from None
        if parsed.tzinfo is None:
            raise InvalidInput(field, "must carry a time zone (e.g. Z or +02:00)")
        return parsed.timestamp()
    return float(value)


# -- validation of one value ------------------------------------------------------------------
def check_type(attr: Attribute, value: Any) -> None:
    """JSON type of a value sent for `attr` (None is always allowed): WrongType if not."""
    if value is None:
        return
    if attr.kind == "time":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise WrongType(attr.name, attr.expected)
        return
    if not isinstance(value, attr.json_types) or (
        attr.kind == "list"
        and isinstance(value, list)
        and not all(isinstance(v, str) for v in value)
    ):
        raise WrongType(attr.name, attr.expected)


def _text(attr: Attribute, value: Any) -> str:
    if value is None or value == "":
        if attr.required:
            raise InvalidInput(attr.name, "is required")
        return ""
    if not isinstance(value, str):
        raise WrongType(attr.name, "a string")
    if _CONTROL.search(value):
        raise InvalidInput(attr.name, "must not contain control characters or line breaks")
    if len(value) > attr.limit:
        raise InvalidInput(attr.name, f"must be at most {attr.limit} characters")
    return value


def _ident(attr: Attribute, value: Any) -> str:
    text = _text(attr, value)
    if attr.wildcard and text == WILDCARD:
        return text
    assert attr.pattern is not None
    if text and not attr.pattern.match(text):
        extra = "_.-" if attr.pattern is _IDENT else "_.@+:-"
        raise InvalidInput(attr.name, f"{text!r} may hold only letters, digits and {extra}")
    return text


def _items(attr: Attribute, value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        raise WrongType(attr.name, "an array of strings")
    if len(value) > MAX_LIST:
        raise InvalidInput(attr.name, f"must have at most {MAX_LIST} entries")
    return list(value)


def _list(attr: Attribute, value: Any) -> list[str]:
    out: list[str] = []
    for item in _items(attr, value):
        if not isinstance(item, str):
            raise InvalidInput(attr.name, f"{item!r} is not a valid {attr.item}")
        text = item.strip()
        if attr.pattern is None:  # addresses and networks, kept in their normal form
            try:
                text = str(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise InvalidInput(attr.name, f"{item!r} is not an IP address or CIDR") from None
        elif not attr.pattern.match(text):
            raise InvalidInput(attr.name, f"{item!r} is not a valid {attr.item}")
        if text not in out:
            out.append(text)
    return out


def _choice(attr: Attribute, value: Any) -> str:
    if value is None or value == "":
        if attr.default is not None:
            return str(attr.default)
        if attr.name == "key_type":
            raise InvalidInput(attr.name, f"is required: one of {', '.join(attr.choices)}")
        raise InvalidInput(attr.name, "is required")
    if attr.name == "key_type" and value == "---":
        raise InvalidInput("key_type", "'---' grants nothing; choose at least one of r, w, d")
    if not isinstance(value, str) or value not in attr.choices:
        raise InvalidInput(attr.name, f"must be one of {', '.join(attr.choices)}")
    return value


def _expiry(value: Any, now: float) -> float | None:
    if value is None:
        return None
    expires_at = parse_time("expires_at", value)
    if expires_at <= now:
        raise InvalidInput("expires_at", "must be in the future")
    if expires_at > now + MAX_EXPIRY:
        raise InvalidInput("expires_at", "must be at most 10 years from now")
    return expires_at


_BARE_NUMBER = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")


def duration(field: str, value: Any, *, most: float) -> float:
    """A duration as a caller writes it, with its unit (`90s`, `12h`, `30d`): a bare number
    is refused with a hint, whatever it was meant to count."""
    from .durations import parse_duration

    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise WrongType(field, "a duration with a unit, such as 30d")
    if not isinstance(value, str) or _BARE_NUMBER.match(value):
        n = float(value) if not isinstance(value, str) else float(value.strip())
        raise InvalidInput(field, f"needs a unit: {n:g}s, {n:g}h or {n:g}d?")
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise InvalidInput(field, str(exc)) from None
    if not 0 <= seconds <= most:
        raise InvalidInput(field, f"must be a duration of at most {_span(most)}")
    return seconds


def _span(seconds: float) -> str:
    if seconds >= 365 * 86400:
        return f"{seconds / (365 * 86400):g} years"
    return f"{seconds / 86400:g} days"


def clean_value(attr: Attribute, value: Any, now: float) -> Any:
    """The stored form of one value, or InvalidInput naming the attribute."""
    if attr.kind == "text":
        return _text(attr, value)
    if attr.kind == "ident":
        return _ident(attr, value)
    if attr.kind == "choice":
        return _choice(attr, value)
    if attr.kind == "list":
        return _list(attr, value)
    if attr.kind == "time":
        return _expiry(value, now)
    if not isinstance(value, bool):
        raise WrongType(attr.name, "true or false")
    return value


def _expiry_input(spec: Mapping[str, Any], now: float) -> float | None:
    if spec.get("expires_in") is not None:
        if spec.get("expires_at") is not None:
            raise InvalidInput("expires_in", "give expires_in or expires_at, not both")
        seconds = spec["expires_in"]
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            seconds = duration("expires_in", seconds, most=MAX_EXPIRY)
        if not 0 < seconds <= MAX_EXPIRY:
            raise InvalidInput("expires_in", "must be a positive duration of at most 10 years")
        return now + float(seconds)
    return _expiry(spec.get("expires_at"), now)


def _wildcards(clean: Mapping[str, Any]) -> None:
    """`*` is for management tokens only, and an environment-wide org means every project."""
    for name in ("org", "project", "space"):
        if clean.get(name) == WILDCARD and clean.get("kind") != "management":
            raise InvalidInput(name, "'*' is for management tokens only")
    if clean.get("org") == WILDCARD and clean.get("project") != WILDCARD:
        raise InvalidInput("project", "must be '*' when org is '*'")


def validate_spec(spec: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """Check every attribute of a new token; return the clean values or raise InvalidInput.

    `expires_in` is seconds here (the CLI and the API turn a duration with a unit into it)."""
    allowed = {*ATTRIBUTES, "expires_in"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise InvalidInput(unknown[0], "is not a token attribute")
    now = time.time() if now is None else now
    for attr in ATTRIBUTE_TABLE:
        if attr.create:
            check_type(attr, spec.get(attr.name))
    clean = {
        attr.name: clean_value(attr, spec.get(attr.name), now)
        for attr in ATTRIBUTE_TABLE
        if attr.create and attr.kind != "time"
    }
    clean["expires_at"] = _expiry_input(spec, now)
    _wildcards(clean)
    return clean


def validate_patch(patch: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """The changes a PATCH asks for, cleaned; InvalidInput for an empty patch, an unknown
    field or one that cannot change (the value, kind, key type, roles, scope)."""
    if not patch:
        raise InvalidInput("body", f"names nothing to change (one of {', '.join(PATCHABLE)})")
    for name in sorted(patch):
        if name == "expires_in":
            continue
        attr = BY_NAME.get(name)
        if attr is None:
            raise InvalidInput(name, "is not a token attribute")
        if not attr.patch:
            raise InvalidInput(
                name, "cannot be changed (rotate or create a token instead); "
                f"changeable: {', '.join(PATCHABLE)}",
            )  # fmt: skip
        check_type(attr, patch[name])
    now = time.time() if now is None else now
    out: dict[str, Any] = {}
    for name, value in patch.items():
        if name in ("expires_at", "expires_in"):
            continue
        attr = BY_NAME[name]
        if attr.kind == "bool" and value is None:
            raise WrongType(name, "true or false")
        out[name] = clean_value(attr, value, now)
    if "expires_at" in patch and "expires_in" in patch:
        raise InvalidInput("expires_in", "give expires_in or expires_at, not both")
    if "expires_at" in patch or "expires_in" in patch:
        out["expires_at"] = _expiry_input(patch, now)
    return out


# -- what a token is now ----------------------------------------------------------------------
def status_of(record: Mapping[str, Any], now: float | None = None) -> str:
    """revoked, expired, disabled or active: the first that holds, in /auth's order."""
    now = time.time() if now is None else now
    if record.get("revoked_at") is not None:
        return "revoked"
    expires_at = record.get("expires_at")
    if expires_at is not None and expires_at <= now:
        return "expired"
    if record.get("enabled", True) is False:
        return "disabled"
    return "active"


def is_expiring(record: Mapping[str, Any], now: float) -> bool:
    """Active, and expiring within a week."""
    expires_at = record.get("expires_at")
    return (
        status_of(record, now) == "active"
        and expires_at is not None
        and expires_at <= now + EXPIRING_WITHIN
    )


def public_view(
    record: Mapping[str, Any], usage: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What lists, shows and the management API return: never the token or its hash."""
    out = {k: v for k, v in record.items() if k != "hash"}
    out.setdefault("enabled", True)
    for key in ("created_at", "expires_at", "revoked_at", "updated_at"):
        out[key] = iso(record.get(key))
    usage = usage or {}
    out["last_used_at"] = iso(usage.get("last_used_at"))
    out["last_client_ip"] = usage.get("last_ip")
    out["request_count"] = int(usage.get("count", 0))
    out["status"] = status_of(record)
    return out


# -- what a management token may hand out -----------------------------------------------------
def outside_scope(caller: Mapping[str, Any], target: Mapping[str, Any]) -> str | None:
    """The first identity field in which `target` lies outside the management token
    `caller`'s tenancy, or None: its org, its project unless that is `*`, and its space,
    feature and user when those are set (`*` is every value)."""
    for name in IDENTITY_FIELDS:
        mine = caller.get(name) or ""
        if mine == WILDCARD or (mine == "" and name not in ("org", "project")):
            continue
        if (target.get(name) or "") != mine:
            return name
    return None


def in_scope(caller: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    return outside_scope(caller, target) is None


def exceeds(caller: Mapping[str, Any], target: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first dimension in which `target` would be more powerful than the management token
    `caller` (field, why), or None when the caller could have minted it: key type, kind,
    roles, permissions, allowlist, app binding, expiry. Scope is `in_scope`'s question."""
    flags = set(target.get("key_type", "")) - {"-"}
    missing = flags - set(caller.get("key_type", ""))
    if missing:
        return "key_type", "".join(sorted(missing))
    if target.get("kind") not in KINDS:
        return "kind", "unknown kind"
    for name in ("roles", "permissions"):
        extra = set(target.get(name) or ()) - set(caller.get(name) or ())
        if extra:
            return name, ", ".join(sorted(extra))
    mine = [ipaddress.ip_network(n, strict=False) for n in caller.get("ip_allowlist") or ()]
    if mine:
        theirs = [ipaddress.ip_network(n, strict=False) for n in target.get("ip_allowlist") or ()]
        if not theirs:
            return "ip_allowlist", "an empty allowlist allows every address"
        for net in theirs:
            if not any(net.version == m.version and net.subnet_of(m) for m in mine):  # type: ignore[arg-type]
                return "ip_allowlist", f"{net} is outside the caller's allowlist"
    apps = set(caller.get("app_ids") or ())
    if apps:
        theirs_apps = set(target.get("app_ids") or ())
        if not theirs_apps:
            return "app_ids", "no binding means every app"
        if theirs_apps - apps:
            return "app_ids", ", ".join(sorted(theirs_apps - apps))
    limit = caller.get("expires_at")
    if limit is not None:
        expires_at = target.get("expires_at")
        if expires_at is None:
            return "expires_at", f"must expire by {iso(limit)}"
        if expires_at > limit:
            return "expires_at", f"must expire by {iso(limit)}"
    return None


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
    enabled: bool = True

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
            enabled=record.get("enabled", True) is not False,
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
