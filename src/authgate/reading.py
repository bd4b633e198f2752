"""Reading a request: the dialect, the original URI and method, the client IP, the tokens.

Each proxy says what it is asking about in its own headers (SPEC §2); `RequestReader.read`
turns them into one `AuthRequest`, or raises `BadRequest` when they cannot be read as
every common upstream would read them (the rules of `rules.py`, docs/request-reading.md).

The dialect is fixed by headers the proxy itself sets, never by a client's: headers of two
dialects together are refused. Where the proxy forwards the client's raw path upstream
(every dialect but plain nginx, whose shipped config forwards the path authgate judged),
a raw path must already be in normal form.
"""

from __future__ import annotations

import ipaddress

from .authorizer import RouteTable
from .config import Settings
from .model import ip_allowed
from .paths import BadPath, encode, normal_path, normalise, split_uri
from .plane import MAX_HEADERS, AuthRequest, BadRequest, IPAddress, Scope
from .query import QueryReader
from .rules import Reading

MAX_HEADER_VALUE = 8192

_PATH_REASONS = {
    "path_parameters": "a ';' in a path segment",
    "backslashes": "a backslash in the path",
    "trailing_dots": "a path segment ending in a dot or a space",
    "double_encoding": "an encoded '%' in the path",
}


def path_rule_broken(path: str, rules: Reading) -> str | None:
    """The first path rule (rules.py) the decoded, normalised `path` breaks, or None.
    Plain `in` tests: C-level, whatever the path's length."""
    if rules.path_parameters and ";" in path:
        return "path_parameters"
    if rules.backslashes and "\\" in path:
        return "backslashes"
    if rules.trailing_dots and (
        ("." in path and ("./" in path or path.endswith(".")))
        or (" " in path and (" /" in path or path.endswith(" ")))
    ):
        return "trailing_dots"
    if rules.double_encoding and "%" in path:
        return "double_encoding"
    return None


class RequestReader:
    """Reads requests for one set of settings (token sources, trusted proxies, rules)."""

    def __init__(self, settings: Settings, routes: RouteTable) -> None:
        rules = settings.reading
        self.routes = routes
        self.case_variants = rules.case_variants
        self.raw_path = rules.raw_path
        self.trusted = settings.trusted_proxies
        self.hops = settings.trusted_hops
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
        query_sources = {s.name: s.label for s in settings.token_sources if s.kind == "query"}
        self.query = QueryReader(query_sources, rules.query_spellings, rules.max_query_pairs)
        self.rules = rules

    def read(self, scope: Scope) -> AuthRequest:
        """Read the dialect, original URI and method, client IP and token candidates."""
        headers = scope["headers"]
        if len(headers) > MAX_HEADERS:
            raise BadRequest(f"more than {MAX_HEADERS} headers")
        seen: dict[bytes, list[bytes]] = {}
        wanted = self.wanted
        for name, value in headers:
            if len(value) > MAX_HEADER_VALUE:
                raise BadRequest("header too long")
            if name in wanted:
                values = seen.get(name)
                if values is None:
                    seen[name] = [value]
                else:
                    values.append(value)
        path = scope["path"]
        raw = True  # the proxy forwards the client's raw path upstream
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
            raw_target = scope.get("raw_path") or path.encode()
            uri = raw_target.decode("latin-1")[len("/ext-authz") :]
            query_bytes: bytes = scope.get("query_string", b"")
            if query_bytes:
                uri += "?" + query_bytes.decode("latin-1")
            method = scope["method"]
            fold = False
        elif (nginx := _nginx_only(seen)) is not None:
            # The common case, plain nginx: one X-Original-URI, at most one X-Original-Method
            # and none of the other dialects' headers. The shipped config forwards the path
            # authgate answers (X-Authgate-Uri), so the normalised path is the one judged.
            fold, raw = True, False
            uri = nginx.decode("latin-1")
            methods_given = seen.get(b"x-original-method")
            given_method = methods_given[0].decode("latin-1") if methods_given else ""
            method = given_method.upper() if given_method else scope["method"]
        else:
            uri, method, fold, raw = self.dialect(seen, scope)
        raw = raw and self.raw_path
        path, query, raw_path = self.target(uri, raw)
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
        apps: list[str] = []
        forward = query
        if query:
            token = next(iter(candidates.values()))[0] if candidates else None
            apps, in_query, forward = self.query.read(query, token)
            for label, found in in_query.items():
                candidates.setdefault(label, []).extend(found)
        client_ip = self.client_ip(scope, seen)
        return AuthRequest(
            method, path, query, client_ip, candidates, fold, apps, forward, raw_path
        )

    def target(self, uri: str, raw: bool) -> tuple[str, str, str]:
        """(normalised path, raw query, raw path when `raw`) of the original URI, or
        BadRequest when some upstream could read the path otherwise. `raw`: the proxy
        forwards the raw path, which must then be in normal form."""
        try:
            raw_path, query = split_uri(uri)
            path = normal_path(raw_path) if raw else normalise(raw_path)
        except BadPath as exc:
            raise BadRequest(str(exc)) from None
        broken = path_rule_broken(path, self.rules)
        if broken is not None:
            raise BadRequest(_PATH_REASONS[broken])
        if self.case_variants and self.routes.lookup(path).case_variant:
            raise BadRequest("the path matches a protected prefix only in another letter case")
        return path, query, raw_path if raw else ""

    def forwarded(self, req: AuthRequest) -> tuple[bytes, bytes, bool]:
        """What the proxy forwards upstream for an allowed request: the authorised path
        with the query without its token parameters (`X-Authgate-Uri`), that query, and
        whether the path is authgate's own encoding (escapes and plain characters only)
        rather than the client's raw path."""
        clean = req.forward_query
        path = req.raw_path or encode(req.path)
        uri = path + ("?" + clean if clean else "")
        return uri.encode("latin-1"), clean.encode("latin-1"), not req.raw_path

    @staticmethod
    def dialect(seen: dict[bytes, list[bytes]], scope: Scope) -> tuple[str, str, bool, bool]:
        """(URI, method, fold, raw) from the proxy headers, when not plain nginx's alone.

        ingress-nginx sends X-Original-URL (an absolute URL; X-Original-URI too with
        auth-method), Traefik and Caddy X-Forwarded-Uri and -Method. Both proxies pass
        the client's own headers through, so headers of both families together are
        refused: a client cannot switch authgate to another dialect. Such a refusal is
        folded for nginx only when ingress-nginx's X-Original-URL is there."""
        nginx_family = [h for h in _NGINX_FAMILY if h in seen]
        forward_family = [h for h in _FORWARD_FAMILY if h in seen]
        fold = b"x-original-url" in seen
        if nginx_family and forward_family:
            raise BadRequest("headers of two proxy dialects (X-Original-* and X-Forwarded-*)")
        method_header = b"x-forwarded-method" if forward_family else b"x-original-method"
        method = (_single(seen.get(method_header), method_header.decode()) or "").upper()
        method = method or scope["method"]
        if forward_family:
            uri = _single(seen.get(b"x-forwarded-uri"), "x-forwarded-uri")
            if uri is None:
                raise BadRequest("X-Forwarded-Method without X-Forwarded-Uri")
            return uri, method, False, True
        found = [_single(seen.get(h), h.decode()) for h in (b"x-original-url", b"x-original-uri")]
        uris = [u for u in found if u is not None]
        if not uris:  # a direct caller: /auth?… itself is the request to judge
            query_bytes = scope.get("query_string", b"")
            return (
                "/" + ("?" + query_bytes.decode("latin-1") if query_bytes else ""),
                method,
                fold,
                False,
            )
        if len(uris) > 1:
            try:
                if len({split_uri(u) for u in uris}) > 1:
                    raise BadRequest("original URI headers disagree")
            except BadPath as exc:
                raise BadRequest(str(exc)) from None
        return uris[0], method, True, True

    def client_ip(self, scope: Scope, seen: dict[bytes, list[bytes]]) -> IPAddress | None:
        """The peer; or, when the peer is a trusted proxy, X-Real-IP, else the X-Forwarded-For
        entry the proxies vouch for: the right-most untrusted one among the last
        `trusted_hops` entries, or the `trusted_hops`-th from the right. Entries further
        left were written by the client and are never read."""
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
            joined = b",".join(forwarded).decode("latin-1")
            hops = joined.rsplit(",", self.hops)[-self.hops :]
            ip: IPAddress | None = None
            for hop in reversed(hops):
                try:
                    ip = ipaddress.ip_address(hop.strip())
                except ValueError:
                    return None
                if not ip_allowed(self.trusted, ip):
                    return ip
            return ip if ip is not None else peer_ip
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
_NGINX_FAMILY = (b"x-original-uri", b"x-original-url", b"x-original-method")
_FORWARD_FAMILY = (b"x-forwarded-uri", b"x-forwarded-method")


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


def _single(values: list[bytes] | None, name: str) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"repeated {name} header")
    return values[0].decode("latin-1")


def is_nginx(scope: Scope) -> bool:
    """Whether the caller is an nginx `auth_request` (statuses fold to 401/403): for a
    request that could not be read, by the headers only nginx-family proxies set."""
    if scope["path"] == "/ext-authz":
        return True
    names = {n for n, _ in scope["headers"]}
    if b"x-original-url" in names:
        return True
    return b"x-original-uri" in names and not names & set(_FORWARD_FAMILY)
