"""One reading of every request (docs/request-reading.md): a request is judged as every
common upstream would read it, or refused with 400 BAD_REQUEST (403 folded with
X-Authgate-Status: 400 on the nginx dialects). Each rule, the protected areas, the trusted
hops, the dialect headers and the answer's header case, in process against a real Valkey."""

from __future__ import annotations

import tempfile
from dataclasses import fields
from pathlib import Path

import httpx
import orjson
import pytest

from authgate.app import Runtime
from authgate.config import ConfigError, load_settings
from authgate.fasthttp import encode
from authgate.rules import RULES, Reading
from tests.conftest import PEPPER, ROOT
from tests.inproc import create, running, settings_for

pytestmark = pytest.mark.anyio

EXAMPLE = str(ROOT / "deploy" / "authgate-example.toml")
SCOPED = "/minimal/api/rest/v1/acme/tunes"
APPS = "/minimal/rest/apps/v1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(text: str) -> str:
    """A config file: the example routes (deploy/authgate-example.toml) and `text`."""
    fh = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    fh.write(text + "\n" + Path(EXAMPLE).read_text())
    fh.close()
    return fh.name


async def ask(
    runtime: Runtime,
    client: httpx.AsyncClient,
    dialect: str,
    uri: str,
    token: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    """(real status, code) of asking about `uri` the way `dialect` asks, `token` both in
    X-Power-Token and as ?pwt= (unless `uri` carries pwt already)."""
    if "pwt=" not in uri:
        uri += ("&" if "?" in uri else "?") + f"pwt={token}"
    sent = {"X-Power-Token": token, **(headers or {})}
    if dialect == "nginx":
        sent.update({"X-Original-URI": uri, "X-Original-Method": "GET"})
    elif dialect == "ingress-nginx":
        sent.update({"X-Original-URL": "https://api.example.com" + uri, "X-Original-Method": "GET"})
    elif dialect == "traefik":
        sent.update({"X-Forwarded-Uri": uri, "X-Forwarded-Method": "GET"})
    elif dialect == "gateway-fabric":
        sent.update({"Path": uri, "Method": "GET"})
    if dialect == "envoy":
        r = await raw_request(runtime, "/ext-authz" + uri, sent)
    else:
        r = await client.get("/ext-authz" if dialect == "gateway-fabric" else "/auth", headers=sent)
    if r.status_code == 200:
        return 200, "OK"
    if "x-authgate-status" in r.headers:
        assert r.status_code in (401, 403) and r.content == b""
        return int(r.headers["x-authgate-status"]), error(r.headers["x-authgate-error"])
    assert r.headers["content-type"] == "application/json"
    return r.status_code, error(r.text)


def error(body: str | bytes) -> str:
    code: str = orjson.loads(body)["error"]["code"]
    return code


async def raw_request(runtime: Runtime, target: str, headers: dict[str, str]) -> httpx.Response:
    """The data plane's answer to a request line sent byte for byte (httpx would resolve
    dot segments), as Envoy sends it."""
    path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
    }
    answer = runtime.data_plane.answer_now(scope)
    if not isinstance(answer, tuple):
        answer = await answer
    status, head, body = answer
    return httpx.Response(status, headers=list(head), content=body)


async def app1(runtime: Runtime) -> str:
    """An acme/tunes read-only token bound to app APP1, without admin or permissions: a
    plain reading allows it on every default-route path."""
    token, _ = await create(runtime, app_ids=["APP1"])
    return token


# -- path spellings ----------------------------------------------------------------------------
SPELLINGS = [
    pytest.param("/minimal/api/system;x/users", id="param-in-system"),
    pytest.param(SCOPED + "/..;/..;/..;/system/users", id="servlet-dot-dot-to-system"),
    pytest.param(SCOPED + "/..;/..;/globex/x/data", id="servlet-dot-dot-to-other-org"),
    pytest.param("/minimal/api/reports;x/q1", id="param-in-permission-route"),
    pytest.param(APPS + ";x/data?app_id=APP2", id="param-in-app-route"),
    pytest.param("/minimal/api/system%3Bx/users", id="encoded-semicolon"),
    pytest.param("/minimal/api/system%5Cusers", id="encoded-backslash"),
    pytest.param("/minimal/api/x\\..\\system/users", id="raw-backslash"),
    pytest.param("/minimal/api/system./users", id="trailing-dot"),
    pytest.param("/minimal/api/system%2e/users", id="encoded-trailing-dot"),
    pytest.param("/minimal/api/system%20/users", id="trailing-space"),
    pytest.param("/minimal/api/SYSTEM/users", id="upper-case-system"),
    pytest.param("/Minimal/api/system/users", id="upper-case-first-segment"),
    pytest.param("/minimal/api/REPORTS/q1", id="upper-case-permission-route"),
    pytest.param("/minimal/rest/apps/V1/data?app_id=APP2", id="upper-case-app-route"),
    pytest.param("/minimal/api/REST/v1/globex/x/data", id="upper-case-area"),
    pytest.param("/minimal/api/%C5%BFystem/users", id="long-s-folds-to-s"),
    pytest.param("/minimal/api/%2573ystem/users", id="double-encoding"),
]


@pytest.mark.parametrize("dialect", ["nginx", "traefik"])
@pytest.mark.parametrize("uri", SPELLINGS)
async def test_spellings_upstreams_read_as_another_path_are_refused(
    redis_url: str, dialect: str, uri: str
) -> None:
    """Path parameters, backslashes, trailing dots or spaces, case variants of a protected
    prefix and double encoding are refused (400), folded for nginx: a plain reading would
    judge them as `default` while Tomcat, IIS, Express or ASP.NET serve the protected
    route."""
    settings = settings_for(redis_url, AUTHGATE_CONFIG=EXAMPLE)
    async with running(settings) as (runtime, client):
        token = await app1(runtime)
        assert await ask(runtime, client, dialect, uri, token) == (400, "BAD_REQUEST")


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param(SCOPED + "/items", id="scoped"),
        pytest.param("/minimal/api/other/x", id="default"),
        pytest.param("/minimal/api/system-status", id="longer-segment-than-system"),
        pytest.param("/minimal/api/v1.0/items", id="dot-inside-a-segment"),
        pytest.param("/minimal/api/caf%C3%A9", id="non-ascii"),
        pytest.param(APPS + "/data?app_id=APP1", id="own-app"),
    ],
)
async def test_plain_spellings_stay_allowed(redis_url: str, uri: str) -> None:
    """What no upstream reads otherwise is judged as before."""
    settings = settings_for(redis_url, AUTHGATE_CONFIG=EXAMPLE)
    async with running(settings) as (runtime, client):
        token = await app1(runtime)
        assert await ask(runtime, client, "nginx", uri, token) == (200, "OK")


# -- query spellings ---------------------------------------------------------------------------
QUERIES = [
    pytest.param("app_id=APP1&app.id=APP2", id="dot"),
    pytest.param("app_id=APP1&app+id=APP2", id="plus"),
    pytest.param("app_id=APP1&app%20id=APP2", id="encoded-space"),
    pytest.param("app_id=APP1&app-id=APP2", id="dash"),
    pytest.param("app_id=APP1&app[id=APP2", id="open-bracket"),
    pytest.param("app_id=APP1&APP_ID=APP2", id="upper-case"),
    pytest.param("app_id=APP1&App_Id=APP2", id="mixed-case"),
    pytest.param("x=1;app_id=APP2&app_id=APP1", id="semicolon-separator"),
    pytest.param("app_id=APP1&app_id[]=APP2", id="array-suffix"),
    pytest.param("app_id=APP1&app_id%5B0%5D=APP2", id="encoded-array-suffix"),
    pytest.param("app_id=APP1&app%5Fid=APP2", id="encoded-underscore"),
    pytest.param("app_id=APP1&%61pp_id=APP2", id="encoded-letter"),
    pytest.param("app_id=APP1&+app_id=APP2", id="leading-space"),
    pytest.param("app_id=APP1&app_id+=APP2", id="trailing-space"),
    pytest.param("app_id=APP1&app_id%00x=APP2", id="nul-truncation"),
    pytest.param("app_id=APP1&pwt={t}&PWT={t}", id="token-upper-case"),
    pytest.param("app_id=APP1&pwt={t}&x=1;pwt={t}", id="token-after-semicolon"),
    pytest.param("app_id=APP1&pwt={t}&pwt[]={t}", id="token-array"),
    pytest.param("app_id=APP1&pwt={t}&p%77t={t}", id="token-encoded-letter"),
    pytest.param("app_id=APP1&pwt={t}&x=pwt={t}", id="token-in-another-value"),
    pytest.param("app_id=APP1&pwt={t}&??pwt={t}", id="token-after-question-marks"),
    pytest.param("app_id=APP1&pwt={t}&y={e}", id="token-encoded-in-another-value"),
]


@pytest.mark.parametrize("query", QUERIES)
async def test_query_names_parsers_read_as_decided_ones_are_refused(
    redis_url: str, query: str
) -> None:
    """For an APP1-bound token asking for APP2, every key some parser (PHP, ASP.NET, Rails,
    ';'-splitting ones) reads as app_id, and every other spelling or copy of the token,
    is refused (400) instead of being ignored."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        encoded = "".join(f"%{ord(c):02X}" for c in token)
        uri = f"{APPS}/data?" + query.format(t=token, e=encoded)
        assert await ask(runtime, client, "nginx", uri, token) == (400, "BAD_REQUEST")


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("app_id=APP1&x=app.id", id="lookalike-value"),
        pytest.param("app_id=APP1&app_idx=APP2", id="longer-name"),
        pytest.param("app_id=APP1&xapp_id=APP2", id="name-inside-another"),
        pytest.param("app_id=APP1&next=%2Fa%3Fapp_id%3DAPP2", id="encoded-nested-query"),
        pytest.param("app_id=APP%31&q=caf%C3%A9+au+lait", id="encoded-values"),
        pytest.param("app_id=APP1&app_id=APP1", id="repeated-own-app"),
    ],
)
async def test_query_names_no_parser_folds_stay_allowed(redis_url: str, query: str) -> None:
    """Keys that are other names to every parser, and values, are not refused."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        assert await ask(runtime, client, "nginx", f"{APPS}/data?{query}", token) == (200, "OK")


async def test_query_without_token_pairs_reaches_the_upstream(redis_url: str) -> None:
    """The forwarded query (X-Authgate-Query) keeps every other pair byte for byte."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        uri = f"{APPS}/data?a=%2F&pwt={token}&app_id=APP1&b&pwt={token}&c=1"
        r = await client.get("/auth", headers={"X-Original-URI": uri, "X-Power-Token": token})
    assert r.status_code == 200
    assert r.headers["x-authgate-query"] == "a=%2F&app_id=APP1&b&c=1"
    assert r.headers["x-authgate-uri"] == f"{APPS}/data?a=%2F&app_id=APP1&b&c=1"


@pytest.mark.parametrize(
    ("query", "why"),
    [
        pytest.param("&".join(["x=1"] * 257), "pairs", id="too-many-pairs"),
        pytest.param(";".join(["x=1"] * 257), "pairs", id="too-many-semicolon-pairs"),
        pytest.param("&".join(["app_idx=1"] * 17), "keys", id="too-many-app-id-keys"),
        pytest.param("app_id=" + "A" * 1025, "longer", id="app-id-too-long"),
        pytest.param("app_id=A%zz", "escape", id="app-id-bad-escape"),
    ],
)
async def test_queries_beyond_the_caps_are_refused(redis_url: str, query: str, why: str) -> None:
    """A query with more pairs than max_query_pairs, more than 16 keys naming app_id or a
    token parameter, or such a value too long or badly escaped, is refused: a long query
    costs no more than a few decisions."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        uri = f"{APPS}/data?{query}"
        r = await client.get("/auth", headers={"X-Original-URI": uri, "X-Power-Token": token})
    assert r.headers["x-authgate-status"] == "400"
    assert why in orjson.loads(r.headers["x-authgate-error"])["error"]["details"]["reason"]


# -- each rule can be relaxed ------------------------------------------------------------------
RELAXED = [
    pytest.param("path_parameters", "nginx", "/minimal/api/system;x/users", id="path_parameters"),
    pytest.param("backslashes", "nginx", "/minimal/api/a%5Cb", id="backslashes"),
    pytest.param("trailing_dots", "nginx", "/minimal/api/a./b", id="trailing_dots"),
    pytest.param("case_variants", "nginx", "/minimal/api/SYSTEM/users", id="case_variants"),
    pytest.param("double_encoding", "nginx", "/minimal/api/a%2541", id="double_encoding"),
    pytest.param(
        "query_spellings", "nginx", f"{APPS}/x?app_id=APP1&APP_ID=APP2", id="query_spellings"
    ),
    pytest.param("raw_path", "traefik", SCOPED + "/a/../b", id="raw_path"),
    pytest.param("raw_path", "envoy", SCOPED + "/a%2Fb", id="raw_path-envoy"),
]


@pytest.mark.parametrize(("rule", "dialect", "uri"), RELAXED)
async def test_each_rule_is_relaxed_in_the_config_file(
    redis_url: str, rule: str, dialect: str, uri: str
) -> None:
    """Strict by default (400); `[reading] <rule> = false` in the config file reads the
    spelling the plain way again (here: allowed)."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        assert await ask(runtime, client, dialect, uri, token) == (400, "BAD_REQUEST")
    relaxed = settings_for(redis_url, AUTHGATE_CONFIG=config(f"[reading]\n{rule} = false\n"))
    async with running(relaxed) as (runtime, client):
        token = await app1(runtime)
        assert await ask(runtime, client, dialect, uri, token) == (200, "OK")


def test_rules_are_declared_once() -> None:
    """Every rule has one switch in `Reading`, on by default, and help text; the config file
    names them in `[reading]` and refuses anything else."""
    assert [f.name for f in fields(Reading)] == [r.name for r in RULES] + ["max_query_pairs"]
    assert all(getattr(Reading(), r.name) is True and len(r.help) > 40 for r in RULES)
    settings = load_settings(
        {"AUTHGATE_PEPPER": PEPPER, "AUTHGATE_CONFIG": config("[reading]\nmax_query_pairs = 9")}
    )
    assert settings.reading.max_query_pairs == 9 and settings.reading.raw_path
    for bad, needle in [
        ("[reading]\nraw_paths = false", "unknown rule 'raw_paths'"),
        ("[reading]\nraw_path = 'no'", "true or false"),
        ("[reading]\nmax_query_pairs = 0", "max_query_pairs"),
        ("reading = 1", "must be a table"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_settings({"AUTHGATE_PEPPER": PEPPER, "AUTHGATE_CONFIG": config(bad)})


# -- protected areas ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "uri"),
    [
        pytest.param("globex", "/minimal/api/rest/v1/acme", id="org-without-project"),
        pytest.param("globex", "/minimal/api/rest/v1/acme/", id="org-and-slash"),
        pytest.param("globex", "/minimal/api/rest/v2/acme/tunes/users", id="other-version"),
        pytest.param("globex", "/minimal/api/rest/v1", id="version-itself"),
        pytest.param("globex", "/minimal/api/rest", id="area-itself"),
        pytest.param("app1", "/minimal/rest/apps/v2/data?app_id=APP2", id="apps-other-version"),
        pytest.param("app1", "/minimal/rest/apps/data?app_id=APP2", id="apps-without-version"),
    ],
)
async def test_unbound_paths_inside_a_protected_area_are_scope_mismatch(
    redis_url: str, token: str, uri: str
) -> None:
    """Under the default routes, a path inside /minimal/api/rest or /minimal/rest/apps that
    no scoped or app route binds is refused (403 SCOPE_MISMATCH), not judged as default."""
    async with running(settings_for(redis_url)) as (runtime, client):
        tokens = {
            "globex": (await create(runtime, org="globex", project="x"))[0],
            "app1": await app1(runtime),
        }
        assert await ask(runtime, client, "nginx", uri, tokens[token]) == (403, "SCOPE_MISMATCH")


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("/minimal/api/rest/v1/globex/x/data", id="own-scope"),
        pytest.param("/minimal/api/rest/v1/globex/x", id="own-scope-exactly"),
        pytest.param("/minimal/api/restore", id="sibling-of-the-area"),
        pytest.param("/minimal/api/other", id="outside-the-areas"),
        pytest.param("/minimal/rest/other", id="outside-apps"),
    ],
)
async def test_bound_and_outside_paths_stay_allowed(redis_url: str, uri: str) -> None:
    """The areas change nothing for paths a route binds or that lie outside them."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token, _ = await create(runtime, org="globex", project="x")
        assert await ask(runtime, client, "nginx", uri, token) == (200, "OK")


@pytest.mark.parametrize(
    ("routes", "uri"),
    [
        pytest.param(
            '[[routes]]\nclass = "scoped"\nprefix = "/minimal/api/rest/v1/{org}/{project}"\n'
            "area = false\n",
            "/minimal/api/rest/v2/acme/tunes/users",
            id="area-false",
        ),
        pytest.param(
            '[[routes]]\nclass = "scoped"\nprefix = "/minimal/api/rest/v1/{org}/{project}"\n'
            'area = "/minimal/api/rest/v1"\n',
            "/minimal/api/rest/v2/acme/tunes/users",
            id="narrower-area",
        ),
        pytest.param(
            '[[routes]]\nclass = "default"\nprefix = "/minimal/api/rest/health"\n'
            '[[routes]]\nclass = "scoped"\nprefix = "/minimal/api/rest/v1/{org}/{project}"\n',
            "/minimal/api/rest/health",
            id="explicit-default-route-inside",
        ),
    ],
)
async def test_routes_file_says_otherwise_explicitly(redis_url: str, routes: str, uri: str) -> None:
    """A route's `area` (false, or another prefix) and a route listed before it decide."""
    fh = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    fh.write(routes)
    fh.close()
    async with running(settings_for(redis_url, AUTHGATE_CONFIG=fh.name)) as (runtime, client):
        token, _ = await create(runtime, org="globex", project="x")
        assert await ask(runtime, client, "nginx", uri, token) == (200, "OK")


def test_default_areas() -> None:
    """Scoped and app routes cover their literal prefix without its version segment; the
    shipped example file agrees; a bad `area` names the route."""
    for env in ({}, {"AUTHGATE_CONFIG": EXAMPLE}):
        routes = load_settings({"AUTHGATE_PEPPER": PEPPER, **env}).routes
        areas = {r.prefix: r.area for r in routes}
        assert areas["/minimal/api/rest/v1/{org}/{project}"] == "/minimal/api/rest"
        assert areas["/minimal/rest/apps/v1"] == "/minimal/rest/apps"
        assert areas["/minimal/api/system"] is None
    for bad in ('area = "x"', "area = 3"):
        fh = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        fh.write(f'[[routes]]\nclass = "app"\nprefix = "/a/v1"\n{bad}\n')
        fh.close()
        with pytest.raises(ConfigError, match=r"routes\[0\].area"):
            load_settings({"AUTHGATE_PEPPER": PEPPER, "AUTHGATE_CONFIG": fh.name})


# -- the raw path, where the proxy forwards it -------------------------------------------------
NOT_NORMAL = [
    pytest.param("/minimal/api/system/../rest/v1/acme/tunes/x", id="dot-segments"),
    pytest.param("/minimal/api/system%2F..%2Frest/v1/acme/tunes/x", id="encoded-slashes"),
    pytest.param(SCOPED + "/%2e%2e/%2e%2e/%2e%2e/system/x", id="encoded-dots"),
    pytest.param(SCOPED + "/./x", id="dot"),
    pytest.param("/minimal/api/rest/v1/acme//tunes/x", id="repeated-slash"),
    pytest.param(SCOPED + "/%78", id="encoded-letter"),
    pytest.param(SCOPED + "/a%7Eb", id="encoded-tilde"),
]
RAW_DIALECTS = ["ingress-nginx", "traefik", "envoy", "gateway-fabric"]


@pytest.mark.parametrize("dialect", RAW_DIALECTS)
@pytest.mark.parametrize("uri", NOT_NORMAL)
async def test_raw_paths_not_in_normal_form_are_refused_where_forwarded_raw(
    redis_url: str, dialect: str, uri: str
) -> None:
    """Where the proxy forwards the client's raw path (ingress-nginx, Traefik, Caddy,
    Envoy, Gateway Fabric), a raw path that is not the normal form authgate judged is
    refused: an upstream that resolves it itself would serve another path."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        assert await ask(runtime, client, dialect, uri, token) == (400, "BAD_REQUEST")


async def test_plain_nginx_judges_the_normalised_path_it_forwards(redis_url: str) -> None:
    """deploy/nginx forwards X-Authgate-Uri, the path authgate judged: its dialect keeps
    judging the normalised path (the dot segments here lead into acme/tunes)."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        uri = "/minimal/api/system/../rest/v1/acme/tunes/x?pwt=" + token
        r = await client.get("/auth", headers={"X-Original-URI": uri, "X-Power-Token": token})
    assert r.status_code == 200
    assert r.headers["x-authgate-uri"] == SCOPED + "/x"


@pytest.mark.parametrize("dialect", RAW_DIALECTS)
async def test_normal_raw_paths_are_allowed_and_forwarded_as_sent(
    redis_url: str, dialect: str
) -> None:
    """Escapes of characters that are not unreserved (%20, %3A, UTF-8) are normal form."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        assert await ask(runtime, client, dialect, SCOPED + "/a%20b/c%3Ad/caf%C3%A9", token) == (
            200,
            "OK",
        )


# -- dialect headers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "folded"),
    [
        pytest.param(
            {"X-Forwarded-Uri": "{u}", "X-Forwarded-Method": "GET", "X-Original-URI": "{u}"},
            False,
            id="caddy-passes-client-x-original-uri",
        ),
        pytest.param(
            {"X-Forwarded-Uri": "{u}", "X-Original-Method": "GET"},
            False,
            id="client-x-original-method-next-to-x-forwarded-uri",
        ),
        pytest.param(
            {"X-Original-URL": "https://h{u}", "X-Forwarded-Uri": "{u}"},
            True,
            id="ingress-passes-client-x-forwarded-uri",
        ),
        pytest.param(
            {"X-Original-URI": "{u}", "X-Forwarded-Method": "GET"},
            False,
            id="client-x-forwarded-method-next-to-x-original-uri",
        ),
    ],
)
async def test_headers_of_two_dialects_are_refused(
    redis_url: str, headers: dict[str, str], folded: bool
) -> None:
    """A client header a proxy passes through cannot switch the dialect (and with it the
    raw-path rule and the folded answers): headers of two dialects together are refused,
    folded for nginx only when ingress-nginx's own X-Original-URL is there."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        uri = f"{SCOPED}/x?pwt={token}"
        sent = {k: v.format(u=uri) for k, v in headers.items()}
        r = await client.get("/auth", headers={**sent, "X-Power-Token": token})
    if folded:
        assert (r.status_code, r.headers["x-authgate-status"]) == (403, "400")
    else:
        assert r.status_code == 400 and "x-authgate-status" not in r.headers
        assert r.json()["error"]["code"] == "BAD_REQUEST"


# -- the client address -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hops", "forwarded", "allowed"),
    [
        pytest.param("1", "203.0.113.9", True, id="one-hop"),
        pytest.param("1", "203.0.113.9, 10.9.9.9", False, id="client-in-10-8-writes-its-own"),
        pytest.param("1", "junk, 203.0.113.9", True, id="left-entries-never-read"),
        pytest.param("1", "203.0.113.9, junk", False, id="proxy-entry-junk-fails-closed"),
        pytest.param("2", "203.0.113.9, 10.0.0.2", True, id="two-hops"),
        pytest.param("2", "10.1.2.3, 203.0.113.9, 10.0.0.2", True, id="two-hops-left-unread"),
        pytest.param("2", "203.0.113.9, 198.51.100.1", False, id="right-most-untrusted"),
        pytest.param("2", "203.0.113.9, 10.0.0.2, 10.0.0.3", False, id="never-a-third-hop"),
    ],
)
async def test_forwarded_for_is_read_from_the_right_for_the_trusted_hops(
    redis_url: str, hops: str, forwarded: str, allowed: bool
) -> None:
    """AUTHGATE_TRUSTED_HOPS X-Forwarded-For entries, counted from the right, are the
    proxies': the client is the right-most untrusted one among them, else the last of
    them. Entries further left are the client's own and never read, so a client whose
    own address lies in a trusted range (10/8) cannot choose the address judged."""
    settings = settings_for(redis_url, AUTHGATE_TRUSTED_HOPS=hops)
    async with running(settings, client_ip="10.0.0.7") as (runtime, client):
        token, _ = await create(runtime, ip_allowlist=["203.0.113.0/24"])
        r = await client.get(
            f"/auth?pwt={token}", headers={"X-Power-Token": token, "X-Forwarded-For": forwarded}
        )
    assert (r.status_code == 200) is allowed, r.text
    if not allowed:
        assert r.json()["error"]["code"] == "IP_NOT_ALLOWED"


# -- the answer on the wire ---------------------------------------------------------------------
CANONICAL = (
    b"X-Org-Id",
    b"X-Project-Id",
    b"X-Space-Id",
    b"X-Feature-Id",
    b"X-User-Id",
    b"X-User-Roles",
    b"X-Token-Id",
    b"X-Key-Type",
    b"X-Authgate-Uri",
    b"X-Authgate-Query",
    b"Content-Length",
)


async def test_answer_header_names_are_in_canonical_case(redis_url: str) -> None:
    """ingress-nginx's Lua and Envoy's allow-lists compare header names case-sensitively:
    the bytes on the wire say `X-Org-Id`, `X-Authgate-Status`, `Content-Type` …"""
    async with running(settings_for(redis_url)) as (runtime, _):
        token = await app1(runtime)

        async def wire(header: str, uri: str) -> bytes:
            scope = {
                "type": "http",
                "method": "GET",
                "path": "/auth",
                "raw_path": b"/auth",
                "query_string": b"",
                "headers": [(header.encode(), uri.encode()), (b"x-power-token", token.encode())],
                "client": ("127.0.0.1", 40000),
            }
            answer = runtime.data_plane.answer_now(scope)
            if not isinstance(answer, tuple):
                answer = await answer
            return encode(answer)

        allowed = await wire("x-original-uri", f"{SCOPED}/x?a=1&pwt={token}")
        folded = await wire("x-original-uri", f"{SCOPED}/x")
        plain = await wire("x-forwarded-uri", f"{SCOPED}/x")
    assert allowed.startswith(b"HTTP/1.1 200 ")
    for name in CANONICAL:
        assert b"\r\n" + name + b": " in allowed, name
    assert b"\r\nX-Authgate-Status: 401\r\n" in folded
    assert b"\r\nX-Authgate-Error: {" in folded
    assert b"\r\nContent-Type: application/json\r\n" in plain
    for answer in (allowed, folded, plain):
        head = answer.split(b"\r\n\r\n")[0]
        names = [line.split(b":")[0] for line in head.split(b"\r\n")[1:]]
        assert all(part[:1].isupper() for n in names for part in n.split(b"-")), names


async def test_too_many_headers_are_refused(redis_url: str) -> None:
    """More than 100 request headers: refused, whatever they hold (a bounded cost)."""
    async with running(settings_for(redis_url)) as (runtime, client):
        token = await app1(runtime)
        many: list[tuple[str, str]] = [(f"X-H{i}", "v") for i in range(101)]
        uri = f"{SCOPED}/x?pwt={token}"
        headers = [("X-Original-URI", uri), ("X-Power-Token", token), *many]
        r = await client.get("/auth", headers=headers)
    assert r.headers["x-authgate-status"] == "400"


@pytest.mark.parametrize(
    ("path", "route", "variant"),
    [
        pytest.param("/a/x/y/Assets/1", True, False, id="exact"),
        pytest.param("/a/x/y/assets/1", False, True, id="lower-case-of-a-capital"),
        pytest.param("/A/x/y/Assets/1", False, True, id="upper-case-of-a-small"),
        pytest.param("/a/x/y/other", False, False, id="inside-the-area-only"),
    ],
)
def test_case_variants_of_a_prefix_with_capitals(path: str, route: bool, variant: bool) -> None:
    """A configured prefix with capitals is matched exactly; its other spellings are case
    variants (refused), whatever the letter case of the path."""
    from authgate.authorizer import RouteTable
    from authgate.config import make_route

    table = RouteTable((make_route("scoped", "/a/{org}/{project}/Assets", ()),))
    found = table.lookup(path)
    assert (found.route is not None, found.case_variant) == (route, variant)


async def test_explain_reads_the_uri_as_the_data_plane_does(redis_url: str) -> None:
    """`authgate explain` applies the same rules: a case variant is BAD_REQUEST, a path in
    a protected area that no route binds is SCOPE_MISMATCH and says so."""
    from authgate.explain import explain

    async with running(settings_for(redis_url)) as (runtime, _):
        token = await app1(runtime)
        refused = await explain(
            runtime.store,
            method="GET",
            uri="/minimal/api/SYSTEM/x",
            token=token,
            token_id=None,
            ip=None,
        )
        area = await explain(
            runtime.store,
            method="GET",
            uri="/minimal/api/rest/v2/acme/tunes/x",
            token=token,
            token_id=None,
            ip=None,
        )
    assert (refused["status"], refused["code"]) == (400, "BAD_REQUEST")
    assert (area["code"], area["check"]) == ("SCOPE_MISMATCH", 8)
    assert area["route"] == "none, inside a protected area"
