"""Attacks on authgate itself, over real uvicorn sockets against a real Valkey.

Identity comes only from the token; forwarded addresses count only from trusted proxies;
control characters never reach a stored attribute; oversized headers get a clean refusal;
tokens are looked up by keyed hash only; the management API does not exist on the data
plane; and no token value is ever found in Redis, a log or /metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from authgate.admin import ROUTES
from authgate.app import Runtime, WorkerApp
from authgate.errors import InvalidInput
from tests.cluster_harness import (
    TOKEN_PATTERN,
    ValkeyNode,
    ask,
    create_tokens,
    run_store,
    unknown_token,
)
from tests.conftest import PEPPER, AuthgateProcess, base_env, run_cli, start_authgate
from tests.inproc import settings_for

SCOPED = "/minimal/api/rest/v1/acme/tunes/items"
SYSTEM = "/minimal/api/system/users"
ISSUED: list[str] = []


def issue(url: str, count: int = 1, **spec: Any) -> list[tuple[str, str]]:
    made = create_tokens(url, count, **spec)
    ISSUED.extend(t for t, _ in made)
    return made


@pytest.fixture(scope="module")
def gate(node: ValkeyNode) -> Iterator[AuthgateProcess]:
    """Default trusted proxies (loopback is trusted), management API on, debug logging."""
    ag = start_authgate(base_env(node.url, AUTHGATE_LOG_LEVEL="debug"), admin=True)
    yield ag
    ag.stop()


@pytest.fixture(scope="module")
def untrusting_gate(node: ValkeyNode) -> Iterator[AuthgateProcess]:
    """Trusts only 10.99.0.0/16, so a loopback peer is an untrusted client."""
    ag = start_authgate(
        base_env(node.url, AUTHGATE_TRUSTED_PROXIES="10.99.0.0/16", AUTHGATE_LOG_LEVEL="debug")
    )
    yield ag
    ag.stop()


def redis_snapshot(node: ValkeyNode, usage: bool = True) -> dict[bytes, Any]:
    """Every key and its whole content (without the usage counters that requests of earlier
    tests may still be writing, unless `usage`)."""
    out: dict[bytes, Any] = {}
    with node.client() as c:
        for key in c.scan_iter(count=1000):
            if not usage and b":usage:" in key:
                continue
            kind = c.type(key)
            if kind == b"string":
                out[key] = c.get(key)
            elif kind == b"hash":
                out[key] = c.hgetall(key)
            elif kind == b"zset":
                out[key] = c.zrange(key, 0, -1, withscores=True)
            elif kind == b"stream":
                out[key] = c.xrange(key)
            elif kind == b"set":
                out[key] = c.smembers(key)
            elif kind == b"list":
                out[key] = c.lrange(key, 0, -1)
    return out


# -- identity and addresses ---------------------------------------------------------------------
SPOOFED = {
    "X-User-Id": "root",
    "X-Org-Id": "evil",
    "X-Project-Id": "evil",
    "X-Space-Id": "evil",
    "X-Feature-Id": "evil",
    "X-User-Roles": "admin",
    "X-Token-Id": "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV",
    "X-Key-Type": "rwd",
    "X-Authgate-Status": "200",
}


@pytest.mark.parametrize("nginx", [True, False], ids=["nginx", "traefik"])
def test_client_identity_headers_are_ignored(
    node: ValkeyNode, gate: AuthgateProcess, nginx: bool
) -> None:
    """Identity headers a client sends (X-User-Id, X-User-Roles: admin, …) change nothing:
    the answer carries the token's identity, once each, and admin-only paths stay closed."""
    [(token, token_id)] = issue(node.url, user_id="u-7", space="s-1", key_type="r--")
    [(admin, _)] = issue(node.url, roles=["admin"])
    answer = ask(gate.url, token, nginx=nginx, headers=SPOOFED)
    assert answer.status == 200
    raw = httpx.get(
        f"{gate.url}/auth",
        headers={**SPOOFED, "X-Original-URI": f"{SCOPED}?pwt={token}", "X-Power-Token": token},
    ).headers
    for name, want in [
        ("x-user-id", "u-7"),
        ("x-org-id", "acme"),
        ("x-project-id", "tunes"),
        ("x-space-id", "s-1"),
        ("x-user-roles", ""),
        ("x-token-id", token_id),
        ("x-key-type", "r--"),
    ]:
        assert raw.get_list(name) == [want], name
    denied = ask(gate.url, token, SYSTEM, nginx=nginx, headers=SPOOFED)
    assert (denied.status, denied.code) == (403, "ADMIN_REQUIRED")
    # A second credential in a source that is not configured does not lend its roles.
    borrowed = ask(gate.url, token, SYSTEM, headers={"Authorization": f"Bearer {admin}"})
    assert borrowed.code == "ADMIN_REQUIRED"
    assert ask(gate.url, admin, SYSTEM).status == 200


@pytest.mark.parametrize(
    "spoof",
    [
        {"X-Real-IP": "203.0.113.5"},
        {"X-Forwarded-For": "203.0.113.5"},
        {"X-Forwarded-For": "10.99.0.1, 203.0.113.5"},
        {"X-Real-IP": "203.0.113.5", "X-Forwarded-For": "203.0.113.5"},
    ],
    ids=["x-real-ip", "x-forwarded-for", "xff-left-entry-client-written", "both"],
)
def test_forwarded_address_from_untrusted_peer_is_ignored(
    node: ValkeyNode,
    gate: AuthgateProcess,
    untrusting_gate: AuthgateProcess,
    spoof: dict[str, str],
) -> None:
    """From a peer outside AUTHGATE_TRUSTED_PROXIES, X-Real-IP and X-Forwarded-For are not
    believed: the allowlist is checked against the peer address. From a trusted proxy they
    are (the control case, showing the headers do matter there)."""
    [(remote, _)] = issue(node.url, ip_allowlist=["203.0.113.0/24"])
    [(local, _)] = issue(node.url, ip_allowlist=["127.0.0.1/32"])
    refused = ask(untrusting_gate.url, remote, headers=spoof)
    assert (refused.status, refused.code) == (403, "IP_NOT_ALLOWED")
    details = orjson.loads(refused.headers["x-authgate-error"])["error"]["details"]
    assert details == {"client_ip": "127.0.0.1"}
    assert ask(untrusting_gate.url, local, headers=spoof).status == 200
    assert ask(gate.url, remote, headers=spoof).status == 200
    assert ask(gate.url, local, headers=spoof).code == "IP_NOT_ALLOWED"


@pytest.mark.parametrize(
    "query",
    [
        "?pwt={t}&pwt={t}",
        "pwt={t}&PWT={t}",
        "pwt={t}&x=pwt={t}",
        "pwt%3D{t}&pwt={t}",
        "pwt={t}&y={t}x",
    ],
    ids=["leading-question-mark", "other-case", "nested", "encoded-equals", "prefix-of-value"],
)
def test_token_never_forwarded_upstream_in_any_parameter(
    node: ValkeyNode, gate: AuthgateProcess, query: str
) -> None:
    """The authorised URI handed to nginx for the upstream (X-Authgate-Uri, X-Authgate-Query)
    never carries a token value: a request that also puts the token in another parameter,
    or in another spelling of `pwt`, is refused (400); the plain one keeps the rest."""
    [(token, _)] = issue(node.url)
    uri = f"{SCOPED}?keep=1&{query.format(t=token)}"
    r = httpx.get(f"{gate.url}/auth", headers={"X-Original-URI": uri, "X-Power-Token": token})
    assert (r.status_code, r.headers["x-authgate-status"]) == (403, "400")
    assert token not in r.headers.get("x-authgate-uri", "")
    plain = f"{SCOPED}?keep=1&pwt={token}"
    r = httpx.get(f"{gate.url}/auth", headers={"X-Original-URI": plain, "X-Power-Token": token})
    assert r.status_code == 200
    assert token not in r.headers["x-authgate-uri"] + r.headers["x-authgate-query"]
    assert r.headers["x-authgate-query"] == "keep=1"


# -- attributes ---------------------------------------------------------------------------------
BAD_TEXT = [
    "a\r\nX-Injected: 1",
    "a\nb",
    "a\rb",
    "a\x00b",
    "a\x1b[31mb",
    "a\tb",
    "a\x7fb",
    "a\u2028b",
]
TEXT_FIELDS = ["name", "description", "org", "project", "space", "feature", "user_id"]
LIST_FIELDS = ["roles", "permissions", "app_ids", "ip_allowlist"]


def test_control_characters_refused_by_the_store_with_nothing_written(node: ValkeyNode) -> None:
    """Every text and list attribute refuses CR, LF, NUL, escape and other control characters
    at creation; the refused calls leave Redis exactly as it was (no key, no audit event)."""
    before = redis_snapshot(node, usage=False)
    base = {"name": "n", "org": "acme", "project": "tunes", "key_type": "r--"}

    async def attempt(store: Any) -> list[str]:
        accepted = []
        for field in TEXT_FIELDS + LIST_FIELDS:
            for bad in BAD_TEXT:
                value: Any = [bad] if field in LIST_FIELDS else bad
                try:
                    await store.create({**base, field: value}, "test")
                except InvalidInput as exc:
                    assert exc.field == field
                else:
                    accepted.append(f"{field}={bad!r}")
        return accepted

    assert run_store(node.url, attempt) == []
    assert redis_snapshot(node, usage=False) == before


@pytest.mark.parametrize(
    "args",
    [
        ["--name", "evil\r\nX-Injected: 1"],
        ["--name", "n", "--org", "acme\n"],
        ["--name", "n", "--user-id", "u\x1b[31m"],
        ["--name", "n", "--roles", "admin\r\nx"],
    ],
    ids=["name-crlf", "org-lf", "user-escape", "role-crlf"],
)
def test_control_characters_refused_by_the_cli_with_nothing_written(
    node: ValkeyNode, args: list[str]
) -> None:
    """`authgate token create` with a control character in an attribute exits 2 with an
    'invalid input' message and writes nothing."""
    before = redis_snapshot(node, usage=False)
    if "--org" not in args:
        args = [*args, "--org", "acme"]
    proc = run_cli(
        base_env(node.url),
        "token", "create", *args, "--project", "tunes", "--key-type", "r--", "--json",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "invalid input" in proc.stderr
    assert proc.stdout == ""
    assert redis_snapshot(node, usage=False) == before


def test_control_characters_refused_by_the_management_api(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """POST /v1/tokens with CR/LF in an attribute is a 422 and creates no token."""
    [(manager, _)] = issue(node.url, kind="management", key_type="rwd")
    before = {k for k in redis_snapshot(node) if b":th:" in k}
    r = httpx.post(
        f"{gate.admin_url}/v1/tokens",
        headers={"Authorization": f"Bearer {manager}"},
        json={"name": "x\r\nSet-Cookie: a=b", "org": "acme", "project": "tunes", "key_type": "r--"},
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "INVALID_INPUT"
    assert {k for k in redis_snapshot(node) if b":th:" in k} == before


# -- oversized input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {"X-Power-Token": "A" * 9_000},
        {"X-Original-URI": "/minimal/" + "a/" * 6_000},
        {"X-Forwarded-For": ", ".join(["10.0.0.1"] * 2_000)},
        {"Cookie": "c" * 60_000},
        {f"X-Filler-{i}": "v" * 100 for i in range(300)},
    ],
    ids=["token-9k", "uri-12k", "xff-2000-hops", "cookie-60k", "300-headers"],
)
def test_huge_headers_get_a_clean_refusal(
    node: ValkeyNode, gate: AuthgateProcess, headers: dict[str, str]
) -> None:
    """Oversized or numerous headers are judged or refused with a 4xx, never a 5xx, and the
    server keeps answering."""
    [(token, _)] = issue(node.url)
    sent = {"X-Original-URI": f"{SCOPED}?pwt={token}", "X-Power-Token": token, **headers}
    try:
        r = httpx.get(f"{gate.url}/auth", headers=sent, timeout=10)
        status = int(r.headers.get("x-authgate-status", r.status_code))
        assert 400 <= r.status_code < 500 or (r.status_code == 200 and "X-Filler-0" in headers)
        assert status < 500
    except httpx.RemoteProtocolError:
        pass  # the HTTP parser may close the connection on a header it will not take
    assert ask(gate.url, token).status == 200


# -- lookup by keyed hash only ------------------------------------------------------------------
def _hmac(token: str, pepper: str = PEPPER) -> bytes:
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).digest()


def _digest_of(key: bytes) -> bytes:
    """The digest a token key names, hex or raw."""
    tail = key.split(b":th:", 1)[1]
    if re.fullmatch(rb"[0-9a-f]{64}", tail):
        return bytes.fromhex(tail.decode())
    return tail


def test_redis_holds_keyed_hashes_not_tokens(node: ValkeyNode) -> None:
    """Token records are keyed by HMAC-SHA256(pepper, token) (not a plain hash), and no
    value stored anywhere in Redis contains a token or its random part."""
    made = issue(node.url, 5)
    snapshot = redis_snapshot(node)
    digests = {_digest_of(k) for k in snapshot if b":th:" in k}
    for token, _ in made:
        assert _hmac(token) in digests
        assert hashlib.sha256(token.encode()).digest() not in digests
    blob = repr(snapshot).encode()
    for token in ISSUED:
        assert token.encode() not in blob
        assert token[4:-6].encode() not in blob
    assert not re.findall(TOKEN_PATTERN.encode(), blob)


def test_right_hash_wrong_pepper_fails(node: ValkeyNode, gate: AuthgateProcess) -> None:
    """Knowing where records live is not enough: a record planted under a plain SHA-256 or
    under an HMAC with another pepper does not authenticate, and an instance with another
    pepper does not accept real tokens."""
    [(real, real_id)] = issue(node.url)
    forged = unknown_token()
    with node.client() as c:
        key = next(k for k in c.scan_iter(match=b"*:th:*") if _digest_of(k) == _hmac(real))
        record = c.get(key)
        head = key.split(b":th:")[0] + b":th:"
        hexed = re.fullmatch(rb".*:th:[0-9a-f]{64}", key) is not None
        for digest in (
            hashlib.sha256(forged.encode()).digest(),
            _hmac(forged, "another-pepper-0123456789-abcdefghijklmnop"),
        ):
            c.set(head + (digest.hex().encode() if hexed else digest), record)
    assert ask(gate.url, forged).code == "TOKEN_INVALID"
    assert ask(gate.url, real).status == 200

    import asyncio

    async def other_pepper() -> int:
        other = settings_for(node.url, AUTHGATE_PEPPER="another-pepper-0123456789-abcdefghijklmnop")
        runtime = Runtime(other)
        try:
            transport = httpx.ASGITransport(app=WorkerApp(runtime))
            async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
                r = await client.get(
                    "/auth",
                    headers={"X-Forwarded-Uri": f"{SCOPED}?pwt={real}", "X-Power-Token": real},
                )
                return r.status_code
        finally:
            await runtime.stop()

    assert asyncio.run(other_pepper()) == 404
    assert real_id


# -- listeners ----------------------------------------------------------------------------------
def test_management_api_is_absent_from_the_data_plane(
    node: ValkeyNode, gate: AuthgateProcess
) -> None:
    """Every management route, with a valid management token, is a plain 404 on the data-plane
    listener, and nothing is created there."""
    [(manager, _)] = issue(node.url, kind="management", key_type="rwd")
    before = redis_snapshot(node, usage=False)
    auth = {"Authorization": f"Bearer {manager}", "X-API-Key": manager}
    for shape, methods in ROUTES.items():
        path = "/" + "/".join("tok_01ARZ3NDEKTSV4RRFFQ69G5FAV" if s == "{id}" else s for s in shape)
        for method in methods:
            r = httpx.request(
                method, f"{gate.url}{path}", headers=auth, json={"name": "x", "org": "a",
                "project": "b", "key_type": "rwd"},
            )  # fmt: skip
            assert r.status_code == 404, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "NOT_FOUND"
    assert redis_snapshot(node, usage=False) == before
    assert httpx.get(f"{gate.admin_url}/openapi.json").status_code == 200


# -- the sweep: after everything above ----------------------------------------------------------
def test_no_token_value_in_redis_logs_or_metrics(
    node: ValkeyNode, gate: AuthgateProcess, untrusting_gate: AuthgateProcess
) -> None:
    """After all the traffic of this module (allowed, denied, malformed, oversized, failed
    creations), no issued token value, nor anything shaped like one, is in Redis, either
    server's log (at debug level) or /metrics."""
    [(token, _)] = issue(node.url)
    for ag in (gate, untrusting_gate):
        ask(ag.url, token)
        ask(ag.url, token, "/minimal/api/rest/v1/acme/tunes/x?pwt=wrong")
        ask(ag.url, token + "x")
    assert ISSUED
    places = {
        "redis": repr(redis_snapshot(node)),
        "log": gate.log() + untrusting_gate.log(),
        "metrics": httpx.get(gate.metrics_url).text + httpx.get(untrusting_gate.metrics_url).text,
    }
    for where, text in places.items():
        leaked = [t[:12] for t in ISSUED if t in text or t[4:-6] in text]
        assert not leaked, f"token values in {where}: {leaked}"
        assert not re.findall(TOKEN_PATTERN, text), where
    with redis.Redis(port=node.port) as c:
        assert c.dbsize() > 0
