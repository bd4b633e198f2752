"""The management API on AUTHGATE_ADMIN_LISTEN: tokens and the audit stream over HTTP.

Callers present a `management` token as `Authorization: Bearer <token>` or `X-API-Key`.
Reads need key type `r`, create and rotate `w`, revoke and delete `d`; the token's IP
allowlist applies to the peer address. Every call and every denial is an audit event that
names the caller by token id (never by value). Errors have the /auth shape,
`{"error": {"code", "message", "details"}}`, and are decided here, at the boundary: this app
never answers 500 and never shows a traceback.

`GET /openapi.json` (no token needed) describes all of it; see openapi.py.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from prometheus_client import Counter

from . import tokens
from .config import Settings
from .durations import parse_duration
from .errors import BackendUnavailable, InvalidInput, NotFound
from .metrics import Metrics
from .model import KEY_TYPES, ip_allowed, iso, status_of
from .openapi import ERROR_CODES, LIST_FIELDS, TEXT_FIELDS, document
from .store import TokenStore

log = logging.getLogger("authgate")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 64 * 1024
# Denials of callers without a recognised management token, written to the audit stream per
# worker: a burst, then a steady rate. Past that they are counted, not written, so that
# nobody who can reach the port can push the lifecycle events out of the capped stream.
ANONYMOUS_AUDIT_BURST = 100
ANONYMOUS_AUDIT_RATE = 10.0  # events per second
MAX_LIMIT = 1000

# Operation -> the key_type flag a management token needs for it.
NEEDS = {
    "list": "r",
    "show": "r",
    "audit": "r",
    "create": "w",
    "rotate": "w",
    "revoke": "d",
    "delete": "d",
}
# Path shape -> {method: operation}. `{id}` matches one segment.
ROUTES: dict[tuple[str, ...], dict[str, str]] = {
    ("v1", "tokens"): {"GET": "list", "POST": "create"},
    ("v1", "tokens", "{id}"): {"GET": "show", "DELETE": "delete"},
    ("v1", "tokens", "{id}", "revoke"): {"POST": "revoke"},
    ("v1", "tokens", "{id}", "rotate"): {"POST": "rotate"},
    ("v1", "audit"): {"GET": "audit"},
    ("openapi.json",): {"GET": "openapi"},
}
# Field names an audit event may repeat; anything else a caller sent is not echoed there.
_KNOWN_FIELDS = frozenset(
    {*TEXT_FIELDS, *LIST_FIELDS, "expires_in", "grace", "count", "limit", "status", "body"}
)

MESSAGES = {
    "TOKEN_MISSING": "No management token was sent (Authorization: Bearer or X-API-Key).",
    "TOKEN_MISMATCH": "Authorization and X-API-Key carry different tokens.",
    "TOKEN_INVALID": "The management token is not valid.",
    "TOKEN_EXPIRED": "The management token has expired.",
    "IP_NOT_ALLOWED": "The client address is not allowed for this management token.",
    "INSUFFICIENT_KEY_TYPE": "The management token's key type does not allow this call.",
    "UNAVAILABLE": "Token storage is unavailable; try again shortly.",
}


class ApiError(Exception):
    """An answer other than success. `denial` marks authentication/authorization failures."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str | None = None,
        *,
        denial: bool = False,
        actor: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(code)
        assert code in ERROR_CODES
        self.status = status
        self.code = code
        self.message = message or MESSAGES.get(code, code)
        self.denial = denial
        self.actor = actor
        self.details = details


class _Disconnected(Exception):
    """The client went away while sending its body."""


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated management token."""

    id: str
    display_prefix: str
    key_type: str


@dataclass(slots=True)
class Call:
    """One request as the API sees it."""

    scope: Scope
    receive: Receive
    operation: str
    token_id: str | None
    client: str
    caller: Caller | None = None
    presented_prefix: str | None = None


@dataclass(slots=True)
class Reply:
    status: int
    body: Any
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class AdminApp:
    """The raw ASGI app; `create_admin_app` builds it."""

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
            "Denials of callers without a recognised management token left out of the audit "
            "stream (over the rate limit)",
            registry=metrics.registry,
        )
        self._allowance = float(ANONYMOUS_AUDIT_BURST)
        self._allowance_at = time.monotonic()
        self._left_out = 0  # since the last anonymous denial written

    # -- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.handle(scope, receive, guarded_send)
        except _Disconnected:
            return
        except Exception as exc:  # the boundary: an answer, never a 500 or a traceback
            log.error("management API: unexpected %s; answering UNAVAILABLE", type(exc).__name__)
            if not started:
                await _send_error(send, ApiError(503, "UNAVAILABLE"))

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        operation, token_id, allowed = _match(scope["path"], method)
        if operation is None:
            if allowed:
                error = ApiError(
                    405, "METHOD_NOT_ALLOWED", "Method not allowed here.", allowed=allowed
                )
                self.requests.labels("unknown", error.code).inc()
                await _send_error(send, error, [(b"allow", ", ".join(allowed).encode())])
            else:
                self.requests.labels("unknown", "NOT_FOUND").inc()
                await _send_error(send, ApiError(404, "NOT_FOUND", "No such endpoint."))
            return
        if operation == "openapi":
            self.requests.labels(operation, "OK").inc()
            await _send_json(send, 200, document())
            return
        client = scope.get("client")
        call = Call(scope, receive, operation, token_id, client[0] if client else "")
        try:
            call.caller = await self.authenticate(call)
            reply = await getattr(self, "op_" + operation)(call)
        except ApiError as exc:
            error = exc
        except InvalidInput as exc:
            error = ApiError(422, "INVALID_INPUT", f"{exc.field}: {exc.message}", field=exc.field)
        except NotFound:
            known = token_id is not None and tokens.looks_like_id(token_id)
            error = ApiError(404, "NOT_FOUND", "No token with that id.")
            if known:  # anything else a caller put there is not repeated back
                error.details["id"] = token_id
        except BackendUnavailable as exc:
            log.warning(
                "management API: redis unavailable during %s: %s",
                operation,
                type(exc.__cause__).__name__,
            )
            error = ApiError(503, "UNAVAILABLE")
        else:
            self.requests.labels(operation, "OK").inc()
            await _send_json(send, reply.status, orjson.dumps(reply.body), reply.headers)
            return
        self.requests.labels(operation, error.code).inc()
        await self.audit_failure(call, error)
        await _send_error(send, error)

    # -- who is calling ----------------------------------------------------------------------
    async def authenticate(self, call: Call) -> Caller:
        values: list[bytes] = []
        for name, value in call.scope["headers"]:
            if name == b"authorization":
                scheme, _, rest = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    values.append(rest.strip())
            elif name == b"x-api-key":
                values.append(value.strip())
        values = [v for v in values if v]
        if not values:
            raise ApiError(401, "TOKEN_MISSING", denial=True)
        if len(set(values)) > 1:
            raise ApiError(401, "TOKEN_MISMATCH", denial=True)
        token = values[0].decode("latin-1")
        if len(token) > self.settings.max_token_length or not tokens.is_well_formed(
            token, self.prefix
        ):
            raise ApiError(401, "TOKEN_INVALID", denial=True)
        call.presented_prefix = tokens.display_prefix(token, self.prefix)
        record = await self.store.record_by_token(token)
        if record is None:
            raise ApiError(401, "TOKEN_INVALID", denial=True)
        actor = str(record["id"])
        if (
            record.get("kind") != "management"
            or record.get("environment", "live") != self.settings.environment
            or record.get("revoked_at") is not None
        ):
            raise ApiError(401, "TOKEN_INVALID", denial=True, actor=actor)
        if status_of(record) == "expired":
            raise ApiError(
                401,
                "TOKEN_EXPIRED",
                denial=True,
                actor=actor,
                expired_at=iso(record.get("expires_at")),
            )
        allowlist = record.get("ip_allowlist") or []
        if allowlist:
            networks = [ipaddress.ip_network(n, strict=False) for n in allowlist]
            try:
                address = ipaddress.ip_address(call.client) if call.client else None
            except ValueError:
                address = None
            if not ip_allowed(networks, address):
                raise ApiError(
                    403, "IP_NOT_ALLOWED", denial=True, actor=actor, client_ip=call.client
                )
        need = NEEDS[call.operation]
        key_type = str(record["key_type"])
        if need not in key_type:
            raise ApiError(403, "INSUFFICIENT_KEY_TYPE", denial=True, actor=actor, required=need)
        return Caller(actor, str(record.get("display_prefix", "")), key_type)

    def no_escalation(self, caller: Caller, key_type: Any) -> None:
        """A management token hands out management tokens only with flags it holds."""
        if key_type not in KEY_TYPES:
            return  # validate_spec explains what is wrong with it
        missing = sorted(set(key_type) - set(caller.key_type) - {"-"})
        if missing:
            raise ApiError(
                403,
                "INSUFFICIENT_KEY_TYPE",
                "A management token cannot grant a management token flags it lacks.",
                denial=True,
                actor=caller.id,
                required="".join(missing),
            )

    # -- operations --------------------------------------------------------------------------
    async def op_create(self, call: Call) -> Reply:
        assert call.caller is not None
        spec = await _read_json(call) or {}
        _check_types(spec)
        if isinstance(spec.get("expires_in"), str):
            spec["expires_in"] = _duration("expires_in", spec["expires_in"])
        if spec.get("kind") == "management":
            self.no_escalation(call.caller, spec.get("key_type"))
        token, view = await self.store.create(spec, call.caller.id)
        return Reply(201, {"token": token, **view}, _location(view["id"]))

    async def op_list(self, call: Call) -> Reply:
        assert call.caller is not None
        params = _params(call, ("org", "project", "status", "limit"))
        limit = _int_param(params, "limit", MAX_LIMIT)
        rows = await self.store.list_tokens(
            org=params.get("org"),
            project=params.get("project"),
            status=params.get("status"),
            limit=limit,
        )
        filters = {k: v for k, v in params.items() if k != "limit"}
        await self.store.audit(
            "list", call.caller.id, None, {"filters": filters, "count": len(rows)}
        )
        return Reply(200, {"tokens": rows})

    async def op_show(self, call: Call) -> Reply:
        assert call.caller is not None and call.token_id is not None
        view = await self.store.show(call.token_id)
        await self.store.audit("show", call.caller.id, view)
        return Reply(200, view)

    async def op_revoke(self, call: Call) -> Reply:
        assert call.caller is not None and call.token_id is not None
        before = await self.store.show(call.token_id)
        view = await self.store.revoke(call.token_id, call.caller.id)
        if before["revoked_at"] is not None:  # the store writes no event for a no-op
            await self.store.audit("revoke", call.caller.id, view, {"already_revoked": True})
        return Reply(200, view)

    async def op_rotate(self, call: Call) -> Reply:
        assert call.caller is not None and call.token_id is not None
        body = await _read_json(call) or {}
        unknown = sorted(set(body) - {"grace"})
        if unknown:
            raise InvalidInput(unknown[0], "is not a rotate option (only grace)")
        grace = body.get("grace", 0)
        if isinstance(grace, str):
            grace = _duration("grace", grace)
        elif not isinstance(grace, int | float) or isinstance(grace, bool):
            raise _wrong_type("grace", "a duration string or a number of seconds")
        target = await self.store.show(call.token_id)
        if target["kind"] == "management":
            self.no_escalation(call.caller, target["key_type"])
        token, view = await self.store.rotate(call.token_id, float(grace), call.caller.id)
        return Reply(201, {"token": token, **view}, _location(view["id"]))

    async def op_delete(self, call: Call) -> Reply:
        assert call.caller is not None and call.token_id is not None
        return Reply(200, await self.store.delete(call.token_id, call.caller.id))

    async def op_audit(self, call: Call) -> Reply:
        assert call.caller is not None
        params = _params(call, ("count",))
        count = _int_param(params, "count", 50)
        events = await self.store.audit_events(count)
        await self.store.audit("audit", call.caller.id, None, {"count": count})
        return Reply(200, {"events": events})

    # -- audit of failures -------------------------------------------------------------------
    async def audit_failure(self, call: Call, error: ApiError) -> None:
        """`denied` when the caller was not let in, `rejected` when its call failed."""
        actor = call.caller.id if call.caller is not None else error.actor or "anonymous"
        detail: dict[str, Any] = {
            "operation": call.operation,
            "method": call.scope["method"],
            "code": error.code,
            "status": error.status,
            "client_ip": call.client,
        }
        if error.denial and call.caller is None and call.presented_prefix and not error.actor:
            detail["presented_prefix"] = call.presented_prefix
        for key in ("required", "field"):
            if key in error.details:
                value = error.details[key]
                detail[key] = value if key != "field" or value in _KNOWN_FIELDS else "(unknown)"
        target = None
        if call.token_id is not None and tokens.looks_like_id(call.token_id):
            target = {"id": call.token_id, "display_prefix": ""}
        action = "denied" if error.denial else "rejected"
        if call.caller is None:
            if not self._anonymous_allowed():
                self._left_out += 1
                self.suppressed.inc()
                return
            if self._left_out:
                detail["suppressed_before"] = self._left_out  # left out since the last one
                self._left_out = 0
        try:
            await self.store.audit(action, actor, target, detail)
        except BackendUnavailable:
            log.warning("management API: could not write the %s audit event", action)

    def _anonymous_allowed(self) -> bool:
        now = time.monotonic()
        self._allowance = min(
            float(ANONYMOUS_AUDIT_BURST),
            self._allowance + (now - self._allowance_at) * ANONYMOUS_AUDIT_RATE,
        )
        self._allowance_at = now
        if self._allowance < 1.0:
            return False
        self._allowance -= 1.0
        return True


def create_admin_app(store: TokenStore, settings: Settings, metrics: Metrics) -> AdminApp:
    """The ASGI app for AUTHGATE_ADMIN_LISTEN."""
    return AdminApp(store, settings, metrics)


# -- helpers ----------------------------------------------------------------------------------
def _match(path: str, method: str) -> tuple[str | None, str | None, list[str]]:
    """(operation, token id, methods allowed on this path); operation None when no match."""
    segments = tuple(path.split("/")[1:])
    token_id = None
    if len(segments) in (3, 4) and segments[:2] == ("v1", "tokens") and segments[2]:
        token_id = segments[2]
        segments = ("v1", "tokens", "{id}", *segments[3:])
    methods = ROUTES.get(segments)
    if methods is None:
        return None, None, []
    operation = methods.get(method)
    return operation, token_id, sorted(methods) if operation is None else []


def _location(token_id: str) -> list[tuple[bytes, bytes]]:
    return [(b"location", f"/v1/tokens/{token_id}".encode())]


def _wrong_type(name: str, expected: str) -> ApiError:
    return ApiError(
        400, "BAD_REQUEST", f"{name}: must be {expected}.", field=name, expected=expected
    )


def _duration(name: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidInput(name, str(exc)) from None


def _check_types(spec: dict[str, Any]) -> None:
    """JSON types of the create body: a wrong type is a BAD_REQUEST naming the field."""
    for name, value in spec.items():
        if value is None:
            continue
        if name in TEXT_FIELDS and not isinstance(value, str):
            raise _wrong_type(name, "a string")
        if name in LIST_FIELDS and not (
            isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise _wrong_type(name, "an array of strings")
        if name == "expires_in" and (
            not isinstance(value, str | int | float) or isinstance(value, bool)
        ):
            raise _wrong_type(name, "a duration string or a number of seconds")


async def _read_json(call: Call) -> dict[str, Any] | None:
    """The request body as a JSON object (None when empty), at most MAX_BODY bytes."""
    too_large = ApiError(
        400, "BAD_REQUEST", f"The body is larger than {MAX_BODY} bytes.", limit=MAX_BODY
    )
    for name, value in call.scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await call.receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks)
    if not raw.strip():
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "BAD_REQUEST", "The body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise ApiError(400, "BAD_REQUEST", "The body must be a JSON object.")
    return value


def _params(call: Call, allowed: tuple[str, ...]) -> dict[str, str]:
    query = call.scope.get("query_string", b"").decode("latin-1")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=20)
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", "Too many query parameters.") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise InvalidInput(key, f"is not a query parameter here ({', '.join(allowed)})")
        if key in out:
            raise InvalidInput(key, "may be given only once")
        if value:
            out[key] = value
    return out


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidInput(name, f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(
    send: Send, error: ApiError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps(
        {"error": {"code": error.code, "message": error.message, "details": error.details}}
    )
    extra = list(headers or [])
    if error.status == 401:
        extra.append((b"www-authenticate", b'Bearer realm="authgate"'))
    await _send_json(send, error.status, body, extra)
