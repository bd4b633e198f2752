"""The management API on AUTHGATE_ADMIN_LISTEN: a Starlette app over `manage.Manager`.

Callers present a `management` token as `Authorization: Bearer <token>` or `X-API-Key`.
What each operation needs, tenancy and the audit are the Manager's; this module reads HTTP
(routes declared once in `ENDPOINTS`, query parameters, a JSON body of at most `MAX_BODY`
bytes) and writes it: every answer is JSON from orjson with `Cache-Control: no-store`,
errors have the /auth shape `{"error": {"code", "message", "details"}}` with the status
`manage.ERRORS` gives the code. This app never answers 500 and never shows a traceback.

`GET /openapi.json` (no token needed) is generated from `ENDPOINTS` and the attribute table
(see openapi.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import tokens
from .config import Settings
from .errors import AuthgateError, InvalidInput, NotFound, Refused, WrongType
from .manage import DEFAULT_LIMIT, ERRORS, Caller, Manager, code_of
from .metrics import Metrics
from .store import TokenStore

log = logging.getLogger("authgate")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 64 * 1024
MAX_QUERY = 4096  # bytes of query string
NO_STORE = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter: its JSON schema and what it means (openapi.py reads these)."""

    name: str
    schema: dict[str, Any]
    help: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation of the API: where it is served and what it takes and answers."""

    operation: str  # a Manager operation, or "openapi"
    method: str
    path: str
    summary: str
    params: tuple[Param, ...] = ()
    body: str | None = None  # components/schemas name of the JSON body
    body_required: bool = False
    status: int = 200
    answer: str = "Token"  # components/schemas name of the answer
    errors: tuple[str, ...] = ()  # codes besides authentication's and UNAVAILABLE

    @property
    def operation_id(self) -> str:
        return {
            "list": "listTokens",
            "show": "showToken",
            "usage": "tokenUsage",
            "audit": "readAudit",
            "create": "createToken",
            "update": "updateToken",
            "rotate": "rotateToken",
            "revoke": "revokeToken",
            "delete": "deleteToken",
        }.get(self.operation, self.operation)


def _int(most: int, default: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": most, "default": default}


LIST_PARAMS = (
    Param("org", {"type": "string"}, "Only this org."),
    Param("project", {"type": "string"}, "Only this project."),
    Param(
        "status",
        {"type": "string", "enum": ["active", "disabled", "expiring", "expired", "revoked"]},
        "Only tokens in this state (`expiring`: active, expiring within 7 days).",
    ),
    Param("name", {"type": "string", "maxLength": 100}, "Only names starting with this."),
    Param("limit", _int(1000, DEFAULT_LIMIT), "At most this many tokens."),
    Param(
        "cursor",
        {"type": "string", "maxLength": 200},
        "`next_cursor` of the previous page (same filters).",
    ),
)  # fmt: skip
_FOUND = ("NOT_FOUND",)
_WRITE = ("BAD_REQUEST", "INVALID_INPUT", "EXCEEDS_CALLER", "RATE_LIMITED")
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "list", "GET", "/v1/tokens",
        "The caller's tokens, newest first, a page at a time (never their values). Needs `r`.",
        LIST_PARAMS, answer="TokenList", errors=("BAD_REQUEST", "INVALID_INPUT"),
    ),
    Endpoint(
        "create", "POST", "/v1/tokens",
        "Create a token inside the caller's scope, at most as powerful as the caller; its "
        "value is in this response only. Needs `w`.",
        body="TokenSpec", body_required=True, status=201, answer="CreatedToken",
        errors=(*_WRITE, "SCOPE_MISMATCH"),
    ),
    Endpoint(
        "show", "GET", "/v1/tokens/{id}", "One token, with its usage totals. Needs `r`.",
        errors=_FOUND,
    ),
    Endpoint(
        "update", "PATCH", "/v1/tokens/{id}",
        "Change name, description, permissions, ip_allowlist, app_ids, expires_at or "
        "enabled; every instance enforces it within 100 ms. Needs `w`.",
        body="TokenPatch", body_required=True, errors=(*_FOUND, *_WRITE),
    ),
    Endpoint(
        "delete", "DELETE", "/v1/tokens/{id}",
        "Delete for good; it stops working at once. Needs `d`.",
        errors=(*_FOUND, "EXCEEDS_CALLER", "RATE_LIMITED"),
    ),
    Endpoint(
        "revoke", "POST", "/v1/tokens/{id}/revoke", "Revoke now (idempotent). Needs `d`.",
        errors=(*_FOUND, "EXCEEDS_CALLER", "RATE_LIMITED"),
    ),
    Endpoint(
        "rotate", "POST", "/v1/tokens/{id}/rotate",
        "Issue a new token with the same attributes; the old one keeps working for `grace`, "
        "then expires. Needs `w`.",
        body="RotateRequest", status=201, answer="CreatedToken", errors=(*_FOUND, *_WRITE),
    ),
    Endpoint(
        "usage", "GET", "/v1/tokens/{id}/usage",
        "Requests per UTC day: allowed, denied by code, last client address. Needs `r`.",
        (Param("days", _int(90, 30), "How many days, today included."),),
        answer="Usage", errors=(*_FOUND, "BAD_REQUEST", "INVALID_INPUT"),
    ),
    Endpoint(
        "audit", "GET", "/v1/audit",
        "The audit events the caller may see, newest first, a page at a time: an environment "
        "token sees all, a scoped one its tenant's tokens' events and its own calls. Needs `r`.",
        (
            Param("count", _int(1000, 50), "At most this many events."),
            Param(
                "cursor",
                {"type": "string", "maxLength": 50},
                "`next_cursor` of the previous page.",
            ),
            Param("token_id", {"type": "string", "maxLength": 40}, "Only this token's events."),
        ),
        answer="AuditList", errors=("BAD_REQUEST", "INVALID_INPUT"),
    ),
    Endpoint("openapi", "GET", "/openapi.json", "This document. No token needed.", answer=""),
)  # fmt: skip
# Path shape -> {method: operation}, derived from ENDPOINTS (`{id}` is one segment).
ROUTES: dict[tuple[str, ...], dict[str, str]] = {}
for _e in ENDPOINTS:
    ROUTES.setdefault(tuple(_e.path.split("/")[1:]), {})[_e.method] = _e.operation


class JSONAnswer(Response):
    """A JSON answer from orjson that no cache keeps."""

    media_type = "application/json"

    def __init__(
        self, content: Any, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        body = content if isinstance(content, bytes) else orjson.dumps(content)
        super().__init__(body, status_code, {**NO_STORE, **(headers or {})})


def error_answer(
    code: str, message: str | None = None, headers: dict[str, str] | None = None, **details: Any
) -> JSONAnswer:
    status, default, _ = ERRORS[code]
    extra = dict(headers or {})
    if status == 401:
        extra["www-authenticate"] = 'Bearer realm="authgate"'
    body = {"error": {"code": code, "message": message or default, "details": details}}
    return JSONAnswer(body, status, extra)


# -- reading a request ------------------------------------------------------------------------
def credentials(request: Request) -> list[str]:
    """Every token value the caller sent (Bearer and X-API-Key), for `Manager.authenticate`."""
    values: list[str] = []
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                values.append(rest.strip().decode("latin-1"))
        elif name == b"x-api-key":
            values.append(value.strip().decode("latin-1"))
    return values


def params(request: Request, allowed: Sequence[Param]) -> dict[str, str]:
    """The query parameters, each at most once, only those the endpoint declares."""
    query: bytes = request.scope.get("query_string", b"")
    if len(query) > MAX_QUERY:
        raise Refused("BAD_REQUEST", f"The query string is longer than {MAX_QUERY} bytes.")
    names = [p.name for p in allowed]
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, max_num_fields=20)
    except ValueError:
        raise Refused("BAD_REQUEST", "Too many query parameters.") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in names:
            hint = f" ({', '.join(names)})" if names else ""
            raise InvalidInput(key, f"is not a query parameter here{hint}")
        if key in out:
            raise InvalidInput(key, "may be given only once")
        if value:
            out[key] = value
    return out


def whole(values: dict[str, str], name: str, default: int) -> int:
    text = values.pop(name, None)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 6:
        raise InvalidInput(name, "must be a whole number")
    return int(text)


async def json_body(request: Request) -> dict[str, Any] | None:
    """The body as a JSON object (None when empty), at most MAX_BODY bytes."""
    too_large = Refused("BAD_REQUEST", f"The body is larger than {MAX_BODY} bytes.", limit=MAX_BODY)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Refused("BAD_REQUEST", "The body is not valid JSON.") from None
    if not isinstance(value, dict):
        raise Refused("BAD_REQUEST", "The body must be a JSON object.")
    return value


# -- the endpoints ----------------------------------------------------------------------------
async def _call(
    manager: Manager, endpoint: Endpoint, caller: Caller, request: Request, token_id: str | None
) -> Any:
    """Read the endpoint's arguments and run its operation."""
    op = endpoint.operation
    named: dict[str, Any] = {}
    try:
        query = params(request, endpoint.params)
        body = await json_body(request) if endpoint.method in ("POST", "PATCH") else None
        if op == "list":
            limit = whole(query, "limit", DEFAULT_LIMIT)
            cursor = query.pop("cursor", None)
            args: tuple[Any, ...] = (query, cursor, limit)
        elif op == "usage":
            args = (whole(query, "days", 30),)
        elif op == "audit":
            args = (whole(query, "count", 50),)
            named = {"before": query.pop("cursor", None), "token_id": query.pop("token_id", None)}
        elif op == "create":
            args = (body or {},)
        elif op in ("update", "rotate"):
            args = (body or {},)
        else:
            args = ()
    except ClientDisconnect:
        raise
    except AuthgateError as exc:
        await manager.failed(caller, op, exc, token_id)
        raise
    method = getattr(manager, op)
    if token_id is not None:
        return await method(caller, token_id, *args)
    return await method(caller, *args, **named)


def _endpoint(manager: Manager, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    if endpoint.operation == "openapi":
        from .openapi import document

        async def openapi(request: Request) -> Response:
            manager.count("openapi", "OK")
            return JSONAnswer(document())

        return openapi

    async def handle(request: Request) -> Response:
        token_id = request.path_params.get("id")
        client = request.client.host if request.client else ""
        caller = await manager.authenticate(credentials(request), client, endpoint.operation)
        result = await _call(manager, endpoint, caller, request, token_id)
        headers = {}
        if endpoint.status == 201:
            headers["location"] = f"/v1/tokens/{result['id']}"
        return JSONAnswer(result, endpoint.status, headers)

    return handle


# -- errors -----------------------------------------------------------------------------------
async def _authgate_error(request: Request, exc: Exception) -> Response:
    code = code_of(exc)
    if isinstance(exc, Refused):
        headers = {}
        if code == "RATE_LIMITED":
            headers["retry-after"] = str(
                max(1, round(float(str(exc.details.get("retry_after", 1)))))
            )
        return error_answer(code, exc.message, headers, **exc.details)
    if isinstance(exc, WrongType):
        return error_answer(
            code, f"{exc.field}: {exc.message}.", field=exc.field, expected=exc.expected
        )
    if isinstance(exc, InvalidInput):
        return error_answer(code, f"{exc.field}: {exc.message}", field=exc.field)
    if isinstance(exc, NotFound):
        token_id = request.path_params.get("id", "")
        if tokens.looks_like_id(token_id):  # anything else a caller put there is not repeated
            return error_answer(code, id=token_id)
        return error_answer(code)
    log.warning("management API: redis unavailable: %s", type(exc.__cause__).__name__)
    return error_answer("UNAVAILABLE")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    manager: Manager = request.app.state.manager
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        manager.count("unknown", "METHOD_NOT_ALLOWED")
        methods = [m.strip() for m in allow.split(",") if m.strip()]
        return error_answer("METHOD_NOT_ALLOWED", headers={"allow": allow}, allowed=methods)
    manager.count("unknown", "NOT_FOUND")
    return error_answer("NOT_FOUND", "No such endpoint.")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("management API: unexpected %s; answering UNAVAILABLE", type(exc).__name__)
    return error_answer("UNAVAILABLE")


async def _disconnected(request: Request, exc: Exception) -> Response:
    return Response(b"", 400)  # nobody is listening any more


def _by_method(
    handlers: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    """One route per path, so a 405 names every method the path allows."""

    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return dispatch


class AdminApp:
    """The ASGI app: the Starlette app inside a last guard (no traceback, no 500)."""

    def __init__(self, app: Starlette, manager: Manager) -> None:
        self.app = app
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            return
        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # answered already by `_unexpected`; only log it
            log.debug("management API: %s after the answer", type(exc).__name__)


def create_admin_app(
    store: TokenStore,
    settings: Settings,
    metrics: Metrics,
    *,
    routes: Sequence[BaseRoute] = (),
) -> AdminApp:
    """The ASGI app for AUTHGATE_ADMIN_LISTEN. `routes` are served beside the API (the web
    console); they find the Manager at `request.app.state.manager`."""
    manager = Manager(store, settings, metrics)
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for e in ENDPOINTS:
        by_path.setdefault(e.path, {})[e.method] = _endpoint(manager, e)
    api: list[BaseRoute] = [
        Route(path, _by_method(handlers), methods=list(handlers))
        for path, handlers in by_path.items()
    ]
    app = Starlette(
        routes=[*api, *routes],
        exception_handlers={
            AuthgateError: _authgate_error,
            HTTPException: _http_error,
            ClientDisconnect: _disconnected,
            Exception: _unexpected,
        },
    )
    app.router.redirect_slashes = False
    app.state.manager = manager
    return AdminApp(app, manager)
