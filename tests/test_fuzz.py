"""Hypothesis against the real ASGI apps, in process, with a real Valkey behind them.

Four surfaces: the /auth header parsing and decision (raw ASGI scopes, any bytes a proxy
could pass), URI normalisation as the decision sees it, token parsing, and the management
API. Whatever arrives: no 5xx, no exception escapes, no allow that the token does not
grant, and no token value echoed back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import zlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authgate import tokens
from authgate.admin import create_admin_app
from authgate.app import Runtime, WorkerApp
from authgate.model import validate_spec
from authgate.paths import encode
from tests.cluster_harness import ValkeyNode, ask, start_node
from tests.conftest import AuthgateProcess, base_env, start_authgate
from tests.inproc import settings_for

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),  # more for a deeper local run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SYSTEM = "/minimal/api/system"
SCOPED = "/minimal/api/rest/v1"
IDENTITY = (
    b"x-org-id",
    b"x-project-id",
    b"x-space-id",
    b"x-feature-id",
    b"x-user-id",
    b"x-user-roles",
    b"x-token-id",
    b"x-key-type",
)


@dataclass
class World:
    loop: asyncio.AbstractEventLoop
    runtime: Runtime
    app: WorkerApp
    admin: Any
    user: str  # acme/tunes, key type rw-, no roles, user_id u-1
    user_view: dict[str, Any]
    managers: dict[str, str]  # key type -> management token
    secrets: list[str]

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    node: ValkeyNode = start_node()
    loop = asyncio.new_event_loop()
    runtime = Runtime(settings_for(node.url))
    admin = create_admin_app(runtime.store, runtime.settings, runtime.metrics)
    try:
        spec = {
            "name": "fuzz",
            "org": "acme",
            "project": "tunes",
            "key_type": "rw-",
            "user_id": "u-1",
            "space": "s-1",
        }
        user, view = loop.run_until_complete(runtime.store.create(spec, "fuzz"))
        managers = {}
        for key_type in ("r--", "rwd"):
            token, _ = loop.run_until_complete(
                runtime.store.create(
                    {"name": "m", "org": "acme", "project": "tunes", "key_type": key_type,
                     "kind": "management"},
                    "fuzz",
                )
            )  # fmt: skip
            managers[key_type] = token
        yield World(
            loop, runtime, WorkerApp(runtime), admin, user, view, managers,
            [user, *managers.values()],
        )  # fmt: skip
    finally:
        loop.run_until_complete(runtime.stop())
        loop.close()
        node.stop()


async def call_asgi(
    app: Any,
    method: str,
    path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    client: tuple[str, int] = ("10.0.0.5", 50000),
) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """One HTTP request straight into an ASGI app, as uvicorn would hand it over."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote_to_bytes(path).decode("latin-1"),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": client,
        "server": ("127.0.0.1", 8080),
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = [m for m in sent if m["type"] == "http.response.start"]
    assert len(start) == 1, f"expected one response start, got {sent}"
    out: dict[bytes, list[bytes]] = {}
    for name, value in start[0].get("headers", []):
        out.setdefault(name.lower(), []).append(value)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start[0]["status"], out, body


# -- strategies -----------------------------------------------------------------------------------
SEGMENTS = [
    "minimal", "api", "system", "rest", "v1", "acme", "tunes", "other", "apps", "x",
    "..", ".", "", "%2e%2e", "%2E.", ".%2e", "%2f", "%2F", "%73ystem", "sys%74em", "%2e",
    "a%2fb", "..%2f..", "%252e", "%25", "%20", "%C3%A9", "%ff", "%00", "%", "%zz", ";",
    "\\", "%5c",
]  # fmt: skip
CLEAN_PATHS = st.lists(st.sampled_from(SEGMENTS), max_size=10).map(lambda p: "/" + "/".join(p))
PATHS = st.lists(st.sampled_from([*SEGMENTS, "?", "#"]), max_size=10).map(
    lambda p: "/" + "/".join(p)
)
QUERY = st.lists(
    st.sampled_from(["app_id=a1", "pwt=TOKEN", "pwt=", "x=1", "pwt=other", "a=%ZZ", "&", "=="]),
    max_size=4,
).map("&".join)
LATIN1 = st.text(st.characters(max_codepoint=255), max_size=40)
HEADER_NAMES = st.sampled_from(
    [
        b"x-original-uri", b"x-original-url", b"x-forwarded-uri", b"x-original-method",
        b"x-forwarded-method", b"x-real-ip", b"x-forwarded-for", b"authorization",
        b"x-power-token", b"path", b"method", b"x-user-id", b"x-org-id", b"x-user-roles",
        b"x-token-id", b"host", b"x-authgate-status", b"cookie",
    ]
)  # fmt: skip


@st.composite
def header_value(draw: st.DrawFn, name: bytes) -> bytes:
    """Mostly values that mean something for `name`, sometimes anything at all."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(LATIN1).encode("latin-1")
    if kind == 1:
        return draw(st.binary(max_size=40))
    if name in (b"x-original-uri", b"x-forwarded-uri", b"path"):
        return (draw(PATHS) + "?" + draw(QUERY)).encode("latin-1")
    if name == b"x-original-url":
        return ("https://h" + draw(PATHS) + "?" + draw(QUERY)).encode("latin-1")
    if name in (b"x-original-method", b"x-forwarded-method", b"method"):
        return draw(st.sampled_from([b"GET", b"POST", b"DELETE", b"get", b"TRACE", b""]))
    if name in (b"x-real-ip", b"x-forwarded-for"):
        return draw(
            st.sampled_from([b"10.0.0.9", b"203.0.113.5", b"::1", b"1.2.3.4, 10.0.0.1", b"x"])
        )
    if name in (b"x-power-token", b"authorization"):
        token = draw(st.sampled_from(["TOKEN", "TOKEN ", " TOKEN", "min_x", ""]))
        return (("Bearer " if name == b"authorization" else "") + token).encode()
    return draw(LATIN1).encode("latin-1")


@st.composite
def auth_requests(draw: st.DrawFn) -> tuple[str, bytes, bytes, list[tuple[bytes, bytes]]]:
    headers = []
    for name in draw(st.lists(HEADER_NAMES, max_size=8)):
        headers.append((name, draw(header_value(name))))
    if draw(st.booleans()):  # the common shape: nginx with the token in both places
        uri = draw(PATHS) + "?pwt=TOKEN"
        headers += [(b"x-original-uri", uri.encode("latin-1")), (b"x-power-token", b"TOKEN")]
    target = draw(st.sampled_from([b"/auth", b"/ext-authz", b"/ext-authz/"]))
    if target == b"/ext-authz/":
        target += draw(PATHS).lstrip("/").encode("latin-1")
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "DELETE", "PATCH", "OPTIONS"]))
    return method, target, draw(QUERY).encode("latin-1"), headers


def with_token(raw: bytes, token: str) -> bytes:
    return raw.replace(b"TOKEN", token.encode())


def reference_path(raw: str) -> str | None:
    """nginx's $uri by a second, independent route: refuse what nginx answers 400 to (a bad
    escape, NUL, `..` above the root), else decode once and resolve segments like a stack."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        return None
    decoded = unquote_to_bytes(raw).decode("latin-1")
    if "\x00" in decoded:
        return None
    stack: list[str] = []
    trailing = False
    for seg in decoded.split("/")[1:]:
        trailing = seg in ("", ".", "..")
        if seg == "..":
            if not stack:
                return None
            stack.pop()
        elif seg not in ("", "."):
            stack.append(seg)
    return "/" + "/".join(stack) + ("/" if trailing and stack else "")


def reference_refusal(path: str) -> str | None:
    """The code a normalised path is refused with before any token check matters: what
    some upstream reads otherwise (';', '\\', a segment ending in '.' or ' ', a '%' left
    after decoding) is BAD_REQUEST; inside /minimal/api/rest/ without org and project,
    SCOPE_MISMATCH."""
    if re.search(r"[;\\%]|[. ](?:/|$)", path):
        return "BAD_REQUEST"
    if (path + "/").startswith("/minimal/api/rest/") and scope_of(path) is None:
        return "SCOPE_MISMATCH"
    return None


def scope_of(path: str) -> list[str] | None:
    """(org, project) named by a scoped API path, or None when it is not one."""
    segments = path.split("/")
    if (path + "/").startswith(SCOPED + "/") and len(segments) > 6 and segments[5] and segments[6]:
        return segments[5:7]
    return None


def judge_allowed(world: World, status: int, headers: dict[bytes, list[bytes]]) -> None:
    """An allow must be one the user token really has: identity only from the token, never
    a System API, never another org's or project's API."""
    assert status == 200
    view = world.user_view
    expect = {
        b"x-org-id": view["org"].encode(),
        b"x-project-id": view["project"].encode(),
        b"x-space-id": view["space"].encode(),
        b"x-user-id": view["user_id"].encode(),
        b"x-user-roles": b"",
        b"x-token-id": view["id"].encode(),
        b"x-key-type": view["key_type"].encode(),
    }
    for name, value in expect.items():
        assert headers.get(name, [b""]) == [value], name
    uri = headers[b"x-authgate-uri"][0].decode("latin-1")
    path = reference_path(uri.partition("?")[0]) or ""
    assert not (path + "/").startswith(SYSTEM + "/"), uri
    assert scope_of(path) in (None, ["acme", "tunes"]), uri


def assert_no_secret(world: World, headers: dict[bytes, list[bytes]], body: bytes) -> None:
    blob = body + b"".join(v for vs in headers.values() for v in vs)
    for secret in world.secrets:
        assert secret.encode() not in blob


# -- 1. /auth header parsing and decision --------------------------------------------------------
@FUZZ
@given(request=auth_requests())
def test_auth_headers_never_5xx_never_wrong_allow(
    world: World, request: tuple[str, bytes, bytes, list[tuple[bytes, bytes]]]
) -> None:
    """Any mix of proxy headers, identity headers, token sources and paths yields a decision:
    never 5xx, never an exception, an allow only within what the token grants, with identity
    headers from the token alone and no token value in the answer."""
    method, target, query, raw_headers = request
    headers = [(n, with_token(v, world.user)) for n, v in raw_headers]
    status, out, body = world.run(
        call_asgi(world.app, method, target, with_token(query, world.user), headers)
    )
    assert status in (200, 400, 401, 403, 404), (status, body)
    if status == 200:
        judge_allowed(world, status, out)
    else:
        assert b"x-org-id" not in out and b"x-user-id" not in out
    assert_no_secret(world, out, body)


@FUZZ
@given(
    path=CLEAN_PATHS,
    method=st.sampled_from(["GET", "POST", "HEAD"]),
)
def test_normalised_path_never_escapes_to_system_apis(world: World, path: str, method: str) -> None:
    """However a path is spelled (escapes, dot segments, %2F), a token without `admin` never
    reaches a System API or another scope: the decision follows the reference $uri, and
    what some upstream would read otherwise is refused."""
    uri = f"/minimal/api/rest/v1/acme/tunes{path}?pwt={world.user}"
    headers = [
        (b"x-original-uri", uri.encode("latin-1")),
        (b"x-original-method", method.encode()),
        (b"x-power-token", world.user.encode()),
    ]
    status, out, body = world.run(call_asgi(world.app, "GET", b"/auth", b"", headers))
    want = reference_path(uri.partition("?")[0])
    if want is None:
        assert status == 403 and out[b"x-authgate-status"] == [b"400"], (uri, status)
        return
    refusal = reference_refusal(want)
    if refusal == "BAD_REQUEST":
        assert status == 403 and out[b"x-authgate-status"] == [b"400"], (uri, want, status)
        return
    is_system = (want + "/").startswith(SYSTEM + "/")
    foreign = scope_of(want) not in (None, ["acme", "tunes"]) or refusal is not None
    if is_system or foreign:
        assert status == 403, (uri, want, status, body)
        code = orjson.loads(out[b"x-authgate-error"][0])["error"]["code"]
        assert code == ("ADMIN_REQUIRED" if is_system else "SCOPE_MISMATCH")
    else:
        assert status == 200, (uri, want, out)
        judge_allowed(world, status, out)
        # The authorised path, sent again, is judged the same: upstream sees what was allowed.
        again = out[b"x-authgate-uri"][0].decode("latin-1")
        assert reference_path(again) == want
        assert encode(want) == again


# -- 2. token parsing ---------------------------------------------------------------------------
def reference_well_formed(token: str, prefix: str) -> bool:
    body, check = token[:-6], token[-6:]
    if len(token) != len(prefix) + 38 or not token.startswith(prefix):
        return False
    if not all(c in tokens.BASE62 for c in token[len(prefix) :]):
        return False
    number = 0
    for c in check:
        number = number * 62 + tokens.BASE62.index(c)
    return number == zlib.crc32(body.encode())


TOKENISH = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=tokens.BASE62, min_size=38, max_size=38).map(lambda s: "min_" + s),
    st.builds(lambda: tokens.generate("min_")),
)


@FUZZ
@given(token=TOKENISH)
def test_token_parsing_matches_a_reference_and_never_allows(world: World, token: str) -> None:
    """is_well_formed agrees with an independent model of prefix, length, charset and CRC32,
    and any such value sent to /auth is judged without error and never allowed."""
    assert tokens.is_well_formed(token, "min_") == reference_well_formed(token, "min_")
    raw = token.encode("utf-8")
    headers = [
        (b"x-original-uri", b"/minimal/api/rest/v1/acme/tunes/x?pwt=" + raw),
        (b"x-power-token", raw),
    ]
    status, out, body = world.run(call_asgi(world.app, "GET", b"/auth", b"", headers))
    assert status in (401, 403), (token, status, body)
    real = int(out[b"x-authgate-status"][0])
    assert real in (400, 401, 404)
    assert_no_secret(world, out, body)


# -- 3. the management API -----------------------------------------------------------------------
def _dumps(value: Any) -> bytes:
    """stdlib JSON: big integers and NaN/Infinity come out as a careless client sends them."""
    return json.dumps(value).encode()


FIELD_NAMES = st.sampled_from(
    [
        "name", "description", "kind", "key_type", "roles", "org", "project", "space",
        "feature", "user_id", "permissions", "ip_allowlist", "app_ids", "expires_at",
        "expires_in", "grace", "id", "token", "hash", "revoked_at", "created_by",
    ]
)  # fmt: skip
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | LATIN1
    | st.sampled_from(["acme", "tunes", "rwd", "r--", "---", "management", "admin", "10.0.0.0/8",
                       "30d", "a\r\nX-Injected: 1", "-1s", "1e309"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(LATIN1, inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
BODIES = st.one_of(
    st.dictionaries(FIELD_NAMES, JSONISH, max_size=8).map(_dumps),
    st.fixed_dictionaries(
        {"name": LATIN1, "org": st.just("acme"), "project": st.just("tunes"),
         "key_type": st.sampled_from(["r--", "rwd", "-w-"])},
        optional={"kind": st.sampled_from(["query", "management", "other"]),
                  "roles": JSONISH, "ip_allowlist": JSONISH, "expires_in": JSONISH},
    ).map(_dumps),
    st.binary(max_size=64),
    st.just(b""),
)  # fmt: skip
ADMIN_PATHS = st.lists(
    st.sampled_from(["v1", "tokens", "audit", "revoke", "rotate", "openapi.json", "", "..",
                     "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", "tok_", "%2e%2e", "x"]),
    min_size=1, max_size=4,
).map(lambda p: "/" + "/".join(p))  # fmt: skip


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
    path=ADMIN_PATHS,
    body=BODIES,
    who=st.sampled_from(["rwd", "r--", "user", "none", "garbage"]),
    params=st.dictionaries(
        st.sampled_from(["org", "project", "status", "limit", "count", "x"]), LATIN1, max_size=3
    ),
)
def test_management_api_input_never_5xx_never_bypasses(
    world: World, method: str, path: str, body: bytes, who: str, params: dict[str, str]
) -> None:
    """Any method, path, query and body: an answer (no 5xx, no exception), JSON errors, writes
    only for a management token holding the flag, and created tokens valid in every field."""
    headers: dict[str, str] = {"content-type": "application/json"}
    if who in world.managers:
        headers["authorization"] = f"Bearer {world.managers[who]}"
    elif who == "user":
        headers["authorization"] = f"Bearer {world.user}"
    elif who == "garbage":
        headers["x-api-key"] = "min_" + "A" * 38

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=world.admin, client=("10.0.0.5", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            url = f"http://admin{path}"  # absolute: httpx refuses a relative path like //x
            return await client.request(method, url, params=params, content=body, headers=headers)

    r = world.run(go())
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    if r.status_code >= 400:
        assert set(doc) == {"error"} and {"code", "message", "details"} <= set(doc["error"])
        return
    if r.request.url.path == "/openapi.json":  # public, and httpx resolves /../ itself
        return
    assert who in world.managers, f"{who} got {r.status_code} on {method} {path}"
    if method != "GET":
        assert who == "rwd", f"a read-only management token wrote: {method} {path}"
    if r.status_code == 201 and "token" in doc:
        world.secrets.append(doc["token"])
        view = {k: doc[k] for k in ("name", "description", "org", "project", "space", "feature",
                                    "user_id", "roles", "permissions", "ip_allowlist", "app_ids",
                                    "key_type", "kind")}  # fmt: skip
        assert validate_spec(view) == {**view, "expires_at": None}
        assert not re.search(r"[\x00-\x1f\x7f]", orjson.dumps(view).decode())


# -- 4. raw HTTP over a real socket ---------------------------------------------------------------
@pytest.fixture(scope="module")
def served(world: World) -> Iterator[AuthgateProcess]:
    """The same Valkey and tokens, behind a real `authgate serve` data-plane listener."""
    url = world.runtime.settings.redis_url
    ag = start_authgate(base_env(url))
    yield ag
    assert ask(ag.url, world.user).status == 200  # still deciding after all of it
    ag.stop()
    assert "Traceback" not in ag.log()
    assert not [s for s in world.secrets if s in ag.log()]


RAW_NAMES = st.one_of(
    HEADER_NAMES.map(lambda n: n.title()),
    st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"Host"]),
    st.binary(min_size=1, max_size=12),
)
RAW_VALUES = st.one_of(
    st.sampled_from([b"TOKEN", b"/minimal/api/rest/v1/acme/tunes/x?pwt=TOKEN", b"chunked",
                     b"100-continue", b"close", b"5", b"-1", b"0", b"99999999999999999999",
                     b"a\r\nX-Injected: 1", b"\x00", b" \t ", b"\xff\xfe"]),
    st.binary(max_size=30),
)  # fmt: skip


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"BREW", b"", b"G\x00T"]))
    target = draw(
        st.sampled_from([b"/auth", b"/ext-authz/x?pwt=TOKEN", b"/healthz", b"*", b"", b"/a b"])
        | CLEAN_PATHS.map(lambda p: ("/ext-authz" + p).encode("latin-1"))
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]))
    lines = [method + b" " + target + b" " + version]
    if draw(st.booleans()):
        lines += [
            b"X-Original-URI: /minimal/api/rest/v1/acme/tunes/x?pwt=TOKEN",
            b"X-Power-Token: TOKEN",
        ]
    for _ in range(draw(st.integers(0, 6))):
        lines.append(
            draw(RAW_NAMES) + draw(st.sampled_from([b": ", b":", b" : ", b""])) + draw(RAW_VALUES)
        )
    body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n"]))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _exchange(port: int, data: bytes) -> list[int]:
    """Send `data` on a fresh connection; the statuses of every answer until the server is
    done (it closes, or stays quiet for a moment with the connection kept open)."""
    import socket

    statuses: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buffer = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            buffer += chunk
    for match in re.finditer(rb"(?:^|\r\n\r\n|\n)HTTP/1\.[01] (\d{3}) ", buffer):
        statuses.append(int(match.group(1)))
    return statuses


@FUZZ
@given(data=raw_requests())
def test_raw_http_on_the_data_plane_never_5xx(
    world: World, served: AuthgateProcess, data: bytes
) -> None:
    """Whatever bytes arrive on the data-plane socket (bad request lines, control characters,
    CR/LF in values, odd framing, bodies, pipelining), authgate answers with no 5xx, echoes
    no token, and keeps serving."""
    sent = with_token(data, world.user)
    statuses = _exchange(served.port, sent)
    assert all(s < 500 for s in statuses), (sent, statuses)
    assert _exchange(served.port, b"GET /healthz HTTP/1.0\r\n\r\n") == [200]
