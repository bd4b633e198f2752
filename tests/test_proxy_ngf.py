"""authgate's promises through the nginx configuration NGINX Gateway Fabric renders.

NGF (2.x, `internal/controller/nginx/config/servers_template.go` and `servers.go`) turns
the HTTPRoute's ExternalAuth filter into, per protected location,

    auth_request /_ngf-internal-ext-auth-<namespace>_<route>_rule<i>;
    auth_request_set $ext_auth_response_<name> $upstream_http_<name>;   # per allowedResponseHeader
    proxy_set_header <Name> $ext_auth_response_<name>;

and one internal location that proxies to `<backend><http.path>` with
`proxy_pass_request_headers off`, `proxy_pass_request_body off` and only Host, `Path`
($request_uri), `Method` ($request_method), Authorization and the allowedHeaders. The
route's RequestHeaderModifier becomes `proxy_set_header` lines before the base ones
(Host, X-Forwarded-For, X-Real-IP, X-Forwarded-Proto/-Host/-Port, Upgrade, Connection);
`proxy_pass` names the backend's upstream without a URI, so the client's raw URI goes
upstream. The NginxProxy's logging becomes `error_log stderr <errorLevel>` and the
`ngf_user_defined_log_format` access log; without one nginx's default `combined` log applies.

`render` below writes that configuration from the shipped overlay, reduced to what
touches external auth (no njs matching, no TLS). What cannot be reproduced here: NGF's
controller itself (status conditions, the experimental-channel validation of the filter),
the agent that pushes the configuration, and the nginx image's modules (njs).
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, Valkey, free_port
from tests.decision_rows import ALLOWED, SCOPED, SYSTEM, Call, both
from tests.ingress_nginx_harness import K8S, kustomize
from tests.nginx_harness import Nginx, Rendered, Reply, nginx_binary
from tests.proxy_stack import backends, header_values, wait_until_expired
from tests.test_nginx_gateway import DENIED, SPOOFED
from tests.test_proxy_ingress_nginx import (
    ACTED_ON,
    DISGUISED,
    FOLDED,
    Stack,
    raw_refused,
    stop_all,
)

pytestmark = pytest.mark.nginx

OVERLAY = "overlays/gateway-api/nginx-gateway-fabric"
CONFIG = (ROOT / "deploy" / "authgate-example.toml").read_text()
NGF_DEFAULT_ERROR_LEVEL = "info"


def _var(header: str) -> str:
    return header.lower().replace("-", "_")


@dataclass(frozen=True)
class Route:
    """What NGF reads from the overlay: the route's rule, its filters, the logging."""

    namespace: str
    name: str
    hostname: str
    prefix: str
    auth_backend: str  # <namespace>_<service>_<port>
    auth_path: str
    allowed_headers: tuple[str, ...]
    allowed_response_headers: tuple[str, ...]
    removed_headers: tuple[str, ...]
    backend: str
    logging: dict[str, Any]
    snippets: dict[str, str]  # SnippetsFilter context -> value


def with_snippets(work: Path) -> str:
    """A kustomization that adds snippets/ to the overlay as its README says; returns its
    directory for `load`."""
    work.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(K8S / OVERLAY, work)  # kustomize wants relative paths
    spec = {
        "resources": [base, f"{base}/snippets/snippetsfilter.yaml"],
        "patches": [
            {
                "target": {"kind": "HTTPRoute", "name": "example-api"},
                "path": f"{base}/snippets/httproute-patch.yaml",
            }
        ],
    }
    (work / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return str(work)


def load(overlay: str = OVERLAY, *, logging: bool = True) -> Route:
    objects = kustomize(overlay)
    (route,) = [o for o in objects if o["kind"] == "HTTPRoute"]
    (rule,) = route["spec"]["rules"]
    (match,) = rule["matches"]
    assert match["path"]["type"] == "PathPrefix"
    filters = {f["type"]: f for f in rule.get("filters", [])}
    ext = filters["ExternalAuth"]["externalAuth"]
    ref = ext["backendRef"]
    ns = route["metadata"]["namespace"]
    modifier = filters.get("RequestHeaderModifier", {}).get("requestHeaderModifier", {})
    (backend,) = rule["backendRefs"]
    proxies = [o for o in objects if o["kind"] == "NginxProxy"]
    snippets: dict[str, str] = {}
    if "ExtensionRef" in filters:
        ref_name = filters["ExtensionRef"]["extensionRef"]["name"]
        (sf,) = [
            o
            for o in objects
            if o["kind"] == "SnippetsFilter" and o["metadata"]["name"] == ref_name
        ]
        snippets = {sn["context"]: sn["value"] for sn in sf["spec"]["snippets"]}
    return Route(
        namespace=ns,
        name=route["metadata"]["name"],
        hostname=route["spec"]["hostnames"][0],
        prefix=match["path"]["value"],
        auth_backend=f"{ref.get('namespace', ns)}_{ref['name']}_{ref['port']}",
        auth_path=ext["http"]["path"],
        allowed_headers=tuple(ext["http"].get("allowedHeaders", [])),
        allowed_response_headers=tuple(ext["http"].get("allowedResponseHeaders", [])),
        removed_headers=tuple(modifier.get("remove", [])),
        backend=f"{ns}_{backend['name']}_{backend['port']}",
        logging=proxies[0]["spec"].get("logging", {}) if proxies and logging else {},
        snippets=snippets,
    )


def render(route: Route, prefix: Path, *, authgate: str, upstream: str, port: int) -> Rendered:
    """Write `prefix/conf/nginx.conf` as NGF would for `route`."""
    for sub in ("conf", "logs", "tmp", "html"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    internal = f"/_ngf-internal-ext-auth-{route.namespace}_{route.name}_rule0"
    level = route.logging.get("errorLevel", NGF_DEFAULT_ERROR_LEVEL)
    access = route.logging.get("accessLog", {})
    log_lines = []
    if access.get("format"):
        escape = f" escape={access['escape']}" if access.get("escape") else ""
        log_lines = [
            f"log_format ngf_user_defined_log_format{escape} '{access['format']}';",
            "access_log logs/access.log ngf_user_defined_log_format;",
        ]
    else:
        log_lines = ["access_log logs/access.log combined;"]  # nginx's default
    # A SnippetsFilter's location snippet is included first in the location, its server
    # snippet after server_name.
    protected = route.snippets.get("http.server.location", "").splitlines()
    protected.append(f"auth_request {internal};")
    for h in route.allowed_response_headers:
        protected += [
            f"auth_request_set $ext_auth_response_{_var(h)} $upstream_http_{_var(h)};",
            f"proxy_set_header {h} $ext_auth_response_{_var(h)};",
        ]
    protected += [f'proxy_set_header {h} "";' for h in route.removed_headers]
    protected += [
        'proxy_set_header Host "$gw_api_compliant_host";',
        'proxy_set_header X-Forwarded-For "$proxy_add_x_forwarded_for";',
        'proxy_set_header X-Real-IP "$remote_addr";',
        'proxy_set_header X-Forwarded-Proto "$scheme";',
        'proxy_set_header X-Forwarded-Host "$host";',
        'proxy_set_header X-Forwarded-Port "$server_port";',
        'proxy_set_header Upgrade "$http_upgrade";',
        'proxy_set_header Connection "$connection_upgrade";',
        f"proxy_pass http://{route.backend};",
    ]
    auth = [
        "internal;",
        'proxy_set_header Host "$gw_api_compliant_host";',
        'proxy_set_header Path "$request_uri";',
        'proxy_set_header Method "$request_method";',
        'proxy_set_header Authorization "$http_authorization";',
        *[f'proxy_set_header {h} "$http_{_var(h)}";' for h in route.allowed_headers],
        f"proxy_pass http://{route.auth_backend}{route.auth_path};",
        "proxy_pass_request_body off;",
        'proxy_set_header Content-Length "";',
        "proxy_pass_request_headers off;",
    ]

    def block(head: str, lines: list[str]) -> str:
        return "\n".join(
            [f"        {head} {{", *[f"            {ln}" for ln in lines], "        }"]
        )

    slash = route.prefix.rstrip("/") + "/"
    text = "\n".join(
        [
            f"error_log logs/error.log {level};",
            "worker_processes 1;",
            "pid logs/nginx.pid;",
            "events {",
            "    worker_connections 1024;",
            "}",
            "http {",
            "    client_body_temp_path tmp/client_body;",
            "    proxy_temp_path tmp/proxy;",
            "    fastcgi_temp_path tmp/fastcgi;",
            "    uwsgi_temp_path tmp/uwsgi;",
            "    scgi_temp_path tmp/scgi;",
            "    default_type application/octet-stream;",
            "    root html;",
            "    proxy_http_version 1.1;",
            "    map $http_host $gw_api_compliant_host {",
            "        '' $host;",
            "        default $http_host;",
            "    }",
            "    map $http_upgrade $connection_upgrade {",
            "        default upgrade;",
            "        '' close;",
            "    }",
            *[f"    {ln}" for ln in log_lines],
            f"    upstream {route.backend} {{",
            f"        server {upstream};",
            "    }",
            f"    upstream {route.auth_backend} {{",
            f"        server {authgate};",
            "    }",
            "    server {",
            f"        listen 127.0.0.1:{port};",
            f"        server_name {route.hostname};",
            *[f"        {ln}" for ln in route.snippets.get("http.server", "").splitlines()],
            block(f"location {slash}", protected),
            block(f"location = {route.prefix.rstrip('/')}", protected),
            block(f"location {internal}", auth),
            "    }",
            "}",
            "",
        ]
    )
    if os.geteuid() == 0:  # workers would run as nobody, unable to use the prefix
        text = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" + text
    (prefix / "conf" / "nginx.conf").write_text(text)
    return Rendered(prefix, port, port)


@pytest.fixture(scope="module")
def stack(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("ngf")
    servers: list[Nginx] = []
    with backends(valkey.url, work, CONFIG) as back:
        try:
            echo, main = back.echo, f"127.0.0.1:{back.authgate.port}"
            no_redis = f"127.0.0.1:{back.no_redis.port}"
            st = Stack(echo, back.tokens)
            plain, snippets = load(), load(with_snippets(work / "kustomization"))
            down = f"127.0.0.1:{free_port()}"  # nothing listens there
            instances = {
                "ngf": (plain, main),
                "ngf_redis_down": (plain, no_redis),
                "ngf_authgate_down": (plain, down),
                "defaults": (load(logging=False), main),
                "ngf_snippets": (snippets, main),
                "ngf_snippets_redis_down": (snippets, no_redis),
                "ngf_snippets_authgate_down": (snippets, down),
                "ngf_snippets_impostor": (snippets, echo.address),  # 200 without X-Authgate-Uri
            }
            for name, (route, address) in instances.items():
                rendered = render(
                    route,
                    work / name,
                    authgate=address,
                    upstream=echo.address,
                    port=free_port(),
                )
                st.nginx[name] = Nginx(nginx_binary(), rendered).start()
                servers.append(st.nginx[name])
            yield st
        finally:
            stop_all(servers)


@pytest.mark.parametrize(("call", "status", "code"), DENIED)
def test_denials_are_nginx_401_or_403_pages(
    stack: Stack, call: Call, status: int, code: str
) -> None:
    """NGF has no mapping for authgate's folded answers: the client gets nginx's own 401 or
    403 page (404 and 503 as 401, 400 as 403), a 500 when authgate is stopped, and the
    upstream nothing."""
    if call.header == "expiring":
        wait_until_expired(stack.tokens)
    stack.echo.clear()
    reply = stack.send("ngf", call)
    if raw_refused(call):
        status = 400
    expected = 500 if call.via == "authgate_down" else FOLDED[status]
    assert reply.status == expected, reply.text()
    assert reply.header("Content-Type") == "text/html"
    assert stack.echo.received == []


@pytest.mark.parametrize("call", ALLOWED)
def test_allowed_request_is_proxied_once_with_the_clients_uri(stack: Stack, call: Call) -> None:
    """An allowed request reaches the upstream once with the client's method and its own
    URI, pwt included: an HTTPRoute cannot remove a query parameter (the proxy table's
    limit)."""
    stack.echo.clear()
    reply = stack.send("ngf", call)
    assert reply.status == 200, reply.text()
    assert [(r["method"], r["target"]) for r in stack.echo.received] == [
        (call.method, stack.target(call))
    ]


def test_upstream_gets_identity_from_the_decision_and_no_token_header(stack: Stack) -> None:
    """allowedResponseHeaders replace the client's identity headers with the decision's
    (or remove them), and the RequestHeaderModifier removes X-Power-Token."""
    stack.echo.clear()
    reply = stack.send("ngf", both("ro"), headers=SPOOFED)
    assert reply.status == 200, reply.text()
    (record,) = stack.echo.received
    expected = {
        "X-User-Id": ["u-1"],
        "X-Org-Id": ["acme"],
        "X-Project-Id": ["tunes"],
        "X-Space-Id": [],
        "X-Feature-Id": [],
        "X-User-Roles": ["viewer"],
        "X-Token-Id": [stack.tokens["ro"]["id"]],
        "X-Key-Type": ["r--"],
        "X-Power-Token": [],
    }
    assert {name: header_values(record, name) for name in expected} == expected


@pytest.mark.parametrize("header", [pytest.param(h, id=h[0].lower()) for h in ACTED_ON])
def test_headers_upstreams_act_on_do_not_reach_the_upstream(
    stack: Stack, header: tuple[str, str]
) -> None:
    """The RequestHeaderModifier removes method-override, original-URL and prefix headers
    a client sends, so the upstream cannot run another method or route elsewhere."""
    stack.echo.clear()
    reply = stack.send("ngf", both("ro"), headers=[header])
    assert reply.status == 200, reply.text()
    (record,) = stack.echo.received
    assert header_values(record, header[0]) == []


@pytest.mark.parametrize(
    ("call", "spoof"),
    [
        pytest.param(both("ro", SYSTEM), ("Path", SCOPED), id="path"),
        pytest.param(both("ro", SYSTEM), ("X-Original-URI", SCOPED), id="x-original-uri"),
        pytest.param(both("ro", SYSTEM), ("X-Forwarded-Uri", SCOPED), id="x-forwarded-uri"),
        pytest.param(both("ro", method="POST"), ("Method", "GET"), id="method"),
        pytest.param(both("ip_denied"), ("X-Real-IP", "203.0.113.9"), id="x-real-ip"),
        pytest.param(both("ip_denied"), ("X-Forwarded-For", "203.0.113.9"), id="x-forwarded-for"),
    ],
)
def test_client_cannot_choose_path_method_or_address(
    stack: Stack, call: Call, spoof: tuple[str, str]
) -> None:
    """NGF sends authgate only Path, Method, Host, Authorization and the allowed token
    header, none of them the client's own: spoofed ones change nothing (denied, 403)."""
    stack.echo.clear()
    reply = stack.send("ngf", call, headers=[spoof])
    assert reply.status == 403, reply.text()
    assert stack.echo.received == []


@pytest.mark.parametrize("path", DISGUISED)
def test_a_raw_path_not_in_normal_form_is_refused(stack: Stack, path: str) -> None:
    """NGF forwards the client's raw path, so authgate refuses a raw `Path` that is not in
    the normal form it judged: the client gets nginx's 403 (a folded 400) and the upstream
    nothing."""
    stack.echo.clear()
    reply = stack.send("ngf", both("ro", path))
    assert (reply.status, stack.echo.received) == (403, [])


# -- the optional SnippetsFilter (snippets/) ---------------------------------------------------


def error_of(reply: Reply) -> dict[str, Any]:
    assert reply.header("Content-Type") == "application/json", reply.text()
    error: dict[str, Any] = json.loads(reply.body)["error"]
    assert set(error) == {"code", "message", "details"}
    return error


@pytest.mark.parametrize(("call", "status", "code"), DENIED)
def test_snippets_give_every_denial_its_status_and_json_body(
    stack: Stack, call: Call, status: int, code: str
) -> None:
    """With the SnippetsFilter every decision-table denial (authgate stopped included)
    reaches the client with the table's status and authgate's JSON error, and nothing
    reaches the upstream."""
    if call.header == "expiring":
        wait_until_expired(stack.tokens)
    stack.echo.clear()
    reply = stack.send("ngf_snippets", call)
    if raw_refused(call):  # NGF's Path header carries the raw path
        status, code = 400, "BAD_REQUEST"
    assert reply.status == status, reply.text()
    assert error_of(reply)["code"] == code
    assert reply.header("Cache-Control") == "no-store"
    assert stack.echo.received == []


@pytest.mark.parametrize("call", ALLOWED)
def test_snippets_proxy_an_allowed_request_once_with_the_authorised_uri(
    stack: Stack, call: Call
) -> None:
    """With the SnippetsFilter an allowed request reaches the upstream once, with the
    client's method and the URI authgate authorised: no pwt."""
    stack.echo.clear()
    reply = stack.send("ngf_snippets", call)
    assert reply.status == 200, reply.text()
    expected = call.path + (f"?{call.query}" if call.query else "")
    assert [(r["method"], r["target"]) for r in stack.echo.received] == [(call.method, expected)]


@pytest.mark.parametrize("path", DISGUISED)
def test_snippets_forward_the_judged_path_or_refuse(stack: Stack, path: str) -> None:
    """With the SnippetsFilter the upstream receives the normalised path authgate judged,
    or the request is refused with 400 and reaches no upstream."""
    stack.echo.clear()
    reply = stack.send("ngf_snippets", both("ro", path))
    targets = [r["target"] for r in stack.echo.received]
    if reply.status == 200:
        assert targets == [SCOPED]
    else:
        assert (reply.status, error_of(reply)["code"], targets) == (400, "BAD_REQUEST", [])


def test_snippets_upstream_gets_identity_and_no_token_or_acted_on_header(stack: Stack) -> None:
    """Through @authgate_upstream the identity is the decision's, and neither the token
    header nor a method-override or original-URL header reaches the upstream."""
    stack.echo.clear()
    reply = stack.send("ngf_snippets", both("ro"), headers=[*SPOOFED, *ACTED_ON[:3]])
    assert reply.status == 200, reply.text()
    (record,) = stack.echo.received
    assert header_values(record, "X-Org-Id") == ["acme"]
    assert header_values(record, "X-User-Roles") == ["viewer"]
    assert header_values(record, "X-Token-Id") == [stack.tokens["ro"]["id"]]
    for name in ("X-Space-Id", "X-Power-Token", *[h for h, _ in ACTED_ON[:3]]):
        assert header_values(record, name) == [], name


def test_snippets_answer_503_json_to_an_answer_without_the_authorised_uri(stack: Stack) -> None:
    """A 200 from the auth service without X-Authgate-Uri is no usable decision: 503
    UNAVAILABLE with the JSON body, and the API gets nothing."""
    stack.echo.clear()
    reply = stack.send("ngf_snippets", both("ro", via="impostor"))
    assert (reply.status, error_of(reply)["code"]) == (503, "UNAVAILABLE"), reply.text()
    assert [r for r in stack.echo.received if r["target"].startswith("/minimal/")] == []


def test_shipped_logging_keeps_tokens_out_of_every_log(stack: Stack) -> None:
    """Last in the module: no access or error log of the gateways running the shipped
    NginxProxy logging holds a token value or a pwt parameter. Control: without it,
    nginx's `combined` access log writes the request line, pwt included. The servers are
    stopped first, so every line is written."""
    assert stack.send("defaults", both("ro")).status == 200
    stop_all(list(stack.nginx.values()))
    assert stack.value("ro") in stack.nginx["defaults"].rendered.logs()
    for name in [n for n in stack.nginx if n != "defaults"]:
        text = stack.nginx[name].rendered.logs()
        assert "pwt=" not in text, name
        for secret in stack.secrets():
            assert secret not in text, name
    access = stack.nginx["ngf"].rendered.access_log.read_text().splitlines()
    assert access and all(json.loads(line)["path"].startswith("/") for line in access)
