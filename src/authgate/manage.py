"""The management plane's rules, for every front end (the HTTP API, the web console).

`Manager.authenticate` turns the credentials a caller presented into a `Caller` (a
`management` token that is valid here and now); every operation takes that caller and
returns plain JSON-ready dicts, or raises from the error tree (`Refused`, `InvalidInput`,
`NotFound`, `BackendUnavailable`). `ERRORS` gives each code its status.

Rules enforced here, not in the front ends:
- key type: reads need `r`, create/update/rotate `w`, revoke/delete `d`;
- tenancy: a management token sees and acts on the tokens of its org (and project, and
  space/feature/user when set; `*` is every value); outside that a token does not exist
  for it (NotFound, 404), and creating one there is SCOPE_MISMATCH;
- no growth: a token it creates, rotates or changes is at most as powerful as itself in
  every dimension (key type, kind, roles, permissions, allowlist, apps, expiry), and it
  changes, rotates, revokes or deletes only tokens it could have created;
- the audit: every change is an event; denials and failed calls are events up to a budget
  per caller (`admin_audit_burst`, `admin_audit_rate` per second, per worker), the rest are
  counted in `authgate_admin_audit_suppressed_total`; a change asked for over the budget
  is refused (429 RATE_LIMITED) rather than left unaudited. Reads are counted in metrics
  (`authgate_admin_requests_total`), not written one event each.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import orjson
from prometheus_client import Counter

from . import tokens
from .config import Settings
from .errors import (
    AuthgateError,
    BackendUnavailable,
    InvalidInput,
    NotFound,
    Refused,
    WrongType,
)
from .metrics import Metrics
from .model import (
    BY_NAME,
    MAX_EXPIRY,
    duration,
    exceeds,
    in_scope,
    ip_allowed,
    is_expiring,
    iso,
    outside_scope,
    status_of,
    validate_patch,
    validate_spec,
)
from .store import HISTORY_DAYS, MAX_GRACE, Position, TokenStore

log = logging.getLogger("authgate")

# code -> (HTTP status, message, whether it is a denial: who is calling or what it may do)
ERRORS: dict[str, tuple[int, str, bool]] = {
    "TOKEN_MISSING": (401, "No management token was sent (Bearer or X-API-Key).", True),
    "TOKEN_MISMATCH": (401, "Authorization and X-API-Key carry different tokens.", True),
    "TOKEN_INVALID": (401, "The management token is not valid.", True),
    "TOKEN_EXPIRED": (401, "The management token has expired.", True),
    "TOKEN_DISABLED": (403, "The management token is disabled.", True),
    "IP_NOT_ALLOWED": (403, "The client address is not allowed for this management token.", True),
    "INSUFFICIENT_KEY_TYPE": (403, "The management token's key type does not allow this.", True),
    "SCOPE_MISMATCH": (403, "The token would lie outside this management token's scope.", True),
    "EXCEEDS_CALLER": (403, "A management token cannot hand out more than it holds.", True),
    "RATE_LIMITED": (429, "Too many audited calls from this caller; retry shortly.", True),
    "NOT_FOUND": (404, "No token with that id.", False),
    "METHOD_NOT_ALLOWED": (405, "Method not allowed here.", False),
    "BAD_REQUEST": (400, "The request could not be read.", False),
    "INVALID_INPUT": (422, "A value was refused; nothing was changed.", False),
    "UNAVAILABLE": (503, "Token storage is unavailable; try again shortly.", False),
}  # fmt: skip

# operation -> the key_type flag a management token needs for it
NEEDS: dict[str, str] = {
    "list": "r",
    "show": "r",
    "usage": "r",
    "audit": "r",
    "create": "w",
    "update": "w",
    "rotate": "w",
    "revoke": "d",
    "delete": "d",
}
READS = frozenset(op for op, flag in NEEDS.items() if flag == "r")
FILTERS = ("org", "project", "status", "name")
LIST_STATUSES = ("active", "disabled", "expiring", "expired", "revoked")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_AUDIT = 1000
# Denials of callers without a recognised management token share one budget.
ANONYMOUS = "anonymous"
_BUDGETS_KEPT = 10_000  # callers whose budget is remembered (least recently used dropped)
_CURSOR_INFO = b"authgate management list cursor v1"
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


@dataclass(frozen=True, slots=True)
class Caller:
    """A management token that authenticated for this call, and where it called from."""

    id: str
    display_prefix: str
    record: Mapping[str, Any]  # the stored record, without its hash
    client_ip: str

    @property
    def key_type(self) -> str:
        return str(self.record["key_type"])


@dataclass(slots=True)
class _Bucket:
    """A token bucket: `allowance` events now, refilled at the budget's rate."""

    allowance: float
    at: float
    left_out: int = 0  # since the last event written


@dataclass(slots=True)
class _Budgets:
    burst: float
    rate: float
    buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def take(self, who: str) -> _Bucket | None:
        """The caller's bucket with one event taken from it, or None when it is empty."""
        now = time.monotonic()
        bucket = self.buckets.get(who)
        if bucket is None:
            bucket = self.buckets[who] = _Bucket(self.burst, now)
            if len(self.buckets) > _BUDGETS_KEPT:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(who)
            bucket.allowance = min(self.burst, bucket.allowance + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.allowance < 1.0:
            return None
        bucket.allowance -= 1.0
        return bucket

    def wait(self, who: str) -> float:
        bucket = self.buckets.get(who)
        if bucket is None or self.rate <= 0:
            return 1.0
        return max(0.0, (1.0 - bucket.allowance) / self.rate)


P = ParamSpec("P")
R = TypeVar("R")


def _operation(
    name: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Wrap a Manager method: check the caller's flag, count the result, audit a failure."""

    def wrap(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            self: Manager = args[0]  # type: ignore[assignment]
            caller: Caller = args[1]  # type: ignore[assignment]
            target = args[2] if len(args) > 2 and isinstance(args[2], str) else None
            try:
                self.require(caller, name)
                result = await fn(*args, **kwargs)
            except AuthgateError as exc:
                await self.failed(caller, name, exc, target)
                raise
            self.count(name, "OK")
            return result

        return run

    return wrap


class Manager:
    """The management operations over one `TokenStore`. One per worker: it holds the audit
    budgets and the metrics."""

    def __init__(self, store: TokenStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.prefix = settings.token_prefix
        self.requests = Counter(
            "authgate_admin_requests",
            "Management API calls by operation and result code (OK when it succeeded)",
            ["operation", "code"],
            registry=metrics.registry,
        )
        self.suppressed = Counter(
            "authgate_admin_audit_suppressed",
            "Management-API denials and failed calls left out of the audit stream (over "
            "their caller's budget)",
            registry=metrics.registry,
        )
        self.budgets = _Budgets(float(settings.admin_audit_burst), float(settings.admin_audit_rate))
        self._cursor_key = hmac.digest(settings.pepper.reveal(), _CURSOR_INFO, "sha256")

    # -- who is calling ----------------------------------------------------------------------
    async def authenticate(
        self, credentials: Sequence[str], client_ip: str, operation: str
    ) -> Caller:
        """The management token every value in `credentials` carries (the front end passes
        each one the caller sent), valid for a call to `operation` from `client_ip`.
        Refused (TOKEN_*, IP_NOT_ALLOWED) otherwise; the refusal is audited and counted."""
        presented: str | None = None
        actor: str | None = None
        try:
            values = [v.strip() for v in credentials if v and v.strip()]
            if not values:
                raise Refused("TOKEN_MISSING")
            if len(set(values)) > 1:
                raise Refused("TOKEN_MISMATCH")
            token = values[0]
            if len(token) > self.settings.max_token_length or not tokens.is_well_formed(
                token, self.prefix
            ):
                raise Refused("TOKEN_INVALID")
            presented = tokens.display_prefix(token, self.prefix)
            record = await self.store.record_by_token(token)
            actor = None if record is None else str(record["id"])
            self._admit(record, client_ip)
        except (Refused, BackendUnavailable) as exc:
            await self._failed(actor, presented, operation, exc, None, client_ip)
            raise
        assert record is not None
        return Caller(str(record["id"]), str(record.get("display_prefix", "")), record, client_ip)

    async def authenticate_id(self, token_id: str, client_ip: str, operation: str) -> Caller:
        """`authenticate` for a front end that remembers a signed-in management token by its
        id (the console's session), so the value itself is never kept: the same checks, on
        the current record, every call."""
        try:
            record: dict[str, Any] | None = await self.store.load(token_id)
        except NotFound:
            record = None
        if record is not None:
            record = {k: v for k, v in record.items() if k != "hash"}
        try:
            self._admit(record, client_ip)
        except Refused as exc:
            actor = None if record is None else str(record["id"])
            await self._failed(actor, None, operation, exc, None, client_ip)
            raise
        assert record is not None
        return Caller(str(record["id"]), str(record.get("display_prefix", "")), record, client_ip)

    def _admit(self, record: Mapping[str, Any] | None, client_ip: str) -> None:
        """Refused unless `record` is a management token valid here, now, from `client_ip`."""
        if record is None:
            raise Refused("TOKEN_INVALID")
        if (
            record.get("kind") != "management"
            or record.get("environment", "live") != self.settings.environment
            or record.get("revoked_at") is not None
        ):
            raise Refused("TOKEN_INVALID")
        status = status_of(record)
        if status == "expired":
            raise Refused("TOKEN_EXPIRED", expired_at=iso(record.get("expires_at")))
        if status == "disabled":
            raise Refused("TOKEN_DISABLED")
        allowlist = record.get("ip_allowlist") or []
        if allowlist:
            networks = [ipaddress.ip_network(n, strict=False) for n in allowlist]
            try:
                address = ipaddress.ip_address(client_ip) if client_ip else None
            except ValueError:
                address = None
            if not ip_allowed(networks, address):
                raise Refused("IP_NOT_ALLOWED", client_ip=client_ip)

    def require(self, caller: Caller, operation: str) -> None:
        """Refused INSUFFICIENT_KEY_TYPE unless the caller's key type has the flag."""
        need = NEEDS[operation]
        if need not in caller.key_type:
            raise Refused("INSUFFICIENT_KEY_TYPE", required=need)

    # -- reads -------------------------------------------------------------------------------
    @_operation("list")
    async def list(
        self,
        caller: Caller,
        filters: Mapping[str, str | None] | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> dict[str, Any]:
        """`{"tokens": [...], "next_cursor": str | None}`: the caller's tokens newest first.
        `filters`: org, project (equal), status (LIST_STATUSES), name (prefix, any case).
        `cursor` is a `next_cursor` of the same listing (same caller, same filters)."""
        wanted = check_filters(filters or {})
        _check_count("limit", limit, MAX_LIMIT)
        after = None if cursor is None else self._open_cursor(caller, wanted, cursor)
        matches = matcher(wanted, time.time())

        def keep(record: dict[str, Any]) -> bool:
            return self.visible(caller, record) and matches(record)

        views, position = await self.store.page(after=after, limit=limit, keep=keep)
        next_cursor = None if position is None else self._cursor(caller, wanted, position)
        return {"tokens": views, "next_cursor": next_cursor}

    @_operation("show")
    async def show(self, caller: Caller, token_id: str) -> dict[str, Any]:
        """One token as the caller may see it (with its usage totals)."""
        return await self.store.view(await self._target(caller, token_id))

    @_operation("usage")
    async def usage(self, caller: Caller, token_id: str, days: int = 30) -> dict[str, Any]:
        """`{"id", "days": [{"date", "allowed", "denied": {code: n}, "last_client_ip"}],
        "totals": {...}}`, newest day first, at most 90 days."""
        _check_count("days", days, HISTORY_DAYS)
        record = await self._target(caller, token_id)
        history = await self.store.usage_history(token_id, days)
        view = await self.store.view(record)
        denied: dict[str, int] = {}
        for day in history:
            for code, n in day["denied"].items():
                denied[code] = denied.get(code, 0) + n
        return {
            "id": token_id,
            "days": history,
            "totals": {
                "allowed": sum(d["allowed"] for d in history),
                "denied": dict(sorted(denied.items())),
                "request_count": view["request_count"],
                "last_used_at": view["last_used_at"],
                "last_client_ip": view["last_client_ip"],
            },
        }

    @_operation("audit")
    async def audit(
        self,
        caller: Caller,
        count: int = 50,
        *,
        before: str | None = None,
        token_id: str | None = None,
    ) -> dict[str, Any]:
        """`{"events": [...], "next_cursor": str | None}`, newest first: the events this
        caller may see. An environment token (org `*`) sees every event; a scoped one, the
        events about tokens inside its scope and its own calls. `before` is a
        `next_cursor`; `token_id` keeps one token's events."""
        _check_count("count", count, MAX_AUDIT)
        if before is not None and not _STREAM_ID.fullmatch(str(before)):
            raise InvalidInput("cursor", "is not an audit cursor")
        everything = caller.record.get("org") == "*" and caller.record.get("project") == "*"

        def keep(event: Mapping[str, Any]) -> bool:
            if token_id is not None and event.get("token_id") != token_id:
                return False
            if everything or event.get("actor") == caller.id:
                return True
            scope = event.get("scope")
            return isinstance(scope, dict) and in_scope(caller.record, scope)

        events, next_cursor = await self.store.audit_page(count, before, keep)
        return {"events": events, "next_cursor": next_cursor}

    # -- changes -----------------------------------------------------------------------------
    @_operation("create")
    async def create(self, caller: Caller, body: Mapping[str, Any]) -> dict[str, Any]:
        """A new token from a JSON body of attributes (`expires_in` a duration with a unit);
        the answer holds its value once, as `token`."""
        spec = dict(body)
        if "expires_in" in spec and spec["expires_in"] is not None:
            spec["expires_in"] = duration("expires_in", spec["expires_in"], most=MAX_EXPIRY)
        clean = validate_spec(spec)
        target = {**clean, "environment": self.settings.environment}
        if not in_scope(caller.record, target):
            raise Refused("SCOPE_MISMATCH", field=outside_scope(caller.record, target))
        self._no_growth(caller, target)
        self._spend(caller)
        token, view = await self.store.add(clean, caller.id)
        return {"token": token, **view}

    @_operation("update")
    async def update(
        self, caller: Caller, token_id: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Change name, description, permissions, ip_allowlist, app_ids, expires_at (null
        clears it; or `expires_in`) and enabled. Nothing else, and never beyond what the
        caller could create."""
        patch = dict(body)
        if "expires_in" in patch:
            if patch["expires_in"] is None:
                raise WrongType("expires_in", "a duration with a unit, such as 30d")
            patch["expires_in"] = duration("expires_in", patch["expires_in"], most=MAX_EXPIRY)
        changes = validate_patch(patch)
        await self._target(caller, token_id)
        self._spend(caller)
        return await self.store.update(
            token_id, changes, caller.id, check=lambda new: self._no_growth(caller, new)
        )

    @_operation("rotate")
    async def rotate(
        self, caller: Caller, token_id: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A new token with the same attributes (`body`: `{"grace": "24h"}`, default 0s);
        the old one keeps working for the grace period, then expires."""
        options = dict(body or {})
        unknown = sorted(set(options) - {"grace"})
        if unknown:
            raise InvalidInput(unknown[0], "is not a rotate option (only grace)")
        grace = options.get("grace")
        seconds = 0.0 if grace is None else duration("grace", grace, most=MAX_GRACE)
        await self._target(caller, token_id)
        self._spend(caller)
        token, view = await self.store.rotate(
            token_id, seconds, caller.id, check=lambda old: self._no_growth(caller, old)
        )
        return {"token": token, **view}

    @_operation("revoke")
    async def revoke(self, caller: Caller, token_id: str) -> dict[str, Any]:
        """Revoke now; revoking a revoked token changes nothing (and says so in the audit)."""
        record = await self._target(caller, token_id)
        self._no_growth(caller, record)
        self._spend(caller)
        view = await self.store.revoke(token_id, caller.id)
        if record.get("revoked_at") is not None:  # the store writes no event for a no-op
            await self.store.audit("revoke", caller.id, record, {"already_revoked": True})
        return view

    @_operation("delete")
    async def delete(self, caller: Caller, token_id: str) -> dict[str, Any]:
        """Delete for good; the answer is the token as it was."""
        record = await self._target(caller, token_id)
        self._no_growth(caller, record)
        self._spend(caller)
        return await self.store.delete(token_id, caller.id)

    # -- the rules ---------------------------------------------------------------------------
    def visible(self, caller: Caller, record: Mapping[str, Any]) -> bool:
        """Whether the token exists for this caller: same environment, inside its scope."""
        return record.get("environment", "live") == self.settings.environment and in_scope(
            caller.record, record
        )

    async def _target(self, caller: Caller, token_id: str) -> dict[str, Any]:
        record = await self.store.load(token_id)
        if not self.visible(caller, record):
            raise NotFound(token_id)
        return record

    def _no_growth(self, caller: Caller, target: Mapping[str, Any]) -> None:
        found = exceeds(caller.record, target)
        if found is None:
            return
        name, why = found
        if name == "key_type":
            raise Refused(
                "INSUFFICIENT_KEY_TYPE",
                "A management token cannot hand out key-type flags it lacks.",
                field="key_type",
                required=why,
            )
        raise Refused("EXCEEDS_CALLER", f"{name}: {why}.", field=name)

    def _spend(self, caller: Caller) -> None:
        """One audit event's worth of the caller's budget, or RATE_LIMITED."""
        bucket = self.budgets.take(caller.id)
        if bucket is None:
            self.suppressed.inc()
            raise Refused(
                "RATE_LIMITED", retry_after=round(max(self.budgets.wait(caller.id), 0.1), 1)
            )

    # -- counting and auditing ---------------------------------------------------------------
    def count(self, operation: str, code: str) -> None:
        self.requests.labels(operation, code).inc()

    async def failed(
        self, caller: Caller | None, operation: str, error: Exception, target: str | None
    ) -> None:
        """Count and (within the caller's budget) audit a call that failed: `denied` when
        the caller was not let in or not allowed, `rejected` when its input was refused."""
        actor = None if caller is None else caller.id
        client_ip = "" if caller is None else caller.client_ip
        await self._failed(actor, None, operation, error, target, client_ip)

    async def _failed(
        self,
        actor: str | None,
        presented: str | None,
        operation: str,
        error: Exception,
        target: str | None,
        client_ip: str,
    ) -> None:
        code = code_of(error)
        self.count(operation, code)
        if isinstance(error, BackendUnavailable) or code == "RATE_LIMITED":
            return  # nothing to write to, or already counted as suppressed
        detail: dict[str, Any] = {
            "operation": operation,
            "code": code,
            "status": ERRORS[code][0],
            "client_ip": client_ip,
        }
        if actor is None and presented:
            detail["presented_prefix"] = presented
        details = getattr(error, "details", {})
        if "required" in details:
            detail["required"] = details["required"]
        name = getattr(error, "field", None) or details.get("field")
        if name is not None:
            detail["field"] = name if name in _KNOWN_FIELDS else "(unknown)"
        record = None
        if target is not None and tokens.looks_like_id(target):
            record = {"id": target, "display_prefix": ""}
        who = actor or ANONYMOUS
        bucket = self.budgets.take(who)
        if bucket is None:
            self.budgets.buckets[who].left_out += 1
            self.suppressed.inc()
            return
        if bucket.left_out:
            detail["suppressed_before"] = bucket.left_out  # left out since the last one
            bucket.left_out = 0
        action = "denied" if ERRORS[code][2] else "rejected"
        try:
            await self.store.audit(action, who, record, detail)
        except BackendUnavailable:
            log.warning("management API: could not write the %s audit event", action)

    # -- cursors -----------------------------------------------------------------------------
    def _binding(self, caller: Caller, filters: Mapping[str, Any]) -> bytes:
        return orjson.dumps([caller.id, sorted(filters.items())])

    def _cursor(self, caller: Caller, filters: Mapping[str, Any], position: Position) -> str:
        payload = orjson.dumps([position[0], position[1]])
        mac = hmac.digest(
            self._cursor_key, payload + b"\n" + self._binding(caller, filters), "sha256"
        )
        return _b64(payload) + "." + _b64(mac[:16])

    def _open_cursor(self, caller: Caller, filters: Mapping[str, Any], cursor: Any) -> Position:
        bad = InvalidInput(
            "cursor", "is not a cursor of this listing (changed, or made for other filters)"
        )
        if not isinstance(cursor, str) or len(cursor) > 200 or cursor.count(".") != 1:
            raise bad
        text, _, sig = cursor.partition(".")
        try:
            payload, mac = _unb64(text), _unb64(sig)
        except ValueError:
            raise bad from None
        if _b64(payload) != text or _b64(mac) != sig:  # one encoding only: no spare bits
            raise bad
        want = hmac.digest(
            self._cursor_key, payload + b"\n" + self._binding(caller, filters), "sha256"
        )
        if not hmac.compare_digest(want[:16], mac):
            raise bad
        score, token_id = orjson.loads(payload)
        return float(score), str(token_id)


_KNOWN_FIELDS = frozenset(
    {*BY_NAME, *FILTERS, "expires_in", "grace", "count", "limit", "days", "cursor", "body", "id"}
)


def check_filters(filters: Mapping[str, Any]) -> dict[str, str]:
    """The list filters that are set, checked: InvalidInput for an unknown one or a bad
    status."""
    wanted = {k: v for k, v in filters.items() if v not in (None, "")}
    for name in sorted(wanted):
        if name not in FILTERS:
            raise InvalidInput(name, f"is not a filter ({', '.join(FILTERS)})")
        if not isinstance(wanted[name], str):
            raise WrongType(name, "a string")
    status = wanted.get("status")
    if status is not None and status not in LIST_STATUSES:
        raise InvalidInput("status", f"must be one of {', '.join(LIST_STATUSES)}")
    return wanted


def matcher(filters: Mapping[str, str], now: float) -> Callable[[Mapping[str, Any]], bool]:
    """Whether a record passes `check_filters` output: org and project equal, name starting
    with the given text (any case), status (`expiring`: active, expiring within 7 days)."""
    org, project, status = filters.get("org"), filters.get("project"), filters.get("status")
    name_prefix = (filters.get("name") or "").casefold()

    def matches(record: Mapping[str, Any]) -> bool:
        if org is not None and record.get("org") != org:
            return False
        if project is not None and record.get("project") != project:
            return False
        if name_prefix and not str(record.get("name", "")).casefold().startswith(name_prefix):
            return False
        if status == "expiring":
            return is_expiring(record, now)
        return status is None or status_of(record, now) == status

    return matches


def code_of(error: Exception) -> str:
    """The ERRORS code an error answers with."""
    if isinstance(error, Refused):
        return error.code
    if isinstance(error, WrongType):
        return "BAD_REQUEST"
    if isinstance(error, InvalidInput):
        return "INVALID_INPUT"
    if isinstance(error, NotFound):
        return "NOT_FOUND"
    return "UNAVAILABLE"


def _check_count(name: str, value: Any, most: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongType(name, "a whole number")
    if not 1 <= value <= most:
        raise InvalidInput(name, f"must be a whole number from 1 to {most}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc
