"""The SPEC §2 decision table, row by row, in every dialect: nginx (X-Original-URI),
ingress-nginx (X-Original-URL), Traefik (X-Forwarded-Uri), Envoy (/ext-authz/<path>) and
NGINX Gateway Fabric (exactly /ext-authz with `Path` and `Method` headers)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest

from authgate.app import Runtime
from authgate.decisions import NGINX_FOLD
from tests.inproc import auth_scope, create, running, settings_for

pytestmark = pytest.mark.anyio

SCOPED = "/minimal/api/rest/v1/acme/tunes/records"
SYSTEM = "/minimal/api/system/users"
APPS = "/minimal/rest/apps/v1/render"
CLIENT_IP = "198.51.100.7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Row:
    """One request: which token, how it is sent, and what must be decided."""

    status: int
    code: str
    token: str = "good"  # key into the tokens made for the test, or a literal kind
    method: str = "GET"
    path: str = SCOPED
    query: str = ""
    header: bool = True  # send X-Power-Token
    pwt: bool = True  # send ?pwt=
    pwt_value: str | None = None  # a different pwt value (mismatch)
    details: dict[str, Any] = field(default_factory=dict)
    raw_refused: bool = False  # a raw path not in normal form: 400 where the proxy forwards it


ROWS = [
    pytest.param(Row(401, "TOKEN_MISSING", header=False, pwt=False), id="1-no-token"),
    pytest.param(
        Row(401, "TOKEN_MISSING", pwt=False, details={"missing": ["query:pwt"]}),
        id="2-both-mode-pwt-missing",
    ),
    pytest.param(
        Row(401, "TOKEN_MISSING", header=False, details={"missing": ["header:x-power-token"]}),
        id="2-both-mode-header-missing",
    ),
    pytest.param(Row(401, "TOKEN_MISMATCH", pwt_value="other"), id="3-sources-disagree"),
    pytest.param(Row(401, "TOKEN_MISMATCH", query="pwt=second"), id="3-two-pwt-values"),
    pytest.param(Row(404, "TOKEN_INVALID", token="bad-checksum"), id="4-bad-checksum"),
    pytest.param(Row(404, "TOKEN_INVALID", token="wrong-prefix"), id="4-wrong-prefix"),
    pytest.param(Row(404, "TOKEN_INVALID", token="too-short"), id="4-too-short"),
    pytest.param(Row(404, "TOKEN_INVALID", token="unknown"), id="5-unknown"),
    pytest.param(Row(404, "TOKEN_INVALID", token="revoked"), id="5-revoked"),
    pytest.param(Row(404, "TOKEN_INVALID", token="deleted"), id="5-deleted"),
    pytest.param(Row(404, "TOKEN_INVALID", token="management"), id="5-management-kind"),
    pytest.param(Row(401, "TOKEN_EXPIRED", token="expired"), id="6-expired"),
    pytest.param(
        Row(403, "IP_NOT_ALLOWED", token="ip-bound", details={"client_ip": CLIENT_IP}),
        id="7-ip-not-allowed",
    ),
    pytest.param(
        Row(403, "SCOPE_MISMATCH", path="/minimal/api/rest/v1/other/tunes/x"), id="8-other-org"
    ),
    pytest.param(
        Row(403, "SCOPE_MISMATCH", path="/minimal/api/rest/v1/acme/other/x"), id="8-other-project"
    ),
    pytest.param(
        Row(403, "SCOPE_MISMATCH", token="app-bound", path=APPS, query="app_id=evil"),
        id="8-other-app",
    ),
    pytest.param(
        Row(403, "SCOPE_MISMATCH", token="app-bound", path=APPS), id="8-app-bound-without-app-id"
    ),
    pytest.param(
        Row(403, "INSUFFICIENT_KEY_TYPE", method="POST", details={"required": "w"}),
        id="9-read-only-post",
    ),
    pytest.param(
        Row(403, "INSUFFICIENT_KEY_TYPE", method="DELETE", token="rw", details={"required": "d"}),
        id="9-no-delete-flag",
    ),
    pytest.param(
        Row(403, "INSUFFICIENT_KEY_TYPE", method="TRACE", token="rwd"), id="9-unknown-method"
    ),
    pytest.param(Row(403, "ADMIN_REQUIRED", token="rwd", path=SYSTEM), id="10-system-no-admin"),
    pytest.param(
        Row(403, "ADMIN_REQUIRED", path="/minimal/api/%73ystem/x", raw_refused=True),
        id="10-encoded-letter",
    ),
    pytest.param(
        Row(403, "ADMIN_REQUIRED", path="/minimal/api%2Fsystem/x", raw_refused=True),
        id="10-encoded-slash",
    ),
    pytest.param(
        Row(
            403,
            "ADMIN_REQUIRED",
            path="/minimal/api/rest/v1/acme/tunes/../../../../system/x",
            raw_refused=True,
        ),
        id="10-dot-segments",
    ),
    pytest.param(
        Row(403, "INSUFFICIENT_PERMISSIONS", path="/minimal/api/rest/v1/acme/tunes/assets/1"),
        id="11-permission-missing",
    ),
    pytest.param(Row(200, "OK"), id="ok-scoped-read"),
    pytest.param(Row(200, "OK", token="admin", path=SYSTEM), id="ok-system-admin"),
    pytest.param(
        Row(200, "OK", token="app-bound", path=APPS, query="app_id=sales"), id="ok-app-bound"
    ),
    pytest.param(
        Row(200, "OK", token="assets", path="/minimal/api/rest/v1/acme/tunes/assets/1"),
        id="ok-with-permission",
    ),
    pytest.param(
        Row(200, "OK", token="rwd", method="DELETE", path="/elsewhere"), id="ok-default-route"
    ),
]

DIALECTS = ["nginx", "ingress-nginx", "traefik", "envoy", "gateway-fabric"]
FOLDING = {"nginx", "ingress-nginx", "gateway-fabric"}


def route_config() -> str:
    """A config file: the default layout plus a route that needs read:assets."""
    fh = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    fh.write(
        '[[routes]]\nclass = "scoped"\nprefix = "/minimal/api/rest/v1/{org}/{project}/assets"\n'
        'permissions = ["read:assets"]\n'
        '[[routes]]\nclass = "scoped"\nprefix = "/minimal/api/rest/v1/{org}/{project}"\n'
        '[[routes]]\nclass = "system"\nprefix = "/minimal/api/system"\n'
        '[[routes]]\nclass = "app"\nprefix = "/minimal/rest/apps/v1"\n'
    )
    fh.close()
    return fh.name


async def make_tokens(runtime: Runtime) -> dict[str, str]:
    store = runtime.store
    made = {
        "good": (await create(runtime))[0],
        "rw": (await create(runtime, key_type="rw-"))[0],
        "rwd": (await create(runtime, key_type="rwd"))[0],
        "admin": (await create(runtime, key_type="r--", roles=["admin"]))[0],
        "ip-bound": (await create(runtime, ip_allowlist=["203.0.113.0/24"]))[0],
        "app-bound": (await create(runtime, app_ids=["sales", "ops"]))[0],
        "assets": (await create(runtime, permissions=["read:assets"]))[0],
        "management": (await create(runtime, kind="management"))[0],
    }
    revoked, view = await create(runtime)
    await store.revoke(view["id"], "test")
    deleted, view = await create(runtime)
    await store.delete(view["id"], "test")
    expired, view = await create(runtime)
    await store.rotate(view["id"], 0, "test")
    good = made["good"]
    made.update(
        revoked=revoked,
        deleted=deleted,
        expired=expired,
        unknown=_valid_unknown(),
        **{
            "bad-checksum": good[:-1] + ("A" if good[-1] != "A" else "B"),
            "wrong-prefix": "ak_live_" + good[4:],
            "too-short": good[:20],
        },
    )
    return made


def _valid_unknown() -> str:
    from authgate import tokens

    return tokens.generate("min_")


def build(dialect: str, row: Row, token: str | None) -> tuple[str, str, dict[str, str]]:
    """(method, url, headers) for asking authgate the way `dialect` does."""
    params = []
    if token is not None and row.pwt:
        params.append("pwt=" + quote(row.pwt_value or token))
    if row.query:
        params.append(row.query)
    uri = row.path + ("?" + "&".join(params) if params else "")
    headers: dict[str, str] = {}
    if token is not None and row.header:
        headers["X-Power-Token"] = token
    if dialect == "nginx":
        headers.update(
            {"X-Original-URI": uri, "X-Original-Method": row.method, "X-Real-IP": CLIENT_IP}
        )
        return row.method, "/auth", headers
    if dialect == "ingress-nginx":
        headers.update(
            {
                "X-Original-URL": "https://api.example.com" + uri,
                "X-Original-Method": row.method,
                "X-Sent-From": "nginx-ingress-controller",
                "X-Real-IP": CLIENT_IP,
                "X-Forwarded-For": CLIENT_IP,
                "X-Auth-Request-Redirect": uri,
            }
        )
        return "GET", "/auth", headers
    if dialect == "traefik":
        headers.update(
            {
                "X-Forwarded-Uri": uri,
                "X-Forwarded-Method": row.method,
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "api.example.com",
                "X-Forwarded-For": CLIENT_IP,
            }
        )
        return "GET", "/auth", headers
    if dialect == "gateway-fabric":
        headers.update({"Path": uri, "Method": row.method, "X-Real-IP": CLIENT_IP})
        return "GET", "/ext-authz", headers
    headers.update({"X-Forwarded-For": CLIENT_IP, "X-Envoy-Expected-Rq-Timeout-Ms": "200"})
    return row.method, "/ext-authz" + uri, headers


async def raw_target(
    runtime: Runtime, method: str, target: str, headers: dict[str, str]
) -> httpx.Response:
    """The data plane's answer to a request line sent byte for byte (as Envoy sends it)."""
    path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
    }
    answer = runtime.data_plane.answer_now(scope)
    if not isinstance(answer, tuple):
        answer = await answer
    status, head, body = answer
    return httpx.Response(status, headers=list(head), content=body)


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("row", ROWS)
async def test_decision_table(redis_url: str, dialect: str, row: Row) -> None:
    """Each row of the decision table answers its status and code in each dialect; nginx
    dialects fold 404 into 401 with the real status and JSON error in headers and no body.
    A path that is not in normal form is judged normalised where the proxy forwards the
    path authgate judged (plain nginx), and refused (400) where it forwards the raw path."""
    if row.raw_refused and dialect != "nginx":
        row = Row(400, "BAD_REQUEST", path=row.path)
    settings = settings_for(redis_url, AUTHGATE_CONFIG=route_config())
    async with running(settings) as (runtime, client):
        tokens = await make_tokens(runtime)
        token = None if (not row.header and not row.pwt) else tokens[row.token]
        method, url, headers = build(dialect, row, token)
        if "/../" in url:  # httpx resolves dot segments: send the request line as it is
            r = await raw_target(runtime, method, url, headers)
        else:
            r = await client.request(method, url, headers=headers)
    if row.status == 200:
        assert r.status_code == 200, r.headers.get("x-authgate-error") or r.text
        assert r.content == b""
        assert r.headers["x-org-id"] == "acme"
        assert r.headers["x-token-id"].startswith("tok_")
        assert "pwt" not in r.headers["x-authgate-uri"]
        return
    if dialect in FOLDING:
        assert r.status_code == NGINX_FOLD[row.status]
        assert r.content == b""
        assert r.headers["content-length"] == "0"
        assert int(r.headers["x-authgate-status"]) == row.status
        error = orjson.loads(r.headers["x-authgate-error"])["error"]
    else:
        assert r.status_code == row.status
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
    assert error["code"] == row.code
    assert error["message"]
    for key, value in row.details.items():
        assert error["details"][key] == value


async def test_expired_carries_expiry_time(redis_url: str) -> None:
    """An expired token's denial names when it expired."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token, view = await create(runtime)
        await runtime.store.rotate(view["id"], 0, "test")
        r = await client.get(f"/auth?pwt={token}", headers={"X-Power-Token": token})
    assert r.status_code == 401
    assert r.json()["error"]["details"]["expired_at"].endswith("Z")


async def test_redis_unreachable_and_not_cached_is_503(redis_url: str) -> None:
    """With Redis unreachable, a token that is not cached gets 503 UNAVAILABLE, folded for
    nginx; never an allow and never a 500."""
    from authgate import tokens

    dead = "redis://127.0.0.1:1/0"
    async with running(settings_for(dead)) as (_, client):
        token = tokens.generate("min_")
        uri = f"{SCOPED}?pwt={token}"
        direct = await client.get("/auth", headers={"X-Forwarded-Uri": uri, "X-Power-Token": token})
        folded = await client.get("/auth", headers={"X-Original-URI": uri, "X-Power-Token": token})
    assert direct.status_code == 503
    assert direct.json()["error"]["code"] == "UNAVAILABLE"
    assert folded.status_code == 401
    assert folded.headers["x-authgate-status"] == "503"


async def test_allowed_answer_carries_identity_and_clean_query(redis_url: str) -> None:
    """Allowed: exactly 200, every identity header, and the query with every token parameter
    removed while other parameters stay byte for byte."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token, view = await create(
            runtime,
            roles=["admin", "ops"],
            space="s1",
            feature="f1",
            user_id="u-42",
            key_type="rw-",
        )
        uri = f"{SCOPED}/a%20b?x=1&pwt={token}&y=%2F&z&pwt={token}"
        r = await client.get("/auth", headers={"X-Original-URI": uri, "X-Power-Token": token})
    assert r.status_code == 200
    h = r.headers
    assert (h["x-org-id"], h["x-project-id"], h["x-space-id"], h["x-feature-id"]) == (
        "acme",
        "tunes",
        "s1",
        "f1",
    )
    assert h["x-user-id"] == "u-42"
    assert h["x-user-roles"] == "admin,ops"
    assert h["x-token-id"] == view["id"]
    assert h["x-key-type"] == "rw-"
    assert h["x-authgate-query"] == "x=1&y=%2F&z"
    assert h["x-authgate-uri"] == f"{SCOPED}/a%20b?x=1&y=%2F&z"


@pytest.mark.parametrize(
    ("sources", "mode", "headers", "status"),
    [
        pytest.param("header:X-API-Key", "any", {"X-API-Key": "{t}"}, 200, id="x-api-key"),
        pytest.param("bearer", "any", {"Authorization": "Bearer {t}"}, 200, id="bearer"),
        pytest.param(
            "bearer", "any", {"Authorization": "Basic {t}"}, 401, id="basic-is-not-bearer"
        ),
        pytest.param(
            "header:x-undb-api-token", "any", {"x-undb-api-token": "{t}"}, 200, id="custom-header"
        ),
        pytest.param(
            "header:X-API-Key,bearer",
            "any",
            {"X-API-Key": "{t}"},
            200,
            id="any-one-source-is-enough",
        ),
        pytest.param(
            "header:X-API-Key,bearer",
            "any",
            {"X-API-Key": "{t}", "Authorization": "Bearer {t}"},
            200,
            id="any-sources-agree",
        ),
        pytest.param(
            "header:X-API-Key,bearer",
            "any",
            {"X-API-Key": "{t}", "Authorization": "Bearer {u}"},
            401,
            id="any-sources-disagree",
        ),
        pytest.param(
            "header:X-API-Key,bearer",
            "both",
            {"X-API-Key": "{t}"},
            401,
            id="both-needs-every-source",
        ),
    ],
)
async def test_token_sources(
    redis_url: str, sources: str, mode: str, headers: dict[str, str], status: int
) -> None:
    """Configured token sources are read as configured; in mode `any` one is enough but all
    present must agree."""
    settings = settings_for(redis_url, AUTHGATE_TOKEN_SOURCES=sources, AUTHGATE_TOKEN_MODE=mode)
    async with running(settings) as (runtime, client):
        token, _ = await create(runtime)
        other, _ = await create(runtime)
        filled = {k: v.format(t=token, u=other) for k, v in headers.items()}
        r = await client.get("/auth", headers={"X-Forwarded-Uri": SCOPED, **filled})
    assert r.status_code == status, r.text


@pytest.mark.parametrize(
    ("peer", "headers", "allowed"),
    [
        pytest.param("127.0.0.1", {"X-Real-IP": "203.0.113.9"}, True, id="trusted-real-ip"),
        pytest.param(
            "127.0.0.1",
            {"X-Forwarded-For": "203.0.113.9"},
            True,
            id="trusted-xff-the-entry-the-proxy-wrote",
        ),
        pytest.param(
            "127.0.0.1",
            {"X-Forwarded-For": "203.0.113.9, 10.0.0.2"},
            False,
            id="xff-one-hop-trusted-by-default",
        ),
        pytest.param(
            "10.0.0.7",
            {"X-Forwarded-For": "203.0.113.9, 10.0.0.8"},
            False,
            id="xff-client-in-a-trusted-range-cannot-choose",
        ),
        pytest.param(
            "127.0.0.1",
            {"X-Forwarded-For": "203.0.113.9, 198.51.100.1"},
            False,
            id="xff-spoofed-left-entry-ignored",
        ),
        pytest.param(
            "198.51.100.1", {"X-Real-IP": "203.0.113.9"}, False, id="untrusted-peer-real-ip-ignored"
        ),
        pytest.param("203.0.113.9", {}, True, id="untrusted-peer-itself"),
        pytest.param("127.0.0.1", {"X-Real-IP": "not-an-ip"}, False, id="garbage-fails-closed"),
    ],
)
async def test_client_ip_from_trusted_proxies_only(
    redis_url: str, peer: str, headers: dict[str, str], allowed: bool
) -> None:
    """X-Real-IP / X-Forwarded-For are believed only from trusted proxies; an allowlist
    checks the address they yield, and garbage fails closed."""
    async with running(settings_for(redis_url), client_ip=peer) as (runtime, client):
        token, _ = await create(runtime, ip_allowlist=["203.0.113.0/24"])
        r = await client.get(f"/auth?pwt={token}", headers={"X-Power-Token": token, **headers})
    assert (r.status_code == 200) is allowed, r.text
    if not allowed:
        assert r.json()["error"]["code"] == "IP_NOT_ALLOWED"


@pytest.mark.parametrize(
    ("headers", "url"),
    [
        pytest.param({"X-Original-URI": "/../etc"}, "/auth", id="dot-dot-above-root"),
        pytest.param({"X-Original-URI": "/a/%zz"}, "/auth", id="bad-escape"),
        pytest.param({"X-Original-URI": "/a/%00"}, "/auth", id="nul"),
        pytest.param({"X-Original-URI": "relative"}, "/auth", id="not-a-path"),
        pytest.param(
            {"X-Original-URI": "/a", "X-Power-Token": "x" * 9000}, "/auth", id="oversized-header"
        ),
        pytest.param({"X-Original-URI": "/é/\u00ff"}, "/auth", id="non-ascii"),
    ],
)
async def test_bad_input_is_a_decision_never_a_500(
    redis_url: str, headers: dict[str, str], url: str
) -> None:
    """Malformed URIs, absurd lengths and non-ASCII get a clear 4xx decision (folded for
    nginx), never a 500."""
    async with running(settings_for(redis_url)) as (_, client):
        encoded = [(k.encode(), v.encode("utf-8")) for k, v in headers.items()]
        r = await client.get(url, headers=encoded)
    assert r.status_code in (401, 403)
    assert r.headers["x-authgate-status"] in ("400", "401")
    assert orjson.loads(r.headers["x-authgate-error"])["error"]["code"] in (
        "BAD_REQUEST",
        "TOKEN_MISSING",
    )


async def test_repeated_token_headers_must_agree(redis_url: str) -> None:
    """Two X-Power-Token headers with different values are a mismatch, not a pick."""
    async with running(settings_for(redis_url)) as (runtime, client):
        a, _ = await create(runtime)
        b, _ = await create(runtime)
        r = await client.get(f"/auth?pwt={a}", headers=[("X-Power-Token", a), ("X-Power-Token", b)])
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "TOKEN_MISMATCH"


async def test_revoke_rotate_delete_take_effect_on_next_request(redis_url: str) -> None:
    """On one instance a cached token stops working on the very next request after revoke,
    rotation expiry or delete; a rotated token's successor works at once."""
    async with running(settings_for(redis_url), start=True) as (runtime, client):
        await runtime.invalidator.subscribed.wait()  # type: ignore[union-attr]

        async def ask(token: str) -> int:
            r = await client.get(f"/auth?pwt={token}", headers={"X-Power-Token": token})
            return r.status_code

        for action in ("revoke", "delete"):
            token, view = await create(runtime)
            assert await ask(token) == 200
            await getattr(runtime.store, action)(view["id"], "test")
            assert await _eventually(ask, token, 404)
        token, view = await create(runtime)
        assert await ask(token) == 200
        new_token, _ = await runtime.store.rotate(view["id"], 0, "test")
        assert await ask(new_token) == 200
        assert await ask(token) == 401


async def _eventually(ask: Any, token: str, status: int) -> bool:
    """The next request after the change; pub/sub delivery in-process takes a loop turn."""
    import anyio

    for _ in range(50):
        if await ask(token) == status:
            return True
        await anyio.sleep(0.002)
    return False


async def test_healthz_and_readyz(redis_url: str) -> None:
    """/healthz never needs Redis; /readyz reports whether Redis answers."""
    async with running(settings_for(redis_url)) as (_, up):
        assert (await up.get("/healthz")).status_code == 200
        assert (await up.get("/readyz")).status_code == 200
    async with running(settings_for("redis://127.0.0.1:1/0")) as (_, down):
        assert (await down.get("/healthz")).status_code == 200
        assert (await down.get("/readyz")).status_code == 503


async def test_unknown_paths_are_json_404(redis_url: str) -> None:
    """Paths outside the data plane answer a JSON 404, not a framework page."""
    async with running(settings_for(redis_url)) as (_, client):
        r = await client.get("/v1/tokens")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "NOT_FOUND"


def test_httpx_is_real() -> None:
    """Sanity: the in-process transport really is httpx's ASGI transport."""
    assert httpx.ASGITransport.__module__.startswith("httpx")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(
            {"X-Original-URL": "https://h.example" + SYSTEM, "X-Original-URI": SCOPED},
            id="ingress-nginx-passes-client-x-original-uri",
        ),
        pytest.param(
            {"X-Forwarded-Uri": SYSTEM, "X-Original-URI": SCOPED},
            id="traefik-passes-client-x-original-uri",
        ),
        pytest.param(
            {"X-Original-URI": SYSTEM, "X-Forwarded-Uri": SCOPED}, id="client-adds-x-forwarded-uri"
        ),
        pytest.param(
            {"X-Forwarded-Uri": SCOPED, "X-Forwarded-Method": "DELETE", "X-Original-Method": "GET"},
            id="client-adds-x-original-method",
        ),
        pytest.param(
            {"X-Original-URI": SCOPED, "X-Original-URI ": SYSTEM}, id="repeated-original-uri"
        ),
    ],
)
async def test_spoofed_original_headers_are_refused(
    redis_url: str, headers: dict[str, str]
) -> None:
    """A proxy that passes client headers through cannot be made to judge the client's
    choice of path or method: original-URI or method headers that disagree are refused."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token, _ = await create(runtime, key_type="r--")
        sent = [
            (k.strip(), v + (f"?pwt={token}" if "Uri" in k or "URI" in k or "URL" in k else ""))
            for k, v in headers.items()
        ]
        r = await client.get("/auth", headers=[*sent, ("X-Power-Token", token)])
    assert r.status_code in (400, 403)
    error = (orjson.loads(r.headers["x-authgate-error"]) if r.status_code == 403 else r.json())[
        "error"
    ]
    assert error["code"] == "BAD_REQUEST"


async def test_gateway_fabric_without_path_header_is_refused(redis_url: str) -> None:
    """Exactly /ext-authz without the original path is a bad request, folded for nginx."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token, _ = await create(runtime)
        r = await client.get(f"/ext-authz?pwt={token}", headers={"X-Power-Token": token})
    assert r.status_code == 403
    assert r.headers["x-authgate-status"] == "400"


async def test_denials_the_cache_can_answer_need_no_wait(redis_url: str) -> None:
    """A missing, malformed or already-known-unknown token is answered on the spot, with no
    task and no Redis call; only the first sight of a well-formed unknown token waits for
    Redis."""
    from authgate import tokens

    async with running(settings_for(redis_url), start=True) as (runtime, _):
        plane = runtime.data_plane
        assert runtime.invalidator is not None
        await runtime.invalidator.subscribed.wait()  # its first flush is behind us

        def scope(token: str | None) -> dict[str, Any]:
            return auth_scope(token, f"/v1/x?pwt={token}" if token else "/v1/x")

        unknown = tokens.generate("min_")
        malformed = unknown[:-1] + ("A" if unknown[-1] != "A" else "B")
        for token in (None, malformed, "min_short"):
            answer = plane.answer_now(scope(token))
            assert isinstance(answer, tuple), token
            assert answer[0] in (401, 403)
        first = plane.answer_now(scope(unknown))
        assert not isinstance(first, tuple)
        assert (await first)[1][0] == (b"X-Authgate-Status", b"404")
        negative = runtime.metrics.cache_counts["negative"]
        again = plane.answer_now(scope(unknown))
        assert isinstance(again, tuple)
        assert again[1][0] == (b"X-Authgate-Status", b"404")
        assert b"TOKEN_INVALID" in again[1][1][1]
        assert runtime.metrics.cache_counts["negative"] == negative + 1
