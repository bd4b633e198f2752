"""SPEC §4's promises, as tests that run through a real proxy (Traefik or Caddy).

`neighbours` starts what a proxy talks to: the backends of `tests/proxy_stack.py` (authgate
with and without Redis, a port that never answers, the echo upstream, the tokens) and an
authgate the tests stop. `ProxyPromises` holds the tests; a test module subclasses it as
`Test…` and provides a module-scoped `gateway` fixture (a `Gateway`: the proxy and its sites).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    ROOT,
    AuthgateProcess,
    Valkey,
    free_port,
    start_authgate,
)
from tests.decision_rows import (
    ALLOWED,
    SCOPED,
    SPOOFED_ORIGINAL,
    SYSTEM,
    Call,
    both,
)
from tests.decision_rows import DENIED as EVERY_DENIAL
from tests.echo_upstream import EchoUpstream
from tests.proxy_stack import Tokens, backends, header_values, wait_until_expired
from tests.traefik_caddy_harness import Proxy, Reply, Site, send

# -- the stack: Valkey, authgate processes, tokens, an echo upstream ------------------------

CONFIG = (ROOT / "deploy" / "authgate-example.toml").read_text()

# Sites every gateway has: authgate with its Redis, without it, not listening at all,
# accepting connections but never answering, one the tests stop; authgate with an
# upstream that is not listening; and an impostor that allows everything without saying
# which URI it judged (the echo upstream answering /auth).
NEIGHBOURS = (
    "main",
    "redis_down",
    "authgate_down",
    "hung",
    "stopped",
    "upstream_down",
    "impostor",
)


@dataclass
class Gateway(Tokens):
    """A proxy in front of the neighbours, with the tokens and the upstream it serves."""

    proxy: Proxy
    echo: EchoUpstream
    tokens: dict[str, dict[str, Any]]
    authgates: dict[str, AuthgateProcess]
    prefix: str = ""  # site names: prefix + neighbour

    def port(self, via: str = "main") -> int:
        return self.proxy.ports[self.prefix + via]

    def send(
        self,
        call: Call,
        headers: list[tuple[str, str]] | None = None,
        source: str | None = None,
    ) -> Reply:
        sent = list(headers or [])
        if call.header:
            sent.append(("X-Power-Token", self.value(call.header)))
        port = self.port(call.via)
        return send(port, self.target(call), method=call.method, headers=sent, source=source)


@dataclass
class Neighbours:
    """What the proxies talk to: authgate processes, a hung port, tokens, the echo."""

    env: dict[str, str]
    echo: EchoUpstream
    tokens: dict[str, dict[str, Any]]
    authgates: dict[str, AuthgateProcess]
    addresses: dict[str, str]
    dead: str  # an address nothing listens on

    def sites(self, prefix: str = "", form: str = "k8s") -> list[Site]:
        def upstream(name: str) -> str:
            return self.dead if name == "upstream_down" else self.echo.address

        return [Site(prefix + n, self.addresses[n], upstream(n), form) for n in NEIGHBOURS]


def neighbours(valkey: Valkey, work: Path) -> Iterator[Neighbours]:
    """The backends (tests/proxy_stack.py) and one more authgate, the one tests stop;
    all stopped afterwards."""
    with backends(valkey.url, work, CONFIG) as back:
        stopped = start_authgate(back.env)
        try:
            authgates = {"main": back.authgate, "stopped": stopped, "redis_down": back.no_redis}
            addresses = {n: f"127.0.0.1:{a.port}" for n, a in authgates.items()}
            dead = f"127.0.0.1:{free_port()}"  # nothing listens here
            addresses["authgate_down"] = dead
            addresses["upstream_down"] = addresses["main"]
            addresses["hung"] = back.hung
            addresses["impostor"] = back.echo.address
            yield Neighbours(back.env, back.echo, back.tokens, authgates, addresses, dead)
        finally:
            stopped.stop()


# -- the promises, as tests ----------------------------------------------------------------

DENIED = [
    *EVERY_DENIAL,
    pytest.param(both("ro", via="hung"), 503, "UNAVAILABLE", id="authgate-not-answering"),
]

# Other spellings of a System API path. Where the proxy resolves them itself (Traefik
# decodes %73 and resolves dot segments) authgate judges a System API call; where it
# forwards them raw (Caddy; Traefik's %2F) authgate refuses the raw path.
SYSTEM_SPELLINGS = [
    pytest.param("/minimal/api/%73ystem/health", id="encoded-letter"),
    pytest.param("/minimal/api%2Fsystem/health", id="encoded-slash"),
    pytest.param("/minimal/api/rest/v1/acme/tunes/../../../../system/health", id="dot-segments"),
    pytest.param("/minimal/api/rest/v1/acme/tunes/..%2F..%2F..%2F..%2Fsystem/health", id="mixed"),
]

SPOOFED = [
    ("X-User-Id", "evil"),
    ("x-user-id", "evil-lower"),
    ("X_User_Id", "evil-underscore"),
    ("X-Org-Id", "other-org"),
    ("X-Project-Id", "other-project"),
    ("X-Space-Id", "other-space"),
    ("X-Feature-Id", "other-feature"),
    ("X-User-Roles", "admin"),
    ("X-Token-Id", "tok_forged"),
    ("X-Key-Type", "rwd"),
    ("X-Authgate-Uri", SYSTEM),
]

# Paths whose raw form an upstream might route to the System API while authgate, having
# normalised them, judges them as the scoped API.
NORMALISED = "/minimal/api/rest/v1/acme/tunes/x"
AMBIGUOUS = [
    pytest.param("/minimal/api/system/../rest/v1/acme/tunes/x", id="dot-segments"),
    pytest.param("/minimal/api/system%2F..%2Frest/v1/acme/tunes/x", id="encoded-slashes"),
    pytest.param("/minimal/api/system/%2e%2e/rest/v1/acme/tunes/x", id="encoded-dots"),
    pytest.param("/minimal/api/system//..//rest/v1/acme/tunes/x", id="repeated-slashes"),
]

# Paths authgate reads one way and common upstreams another: a backslash (IIS, many
# routers on Windows hosts), a `;` path parameter (Tomcat, Spring, Jetty strip it), a case
# variant of a protected prefix (case-insensitive routers), a segment ending in a dot.
FOLDED_BY_UPSTREAMS = [
    pytest.param(
        "/minimal/api/rest/v1/acme/tunes/..%5C..%5C..%5C..%5Csystem/health", id="backslashes"
    ),
    pytest.param("/minimal/api/system;x/health", id="path-parameter"),
    pytest.param("/minimal/api/System/health", id="case-variant"),
    pytest.param("/minimal/api/system./health", id="trailing-dot"),
]

CLIENT = "127.0.0.2"  # a client address that is not the proxy's (127.0.0.1)

TOKENISH = re.compile(r"\b(min|ak_live)_[A-Za-z0-9]{8,}")


class ProxyPromises:
    """SPEC §4's promises through one real proxy; subclasses provide `gateway`."""

    @pytest.mark.parametrize(("call", "status", "code"), DENIED)
    def test_denial_reaches_client_with_its_status_and_json_body(
        self, gateway: Gateway, call: Call, status: int, code: str
    ) -> None:
        """Every decision-table denial, authgate's outages included, reaches the client with
        the table's status and a JSON error body with its code, not to be cached; nothing
        reaches the upstream."""
        if call.header == "expiring":
            wait_until_expired(gateway.tokens)
        before = len(gateway.echo.received)
        reply = gateway.send(call)
        assert reply.status == status, reply.body
        assert reply.error()["code"] == code
        assert reply.header("Cache-Control") == "no-store"
        assert gateway.echo.received[before:] == []

    @pytest.mark.parametrize("call", ALLOWED)
    def test_allowed_request_is_proxied_once_without_the_token(
        self, gateway: Gateway, call: Call
    ) -> None:
        """An allowed request reaches the upstream exactly once, with the client's method,
        path and query but neither pwt nor the token header."""
        gateway.echo.clear()
        reply = gateway.send(call)
        assert reply.status == 200, reply.body
        assert reply.header("Cache-Control") is None  # the upstream's answer, untouched
        received = gateway.echo.received
        assert [r["method"] for r in received] == [call.method]
        assert received[0]["target"] == call.path + (f"?{call.query}" if call.query else "")
        assert header_values(received[0], "X-Power-Token") == []
        assert not any(secret in json.dumps(received) for secret in gateway.secrets())

    def test_upstream_gets_identity_from_the_decision_only(self, gateway: Gateway) -> None:
        """Identity headers a client sends (any case, underscores too) are replaced by the
        decision's values or removed."""
        gateway.echo.clear()
        reply = gateway.send(both("ro"), headers=SPOOFED)
        assert reply.status == 200, reply.body
        (record,) = gateway.echo.received
        expected = {
            "X-User-Id": ["u-1"],
            "X-Org-Id": ["acme"],
            "X-Project-Id": ["tunes"],
            "X-User-Roles": ["viewer"],
            "X-Token-Id": [gateway.tokens["ro"]["id"]],
            "X-Key-Type": ["r--"],
            "X_User_Id": [],
            "X-Authgate-Uri": [],
            "X-Power-Token": [],
        }
        assert {name: header_values(record, name) for name in expected} == expected
        # The token has none: the client's is removed, not kept (Traefik copies authgate's
        # empty value, Caddy drops the header).
        for name in ("X-Space-Id", "X-Feature-Id"):
            assert header_values(record, name) in ([], [""]), name
        assert record["target"] == SCOPED

    @pytest.mark.parametrize(
        ("query", "forwarded"),
        [
            pytest.param("a=1&pwt={ro}&b=2", "?a=1&b=2", id="between-others"),
            pytest.param("pwt={ro}", "", id="alone"),
            pytest.param("pwt={ro}&note=x%20y&pwt={ro}", "?note=x%20y", id="twice"),
            pytest.param("pwt={ro}&copy={ro}", None, id="token-in-another-parameter"),
            pytest.param("pwt={ro}&PWT={ro}", None, id="other-spelling"),
        ],
    )
    def test_token_parameters_never_reach_the_upstream(
        self, gateway: Gateway, query: str, forwarded: str | None
    ) -> None:
        """The upstream gets the query without pwt, the rest as sent, and no X-Power-Token
        header; a token also found outside its own parameter is refused (400), not
        forwarded."""
        gateway.echo.clear()
        target = f"{SCOPED}?{query.format(ro=gateway.value('ro'))}"
        headers = [("X-Power-Token", gateway.value("ro"))]
        reply = send(gateway.port(), target, headers=headers)
        if forwarded is None:
            assert (reply.status, reply.error()["code"]) == (400, "BAD_REQUEST")
            assert gateway.echo.received == []
            return
        assert reply.status == 200, reply.body
        (record,) = gateway.echo.received
        assert record["target"] == SCOPED + forwarded
        assert gateway.value("ro") not in json.dumps(record)

    @pytest.mark.parametrize("path", SYSTEM_SPELLINGS)
    def test_system_api_spellings_are_denied(self, gateway: Gateway, path: str) -> None:
        """Every other spelling of a System API path is denied to a token without the admin
        role: judged as the System API (403 ADMIN_REQUIRED) or refused (400 BAD_REQUEST),
        with the JSON body; nothing reaches the upstream."""
        gateway.echo.clear()
        reply = gateway.send(both("ro", path))
        assert (reply.status, reply.error()["code"]) in (
            (403, "ADMIN_REQUIRED"),
            (400, "BAD_REQUEST"),
        ), reply.body
        assert gateway.echo.received == []

    @pytest.mark.parametrize("path", AMBIGUOUS)
    @pytest.mark.parametrize("token", ["ro", "admin"])
    def test_upstream_gets_the_judged_path_or_nothing(
        self, gateway: Gateway, path: str, token: str
    ) -> None:
        """A path with dot segments, encoded slashes or dots is either refused, or reaches
        the upstream normalised exactly as authgate judged it: never in a raw form an
        upstream could route to the System API."""
        gateway.echo.clear()
        reply = gateway.send(both(token, path))
        received = gateway.echo.received
        if reply.status == 200:
            assert [r["target"] for r in received] == [NORMALISED]
        else:
            assert reply.status in (400, 403), reply.body
            assert reply.error()["code"] in ("BAD_REQUEST", "ADMIN_REQUIRED")
            assert received == []

    @pytest.mark.parametrize("path", FOLDED_BY_UPSTREAMS)
    def test_paths_upstreams_read_differently_are_refused(
        self, gateway: Gateway, path: str
    ) -> None:
        """A path that common upstreams fold into a System API call while authgate reads
        it as another route is refused with 400 BAD_REQUEST and never forwarded."""
        gateway.echo.clear()
        reply = gateway.send(both("ro", path))
        assert (reply.status, reply.error()["code"]) == (400, "BAD_REQUEST")
        assert gateway.echo.received == []

    @pytest.mark.parametrize(
        ("token", "spoof"),
        [
            pytest.param("ip_denied", [("X-Real-IP", "203.0.113.9")], id="x-real-ip"),
            pytest.param("ip_denied", [("X-Forwarded-For", "203.0.113.9")], id="xff"),
            pytest.param(
                "ip_denied",
                [("X-Real-IP", "203.0.113.9"), ("X-Forwarded-For", "203.0.113.9, 10.0.0.1")],
                id="both",
            ),
            pytest.param("ip_private", [("X-Real-IP", "10.1.2.3")], id="trusted-range-real-ip"),
            pytest.param("ip_private", [("X-Forwarded-For", "10.1.2.3")], id="trusted-range-xff"),
            pytest.param(
                "ip_private", [("Forwarded", "for=10.1.2.3")], id="trusted-range-forwarded"
            ),
            pytest.param(
                "ip_denied",
                [("Connection", "X-Real-IP, X-Forwarded-For")],
                id="hop-by-hop-removal",
            ),
            pytest.param(
                "ip_private",
                [("X-Real-IP", "10.1.2.3"), ("Connection", "X-Forwarded-For")],
                id="hop-by-hop-with-real-ip",
            ),
        ],
    )
    def test_client_cannot_choose_its_address(
        self, gateway: Gateway, token: str, spoof: list[tuple[str, str]]
    ) -> None:
        """authgate judges the address the proxy saw (the client's 127.0.0.2, itself inside
        authgate's trusted ranges; not the proxy's own 127.0.0.1), whatever the client
        claims or asks the proxy to drop."""
        gateway.echo.clear()
        reply = gateway.send(both(token), headers=spoof, source=CLIENT)
        assert reply.status == 403, reply.body
        error = reply.error()
        assert (error["code"], error["details"]["client_ip"]) == ("IP_NOT_ALLOWED", CLIENT)
        assert gateway.echo.received == []

    def test_allowlist_sees_the_clients_address(self, gateway: Gateway) -> None:
        """A token allowed only for 127.0.0.2 passes from 127.0.0.2 and not from
        127.0.0.1, the proxy's own address."""
        assert gateway.send(both("ip_client"), source=CLIENT).status == 200
        reply = gateway.send(both("ip_client"))
        assert (reply.status, reply.error()["details"]["client_ip"]) == (403, "127.0.0.1")

    @pytest.mark.parametrize(
        ("call", "spoof", "code"),
        [
            *SPOOFED_ORIGINAL,
            pytest.param(
                Call(SYSTEM, header="ro"),
                ("X-Original-URI", f"{SCOPED}?pwt=x"),
                "TOKEN_MISSING",
                id="uri-with-pwt",
            ),
        ],
    )
    def test_client_cannot_choose_what_authgate_judges(
        self, gateway: Gateway, call: Call, spoof: tuple[str, str], code: str
    ) -> None:
        """A client's own X-Original-*/X-Forwarded-* headers neither replace the request
        the proxy describes to authgate nor switch authgate to the nginx answer form: the
        client gets the real status and the JSON body, and nothing reaches the upstream."""
        gateway.echo.clear()
        reply = gateway.send(call, headers=[spoof])
        assert reply.error()["code"] == code
        assert reply.header("X-Authgate-Status") is None
        assert gateway.echo.received == []

    @pytest.mark.parametrize(
        "target",
        [
            pytest.param(SCOPED + "/{env.HOME}", id="path"),
            pytest.param(SCOPED + "/%7Benv.HOME%7D", id="encoded-path"),
            pytest.param(SCOPED + "?q={env.HOME}", id="query"),
            pytest.param(SCOPED + "?q=%7Benv.HOME%7D", id="encoded-query"),
        ],
    )
    def test_placeholders_in_the_request_stay_text(self, gateway: Gateway, target: str) -> None:
        """A proxy that rewrites the request from a template never expands placeholder
        syntax the client wrote: the upstream gets it as text (or the request is refused)."""
        gateway.echo.clear()
        separator = "&" if "?" in target else "?"
        call_target = f"{target}{separator}pwt={gateway.value('ro')}"
        headers = [("X-Power-Token", gateway.value("ro"))]
        reply = send(gateway.port(), call_target, headers=headers)
        received = gateway.echo.received
        if reply.status != 200:
            assert (reply.status, reply.error()["code"]) == (400, "BAD_REQUEST")
            assert received == []
            return
        (record,) = received

        def braces(uri: str) -> str:
            return uri.replace("%7B", "{").replace("%7D", "}")

        assert braces(record["target"]) == braces(target)  # as text, however encoded

    def test_request_body_reaches_the_upstream(self, gateway: Gateway) -> None:
        """A POST body travels to the upstream intact."""
        gateway.echo.clear()
        body = b'{"name": "x"}' * 1000
        call = both("rw", method="POST")
        headers = [("X-Power-Token", gateway.value("rw")), ("Content-Type", "application/json")]
        reply = send(
            gateway.port(), gateway.target(call), method="POST", body=body, headers=headers
        )
        assert reply.status == 200, reply.body
        (record,) = gateway.echo.received
        assert record["body_length"] == len(body)

    def test_upstream_down_is_the_proxys_502_not_a_decision(self, gateway: Gateway) -> None:
        """An allowed request whose upstream does not answer gets 502 (the proxy's), not
        authgate's 503: the guard or error handler tells the two apart."""
        reply = gateway.send(both("ro", via="upstream_down"))
        assert reply.status == 502, reply.body

    def test_allow_without_judged_uri_is_never_forwarded(self, gateway: Gateway) -> None:
        """Should something other than authgate answer 200 on /auth without X-Authgate-Uri,
        the client gets 503 UNAVAILABLE and the request is not forwarded: the echo sees only
        the call to /auth, and that without the client's query (no pwt in its URL)."""
        gateway.echo.clear()
        reply = gateway.send(both("ro", via="impostor"))
        assert (reply.status, reply.error()["code"]) == (503, "UNAVAILABLE")
        assert [r["target"] for r in gateway.echo.received] == ["/auth"]

    def test_silent_authgate_is_503_within_the_timeout(self, gateway: Gateway) -> None:
        """authgate accepting connections but never answering holds a client for the
        shipped timeout (2 s), not the proxy's own (Traefik's forwardAuth waits 30 s)."""
        started = time.monotonic()
        reply = gateway.send(both("ro", via="hung"))
        elapsed = time.monotonic() - started
        assert (reply.status, reply.error()["code"]) == (503, "UNAVAILABLE")
        assert 1.5 < elapsed < 10, elapsed

    def test_authgate_stopped_answers_503_json(self, gateway: Gateway) -> None:
        """Once authgate has served through this proxy and is then stopped, clients get 503
        with the UNAVAILABLE JSON body, never the request forwarded."""
        stopped = gateway.authgates["stopped"]
        if stopped.proc.poll() is None:  # another site of this proxy may have stopped it
            assert gateway.send(both("ro", via="stopped")).status == 200
            stopped.stop()
        gateway.echo.clear()
        for _ in range(3):
            reply = gateway.send(both("ro", via="stopped"))
            assert reply.status == 503, reply.body
            assert reply.error()["code"] == "UNAVAILABLE"
        assert gateway.echo.received == []

    def test_zz_logs_hold_no_token(self, gateway: Gateway) -> None:
        """After everything above (allowed requests, every denial, authgate down, hung and
        stopped), neither the proxy's access log nor its own log holds a token value or a
        pwt parameter; the access log did record the requests."""
        text = gateway.proxy.logs()
        assert SCOPED in text  # requests were logged
        assert "pwt" not in text
        assert not TOKENISH.search(text), TOKENISH.search(text)
        for secret in gateway.secrets():
            assert secret not in text
