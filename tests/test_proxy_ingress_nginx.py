"""authgate's promises through the nginx configuration ingress-nginx renders for our overlays.

`tests/ingress_nginx_harness.py` renders what the controller (v1.15) makes of the shipped
Ingress and controller ConfigMap; real nginx runs it in front of a real `authgate serve`,
Valkey and the echo upstream. Three forms:

- `annotations`: deploy/k8s/overlays/ingress-nginx, snippet annotations off;
- `snippets`: deploy/k8s/overlays/ingress-nginx-snippets;
- `keepalive`: the annotations overlay with `auth-keepalive` and `use-http2: "false"`,
  the form the overlay tells users not to enable (Debian's nginx with the Lua module).

Each form runs against the working authgate (`main`), one whose Redis is down and none
at all (`authgate_down`). `snippets_verbose` is the snippets form logging at level info:
it shows nginx never logs "auth request unexpected status" there. `defaults` is the
annotations overlay on a controller without our ConfigMap, to show what its logs would
hold. The log scan at the end reads what
the whole module produced.
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Valkey, free_port
from tests.decision_rows import ALLOWED, APPS, SCOPED, SPOOFED_ORIGINAL, SYSTEM, Call, both
from tests.echo_upstream import APP_PAGE, EchoUpstream
from tests.ingress_nginx_harness import DEBIAN_NGINX, Controller, load, lua_nginx, render
from tests.nginx_harness import Nginx, Reply, nginx_binary, request
from tests.proxy_stack import Tokens, backends, header_values, wait_until_expired
from tests.test_nginx_gateway import DENIED, SPOOFED

pytestmark = pytest.mark.nginx

ANNOTATIONS = "overlays/ingress-nginx"
SNIPPETS = "overlays/ingress-nginx-snippets"
CONFIG = (ROOT / "deploy" / "authgate-example.toml").read_text()
KEEPALIVE = {"auth-keepalive": "32", "auth-keepalive-requests": "10000"}
NO_LUA = lua_nginx()
FORMS = ["annotations", "snippets", "keepalive", "snippets_verbose"]

# Without snippets nginx answers a denial itself: only 401 and 403, its own HTML page.
FOLDED = {401: 401, 403: 403, 404: 401, 503: 401, 400: 403}


def stop_all(servers: list[Nginx]) -> None:
    """Ask every nginx to quit at once, then wait for each."""
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGQUIT)
    for server in servers:
        server.stop()


def controller(form: str) -> Controller:
    if form == "snippets":
        return load(SNIPPETS)
    if form == "snippets_verbose":
        return load(SNIPPETS, config={"error-log-level": "info"})
    if form == "keepalive":
        return load(ANNOTATIONS, annotations=KEEPALIVE, config={"use-http2": "false"})
    if form == "keepalive_declared":
        # The variable the controller's Lua writes last, declared by a snippet.
        listed = load(ANNOTATIONS).annotations["auth-response-headers"].split(",")
        snippet = {"configuration-snippet": f"set $authHeader{len(listed)} '';"}
        switches = {"allow-snippet-annotations": "true", "annotations-risk-level": "Critical"}
        return load(
            ANNOTATIONS,
            annotations={**KEEPALIVE, **snippet},
            config={"use-http2": "false", **switches},
        )
    if form == "forwarded_headers":
        return load(ANNOTATIONS, config={"use-forwarded-headers": "true"})
    return load(ANNOTATIONS, configmap=None if form == "defaults" else "")


@dataclass
class Stack(Tokens):
    echo: EchoUpstream
    tokens: dict[str, dict[str, Any]]
    nginx: dict[str, Nginx] = field(default_factory=dict)

    def send(self, form: str, call: Call, headers: list[tuple[str, str]] | None = None) -> Reply:
        """`call` through `form` against authgate `call.via`."""
        name = form if call.via == "main" else f"{form}_{call.via}"
        if name not in self.nginx:
            pytest.skip(f"no {name} instance: {NO_LUA}")
        sent = list(headers or [])
        if call.header:
            sent.append(("X-Power-Token", self.value(call.header)))
        port = self.nginx[name].api_port
        return request(port, self.target(call), method=call.method, headers=sent)


@pytest.fixture(scope="module")
def stack(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("ingress-nginx")
    servers: list[Nginx] = []
    with backends(valkey.url, work, CONFIG) as back:
        try:
            echo = back.echo
            st = Stack(echo, back.tokens)
            neighbours = {
                "": f"127.0.0.1:{back.authgate.port}",
                "_redis_down": f"127.0.0.1:{back.no_redis.port}",
                "_authgate_down": f"127.0.0.1:{free_port()}",  # nothing listens there
                "_hung": back.hung,
                "_impostor": echo.address,  # answers 200 without X-Authgate-Uri
            }
            wanted = [("defaults", ""), ("keepalive_declared", ""), ("forwarded_headers", "")]
            wanted += [("snippets", "_hung"), ("snippets", "_impostor")]
            wanted += [(form, via) for form in FORMS for via in list(neighbours)[:3]]
            for form, via in wanted:
                lua = form.startswith("keepalive")
                if lua and NO_LUA:
                    continue
                rendered = render(
                    controller(form),
                    work / f"{form}{via}",
                    authgate=neighbours[via],
                    upstream=echo.address,
                    port=free_port(),
                    lua=lua,
                )
                binary = DEBIAN_NGINX if lua else nginx_binary()
                st.nginx[form + via] = Nginx(binary, rendered).start()
                servers.append(st.nginx[form + via])
            yield st
        finally:
            stop_all(servers)


def error_of(reply: Reply) -> dict[str, Any]:
    assert reply.header("Content-Type") == "application/json", reply.text()
    error: dict[str, Any] = json.loads(reply.body)["error"]
    assert set(error) == {"code", "message", "details"}
    return error


# -- 1. what the client sees --------------------------------------------------------------


@pytest.mark.parametrize("form", ["snippets", "snippets_verbose"])
@pytest.mark.parametrize(("call", "status", "code"), DENIED)
def test_snippets_give_every_denial_its_status_and_json_body(
    stack: Stack, form: str, call: Call, status: int, code: str
) -> None:
    """Through the snippets overlay every decision-table denial (authgate stopped
    included) reaches the client with the table's status and authgate's JSON error (a raw
    path not in normal form: 400 BAD_REQUEST), and nothing reaches the upstream."""
    if call.header == "expiring":
        wait_until_expired(stack.tokens)  # type: ignore[arg-type]
    stack.echo.clear()
    reply = stack.send(form, call)
    if raw_refused(call):  # the controller's X-Original-URL carries the raw path
        status, code = 400, "BAD_REQUEST"
    assert reply.status == status, reply.text()
    assert error_of(reply)["code"] == code
    assert reply.header("Cache-Control") == "no-store"
    assert stack.echo.received == []


@pytest.mark.parametrize("form", ["annotations", "keepalive"])
@pytest.mark.parametrize(("call", "status", "code"), DENIED)
def test_without_snippets_denials_are_nginx_401_or_403_pages(
    stack: Stack, form: str, call: Call, status: int, code: str
) -> None:
    """Without snippets the client gets only what the overlay README's table says: nginx's
    own 401 or 403 page (404 and 503 as 401, 400 as 403), and a 500 when authgate is
    stopped; nothing reaches the upstream."""
    if call.header == "expiring":
        wait_until_expired(stack.tokens)  # type: ignore[arg-type]
    stack.echo.clear()
    reply = stack.send(form, call)
    if raw_refused(call):
        status = 400
    expected = 500 if call.via == "authgate_down" else FOLDED[status]
    assert reply.status == expected, reply.text()
    assert reply.header("Content-Type") == "text/html"
    assert stack.echo.received == []


def raw_refused(call: Call) -> bool:
    """Whether the call's raw path is outside the normal form authgate judges (an escape,
    a dot segment, a repeated slash): refused on dialects that forward the raw path."""
    return "%" in call.path or "/." in call.path or "//" in call.path


def judged(call: Call) -> str:
    """The target authgate authorises for an allowed call: the path and its other query
    parameters, without pwt."""
    return call.path + (f"?{call.query}" if call.query else "")


@pytest.mark.parametrize("call", ALLOWED)
def test_snippets_proxy_an_allowed_request_once_with_the_authorised_uri(
    stack: Stack, call: Call
) -> None:
    """An allowed request reaches the upstream once, with the client's method and the URI
    authgate authorised: no pwt."""
    stack.echo.clear()
    reply = stack.send("snippets", call)
    assert reply.status == 200, reply.text()
    assert [(r["method"], r["target"]) for r in stack.echo.received] == [
        (call.method, judged(call))
    ]


@pytest.mark.parametrize("call", ALLOWED)
def test_annotations_proxy_an_allowed_request_once_with_the_clients_uri(
    stack: Stack, call: Call
) -> None:
    """Without snippets an allowed request reaches the upstream once with the client's own
    URI, pwt included: the limit the proxy table names (workaround: the snippets overlay)."""
    stack.echo.clear()
    reply = stack.send("annotations", call)
    assert reply.status == 200, reply.text()
    assert [(r["method"], r["target"]) for r in stack.echo.received] == [
        (call.method, stack.target(call))
    ]


@pytest.mark.parametrize("form", ["annotations", "snippets"])
def test_the_exact_prefix_location_is_protected_too(stack: Stack, form: str) -> None:
    """A Prefix path renders two locations (`/minimal/` and `= /minimal`), each with its
    own auth location: `/minimal` itself is checked (401 without a token) and, allowed,
    proxied once without pwt in the snippets form."""
    stack.echo.clear()
    assert stack.send(form, Call("/minimal")).status == 401
    reply = stack.send(form, both("ro", "/minimal"))
    assert reply.status == 200, reply.text()
    expected = "/minimal" if form == "snippets" else stack.target(both("ro", "/minimal"))
    assert [r["target"] for r in stack.echo.received] == [expected]


def test_keepalive_form_answers_every_allowed_request_with_500(stack: Stack) -> None:
    """With auth-keepalive (and use-http2 "false") the controller's Lua writes the answer's
    headers into $authHeader1..N while the template declares $authHeader0..N-1: an
    allowed request becomes a 500 and never reaches the upstream. This is why the overlay
    does not enable keep-alive."""
    stack.echo.clear()
    reply = stack.send("keepalive", both("ro"))
    assert reply.status == 500, reply.text()
    assert stack.echo.received == []


def test_keepalive_form_cannot_be_repaired_by_declaring_the_variable(stack: Stack) -> None:
    """Declaring the variable the controller's Lua writes last stops the 500 but not the
    harm: the template sends header i from $authHeader<i> while the Lua stores header i's
    answer in $authHeader<i+1> (and looks names up case-sensitively), so the API never
    gets the decision's identity under its names: X-Org-Id is always empty."""
    stack.echo.clear()
    reply = stack.send("keepalive_declared", both("ro"))
    assert reply.status == 200, reply.text()
    (record,) = stack.echo.received
    assert header_values(record, "X-Org-Id") == []
    assert header_values(record, "X-Project-Id") != ["tunes"]


def test_keepalive_needs_use_http2_off() -> None:
    """auth-keepalive alone does not switch the controller to the Lua form: with HTTP/2 on
    (its default) it keeps auth_request."""
    assert not load(ANNOTATIONS, annotations=KEEPALIVE).keepalive
    assert controller("keepalive").keepalive


@pytest.mark.parametrize("form", ["annotations", "snippets"])
def test_request_body_reaches_the_upstream_once(stack: Stack, form: str) -> None:
    """An allowed write carries its body to the upstream (the auth subrequest never gets
    it), also when the snippets proxy it from @authgate_upstream."""
    stack.echo.clear()
    call = both("rw", method="POST")
    body = b"x" * 20_000
    token = stack.value("rw")
    reply = request(
        stack.nginx[form].api_port,
        stack.target(call),
        method="POST",
        headers=[("X-Power-Token", token)],
        body=body,
    )
    assert reply.status == 200, reply.text()
    assert [(r["method"], r["body_length"]) for r in stack.echo.received] == [("POST", len(body))]


INTERNAL = ("x-authgate-", "x-org-id", "x-token-id", "x-user-id", "x-key-type")


@pytest.mark.parametrize("form", ["annotations", "snippets", "keepalive"])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(both("ro"), id="allowed"),
        pytest.param(both("never_created"), id="invalid"),
        pytest.param(both("ro", SYSTEM), id="admin-required"),
        pytest.param(both("ro", via="redis_down"), id="unavailable"),
    ],
)
def test_client_never_sees_authgates_answer_headers_or_the_token(
    stack: Stack, form: str, call: Call
) -> None:
    """Neither authgate's answer headers (X-Authgate-*, identity) nor the token reach the
    client, allowed or denied. (An allowed body is the echo upstream's report of what it
    received, so only a denial's body is checked.)"""
    reply = stack.send(form, call)
    names = [name.lower() for name, _ in reply.headers]
    assert not [n for n in names if n.startswith(INTERNAL)], names
    shown = reply.text() if reply.status != 200 else str(reply.headers)
    for secret in stack.secrets():
        assert secret not in shown


# -- 2. what the upstream receives -----------------------------------------------------------


@pytest.mark.parametrize("form", ["annotations", "snippets"])
def test_upstream_gets_identity_from_the_decision_and_no_token_header(
    stack: Stack, form: str
) -> None:
    """Identity headers a client sends are replaced by the decision's values or removed,
    and X-Power-Token never reaches the upstream."""
    stack.echo.clear()
    sent = [*SPOOFED, ("x-power-token", stack.value("ro"))]
    reply = stack.send(form, both("ro"), headers=sent)
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
        "X_User_Id": [],
        "X-Power-Token": [],
    }
    assert {name: header_values(record, name) for name in expected} == expected
    assert stack.value("ro") not in json.dumps(record["headers"])


# Headers upstreams act on: method overrides, original-URL routing, prefix claims.
ACTED_ON = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Original-Method", "DELETE"),
    ("X-Forwarded-Method", "DELETE"),
    ("X-Original-URL", SYSTEM),
    ("X-Rewrite-URL", SYSTEM),
    ("X-Original-URI", SYSTEM),
    ("X-Forwarded-Uri", SYSTEM),
    ("X-Forwarded-Prefix", "/minimal/api/system"),
    ("X-Forwarded-Server", "evil"),
    ("Forwarded", "for=10.1.2.3;host=evil"),
]


@pytest.mark.parametrize("form", ["annotations", "snippets"])
@pytest.mark.parametrize("header", [pytest.param(h, id=h[0].lower()) for h in ACTED_ON])
def test_headers_upstreams_act_on_do_not_reach_the_upstream(
    stack: Stack, form: str, header: tuple[str, str]
) -> None:
    """A method-override, original-URL or prefix header the client sends is removed, so
    the upstream cannot run another method or route to another path than authgate judged
    (or authgate refuses the request, which the original-URI headers contradict)."""
    stack.echo.clear()
    reply = stack.send(form, both("ro"), headers=[header])
    received = stack.echo.received
    assert reply.status in {200, 400, 403}, reply.text()
    assert len(received) == (1 if reply.status == 200 else 0)
    for record in received:
        assert header_values(record, header[0]) == []


@pytest.mark.parametrize("form", ["annotations", "snippets"])
@pytest.mark.parametrize(
    "spoof",
    [
        pytest.param([("X-Real-IP", "203.0.113.9")], id="x-real-ip"),
        pytest.param([("X-Forwarded-For", "203.0.113.9")], id="x-forwarded-for"),
        pytest.param(
            [("X-Real-IP", "203.0.113.9"), ("X-Forwarded-For", "203.0.113.9, 10.0.0.1")],
            id="both",
        ),
    ],
)
def test_client_cannot_choose_its_address(
    stack: Stack, form: str, spoof: list[tuple[str, str]]
) -> None:
    """The controller sets X-Real-IP and X-Forwarded-For to the peer it saw: a client's own
    values do not get a token past its IP allowlist."""
    reply = stack.send(form, both("ip_denied"), headers=spoof)
    assert reply.status == 403, reply.text()
    if form == "snippets":
        error = error_of(reply)
        assert (error["code"], error["details"]["client_ip"]) == ("IP_NOT_ALLOWED", "127.0.0.1")


def test_use_forwarded_headers_would_let_a_client_choose_its_address(stack: Stack) -> None:
    """Control for the shipped `use-forwarded-headers: "false"`: with "true" and the
    default proxy-real-ip-cidr (0.0.0.0/0) a client's own X-Forwarded-For becomes the
    address the controller sends authgate, and gets a token past its IP allowlist."""
    spoof = [("X-Forwarded-For", "203.0.113.9")]
    assert stack.send("forwarded_headers", both("ip_denied"), headers=spoof).status == 200
    assert stack.send("annotations", both("ip_denied"), headers=spoof).status == 403


@pytest.mark.parametrize("form", ["annotations", "snippets"])
@pytest.mark.parametrize(("call", "spoof", "code"), SPOOFED_ORIGINAL)
def test_client_cannot_choose_the_path_or_method_authgate_judges(
    stack: Stack, form: str, call: Call, spoof: tuple[str, str], code: str
) -> None:
    """A client's own X-Original-*/X-Forwarded-* headers do not replace the request the
    controller describes: it sets the X-Original-* ones itself and blanks X-Forwarded-Uri
    and -Method (auth-proxy-set-headers), so authgate judges the real request."""
    stack.echo.clear()
    reply = stack.send(form, call, headers=[spoof])
    assert stack.echo.received == []
    if form == "snippets":
        assert (reply.status, error_of(reply)["code"]) == (403, code)
    else:
        assert reply.status == 403, reply.text()


def raw_request(port: int, head: bytes) -> int:
    """The status nginx answers to a hand-written request head."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        data = b""
        while b"\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("form", ["annotations", "snippets"])
@pytest.mark.parametrize(
    "host",
    [
        pytest.param(b"x" + SCOPED.encode(), id="path-in-host"),
        pytest.param(b"x?", id="query-in-host"),
        pytest.param(b"x#", id="fragment-in-host"),
        pytest.param(b"x@y", id="userinfo-in-host"),
    ],
)
def test_client_host_header_cannot_change_the_judged_path(
    stack: Stack, form: str, host: bytes
) -> None:
    """X-Original-URL is built from the client's Host header: whatever Host says, a System
    API call stays one (denied to a non-admin) or is refused, and reaches no upstream."""
    stack.echo.clear()
    token = stack.value("ro").encode()
    head = (
        b"GET "
        + SYSTEM.encode()
        + b"?pwt="
        + token
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\nX-Power-Token: "
        + token
        + b"\r\nConnection: close\r\n\r\n"
    )
    status = raw_request(stack.nginx[form].api_port, head)
    assert status in {400, 403}
    assert stack.echo.received == []


# The scoped API's path spelled so that an upstream which does not resolve dot segments or
# decode %2F itself would route it to the System API.
DISGUISED = [
    pytest.param("/minimal/api/system/../rest/v1/acme/tunes/items", id="dot-segments"),
    pytest.param("/minimal/api/system%2F..%2Frest/v1/acme/tunes/items", id="encoded-slash"),
    pytest.param("/minimal/api/system/..%2Frest/v1/acme/tunes/items", id="mixed"),
    pytest.param("/minimal/api//system/../rest/v1/acme/tunes/items", id="double-slash"),
]


@pytest.mark.parametrize("path", DISGUISED)
def test_snippets_forward_the_judged_path_or_refuse(stack: Stack, path: str) -> None:
    """The upstream receives the normalised path authgate judged (never the client's raw
    spelling), or the request is refused with 400 and reaches no upstream."""
    stack.echo.clear()
    reply = stack.send("snippets", both("ro", path))
    targets = [r["target"] for r in stack.echo.received]
    if reply.status == 200:
        assert targets == [SCOPED]
    else:
        assert (reply.status, error_of(reply)["code"], targets) == (400, "BAD_REQUEST", [])


@pytest.mark.parametrize("path", DISGUISED)
def test_annotations_refuse_a_raw_path_not_in_normal_form(stack: Stack, path: str) -> None:
    """Without snippets the controller forwards the client's raw path, so authgate refuses
    a raw path that is not in the normal form it judged (X-Original-URL dialect): the
    client gets nginx's 403 (a folded 400) and the upstream nothing."""
    stack.echo.clear()
    reply = stack.send("annotations", both("ro", path))
    assert (reply.status, stack.echo.received) == (403, [])


def test_snippets_keep_the_other_query_parameters(stack: Stack) -> None:
    """The query the upstream receives is the client's without pwt: every other parameter
    is kept, in order."""
    stack.echo.clear()
    reply = stack.send("snippets", both("app", APPS, query="app_id=app-1&x=1"))
    assert reply.status == 200, reply.text()
    (record,) = stack.echo.received
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(record["target"]).query)
    assert query == {"app_id": ["app-1"], "x": ["1"]}


@pytest.mark.parametrize("mode", ["forbidden", "not_found", "error"])
def test_snippets_pass_the_upstreams_own_errors_through(stack: Stack, mode: str) -> None:
    """The mapping applies to authgate's answers only: an error page of the API itself
    (403, 404, 500) reaches the client as the API sent it."""
    stack.echo.app_mode = mode
    try:
        reply = stack.send("snippets", both("app", APP_PAGE, query="app_id=app-1"))
    finally:
        stack.echo.app_mode = "page"
    assert reply.status == {"forbidden": 403, "not_found": 404, "error": 500}[mode]
    assert reply.header("Content-Type") == "text/html"
    assert b"app app-1" in reply.body


@pytest.mark.parametrize(
    "via",
    [
        pytest.param("hung", id="authgate-never-answers"),
        pytest.param("impostor", id="answer-without-authorised-uri"),
    ],
)
def test_snippets_answer_503_json_when_authgate_gives_no_usable_decision(
    stack: Stack, via: str
) -> None:
    """authgate accepting connections but never answering (the auth-snippet's 2 s
    timeout), or a 200 without X-Authgate-Uri, gives 503 UNAVAILABLE with the JSON body,
    and nothing reaches the upstream."""
    stack.echo.clear()
    reply = stack.send("snippets", both("ro", via=via))
    assert (reply.status, error_of(reply)["code"]) == (503, "UNAVAILABLE"), reply.text()
    assert [r for r in stack.echo.received if r["target"].startswith("/minimal/api/")] == []


# -- 3. logs ----------------------------------------------------------------------------------


def logs_of(stack: Stack, name: str) -> str:
    return stack.nginx[name].rendered.logs()


def test_shipped_controller_settings_keep_tokens_out_of_every_log(stack: Stack) -> None:
    """Last in the module: after every request above (allowed, denied, authgate or Redis
    down, spoofed headers), no access or error log of a form running the shipped
    controller ConfigMap holds a token value or a pwt parameter. Control: with the
    controller's default log format ($request) the token lands in its log. The servers
    are stopped first, so every line is written."""
    assert stack.send("defaults", both("ro")).status == 200
    stop_all(list(stack.nginx.values()))
    assert stack.value("ro") in logs_of(stack, "defaults")
    checked = [n for n in stack.nginx if n != "defaults" and not n.startswith("snippets_verbose")]
    assert len(checked) >= 6
    for name in checked:
        text = logs_of(stack, name)
        assert "pwt=" not in text, name
        for secret in stack.secrets():
            assert secret not in text, name
    for name in [n for n in stack.nginx if n.startswith("snippets_verbose")]:
        assert "auth request unexpected status" not in logs_of(stack, name), name
    access = Path(stack.nginx["snippets"].rendered.access_log).read_text().splitlines()
    assert access and all(json.loads(line)["path"].startswith("/") for line in access)
