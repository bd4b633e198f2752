"""The data plane: `/auth` and `/ext-authz/…`, read top to bottom.

A request becomes an `AuthRequest` (dialect, method, normalised path, query, client IP,
token candidates); `Authorizer.decide` runs the SPEC §2 checks in order and the first
failing one answers. Nothing here raises to the server: every outcome is a decision.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
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
from .pepper import PreviousPepper
from .store import TokenStore
from .tokens import Hasher, is_well_formed
from .usage import UsageRecorder

log = logging.getLogger("authgate")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body

MAX_HEADER_VALUE = 8192
# Control characters but the tab: none may reach a response header (CR/LF would split it).
_CONTROLS = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
IDENTITY_BLOCKS = 4096  # identity header sets (shared by many tokens) kept encoded


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
    """Decides one request. Holds the cache; asks the store only on a miss.

    `decide_cached` is the hot path: when the cache can answer, the whole decision is made
    without a single await. `decide` adds the Redis lookup for everything else.
    """

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
        self.routes = RouteTable(settings.routes)
        self._both = settings.token_mode == "both"
        self._hash = Hasher(settings.pepper.reveal()).digest
        self.previous = PreviousPepper.of(settings, store)  # only while rotating the pepper
        self._cache_counts = metrics.cache_counts
        # Cache misses: one Redis GET per token however many requests carry it at once, and
        # one round trip for all the misses of an event-loop turn.
        self._loading: dict[bytes, asyncio.Future[Entry | BackendUnavailable | None]] = {}
        self._queued: list[bytes] = []
        self._reads: set[asyncio.Future[None]] = set()

    # -- checks 1-4: the token itself --------------------------------------------------------
    def pick_token(self, req: AuthRequest) -> str | Decision:
        found = self.candidate(req)
        if isinstance(found, str) and not is_well_formed(found, self.prefix):
            return deny("TOKEN_INVALID", 4)
        return found

    def candidate(self, req: AuthRequest) -> str | Decision:
        """Checks 1-3 and check 4's length limit; the rest of check 4 is `is_well_formed`."""
        candidates = req.candidates
        present = 0
        for values in candidates.values():
            if values:
                present += 1
        if not present:
            return deny("TOKEN_MISSING", 1, sources=[s.label for s in self.sources])
        if self._both and present < len(self.sources):
            missing = [s.label for s in self.sources if not candidates.get(s.label)]
            return deny("TOKEN_MISSING", 2, missing=missing)
        token: str | None = None
        for values in candidates.values():
            for value in values:
                if token is None:
                    token = value
                elif value != token:
                    labels = sorted(label for label, v in candidates.items() if v)
                    return deny("TOKEN_MISMATCH", 3, sources=labels)
        if token is None or len(token) > self.max_token:
            return deny("TOKEN_INVALID", 4)
        return token

    # -- check 5: find it ---------------------------------------------------------------------
    async def lookup(self, token: str) -> Entry | Decision | None:
        """The token's entry (None when unknown), from the cache or one Redis GET."""
        key = self._hash(token)
        now = time.monotonic()
        state, entry = self.cache.get(key, now)
        self._cache_counts[state] += 1
        if state == "fresh":
            return entry
        if state == "negative":
            return None
        loaded = await self._load(key)
        if loaded is None and self.previous is not None:
            try:
                loaded = await self.previous.load(token, key, self._compile, self.cache.generation)
            except BackendUnavailable as exc:
                loaded = exc
        if isinstance(loaded, BackendUnavailable):
            if state == "stale":
                return entry  # bounded by stale_window; invalidations still drop it
            log.warning("redis unavailable on lookup: %s", type(loaded.__cause__).__name__)
            return deny("UNAVAILABLE", 12)
        return loaded

    async def _load(self, key: bytes) -> Entry | BackendUnavailable | None:
        """The token's record, from the next batched read: the misses of one event-loop
        turn share one Redis round trip, and a token already being read is not read again."""
        future = self._loading.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._loading[key] = loop.create_future()
            self._queued.append(key)
            if len(self._queued) == 1:
                loop.call_soon(self._start_read)
        return await asyncio.shield(future)

    def _start_read(self) -> None:
        keys, self._queued = self._queued, []
        task = asyncio.ensure_future(self._read(keys))
        self._reads.add(task)  # a reference until it is done
        task.add_done_callback(self._reads.discard)

    async def _read(self, keys: list[bytes]) -> None:
        generation = self.cache.generation
        now = time.monotonic()
        started = time.perf_counter()
        results: list[Entry | BackendUnavailable | None] = []
        try:
            records = await self.store.records_by_hash([k.hex() for k in keys])
        except BackendUnavailable as exc:
            self.metrics.redis_failed()
            results = [exc] * len(keys)
        else:
            self.metrics.redis_call(time.perf_counter() - started)
            for key, record in zip(keys, records, strict=True):
                results.append(self._compile(key, record, now, generation))
        finally:
            lost = BackendUnavailable("lookup did not finish")
            for i, key in enumerate(keys):
                future = self._loading.pop(key)
                if not future.done():
                    future.set_result(results[i] if i < len(results) else lost)

    def _compile(
        self, key: bytes, record: Any, now: float, generation: int
    ) -> Entry | BackendUnavailable | None:
        if record is None:
            self.cache.put_negative(key, now, generation)
            return None
        try:
            entry = Entry.from_record(record)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("token record %s… is malformed (%s)", key.hex()[:12], type(exc).__name__)
            return BackendUnavailable("malformed token record")
        self.cache.put(key, entry, now, generation)
        return entry

    # -- checks 6-11: what this token may do here --------------------------------------------
    def authorize(self, entry: Entry, req: AuthRequest, now: float) -> Decision:
        if entry.revoked or entry.kind != "query" or entry.environment != self.environment:
            return deny("TOKEN_INVALID", 5)
        if entry.expires_at is not None and entry.expires_at <= now:
            return deny("TOKEN_EXPIRED", 6, expired_at=iso(entry.expires_at))
        if entry.networks and not ip_allowed(entry.networks, req.client_ip):
            return deny("IP_NOT_ALLOWED", 7, client_ip=str(req.client_ip or "unknown"))
        route, bound = self.routes.match(req.path)
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

    def decide_cached(self, req: AuthRequest) -> Decision | None:
        """The decision when no Redis call is needed (the token is missing, malformed, known
        unknown, or found fresh in the cache), else None. A cache hit skips check 4's
        checksum: only tokens that passed it are ever cached, and the key is their HMAC."""
        token = self.candidate(req)
        if isinstance(token, Decision):
            return token
        key = self._hash(token)
        now = time.monotonic()
        entry = self.cache.fresh(key, now)
        if entry is None:
            if not is_well_formed(token, self.prefix):
                return deny("TOKEN_INVALID", 4)
            if self.cache.known_unknown(key, now):
                self._cache_counts["negative"] += 1
                return deny("TOKEN_INVALID", 5)
            return None
        self._cache_counts["fresh"] += 1
        decision = self.authorize(entry, req, time.time())
        if decision.status == 200:
            self.usage.note(entry.id)
        return decision

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


class RouteTable:
    """`Settings.routes` compiled: one anchored regex per route, tried in order."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes: list[tuple[Route, str, re.Pattern[str]]] = []
        for route in routes:
            pattern, head, bound = "", "", False
            for segment in route.segments:
                if segment[0] == "{":  # org, project or app, each at most once
                    pattern += f"/(?P<{segment[1:-1]}>[^/]+)"
                    bound = True
                else:
                    pattern += "/" + re.escape(segment)
                    if not bound:
                        head += "/" + segment
            # Whole segments: the prefix ends the path or a slash follows (\Z, not $: a
            # decoded %0A must not end a segment early).
            compiled = re.compile(pattern + r"(?:/|\Z)")
            self._routes.append((route, head, compiled))

        self._seen: dict[str, tuple[Route | None, dict[str, str]]] = {}

    def match(self, path: str) -> tuple[Route | None, dict[str, str]]:
        """The first route whose prefix `path` starts with, and the placeholders it bound.
        Results are remembered for recent paths: treat the dict as read-only."""
        found = self._seen.get(path)
        if found is None:
            found = self._match(path)
            if len(self._seen) >= 4096:
                self._seen.clear()
            self._seen[path] = found
        return found

    def _match(self, path: str) -> tuple[Route | None, dict[str, str]]:
        for route, head, pattern in self._routes:
            if path.startswith(head):
                m = pattern.match(path)
                if m is not None:
                    return route, m.groupdict()
        return None, {}


def match_route(routes: tuple[Route, ...], path: str) -> tuple[Route | None, dict[str, str]]:
    return RouteTable(routes).match(path)


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
        # Parsed peer addresses (and whether they are trusted proxies) and X-Real-IP values:
        # the same few recur on every request, and ipaddress parsing costs microseconds.
        self._peers: dict[str, tuple[IPAddress | None, bool]] = {}
        self._addresses: dict[bytes, IPAddress | None] = {}
        header_sources = {}
        for s in settings.token_sources:
            if s.kind == "header":
                header_sources[s.name.encode()] = s.label
        self.header_sources = header_sources
        self.wanted = _WANTED | frozenset(header_sources)
        self.bearer = any(s.kind == "bearer" for s in settings.token_sources)
        # id(Entry.headers) -> (those headers, their lines encoded, or None when a value holds
        # a control character). The headers are kept to tell a reused id apart; they are
        # shared by every token of the same org, project, roles … (`model._shared`).
        self._blocks: dict[int, tuple[tuple[tuple[bytes, bytes], ...], bytes | None]] = {}
        self.query_sources = {s.name: s.label for s in settings.token_sources if s.kind == "query"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        answer = self.answer_now(scope)
        if not isinstance(answer, tuple):
            answer = await answer
        status, headers, body = answer
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def answer_now(self, scope: Scope) -> Answer | Coroutine[Any, Any, Answer]:
        """The answer to one request: (status, headers, body) when it is known without
        waiting (a cache hit, a denial, /healthz), else a coroutine that makes it (a cache
        miss, /readyz). `scope` needs the ASGI keys path, raw_path, query_string, method,
        headers (lower-case names) and client. The ASGI entry above and the data-plane
        HTTP server (`fasthttp`) both answer through this; every header list carries
        Content-Length."""
        path: str = scope["path"]
        if path == "/auth" or path.startswith("/ext-authz/") or path == "/ext-authz":
            started = time.perf_counter()
            req: AuthRequest | None = None
            try:
                req = self.parse(scope)
                decision = self.authorizer.decide_cached(req)
                if decision is None:
                    return self._auth_later(scope, req, started)
            except BadRequest as exc:
                decision = deny("BAD_REQUEST", 0, reason=exc.reason)
            except Exception as exc:  # every outcome must be a decision, never a 500 to nginx
                log.error("unexpected %s while deciding; answering UNAVAILABLE", type(exc).__name__)
                decision = deny("UNAVAILABLE", 12)
            return self.auth_answer(scope, req, decision, started)
        if path == "/healthz":
            return json_answer(200, b'{"status":"ok"}')
        if path == "/readyz":
            return self._readyz()
        return json_answer(
            404, b'{"error":{"code":"NOT_FOUND","message":"No such endpoint.","details":{}}}'
        )

    async def _readyz(self) -> Answer:
        ok = await self.ready()
        return json_answer(
            200 if ok else 503, b'{"status":"ready"}' if ok else b'{"status":"redis unavailable"}'
        )

    async def _auth_later(self, scope: Scope, req: AuthRequest, started: float) -> Answer:
        try:
            decision = await self.authorizer.decide(req)
        except Exception as exc:  # every outcome must be a decision, never a 500 to nginx
            log.error("unexpected %s while deciding; answering UNAVAILABLE", type(exc).__name__)
            decision = deny("UNAVAILABLE", 12)
        return self.auth_answer(scope, req, decision, started)

    def auth_answer(
        self, scope: Scope, req: AuthRequest | None, decision: Decision, started: float
    ) -> Answer:
        """The response for a decision (counted in the metrics)."""
        fold = req.fold if req is not None else is_nginx(scope)
        entry = decision.entry
        answer: Answer
        if decision.status == 200 and req is not None and entry is not None:
            clean = self.clean_query(req) if req.query else ""
            uri = (encode(req.path) + ("?" + clean if clean else "")).encode("latin-1")
            query = clean.encode("latin-1")
            items = [
                *entry.headers,
                entry.user_header,
                entry.id_header,
                (b"x-authgate-uri", uri),
                (b"x-authgate-query", query),
                (b"content-length", b"0"),
            ]
            block = self._identity_block(entry.headers)
            (user_name, user), (id_name, token_id) = entry.user_header, entry.id_header
            if block is not None and safe_lines(user + token_id + uri + query, 0):
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
                        b"\r\nx-authgate-uri: ",
                        uri,
                        b"\r\nx-authgate-query: ",
                        query,
                        _LENGTH_0,
                    )
                )
                answer = (200, encoded, b"")
            else:  # the server's own check refuses it
                answer = (200, items, b"")
        else:
            body = error_body(decision)
            if fold:
                headers = [
                    (b"x-authgate-status", str(decision.status).encode()),
                    (b"x-authgate-error", body),
                    (b"content-length", b"0"),
                ]
                answer = (NGINX_FOLD[decision.status], headers, b"")
            else:
                answer = json_answer(decision.status, body)
        self.metrics.decided(decision.code, time.perf_counter() - started)
        return answer

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

    def clean_query(self, req: AuthRequest) -> str:
        if not req.query:
            return ""
        names = self.authorizer.query_names
        # The token never travels upstream, whatever other parameter it was also put in
        # (`??pwt=`, `PWT=`, `x=pwt=…`): a pair that carries it is dropped too.
        token = ""
        for values in req.candidates.values():
            if values:
                token = values[0]
                break
        kept = []
        for key, value, raw in req.pairs:
            if key in names or (token and (token in raw or token in key + value)):
                continue
            kept.append(raw)
        return "&".join(kept)

    def parse(self, scope: Scope) -> AuthRequest:
        """Read the dialect, original URI and method, client IP and token candidates."""
        seen: dict[bytes, list[bytes]] = {}
        wanted = self.wanted
        for name, value in scope["headers"]:
            if len(value) > MAX_HEADER_VALUE:
                raise BadRequest("header too long")
            if name in wanted:
                values = seen.get(name)
                if values is None:
                    seen[name] = [value]
                else:
                    values.append(value)
        path = scope["path"]
        if path == "/ext-authz":
            # NGINX Gateway Fabric: nginx auth_request to exactly this path, with the
            # original in `Path` and `Method` headers; statuses fold as for nginx.
            uri = _single(seen.get(b"path"), "Path") or ""
            if not uri:
                raise BadRequest("no original path (Path header)")
            method = (_single(seen.get(b"method"), "Method") or scope["method"]).upper()
            fold = True
        elif path.startswith("/ext-authz/"):
            # Envoy ext_authz: the original method and path are on the request line.
            raw = scope.get("raw_path") or path.encode()
            uri = raw.decode("latin-1")[len("/ext-authz") :]
            query_bytes: bytes = scope.get("query_string", b"")
            if query_bytes:
                uri += "?" + query_bytes.decode("latin-1")
            method = scope["method"]
            fold = False
        elif (nginx := _nginx_only(seen)) is not None:
            # The common case, plain nginx: one X-Original-URI, at most one X-Original-Method
            # and none of the other dialects' headers (the general branch below agrees).
            fold = True
            uri = nginx.decode("latin-1")
            methods_given = seen.get(b"x-original-method")
            given_method = methods_given[0].decode("latin-1") if methods_given else ""
            method = given_method.upper() if given_method else scope["method"]
        else:
            fold = b"x-original-uri" in seen or b"x-original-url" in seen
            uri = self.original_uri(seen, scope)
            methods = [
                _single(seen.get(h), h.decode())
                for h in (b"x-original-method", b"x-forwarded-method")
            ]
            given = {m.upper() for m in methods if m}
            if len(given) > 1:
                raise BadRequest("original method headers disagree")
            method = given.pop() if given else scope["method"]
        try:
            raw_path, query = split_uri(uri)
            npath = normalise(raw_path)
        except BadPath as exc:
            raise BadRequest(str(exc)) from None
        pairs = query_pairs(query) if query else []
        candidates: dict[str, list[str]] = {}
        for name, label in self.header_sources.items():
            values = seen.get(name)
            if values:
                _keep(candidates, label, [v.decode("latin-1").strip() for v in values])
        if self.bearer:
            auth = seen.get(b"authorization")
            if auth:
                bearer = [
                    v[7:].decode("latin-1").strip() for v in auth if v[:7].lower() == b"bearer "
                ]
                _keep(candidates, "bearer", bearer)
        if pairs and self.query_sources:
            for key, value, _ in pairs:
                qlabel = self.query_sources.get(key)
                if qlabel is not None and (value := value.strip()):
                    candidates.setdefault(qlabel, []).append(value)
        return AuthRequest(
            method, npath, query, self.client_ip(scope, seen), candidates, fold, pairs
        )

    @staticmethod
    def original_uri(seen: dict[bytes, list[bytes]], scope: Scope) -> str:
        """The URI to judge. When several proxies' headers are present (a client can add
        its own that a proxy passes through), they must all name the same path and query."""
        found = [
            _single(seen.get(h), h.decode())
            for h in (b"x-original-uri", b"x-original-url", b"x-forwarded-uri")
        ]
        uris = [u for u in found if u is not None]
        if not uris:  # a direct caller: /auth?… itself is the request to judge
            query_bytes = scope.get("query_string", b"")
            return "/" + ("?" + query_bytes.decode("latin-1") if query_bytes else "")
        if len(uris) > 1:
            try:
                if len({split_uri(u) for u in uris}) > 1:
                    raise BadRequest("original URI headers disagree")
            except BadPath as exc:
                raise BadRequest(str(exc)) from None
        return uris[0]

    def client_ip(self, scope: Scope, seen: dict[bytes, list[bytes]]) -> IPAddress | None:
        client = scope.get("client")
        peer = client[0] if client else None
        if peer is None:
            return None
        known = self._peers.get(peer)
        if known is None:
            known = self._peer(peer)
        peer_ip, trusted = known
        if peer_ip is None or not trusted:
            return peer_ip
        real = seen.get(b"x-real-ip")
        if real:
            raw = real[-1]
            if raw in self._addresses:
                return self._addresses[raw]
            return self._address(raw)  # None (fail closed) when it is not an address
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

    def _peer(self, peer: str) -> tuple[IPAddress | None, bool]:
        try:
            peer_ip = ipaddress.ip_address(peer)
        except ValueError:
            known: tuple[IPAddress | None, bool] = (None, False)
        else:
            known = (peer_ip, ip_allowed(self.trusted, peer_ip))
        if len(self._peers) >= 1024:
            self._peers.clear()
        self._peers[peer] = known
        return known

    def _address(self, raw: bytes) -> IPAddress | None:
        try:
            ip: IPAddress | None = ipaddress.ip_address(raw.decode("latin-1").strip())
        except ValueError:
            ip = None
        if len(self._addresses) >= 4096:
            self._addresses.clear()
        self._addresses[raw] = ip
        return ip


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
        b"path",  # NGINX Gateway Fabric, on exactly /ext-authz
        b"method",
    }
)


def _keep(candidates: dict[str, list[str]], label: str, values: list[str]) -> None:
    """Record a source's values; empty ones do not count as a token."""
    if "" in values:
        values = [v for v in values if v]
    if values:
        candidates[label] = values


def _nginx_only(seen: dict[bytes, list[bytes]]) -> bytes | None:
    """The X-Original-URI value when it is the only original-URI/method header besides at
    most one X-Original-Method; None otherwise (then the general rules apply)."""
    uris = seen.get(b"x-original-uri")
    if uris is None or len(uris) != 1:
        return None
    methods = seen.get(b"x-original-method")
    if methods is not None and len(methods) != 1:
        return None
    for other in _OTHER_DIALECTS:
        if other in seen:
            return None
    return uris[0]


_OTHER_DIALECTS = (b"x-original-url", b"x-forwarded-uri", b"x-forwarded-method")
_LENGTH_0 = b"\r\ncontent-length: 0"
_BODIES: dict[str, bytes] = {}  # error bodies without details, made once per code


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


def _single(values: list[bytes] | None, name: str) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"repeated {name} header")
    return values[0].decode("latin-1")


def is_nginx(scope: Scope) -> bool:
    """Whether the caller is an nginx `auth_request` (statuses fold to 401/403)."""
    if scope["path"] == "/ext-authz":
        return True
    return any(n in (b"x-original-uri", b"x-original-url") for n, _ in scope["headers"])


class BadRequest(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def json_answer(status: int, body: bytes) -> Answer:
    return (
        status,
        [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        body,
    )
