"""The data plane: `/auth` and `/ext-authz/…`, read top to bottom.

A request becomes an `AuthRequest` (dialect, method, normalised path, query, client IP,
token candidates); `Authorizer.decide` runs the SPEC §2 checks in order and the first
failing one answers. Nothing here raises to the server: every outcome is a decision.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .cache import TokenCache
from .config import Route, Settings
from .decisions import CODES, MESSAGES, METHOD_FLAG, NGINX_FOLD
from .errors import BackendUnavailable
from .metrics import Metrics
from .model import Entry, ip_allowed, iso
from .paths import BadPath, encode, normalise, query_pairs, split_uri
from .store import TokenStore
from .tokens import is_well_formed
from .usage import UsageRecorder

log = logging.getLogger("authgate")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_HEADER_VALUE = 8192


@dataclass(slots=True)
class AuthRequest:
    method: str
    path: str  # normalised, as nginx's $uri
    query: str  # raw query string
    client_ip: IPAddress | None
    candidates: dict[str, list[str]]  # source label -> values found
    fold: bool = False  # nginx dialect: 404/503 travel as 401/403 + headers
    pairs: list[tuple[str, str, str]] = field(default_factory=list)


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


class Authorizer:
    """Decides one request. Holds the cache; asks the store only on a miss."""

    def __init__(
        self,
        settings: Settings,
        store: TokenStore,
        cache: TokenCache,
        metrics: Metrics,
        usage: UsageRecorder,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.usage = usage
        self.sources = settings.token_sources
        self.query_names = frozenset(s.name for s in self.sources if s.kind == "query")
        self.prefix = settings.token_prefix
        self.environment = settings.environment
        self.max_token = settings.max_token_length

    # -- checks 1-4: the token itself --------------------------------------------------------
    def pick_token(self, req: AuthRequest) -> str | Decision:
        values = {label: v for label, v in req.candidates.items() if v}
        if not values:
            return deny("TOKEN_MISSING", 1, sources=[s.label for s in self.sources])
        if self.settings.token_mode == "both" and len(values) < len(self.sources):
            missing = [s.label for s in self.sources if s.label not in values]
            return deny("TOKEN_MISSING", 2, missing=missing)
        distinct = {v for vs in values.values() for v in vs}
        if len(distinct) > 1:
            return deny("TOKEN_MISMATCH", 3, sources=sorted(values))
        token = distinct.pop()
        if len(token) > self.max_token or not is_well_formed(token, self.prefix):
            return deny("TOKEN_INVALID", 4)
        return token

    # -- check 5: find it ---------------------------------------------------------------------
    async def lookup(self, token: str) -> Entry | Decision | None:
        digest = self.store.hash(token)
        now = time.monotonic()
        state, entry = self.cache.get(digest, now)
        self.metrics.cache_child[state].inc()
        if state == "fresh":
            return entry
        if state == "negative":
            return None
        generation = self.cache.generation
        started = time.perf_counter()
        try:
            record = await self.store.record_by_hash(digest)
        except BackendUnavailable as exc:
            self.metrics.redis_errors.inc()
            self.metrics.redis_up.set(0)
            if state == "stale":
                return entry  # bounded by stale_window; invalidations still drop it
            log.warning("redis unavailable on lookup: %s", type(exc.__cause__).__name__)
            return deny("UNAVAILABLE", 12)
        self.metrics.redis_latency.observe(time.perf_counter() - started)
        self.metrics.redis_up.set(1)
        if record is None:
            self.cache.put_negative(digest, now, generation)
            return None
        fresh = Entry.from_record(record)
        self.cache.put(digest, fresh, now, generation)
        return fresh

    # -- checks 6-11: what this token may do here --------------------------------------------
    def authorize(self, entry: Entry, req: AuthRequest, now: float) -> Decision:
        if entry.revoked or entry.kind != "query" or entry.environment != self.environment:
            return deny("TOKEN_INVALID", 5)
        if entry.expires_at is not None and entry.expires_at <= now:
            return deny("TOKEN_EXPIRED", 6, expired_at=iso(entry.expires_at))
        if entry.networks and not ip_allowed(entry.networks, req.client_ip):
            return deny("IP_NOT_ALLOWED", 7, client_ip=str(req.client_ip or "unknown"))
        route, bound = match_route(self.settings.routes, req.path)
        if route is not None:
            scope = self.check_scope(entry, route, bound, req)
            if scope is not None:
                return scope
        flag = METHOD_FLAG.get(req.method)
        if flag is None or flag not in entry.key_type:
            return deny("INSUFFICIENT_KEY_TYPE", 9, required=flag, method=req.method[:16])
        if route is not None and route.cls == "system" and "admin" not in entry.roles:
            return deny("ADMIN_REQUIRED", 10)
        if route is not None and not route.permissions <= entry.permissions:
            return deny(
                "INSUFFICIENT_PERMISSIONS",
                11,
                required=sorted(route.permissions - entry.permissions),
            )
        return Decision(200, "OK", 0, entry=entry)

    def check_scope(
        self, entry: Entry, route: Route, bound: dict[str, str], req: AuthRequest
    ) -> Decision | None:
        if "org" in bound and (bound["org"] != entry.org or bound["project"] != entry.project):
            return deny("SCOPE_MISMATCH", 8)
        if route.cls == "app" and entry.app_ids:
            apps = [v for k, v, _ in req.pairs if k == "app_id"]
            if "app" in bound:
                apps.append(bound["app"])
            if not apps or any(a not in entry.app_ids for a in apps):
                return deny("SCOPE_MISMATCH", 8)
        return None

    async def decide(self, req: AuthRequest) -> Decision:
        picked = self.pick_token(req)
        if isinstance(picked, Decision):
            return picked
        found = await self.lookup(picked)
        if isinstance(found, Decision):
            return found
        if found is None:
            return deny("TOKEN_INVALID", 5)
        decision = self.authorize(found, req, time.time())
        if decision.allowed:
            self.usage.note(found.id)
        return decision


def match_route(routes: tuple[Route, ...], path: str) -> tuple[Route | None, dict[str, str]]:
    segments = path.split("/")[1:]
    for route in routes:
        if len(segments) < len(route.segments):
            continue
        bound: dict[str, str] = {}
        for want, got in zip(route.segments, segments, strict=False):
            if want[0] == "{":
                if not got:
                    break
                bound[want[1:-1]] = got
            elif want != got:
                break
        else:
            return route, bound
    return None, {}


class DataPlane:
    """The raw ASGI app on AUTHGATE_LISTEN: no framework between request and decision."""

    def __init__(
        self, settings: Settings, authorizer: Authorizer, ready: Callable[[], Awaitable[bool]]
    ) -> None:
        self.settings = settings
        self.authorizer = authorizer
        self.metrics = authorizer.metrics
        self.ready = ready
        self.trusted = settings.trusted_proxies
        self._trusted_cache: dict[str, bool] = {}
        header_sources = {}
        for s in settings.token_sources:
            if s.kind == "header":
                header_sources[s.name.encode()] = s.label
        self.header_sources = header_sources
        self.bearer = any(s.kind == "bearer" for s in settings.token_sources)
        self.query_sources = {s.name: s.label for s in settings.token_sources if s.kind == "query"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path == "/auth" or path.startswith("/ext-authz/") or path == "/ext-authz":
            await self.handle_auth(scope, send)
        elif path == "/healthz":
            await respond(send, 200, b'{"status":"ok"}')
        elif path == "/readyz":
            ok = await self.ready()
            await respond(
                send,
                200 if ok else 503,
                b'{"status":"ready"}' if ok else b'{"status":"redis unavailable"}',
            )
        else:
            await respond(
                send,
                404,
                b'{"error":{"code":"NOT_FOUND","message":"No such endpoint.","details":{}}}',
            )

    async def handle_auth(self, scope: Scope, send: Send) -> None:
        started = time.perf_counter()
        req: AuthRequest | None = None
        try:
            req = self.parse(scope)
            decision = await self.authorizer.decide(req)
        except BadRequest as exc:
            decision = deny("BAD_REQUEST", 0, reason=exc.reason)
        except Exception as exc:  # every outcome must be a decision, never a 500 to nginx
            log.error("unexpected %s while deciding; answering UNAVAILABLE", type(exc).__name__)
            decision = deny("UNAVAILABLE", 12)
        fold = req.fold if req is not None else is_nginx(scope)
        if decision.allowed and req is not None and decision.entry is not None:
            clean = self.clean_query(req)
            uri = encode(req.path) + ("?" + clean if clean else "")
            headers = [
                *decision.entry.headers,
                (b"x-authgate-uri", uri.encode("latin-1")),
                (b"x-authgate-query", clean.encode("latin-1")),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
        else:
            body = orjson.dumps(
                {
                    "error": {
                        "code": decision.code,
                        "message": MESSAGES[decision.code],
                        "details": decision.details,
                    }
                }
            )
            if fold:
                headers = [
                    (b"x-authgate-status", str(decision.status).encode()),
                    (b"x-authgate-error", body),
                    (b"content-length", b"0"),
                ]
                await send(
                    {
                        "type": "http.response.start",
                        "status": NGINX_FOLD[decision.status],
                        "headers": headers,
                    }
                )
                await send({"type": "http.response.body", "body": b""})
            else:
                await respond(send, decision.status, body)
        self.metrics.decision_child[(decision.status, decision.code)].inc()
        self.metrics.latency.observe(time.perf_counter() - started)

    def clean_query(self, req: AuthRequest) -> str:
        if not req.query:
            return ""
        names = self.authorizer.query_names
        return "&".join(raw for key, _, raw in req.pairs if key not in names)

    def parse(self, scope: Scope) -> AuthRequest:
        """Read the dialect, original URI and method, client IP and token candidates."""
        seen: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            if len(value) > MAX_HEADER_VALUE:
                raise BadRequest("header too long")
            if name in _WANTED or name in self.header_sources:
                seen.setdefault(name, []).append(value)
        fold = False
        path = scope["path"]
        if path.startswith("/ext-authz"):
            raw = scope.get("raw_path") or path.encode()
            uri = raw.decode("latin-1")[len("/ext-authz") :] or "/"
            query_bytes: bytes = scope.get("query_string", b"")
            if query_bytes:
                uri += "?" + query_bytes.decode("latin-1")
            method = scope["method"]
        else:
            uri_values = seen.get(b"x-original-uri") or seen.get(b"x-original-url")
            if uri_values:
                fold = True
            else:
                uri_values = seen.get(b"x-forwarded-uri")
            if uri_values:
                if len(uri_values) > 1:
                    raise BadRequest("repeated original URI header")
                uri = uri_values[0].decode("latin-1")
            else:  # a direct caller: /auth?… itself is the request to judge
                query_bytes = scope.get("query_string", b"")
                uri = "/" + ("?" + query_bytes.decode("latin-1") if query_bytes else "")
            methods = seen.get(b"x-original-method") or seen.get(b"x-forwarded-method")
            method = methods[0].decode("latin-1").upper() if methods else scope["method"]
        try:
            raw_path, query = split_uri(uri)
            npath = normalise(raw_path)
        except BadPath as exc:
            raise BadRequest(str(exc)) from None
        req = AuthRequest(method, npath, query, self.client_ip(scope, seen), {}, fold)
        if query:
            req.pairs = query_pairs(query)
        candidates = req.candidates
        for name, label in self.header_sources.items():
            values = seen.get(name)
            if values:
                candidates[label] = [v.decode("latin-1").strip() for v in values]
        if self.bearer:
            auth = seen.get(b"authorization")
            if auth:
                bearer = [
                    v[7:].decode("latin-1").strip() for v in auth if v[:7].lower() == b"bearer "
                ]
                if bearer:
                    candidates["bearer"] = bearer
        if self.query_sources and req.pairs:
            for key, value, _ in req.pairs:
                qlabel = self.query_sources.get(key)
                if qlabel is not None:
                    candidates.setdefault(qlabel, []).append(value.strip())
        for clabel, found in list(candidates.items()):
            kept = [v for v in found if v]
            if kept:
                candidates[clabel] = kept
            else:
                del candidates[clabel]
        return req

    def client_ip(self, scope: Scope, seen: dict[bytes, list[bytes]]) -> IPAddress | None:
        client = scope.get("client")
        peer = client[0] if client else None
        if peer is None:
            return None
        try:
            peer_ip = ipaddress.ip_address(peer)
        except ValueError:
            return None
        if not self.is_trusted(peer, peer_ip):
            return peer_ip
        real = seen.get(b"x-real-ip")
        if real:
            try:
                return ipaddress.ip_address(real[-1].decode("latin-1").strip())
            except ValueError:
                return None  # fail closed: an allowlist will refuse
        forwarded = seen.get(b"x-forwarded-for")
        if forwarded:
            hops = [h.strip() for v in forwarded for h in v.decode("latin-1").split(",")]
            for hop in reversed(hops):
                try:
                    ip = ipaddress.ip_address(hop)
                except ValueError:
                    return None
                if not any(ip in net for net in self.trusted if net.version == ip.version):
                    return ip
            return ipaddress.ip_address(hops[0]) if hops else peer_ip
        return peer_ip

    def is_trusted(self, peer: str, peer_ip: IPAddress) -> bool:
        known = self._trusted_cache.get(peer)
        if known is None:
            known = ip_allowed(self.trusted, peer_ip)
            if len(self._trusted_cache) > 1024:
                self._trusted_cache.clear()
            self._trusted_cache[peer] = known
        return known


_WANTED = frozenset(
    {
        b"x-original-uri",
        b"x-original-url",
        b"x-forwarded-uri",
        b"x-original-method",
        b"x-forwarded-method",
        b"x-real-ip",
        b"x-forwarded-for",
        b"authorization",
    }
)


def is_nginx(scope: Scope) -> bool:
    return any(n in (b"x-original-uri", b"x-original-url") for n, _ in scope["headers"])


class BadRequest(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
