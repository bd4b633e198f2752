"""Reading a request: the dialect, the original URI and method, the client IP, the tokens.

Each proxy says what it is asking about in its own headers (SPEC §2): `RequestReader.read`
turns them into one `AuthRequest`, or raises `BadRequest` when they cannot be read as
every common upstream would read them.
"""

from __future__ import annotations

import ipaddress

from .config import Settings
from .model import ip_allowed
from .paths import BadPath, encode, normalise, query_pairs, split_uri
from .plane import AuthRequest, BadRequest, IPAddress, Scope

MAX_HEADER_VALUE = 8192


class RequestReader:
    """Reads requests for one set of settings (token sources, trusted proxies)."""

    def __init__(self, settings: Settings) -> None:
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
        self.query_sources = {s.name: s.label for s in settings.token_sources if s.kind == "query"}
        self.query_names = frozenset(self.query_sources)

    def read(self, scope: Scope) -> AuthRequest:
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

    def forwarded(self, req: AuthRequest) -> tuple[bytes, bytes]:
        """What the proxy forwards upstream for an allowed request: the authorised path
        with the clean query (`X-Authgate-Uri`), and the clean query alone."""
        clean = self.clean_query(req) if req.query else ""
        uri = encode(req.path) + ("?" + clean if clean else "")
        return uri.encode("latin-1"), clean.encode("latin-1")

    def clean_query(self, req: AuthRequest) -> str:
        if not req.query:
            return ""
        names = self.query_names
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
