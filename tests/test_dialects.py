"""/auth driven exactly as each proxy drives it, against a real `authgate serve` and Valkey.

- ingress-nginx: a real nginx running the `auth-url` locations the controller generates
  (rootfs/etc/nginx/template/nginx.tmpl: `location = /_external-auth-…`), rendered from the
  annotations of deploy/k8s/overlays/ingress-nginx*/ as the controller would render them:
  the bare `auth-url` form, the shipped Ingress (auth-method GET, response headers,
  keep-alive upstream) and the shipped Ingress plus the status-mapping snippets.
- Traefik forwardAuth: a GET to the auth address with the client's headers and
  X-Forwarded-Method/-Proto/-Host/-Uri/-For set by the proxy; any non-2xx answer goes to
  the client as it is.
- Envoy ext_authz (HTTP service): the original method, and `path_prefix` + the original
  path and query on the request line; Host, Authorization and the allowed headers only;
  no body. Denials go to the client as they are.

Traefik and Envoy are played by the test (their requests are simple to reproduce byte for
byte); nginx is real, because its `auth_request` rules (only 2xx/401/403, body dropped,
keep-alive) are the point.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from authgate.backend import connect
from authgate.config import load_settings
from authgate.decisions import NGINX_FOLD
from authgate.store import TokenStore
from authgate.tokens import checksum
from tests.conftest import (
    ROOT,
    AuthgateProcess,
    Valkey,
    base_env,
    free_port,
    start_authgate,
    start_valkey,
)
from tests.echo_upstream import EchoUpstream
from tests.nginx_harness import nginx_binary, wait_for_listen

pytestmark = pytest.mark.nginx

INGRESS_DIR = ROOT / "deploy" / "k8s" / "overlays"
ANNOTATION = "nginx.ingress.kubernetes.io/"
AUTH_LOCATION = "/_external-auth-Lw-Prefix"  # the controller's name for path /minimal, Prefix
API = "/minimal/api/rest/v1/acme/tunes/assets"
IDENTITY = (
    "X-Org-Id",
    "X-Project-Id",
    "X-Space-Id",
    "X-Feature-Id",
    "X-User-Id",
    "X-User-Roles",
    "X-Token-Id",
    "X-Key-Type",
)


# -- the stack -------------------------------------------------------------------------------
def ingress_annotations(overlay: str) -> dict[str, str]:
    """The nginx.ingress.kubernetes.io/* annotations of a shipped Ingress overlay."""
    base = yaml.safe_load((INGRESS_DIR / "ingress-nginx" / "ingress.yaml").read_text())
    found = dict(base["metadata"]["annotations"])
    if overlay == "snippets":
        patch = yaml.safe_load(
            (INGRESS_DIR / "ingress-nginx-snippets" / "ingress-snippets.yaml").read_text()
        )
        for key, value in patch["metadata"]["annotations"].items():
            if value is None:
                found.pop(key, None)
            else:
                found[key] = value
    return {k[len(ANNOTATION) :]: v for k, v in found.items() if k.startswith(ANNOTATION)}


def render_ingress_server(
    annotations: Mapping[str, str], listen: int, authgate: int, upstream: int
) -> str:
    """One `server` as ingress-nginx generates it for path /minimal with these annotations.

    Copied from the controller template: the internal auth location (no body, emptied
    Content-Length and X-Forwarded-Proto, X-Original-URL/-Method, X-Sent-From, X-Real-IP,
    X-Forwarded-For, X-Auth-Request-Redirect; with auth-method also proxy_method and
    X-Original-URI), then the protected location with `auth_request` and one
    `auth_request_set`/`proxy_set_header` pair per auth-response-headers entry.
    The keep-alive form runs Lua in the controller (200 allows, 401/403 pass, anything else
    is a 500); here it is the same upstream keep-alive with auth_request, and the test
    checks authgate's status is exactly 200.
    """
    keepalive = "auth-keepalive" in annotations
    auth_lines = [
        "internal;",
        "access_log off;",
        "proxy_pass_request_body     off;",
        'proxy_set_header            Content-Length          "";',
        'proxy_set_header            X-Forwarded-Proto       "";',
        "proxy_set_header            X-Request-ID            $request_id;",
    ]
    if "auth-method" in annotations:
        auth_lines += [
            f"proxy_method                {annotations['auth-method']};",
            "proxy_set_header            X-Original-URI          $request_uri;",
            "proxy_set_header            X-Scheme                $scheme;",
        ]
    auth_lines += [
        f"proxy_set_header            Host                    127.0.0.1:{authgate};",
        "proxy_set_header            X-Original-URL          $scheme://$http_host$request_uri;",
        "proxy_set_header            X-Original-Method       $request_method;",
        'proxy_set_header            X-Sent-From             "nginx-ingress-controller";',
        "proxy_set_header            X-Real-IP               $remote_addr;",
        "proxy_set_header            X-Forwarded-For         $remote_addr;",
        "proxy_set_header            X-Auth-Request-Redirect $request_uri;",
        "proxy_buffering             off;",
        "proxy_buffer_size           4k;",
        "proxy_buffers               4 4k;",
        "proxy_request_buffering     on;",
        "proxy_ssl_server_name       on;",
        "proxy_pass_request_headers  on;",
        "client_max_body_size        1m;",
        annotations.get("auth-snippet", ""),
    ]
    if keepalive:
        auth_lines += [
            "proxy_http_version 1.1;",
            'proxy_set_header Connection "";',
            "set $target http://authgate_keepalive/auth;",
        ]
    else:
        auth_lines += ["proxy_http_version 1.1;", f"set $target http://127.0.0.1:{authgate}/auth;"]
    auth_lines.append("proxy_pass $target;")

    names = [h.strip() for h in annotations.get("auth-response-headers", "").split(",")]
    protect = [
        f"auth_request        {AUTH_LOCATION};",
        "auth_request_set    $auth_cookie $upstream_http_set_cookie;",
        "add_header          Set-Cookie $auth_cookie;",
        # Not the controller's: lets the test see the status authgate gave the subrequest.
        "auth_request_set    $authgate_subrequest_status $upstream_status;",
        "proxy_set_header    X-Test-Auth-Status $authgate_subrequest_status;",
    ]
    for i, name in enumerate(n for n in names if n):
        var = name.lower().replace("-", "_")
        protect.append(f"auth_request_set $authHeader{i} $upstream_http_{var};")
        protect.append(f"proxy_set_header '{name}' $authHeader{i};")
    protect += [
        annotations.get("configuration-snippet", ""),
        "proxy_set_header Host $http_host;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        f"proxy_pass http://127.0.0.1:{upstream};",
    ]
    body = "\n            ".join
    return f"""
    server {{
        listen 127.0.0.1:{listen};
        server_name api.example.com;
        {annotations.get("server-snippet", "")}
        location = {AUTH_LOCATION} {{
            {body(auth_lines)}
        }}
        location /minimal {{
            {body(protect)}
        }}
    }}
"""


def render_nginx(servers: list[str], authgate: int) -> str:
    return f"""
worker_processes 1;
pid logs/nginx.pid;
error_log logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log logs/access.log;
    client_body_temp_path tmp/client;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    # auth-keepalive: the controller's upstream for the auth service
    upstream authgate_keepalive {{
        server 127.0.0.1:{authgate};
        keepalive 32;
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }}
    {"".join(servers)}
}}
"""


@dataclass
class Stack:
    valkey: Valkey
    authgate: AuthgateProcess
    upstream: EchoUpstream
    ports: dict[str, int]  # ingress variant -> nginx port
    prefix: Path

    def nginx_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in (self.prefix / "logs").glob("*"))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Own Valkey (the Redis-down cases stop it), authgate, an echo upstream and nginx."""
    valkey = start_valkey()
    ag = start_authgate(base_env(valkey.url))
    upstream = EchoUpstream().start()
    prefix = Path(tempfile.mkdtemp(prefix="authgate-dialects-"))
    for sub in ("conf", "logs", "tmp"):
        (prefix / sub).mkdir()
    variants = {
        # auth-url and auth-response-headers only: the controller's defaults for the rest.
        "ingress-nginx": {
            "auth-url": f"http://127.0.0.1:{ag.port}/auth",
            "auth-response-headers": ingress_annotations("base")["auth-response-headers"],
        },
        "ingress-nginx-keepalive": ingress_annotations("base"),
        "ingress-nginx-snippets": ingress_annotations("snippets"),
    }
    ports = {name: free_port() for name in variants}
    servers = [
        render_ingress_server(annotations, ports[name], ag.port, upstream.port)
        for name, annotations in variants.items()
    ]
    conf = prefix / "conf" / "nginx.conf"
    conf.write_text(render_nginx(servers, ag.port))
    binary = nginx_binary()
    argv = [str(binary), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "e")]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen([*argv, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    try:
        for port in ports.values():
            wait_for_listen(port, proc)
        yield Stack(valkey, ag, upstream, ports, prefix)
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.stop()
        ag.stop()
        valkey.stop()
        shutil.rmtree(prefix, ignore_errors=True)


def mint(stack: Stack, **spec: Any) -> tuple[str, str]:
    """A query token for acme/tunes (read-only unless `spec` says otherwise)."""
    full: dict[str, Any] = {"name": "t", "org": "acme", "project": "tunes", "key_type": "r--"}
    full.update(spec)
    env = base_env(stack.valkey.url)

    async def go() -> tuple[str, str]:
        settings = load_settings(env)
        client = connect(settings.redis_url, 2.0)
        try:
            store = TokenStore(client, settings)
            token, view = await store.create(full, "test")
            return token, view["id"]
        finally:
            await client.aclose()

    return asyncio.run(go())


def expire(stack: Stack, token_id: str) -> None:
    """Rotate with no grace: the old token is expired from now on."""
    env = base_env(stack.valkey.url)

    async def go() -> None:
        settings = load_settings(env)
        client = connect(settings.redis_url, 2.0)
        try:
            await TokenStore(client, settings).rotate(token_id, 0, "test")
        finally:
            await client.aclose()

    asyncio.run(go())


# -- one request through each dialect --------------------------------------------------------
@dataclass
class Seen:
    """What the client got, and what the upstream got (None when nothing reached it)."""

    status: int
    body: bytes
    headers: dict[str, str]
    upstream: dict[str, str] | None

    def error(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error


def raw_request(
    port: int, method: str, target: str, headers: list[tuple[str, str]]
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Request:
    """The client's request: method, raw target, headers."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()


def through_nginx(stack: Stack, variant: str, req: Request) -> Seen:
    stack.upstream.clear()
    headers = [("Host", "api.example.com"), *req.headers]
    status, got, body = raw_request(stack.ports[variant], req.method, req.target, headers)
    received = stack.upstream.received
    upstream = {k.lower(): v for k, v in received[0]["headers"]} if received else None
    return Seen(status, body, got, upstream)


def through_traefik(stack: Stack, req: Request) -> Seen:
    """forwardAuth: GET <address>, the client's headers, X-Forwarded-* set by Traefik."""
    forwarded = {
        "x-forwarded-method": req.method,
        "x-forwarded-proto": "http",
        "x-forwarded-host": "api.example.com",
        "x-forwarded-uri": req.target,
        "x-forwarded-for": "127.0.0.1",
    }
    headers = [(k, v) for k, v in req.headers if k.lower() not in forwarded]
    headers += [("Host", f"127.0.0.1:{stack.authgate.port}"), *forwarded.items()]
    status, got, body = raw_request(stack.authgate.port, "GET", "/auth", headers)
    # 2xx: Traefik copies authResponseHeaders onto the request it forwards.
    upstream = {k: v for k, v in got.items() if k.title() in IDENTITY} if status < 300 else None
    return Seen(status, body, got, upstream)


def through_envoy(
    stack: Stack, req: Request, allowed: tuple[str, ...] = ("x-power-token",)
) -> Seen:
    """ext_authz HTTP service: same method, path_prefix + path and query, allowed headers."""
    keep = {"authorization", *allowed}
    headers = [(k, v) for k, v in req.headers if k.lower() in keep]
    headers += [
        ("Host", "api.example.com"),
        ("Content-Length", "0"),
        ("x-envoy-expected-rq-timeout-ms", "200"),
        ("x-forwarded-proto", "http"),
    ]
    status, got, body = raw_request(
        stack.authgate.port, req.method, "/ext-authz" + req.target, headers
    )
    upstream = {k: v for k, v in got.items() if k.title() in IDENTITY} if status < 300 else None
    return Seen(status, body, got, upstream)


DIALECTS: dict[str, Callable[[Stack, Request], Seen]] = {
    "ingress-nginx": lambda s, r: through_nginx(s, "ingress-nginx", r),
    "ingress-nginx-keepalive": lambda s, r: through_nginx(s, "ingress-nginx-keepalive", r),
    "ingress-nginx-snippets": lambda s, r: through_nginx(s, "ingress-nginx-snippets", r),
    "traefik": through_traefik,
    "envoy": through_envoy,
}
FOLDING = ("ingress-nginx", "ingress-nginx-keepalive")  # no mapping: client sees 401/403


def with_token(
    token: str | None, path: str = API, *, header: bool = True, query: bool = True
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(target, headers) carrying `token` the Power Token way: X-Power-Token and ?pwt=."""
    sep = "&" if "?" in path else "?"
    target = f"{path}{sep}pwt={token}" if token is not None and query else path
    headers = (("X-Power-Token", token),) if token is not None and header else ()
    return target, headers


# -- the decision table through every dialect -------------------------------------------------
@dataclass(frozen=True)
class Case:
    status: int
    code: str
    make: Callable[[Stack], Request]


def _plain(
    token_spec: dict[str, Any], method: str = "GET", path: str = API
) -> Callable[[Stack], Request]:
    def make(stack: Stack) -> Request:
        token, _ = mint(stack, **token_spec)
        target, headers = with_token(token, path)
        return Request(method, target, headers)

    return make


def _expired(stack: Stack) -> Request:
    token, token_id = mint(stack)
    expire(stack, token_id)
    target, headers = with_token(token)
    return Request("GET", target, headers)


def _unknown(stack: Stack) -> Request:
    body = "min_" + "Z" * 32
    target, headers = with_token(body + checksum(body))
    return Request("GET", target, headers)


def _header_only(stack: Stack) -> Request:
    token, _ = mint(stack)
    _, headers = with_token(token)
    return Request("GET", API, headers)


def _mismatch(stack: Stack) -> Request:
    one, _ = mint(stack)
    two, _ = mint(stack)
    return Request("GET", f"{API}?pwt={one}", (("X-Power-Token", two),))


CASES = [
    pytest.param(Case(401, "TOKEN_MISSING", lambda s: Request("GET", API)), id="missing"),
    pytest.param(Case(401, "TOKEN_MISSING", _header_only), id="header-only"),
    pytest.param(Case(401, "TOKEN_MISMATCH", _mismatch), id="mismatch"),
    pytest.param(
        Case(404, "TOKEN_INVALID", lambda s: Request("GET", *with_token("min_nonsense"))),
        id="malformed",
    ),
    pytest.param(Case(404, "TOKEN_INVALID", _unknown), id="unknown"),
    pytest.param(Case(401, "TOKEN_EXPIRED", _expired), id="expired"),
    pytest.param(Case(403, "IP_NOT_ALLOWED", _plain({"ip_allowlist": ["10.9.9.9/32"]})), id="ip"),
    pytest.param(
        Case(403, "SCOPE_MISMATCH", _plain({}, path="/minimal/api/rest/v1/globex/tunes/x")),
        id="scope",
    ),
    pytest.param(Case(403, "INSUFFICIENT_KEY_TYPE", _plain({}, "DELETE")), id="key-type"),
    pytest.param(
        Case(403, "ADMIN_REQUIRED", _plain({}, path="/minimal/api/system/users")), id="admin"
    ),
    # Every proxy here forwards the raw path: one not in normal form is refused (400).
    pytest.param(
        Case(
            400,
            "BAD_REQUEST",
            _plain({}, path="/minimal/api/rest/v1/acme/tunes/../../../../system/users"),
        ),
        id="dot-segments",
    ),
    pytest.param(
        Case(400, "BAD_REQUEST", _plain({}, path="/minimal/api/%73ystem/users")),
        id="escaped-system",
    ),
    pytest.param(
        Case(400, "BAD_REQUEST", _plain({}, path="/minimal/api/system/../rest/v1/acme/tunes/x")),
        id="dot-segments-into-the-scope",
    ),
    pytest.param(
        Case(
            400, "BAD_REQUEST", _plain({}, path="/minimal/api/system%2F..%2Frest/v1/acme/tunes/x")
        ),
        id="encoded-slash-into-the-scope",
    ),
]


@pytest.mark.parametrize("dialect", list(DIALECTS))
@pytest.mark.parametrize("case", CASES)
def test_denials_reach_the_client_with_the_real_status(
    stack: Stack, dialect: str, case: Case
) -> None:
    """Each denial: the table's status and JSON body (folded to 401/403 by bare ingress-nginx,
    which cannot map it back); the upstream never sees the request; never a 500."""
    seen = DIALECTS[dialect](stack, case.make(stack))
    assert seen.upstream is None, f"{dialect} let a denied request through"
    if dialect in FOLDING:
        assert seen.status == NGINX_FOLD[case.status], seen
    else:
        assert seen.status == case.status, seen
        assert seen.error()["code"] == case.code
    assert "auth request unexpected status" not in stack.nginx_log()


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_allowed_request_carries_the_identity(stack: Stack, dialect: str) -> None:
    """Allowed: exactly 200 from authgate and the identity headers replace the client's."""
    token, token_id = mint(stack, key_type="rw-", roles=["viewer", "editor"], user_id="u-1")
    target, headers = with_token(token, API + "?page=2")
    spoof = (("X-Org-Id", "evil"), ("X-Token-Id", "tok_evil"))
    seen = DIALECTS[dialect](stack, Request("POST", target, headers + spoof))
    assert seen.status == 200, seen
    assert seen.upstream is not None
    assert seen.upstream["x-org-id"] == "acme"
    assert seen.upstream["x-project-id"] == "tunes"
    assert seen.upstream["x-user-id"] == "u-1"
    assert seen.upstream["x-user-roles"] == "viewer,editor"
    assert seen.upstream["x-token-id"] == token_id
    assert seen.upstream["x-key-type"] == "rw-"
    if dialect.startswith("ingress"):
        assert seen.upstream["x-test-auth-status"] == "200"  # not 204: the keep-alive rule


@pytest.mark.parametrize("dialect", ["ingress-nginx", "ingress-nginx-keepalive"])
def test_ingress_fold_carries_the_real_answer(stack: Stack, dialect: str) -> None:
    """Asked the ingress-nginx way, authgate folds 404 into 401 with the real status and
    JSON in headers, an empty body and Content-Length: 0 (the keep-alive condition)."""
    body = "min_" + "Y" * 32
    token = body + checksum(body)
    headers = [
        ("Host", f"127.0.0.1:{stack.authgate.port}"),
        ("X-Original-URL", f"http://api.example.com{API}?pwt={token}"),
        ("X-Original-Method", "GET"),
        ("X-Sent-From", "nginx-ingress-controller"),
        ("X-Real-IP", "127.0.0.1"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Auth-Request-Redirect", f"{API}?pwt={token}"),
        ("X-Power-Token", token),
    ]
    status, got, raw = raw_request(stack.authgate.port, "GET", "/auth", headers)
    assert status == 401
    assert got["x-authgate-status"] == "404"
    assert json.loads(got["x-authgate-error"])["error"]["code"] == "TOKEN_INVALID"
    assert raw == b"" and got["content-length"] == "0"


# -- Redis down ------------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_redis_down_is_unavailable(stack: Stack, dialect: str) -> None:
    """A token not in cache while Redis is down: 503 UNAVAILABLE (401 through bare
    ingress-nginx, which can only fold it); service resumes when Redis is back."""
    token, _ = mint(stack)
    target, headers = with_token(token)
    stack.valkey.stop()
    try:
        seen = DIALECTS[dialect](stack, Request("GET", target, headers))
    finally:
        stack.valkey.start()
    assert seen.upstream is None
    if dialect in FOLDING:
        assert seen.status == 401
    else:
        assert seen.status == 503, seen
        assert seen.error()["code"] == "UNAVAILABLE"
    fresh, _ = mint(stack)  # the restarted server is empty
    target, headers = with_token(fresh)
    deadline = time.monotonic() + 10
    while DIALECTS[dialect](stack, Request("GET", target, headers)).status != 200:
        assert time.monotonic() < deadline, "authgate did not recover after Redis came back"
        time.sleep(0.05)


# -- headers a client can smuggle through a proxy --------------------------------------------
@pytest.mark.parametrize("dialect", ["ingress-nginx", "ingress-nginx-snippets", "traefik"])
def test_client_cannot_choose_the_judged_path(stack: Stack, dialect: str) -> None:
    """A client-sent X-Original-URI naming a harmless path does not get a System API call
    through: the proxy forwards client headers to authgate, so authgate must not prefer a
    header the proxy did not set over the one it did."""
    token, _ = mint(stack)  # no admin role
    target, headers = with_token(token, "/minimal/api/system/users")
    smuggled = (("X-Original-URI", f"{API}?pwt={token}"),)
    seen = DIALECTS[dialect](stack, Request("GET", target, headers + smuggled))
    assert seen.upstream is None, f"{dialect}: the system API was reached"
    assert seen.status in (400, 403), seen


@pytest.mark.parametrize("dialect", ["ingress-nginx", "traefik"])
def test_client_cannot_choose_the_judged_method(stack: Stack, dialect: str) -> None:
    """A client-sent method header does not let a read-only token DELETE."""
    token, _ = mint(stack)  # r--
    target, headers = with_token(token)
    smuggled = (("X-Original-Method", "GET"), ("X-Forwarded-Method", "GET"))
    seen = DIALECTS[dialect](stack, Request("DELETE", target, headers + smuggled))
    assert seen.upstream is None, f"{dialect}: a read-only token deleted"
    assert seen.status in (400, 403), seen
