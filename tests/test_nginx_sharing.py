"""End to end through the shipped public app sharing server (sites/app-sharing.conf).

Clean public paths map to a shared app and an injected read-only token; authgate checks
each request. The echo upstream plays the shared app, including a careless one that names
its app id and address in headers, redirects and error pages: the consumer must never see
an app id, a token or the upstream's address.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from tests.conftest import Valkey, base_env, free_port, run_cli, start_authgate
from tests.echo_upstream import APP_MODES, APP_PAGE, EchoUpstream
from tests.nginx_harness import (
    SPOOFED_ROUTING,
    Nginx,
    Reply,
    assert_routing_headers_cleared,
    nginx_binary,
    render,
    request,
)

pytestmark = pytest.mark.nginx

SHARED = {"/dashboard": "sales-overview", "/sales-dashboard": "sales-pipeline"}
GENERIC = "This shared page is not available."


@dataclass
class Stack:
    env: dict[str, str]
    echo: EchoUpstream
    tokens: dict[str, dict[str, Any]]
    nginx: dict[str, Nginx] = field(default_factory=dict)

    def get(self, path: str, via: str = "main", **kw: Any) -> Reply:
        return request(self.nginx[via].share_port, path, **kw)

    def secrets(self) -> list[str]:
        return [str(t["token"]) for t in self.tokens.values()]


def _create(env: dict[str, str], name: str, *args: str) -> dict[str, Any]:
    base = ["token", "create", "--name", name, "--org", "acme", "--project", "tunes"]
    out = run_cli(env, *base, "--key-type", "r--", *args, "--json")
    created: dict[str, Any] = json.loads(out.stdout)
    return created


@pytest.fixture(scope="module")
def stack(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client = redis.Redis.from_url(valkey.url)
    client.flushall()
    client.close()
    work = tmp_path_factory.mktemp("sharing")
    env = base_env(valkey.url)
    echo = EchoUpstream().start()
    servers: list[Nginx] = []
    authgate = None
    try:
        authgate = start_authgate(env)
        tokens = {
            "overview": _create(env, "share-overview", "--app-id", "sales-overview"),
            "pipeline": _create(env, "share-pipeline", "--app-id", "sales-pipeline"),
            "revoked": _create(env, "share-revoked", "--app-id", "sales-overview"),
            "wrong_app": _create(env, "share-wrong", "--app-id", "other-app"),
            "consumer": _create(env, "consumer-own"),
        }
        run_cli(env, "token", "revoke", tokens["revoked"]["id"])
        st = Stack(env, echo, tokens)
        good = {
            "sales-overview": tokens["overview"]["token"],
            "sales-pipeline": tokens["pipeline"]["token"],
        }
        broken = {
            "sales-overview": tokens["revoked"]["token"],
            "sales-pipeline": tokens["wrong_app"]["token"],
        }
        ag = f"127.0.0.1:{authgate.port}"
        dead = f"127.0.0.1:{free_port()}"
        variants: dict[str, dict[str, Any]] = {
            "main": dict(authgate=ag, upstream=echo.address, shared_tokens=good),
            "main_verbose": dict(
                authgate=ag, upstream=echo.address, shared_tokens=good, quiet_errors=False
            ),
            "placeholder": dict(authgate=ag, upstream=echo.address),  # the file as committed
            "broken": dict(authgate=ag, upstream=echo.address, shared_tokens=broken),
            "authgate_down": dict(authgate=dead, upstream=echo.address, shared_tokens=good),
            "upstream_down": dict(authgate=ag, upstream=dead, shared_tokens=good),
        }
        binary = nginx_binary()
        for name, kw in variants.items():
            rendered = render(work / name, api_port=free_port(), share_port=free_port(), **kw)
            st.nginx[name] = Nginx(binary, rendered).start()
            servers.append(st.nginx[name])
        yield st
    finally:
        for server in servers:
            server.stop()
        if authgate is not None:
            authgate.stop()
        echo.stop()


def assert_hidden(stack: Stack, reply: Reply) -> None:
    """Nothing in the reply names a shared app, a token, the upstream or an internal path."""
    text = reply.text()
    for forbidden in [*SHARED.values(), *stack.secrets(), stack.echo.address, "/minimal/"]:
        assert forbidden not in text, (forbidden, text)
    assert str(stack.echo.port) not in text
    assert "pwt" not in text


@pytest.mark.parametrize(("path", "app_id"), list(SHARED.items()))
def test_clean_path_serves_its_shared_app(stack: Stack, path: str, app_id: str) -> None:
    """A clean public path reaches its app's internal page with the app id and no token:
    no pwt, no X-Power-Token, and the identity of the injected token."""
    stack.echo.clear()
    reply = stack.get(path)
    assert reply.status == 200, reply.body
    assert json.loads(reply.body) == {"page": "view", "widgets": 3}
    (record,) = stack.echo.received
    assert record["target"] == f"{APP_PAGE}?app_id={app_id}"
    headers = {k.lower(): v for k, v in record["headers"]}
    assert "x-power-token" not in headers
    name = "overview" if app_id == "sales-overview" else "pipeline"
    assert headers["x-token-id"] == stack.tokens[name]["id"]
    assert headers["x-key-type"] == "r--"
    assert stack.tokens[name]["token"] not in json.dumps(record)


EXPECTED_STATUS = {
    "page": 200,
    "redirect": 302,
    "redirect_relative": 302,
    "not_found": 404,
    "forbidden": 403,
    "error": 500,
}


@pytest.mark.parametrize("mode", APP_MODES)
@pytest.mark.parametrize("path", list(SHARED))
def test_consumer_never_sees_app_id_token_or_upstream(stack: Stack, path: str, mode: str) -> None:
    """Whatever the app answers (its page with leaky headers, a redirect to its internal
    URL, an error page naming itself), the consumer gets the status and nothing else: no app
    id, token, upstream address or internal path in any header or body; redirects lead to the
    public path."""
    stack.echo.app_mode = mode
    try:
        for method in ("GET", "HEAD"):
            reply = stack.get(path, method=method)
            assert reply.status == EXPECTED_STATUS[mode], (method, reply.body)
            assert_hidden(stack, reply)
            if mode.startswith("redirect"):
                assert reply.header("Location") == path
                assert reply.header("Refresh") == f"0; url={path}"
            for name in ("Set-Cookie", "Content-Location", "Link", "X-Powered-By"):
                assert reply.header(name) is None, name
            if reply.status >= 400 and method == "GET":
                assert reply.header("Content-Type") == "application/json"
                error = json.loads(reply.body)["error"]
                assert (error["message"], error["details"]) == (GENERIC, {})
    finally:
        stack.echo.app_mode = "page"


def test_app_never_gets_client_headers_it_would_act_on(stack: Stack) -> None:
    """A consumer's method overrides, original-URL/rewrite headers, host, prefix, scheme and
    address claims never reach the shared app; the address headers are nginx's own view."""
    stack.echo.clear()
    reply = stack.get("/dashboard", headers=SPOOFED_ROUTING)
    assert reply.status == 200, reply.body
    (record,) = stack.echo.received
    assert_routing_headers_cleared(record)


def test_consumer_cannot_choose_the_app_or_the_token(stack: Stack) -> None:
    """The consumer's query (app_id, pwt) and token headers are ignored: the request is
    judged and served as the shared app with the injected token, once."""
    own = stack.tokens["consumer"]["token"]
    stack.echo.clear()
    reply = stack.get(
        f"/dashboard?app_id=sales-pipeline&pwt={own}",
        headers=[("X-Power-Token", own), ("X-API-Key", own), ("Authorization", f"Bearer {own}")],
    )
    assert reply.status == 200, reply.body
    (record,) = stack.echo.received
    assert record["target"] == f"{APP_PAGE}?app_id=sales-overview"
    headers = {k.lower(): v for k, v in record["headers"]}
    assert headers["x-token-id"] == stack.tokens["overview"]["id"]
    assert own not in json.dumps(record)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_shared_token_is_read_only(stack: Stack, method: str) -> None:
    """Writes through a shared path are refused by authgate (the injected token is r--)."""
    stack.echo.clear()
    reply = stack.get("/dashboard", method=method, body=b"{}")
    assert reply.status == 403
    assert json.loads(reply.body)["error"]["code"] == "INSUFFICIENT_KEY_TYPE"
    assert_hidden(stack, reply)
    assert stack.echo.received == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        pytest.param("/dashboard", 404, "TOKEN_INVALID", id="revoked-token"),
        pytest.param("/sales-dashboard", 403, "SCOPE_MISMATCH", id="token-for-another-app"),
    ],
)
def test_denials_keep_status_and_name_only_the_code(
    stack: Stack, path: str, status: int, code: str
) -> None:
    """When authgate refuses the injected token, the consumer gets the real status and code
    with a generic message and no details."""
    stack.echo.clear()
    reply = stack.get(path, via="broken")
    assert reply.status == status
    assert json.loads(reply.body) == {"error": {"code": code, "message": GENERIC, "details": {}}}
    assert_hidden(stack, reply)
    assert stack.echo.received == []


@pytest.mark.parametrize("path", list(SHARED))
def test_without_a_configured_token_every_clean_path_is_refused(stack: Stack, path: str) -> None:
    """As committed (no token lines), each shared path is still checked by authgate and
    refused: the public location proxies only after auth_request."""
    stack.echo.clear()
    reply = stack.get(path, via="placeholder")
    assert reply.status == 401
    assert json.loads(reply.body)["error"]["code"] == "TOKEN_MISSING"
    assert stack.echo.received == []


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/dashboardx",
        "/dashboard/x",
        "/%64ashboard",
        "/x/../dashboard",
        f"{APP_PAGE}?app_id=sales-overview",
    ],
)
def test_other_public_paths_are_404(stack: Stack, path: str) -> None:
    """Only the exact clean paths are shared; other spellings and the internal app path
    answer 404 without asking authgate or the app."""
    stack.echo.clear()
    reply = stack.get(path)
    assert reply.status == 404
    assert json.loads(reply.body)["error"]["code"] == "NOT_FOUND"
    assert_hidden(stack, reply)
    assert stack.echo.received == []


def test_consumers_cannot_call_the_auth_location(stack: Stack) -> None:
    """/_authgate_app is internal: asking for it directly is refused and shows nothing."""
    for path in ("/_authgate_app", "/_authgate"):
        reply = stack.get(path)
        assert reply.status in (401, 404), path
        assert reply.header("X-Token-Id") is None
        assert_hidden(stack, reply)


@pytest.mark.parametrize(
    ("via", "status", "code"),
    [
        pytest.param("authgate_down", 503, "UNAVAILABLE", id="authgate-down"),
        pytest.param("upstream_down", 502, "UPSTREAM_ERROR", id="upstream-down"),
    ],
)
def test_faults_answer_generic_json(stack: Stack, via: str, status: int, code: str) -> None:
    """authgate or the app unreachable: a JSON error that names neither."""
    reply = stack.get("/dashboard", via=via)
    assert reply.status == status
    assert json.loads(reply.body) == {"error": {"code": code, "message": GENERIC, "details": {}}}
    assert_hidden(stack, reply)


TOKENISH = re.compile(r"min_[A-Za-z0-9]{4,}")


def test_logs_hold_no_token_after_the_whole_module(stack: Stack) -> None:
    """After all of the above, no log of the shipped configuration holds a token or pwt,
    nginx never reported an unexpected auth status, and no 500 came from nginx itself."""
    for name, server in stack.nginx.items():
        text = server.rendered.logs()
        assert "unexpected status" not in text, name
        for line in server.rendered.access_log.read_text().splitlines():
            entry = json.loads(line)  # a 500 only when the app itself answered 500
            assert entry["status"] != 500 or entry["upstream_status"] == "500", name
        if name.endswith("_verbose"):
            continue
        assert "pwt" not in text, name
        assert not TOKENISH.search(text), name
        for secret in stack.secrets():
            assert secret not in text, name
