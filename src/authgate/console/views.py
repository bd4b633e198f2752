"""The console's pages: Starlette routes that render Jinja2 templates.

Every page reads and writes through the management service (`manage`), with the signed-in
management token as the caller, so the console shows and does exactly what the management
API would let that token see and do: a scoped token sees its tenant only, an `r--` token
gets no write controls, and a forged form post is refused by the service all the same.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import AuthgateError
from . import chart
from .service import ConsoleApi, ConsoleCaller, ServiceError
from .session import COOKIE, Session, SessionStore

HERE = Path(__file__).parent
MAX_FORM = 16 * 1024
STATUSES = ("active", "disabled", "expiring", "expired", "revoked")
PAGE = 50
USAGE_DAYS = 30

# Headers on every console response. The CSP allows the console's own script and
# stylesheet only: no inline script or style anywhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _when(value: Any) -> str:
    """An ISO timestamp or epoch seconds as `YYYY-MM-DD HH:MM UTC`; empty when None."""
    if value in (None, ""):
        return ""
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(float(value), UTC)
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


class Console:
    """State shared by the pages: the service, the sessions and the templates."""

    def __init__(self, api: ConsoleApi, sessions: SessionStore, root: str = "/console") -> None:
        self.api = api
        self.sessions = sessions
        self.root = root
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = _when

    # -- rendering --------------------------------------------------------------------------
    def page(
        self,
        name: str,
        request: Request,
        status: int = 200,
        **context: Any,
    ) -> Response:
        # A signed-in page's caller and CSRF token, set by the `page` decorator.
        context.setdefault("caller", getattr(request.state, "caller", None))
        context.setdefault("csrf", getattr(request.state, "csrf", None))
        caller: ConsoleCaller | None = context["caller"]
        context.setdefault("root", self.root)
        if caller is not None:
            context.setdefault("can", caller.can)
        html = self.templates.get_template(name).render(**context)
        return Response(html, status, media_type="text/html")

    def error_page(self, request: Request, error: ServiceError, **context: Any) -> Response:
        return self.page("error.html", request, error.status, error=error, **context)

    # -- sessions ---------------------------------------------------------------------------
    async def signed_in(self, request: Request) -> tuple[Session, ConsoleCaller] | None:
        session = await self.sessions.load(request.cookies.get(COOKIE))
        if session is None:
            return None
        caller = await self.api.caller_by_id(session.token_id, client_ip(request))
        if caller is None:  # revoked, disabled, expired, or another address now
            await self.sessions.end(session)
            return None
        return session, caller


Handler = Callable[[Request, Console, Session, ConsoleCaller], Awaitable[Response]]


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every response of the wrapped app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in self._headers}

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = [*kept, *self._headers]
            await send(message)

        await self.app(scope, receive, with_headers)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _to_login(console: Console, request: Request) -> Response:
    response = RedirectResponse(f"{console.root}/login", 303)
    response.delete_cookie(COOKIE, path=console.root)
    return response


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body, at most MAX_FORM bytes; a repeated field is refused."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise ServiceError(415, "BAD_REQUEST", "Forms are sent urlencoded.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise ServiceError(413, "BAD_REQUEST", "The form is too large.")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise ServiceError(400, "BAD_REQUEST", "The form could not be read.") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise ServiceError(400, "BAD_REQUEST", f"The form repeats {key}.", field=key)
        form[key] = value
    return form


def page(method: str = "GET") -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A signed-in page. POSTs must carry the session's CSRF token; the service's errors
    are shown in the page with their code and message."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            console: Console = request.app.state.console
            try:
                found = await console.signed_in(request)
            except AuthgateError:
                return console.error_page(request, ServiceError.unavailable())
            if found is None:
                return _to_login(console, request)
            session, caller = found
            request.state.caller, request.state.csrf = caller, session.csrf
            try:
                if method == "POST":
                    form = await read_form(request)
                    if not SessionStore.csrf_ok(session, form.get("csrf")):
                        raise ServiceError(
                            403, "CSRF_REJECTED", "The form's CSRF token is missing or wrong."
                        )
                    request.state.form = form
                return await handler(request, console, session, caller)
            except ServiceError as error:
                return console.error_page(request, error)
            except AuthgateError as exc:
                return console.error_page(request, ServiceError.from_error(exc))

        return endpoint

    return wrap


# -- sign in and out ---------------------------------------------------------------------------
async def login_form(request: Request) -> Response:
    console: Console = request.app.state.console
    return _login_page(console, request)


def _login_page(
    console: Console, request: Request, error: ServiceError | None = None, status: int = 200
) -> Response:
    # Double-submit CSRF for the sign-in form: a random value in a short-lived cookie and
    # in the form, which another site can neither read nor set.
    login_csrf = secrets.token_urlsafe(24)
    response = console.page(
        "login.html",
        request,
        status,
        error=error,
        login_csrf=login_csrf,
        session_minutes=int(console.sessions.ttl // 60),
    )
    response.set_cookie(
        COOKIE + "_login",
        login_csrf,
        max_age=600,
        path=console.root,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def login(request: Request) -> Response:
    console: Console = request.app.state.console
    try:
        form = await read_form(request)
        sent = form.get("csrf", "")
        expected = request.cookies.get(COOKIE + "_login", "")
        if not sent or not secrets.compare_digest(sent, expected):
            raise ServiceError(403, "CSRF_REJECTED", "The sign-in form expired; try again.")
        caller = await console.api.sign_in(form.get("token", ""), client_ip(request))
        session = await console.sessions.create(caller.caller.id)
    except ServiceError as error:
        return _login_page(console, request, error, error.status)
    except AuthgateError as exc:
        failure = ServiceError.from_error(exc)
        return _login_page(console, request, failure, failure.status)
    response = RedirectResponse(f"{console.root}/tokens", 303)
    response.set_cookie(
        COOKIE,
        console.sessions.cookie_value(session),
        max_age=int(console.sessions.ttl),
        path=console.root,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(COOKIE + "_login", path=console.root)
    return response


@page("POST")
async def logout(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    await console.sessions.end(session)
    return _to_login(console, request)


async def home(request: Request) -> Response:
    console: Console = request.app.state.console
    return RedirectResponse(f"{console.root}/tokens", 303)


# -- tokens ----------------------------------------------------------------------------------
def _filters(request: Request) -> dict[str, str]:
    out = {}
    for name in ("status", "org", "project", "name"):
        value = request.query_params.get(name, "").strip()
        if value:
            out[name] = value
    return out


@page()
async def tokens(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    filters = _filters(request)
    cursor = request.query_params.get("cursor") or None
    items, next_cursor = await console.api.tokens(caller, filters, cursor, PAGE)
    base = f"{console.root}/tokens"
    next_url = f"{base}?{urlencode({**filters, 'cursor': next_cursor})}" if next_cursor else None
    first_url = f"{base}?{urlencode(filters)}" if cursor else None
    return console.page(
        "tokens.html",
        request,
        nav="tokens",
        tokens=items,
        filters=filters,
        statuses=STATUSES,
        next_url=next_url,
        first_url=first_url,
    )


_LIST_FIELDS = ("roles", "permissions", "ip_allowlist", "app_ids")
_CREATE_FIELDS = (
    "name", "description", "kind", "org", "project", "space", "key_type", "user_id",
    "expires_in", *_LIST_FIELDS,
)  # fmt: skip
_EDIT_FIELDS = ("name", "description", "permissions", "ip_allowlist", "app_ids", "expires_at")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]


def _new_form(
    console: Console,
    request: Request,
    session: Session,
    caller: ConsoleCaller,
    values: dict[str, str],
    error: ServiceError | None = None,
) -> Response:
    return console.page(
        "new.html",
        request,
        error.status if error else 200,
        once=secrets.token_urlsafe(18),
        nav="new",
        values=values,
        error=error,
        kinds=("query", "management"),
        key_types=console.api.key_types,
    )


@page()
async def new_token_form(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    caller.need("w")
    values = {
        "kind": "query",
        "key_type": "r--",
        "org": "" if caller.org == "*" else caller.org,
        "project": "" if caller.project == "*" else caller.project,
        "space": "" if caller.space in ("", "*") else caller.space,
    }
    return _new_form(console, request, session, caller, values)


@page("POST")
async def new_token(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    form: dict[str, str] = request.state.form
    values = {k: form.get(k, "") for k in _CREATE_FIELDS}
    spec: dict[str, Any] = {}
    for name in _CREATE_FIELDS:
        value = values[name].strip()
        if not value:
            continue
        spec[name] = _split(value) if name in _LIST_FIELDS else value
    if not await console.sessions.spend(form.get("once")):
        error = ServiceError(409, "ALREADY_SUBMITTED", "This form was already submitted.")
        return _new_form(console, request, session, caller, values, error)
    try:
        value, token = await console.api.create(caller, spec)
    except ServiceError as error:
        return _new_form(console, request, session, caller, values, error)
    return console.page(
        "secret.html",
        request,
        201,
        heading="Token created",
        value=value,
        token=token,
        grace=None,
    )


def _attributes(token: dict[str, Any]) -> list[tuple[str, str]]:
    def show(value: Any) -> str:
        if value in (None, "", []):
            return "—"
        if isinstance(value, list):
            return ", ".join(str(v) for v in value)
        return str(value)

    rows = [
        ("Description", show(token.get("description"))),
        ("Kind", show(token.get("kind"))),
        ("Key type", show(token.get("key_type"))),
        ("Roles", show(token.get("roles"))),
        ("Org", show(token.get("org"))),
        ("Project", show(token.get("project"))),
        ("Space", show(token.get("space"))),
        ("Feature", show(token.get("feature"))),
        ("User id", show(token.get("user_id"))),
        ("Permissions", show(token.get("permissions"))),
        ("IP allowlist", show(token.get("ip_allowlist"))),
        ("App ids", show(token.get("app_ids"))),
        ("Environment", show(token.get("environment"))),
        ("Enabled", "yes" if token.get("enabled", True) else "no"),
        ("Created", _when(token.get("created_at")) or "—"),
        ("Created by", show(token.get("created_by"))),
        ("Expires", _when(token.get("expires_at")) or "never"),
        ("Revoked", _when(token.get("revoked_at")) or "—"),
        ("Last used", _when(token.get("last_used_at")) or "never"),
    ]
    return rows


@page()
async def token_page(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    token_id = request.path_params["token_id"]
    token = await console.api.show(caller, token_id)
    days = await console.api.usage(caller, token_id, USAGE_DAYS)
    events = await console.api.token_audit(caller, token_id)
    allowed = sum(int(d.get("allowed") or 0) for d in days)
    denied = sum(sum(int(n) for n in (d.get("denied") or {}).values()) for d in days)
    last_ip = next((d["last_client_ip"] for d in reversed(days) if d.get("last_client_ip")), None)
    return console.page(
        "token.html",
        request,
        nav="tokens",
        token=token,
        attributes=_attributes(token),
        chart=Markup(chart.usage_svg(days)),  # noqa: S704 - built from numbers and escaped text
        legend=chart.LEGEND,
        usage_days=USAGE_DAYS,
        usage_totals={"allowed": allowed, "denied": denied, "last_ip": last_ip},
        events=events,
    )


def _edit_values(token: dict[str, Any]) -> dict[str, str]:
    values = {}
    for name in _EDIT_FIELDS:
        value = token.get(name)
        if isinstance(value, list):
            values[name] = ", ".join(value)
        else:
            values[name] = "" if value is None else str(value)
    return values


@page()
async def edit_form(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    caller.need("w")
    token = await console.api.show(caller, request.path_params["token_id"])
    return console.page(
        "edit.html",
        request,
        nav="tokens",
        token=token,
        values=_edit_values(token),
    )


@page("POST")
async def edit(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    token_id = request.path_params["token_id"]
    form: dict[str, str] = request.state.form
    token = await console.api.show(caller, token_id)
    before = _edit_values(token)
    patch: dict[str, Any] = {}
    for name in _EDIT_FIELDS:
        if name not in form or form[name].strip() == before[name]:
            continue
        value = form[name].strip()
        if name in _LIST_FIELDS:
            patch[name] = _split(value)
        elif name == "expires_at":
            patch[name] = value or None
        else:
            patch[name] = value
    if not patch:
        return _redirect(console, request, token_id)
    try:
        await console.api.update(caller, token_id, patch)
    except ServiceError as error:
        values = {**before, **{k: form.get(k, before[k]) for k in _EDIT_FIELDS}}
        return console.page(
            "edit.html",
            request,
            error.status,
            nav="tokens",
            token=token,
            values=values,
            error=error,
        )
    return _redirect(console, request, token_id)


def _redirect(console: Console, request: Request, token_id: str) -> Response:
    return RedirectResponse(f"{console.root}/tokens/{token_id}", 303)


def _switch(enabled: bool) -> Handler:
    async def handler(
        request: Request, console: Console, session: Session, caller: ConsoleCaller
    ) -> Response:
        token_id = request.path_params["token_id"]
        await console.api.update(caller, token_id, {"enabled": enabled})
        return _redirect(console, request, token_id)

    return handler


disable = page("POST")(_switch(False))
enable = page("POST")(_switch(True))


@page("POST")
async def rotate(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    token_id = request.path_params["token_id"]
    form: dict[str, str] = request.state.form
    token = await console.api.show(caller, token_id)
    grace = form.get("grace", "").strip() or "0s"
    if form.get("confirm") != "yes":
        caller.need("w")
        return console.page(
            "confirm.html",
            request,
            token=token,
            action="rotate",
            question=f"Rotate {token['name']}?",
            consequence=f"A new value is issued; the current one stops working after {grace}.",
            button="Rotate",
            extra={"grace": grace, "once": secrets.token_urlsafe(18)},
        )
    if not await console.sessions.spend(form.get("once")):
        raise ServiceError(409, "ALREADY_SUBMITTED", "This rotation was already submitted.")
    value, new = await console.api.rotate(caller, token_id, grace)
    return console.page(
        "secret.html",
        request,
        201,
        heading="Token rotated",
        value=value,
        token=new,
        grace=grace if grace not in ("0", "0s") else None,
    )


def _final(action: str, question: str, consequence: str, button: str) -> Handler:
    """Revoke or delete: a confirmation page first, then the call."""

    async def handler(
        request: Request, console: Console, session: Session, caller: ConsoleCaller
    ) -> Response:
        token_id = request.path_params["token_id"]
        form: dict[str, str] = request.state.form
        if form.get("confirm") != "yes":
            caller.need("d")
            token = await console.api.show(caller, token_id)
            return console.page(
                "confirm.html",
                request,
                token=token,
                action=action,
                question=question.format(name=token["name"]),
                consequence=consequence,
                button=button,
                extra={},
            )
        if action == "revoke":
            await console.api.revoke(caller, token_id)
            return _redirect(console, request, token_id)
        await console.api.delete(caller, token_id)
        return RedirectResponse(f"{console.root}/tokens", 303)

    return handler


revoke = page("POST")(
    _final("revoke", "Revoke {name}?", "It stops working at once. This cannot be undone.", "Revoke")
)
delete = page("POST")(
    _final(
        "delete",
        "Delete {name}?",
        "It stops working at once and disappears from every list. This cannot be undone.",
        "Delete",
    )
)


@page()
async def audit(
    request: Request, console: Console, session: Session, caller: ConsoleCaller
) -> Response:
    cursor = request.query_params.get("cursor") or None
    events, next_cursor = await console.api.audit(caller, cursor, PAGE)
    base = f"{console.root}/audit"
    return console.page(
        "audit.html",
        request,
        nav="audit",
        events=events,
        next_url=f"{base}?{urlencode({'cursor': next_cursor})}" if next_cursor else None,
        first_url=base if cursor else None,
    )


async def not_found(request: Request, exc: Exception) -> Response:
    console: Console = request.app.state.console
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    error = ServiceError(
        status,
        "NOT_FOUND" if status == 404 else "METHOD_NOT_ALLOWED",
        "No such page." if status == 404 else "Method not allowed here.",
    )
    return console.page("error.html", request, status, error=error)


def create_console(api: ConsoleApi, sessions: SessionStore, root: str = "/console") -> Starlette:
    """The console as a Starlette app, to mount at `root` on the management listener."""
    tid = "/tokens/{token_id:str}"
    routes = [
        Route("/", home),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/tokens", tokens, methods=["GET"]),
        Route("/tokens/new", new_token_form, methods=["GET"]),
        Route("/tokens/new", new_token, methods=["POST"]),
        Route(tid, token_page, methods=["GET"]),
        Route(tid + "/edit", edit_form, methods=["GET"]),
        Route(tid + "/edit", edit, methods=["POST"]),
        Route(tid + "/disable", disable, methods=["POST"]),
        Route(tid + "/enable", enable, methods=["POST"]),
        Route(tid + "/rotate", rotate, methods=["POST"]),
        Route(tid + "/revoke", revoke, methods=["POST"]),
        Route(tid + "/delete", delete, methods=["POST"]),
        Route("/audit", audit, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.console = Console(api, sessions, root)
    return app
