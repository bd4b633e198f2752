"""The published OpenAPI document against the API that publishes it.

The document is valid OpenAPI 3.1; every path and method in it is called on a real
`authgate serve`, and each answer has a status the document lists for that operation and
a body its schema accepts. Then properties (Hypothesis, hand-written strategies drawn from
the document's own schemas): any body or query the document allows, or nearly allows, is
answered with a documented status and a conforming body, and a refused call writes nothing.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from authgate import openapi
from authgate.admin import ENDPOINTS, create_admin_app
from authgate.backend import connect
from authgate.config import load_settings
from authgate.metrics import Metrics
from authgate.store import TokenStore
from tests.conftest import AuthgateProcess, base_env
from tests.test_admin import call, keys_snapshot, mint

DOC = openapi.build()
SCHEMAS = DOC["components"]["schemas"]
_REGISTRY = Registry().with_resource(
    "urn:authgate", Resource.from_contents(DOC, default_specification=DRAFT202012)
)
QUERY = {"name": "reader", "org": "acme", "project": "tunes", "key_type": "r--"}


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    text = orjson.dumps(schema).decode().replace('"#/components', '"urn:authgate#/components')
    return Draft202012Validator(orjson.loads(text), registry=_REGISTRY)


def check_answer(method: str, path: str, resp: httpx.Response) -> None:
    """The status is one the document lists for the operation; the body fits its schema."""
    operation = DOC["paths"][path][method.lower()]
    answers = operation["responses"]
    assert str(resp.status_code) in answers, (
        f"{method} {path} answered {resp.status_code}, documented {sorted(answers)}: {resp.text}"
    )
    answer = answers[str(resp.status_code)]
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == "no-store"
    schema = answer["content"]["application/json"]["schema"]
    errors = list(validator(schema).iter_errors(resp.json()))
    assert not errors, f"{method} {path} {resp.status_code}: {errors[0].message}"
    for header in answer.get("headers", {}):
        assert header.lower() in resp.headers, f"{header} missing"


def test_document_is_valid_openapi_31() -> None:
    """openapi-spec-validator accepts the document; every schema is valid JSON Schema and
    every $ref resolves."""
    import openapi_spec_validator

    openapi_spec_validator.validate(DOC)
    assert DOC["openapi"].startswith("3.1.")
    for schema in SCHEMAS.values():
        Draft202012Validator.check_schema(schema)
    for ref in re.findall(r'"\$ref":"#/([^"]+)"', orjson.dumps(DOC).decode()):
        node: Any = DOC
        for part in ref.split("/"):
            node = node[part]


def test_document_is_generated_from_the_declarations() -> None:
    """Paths and methods are exactly ENDPOINTS; TokenSpec and TokenPatch are the attribute
    table's creatable and patchable attributes; the error enum is manage.ERRORS."""
    from authgate.manage import ERRORS
    from authgate.model import ATTRIBUTE_TABLE

    documented = {
        (p, m.upper()) for p, item in DOC["paths"].items() for m in item if m != "parameters"
    }
    assert documented == {(e.path, e.method) for e in ENDPOINTS}
    spec = set(SCHEMAS["TokenSpec"]["properties"]) - {"expires_in"}
    assert spec == {a.name for a in ATTRIBUTE_TABLE if a.create}
    patch = set(SCHEMAS["TokenPatch"]["properties"]) - {"expires_in"}
    assert patch == {a.name for a in ATTRIBUTE_TABLE if a.patch}
    assert set(SCHEMAS["TokenSpec"]["required"]) == {"name", "org", "project", "key_type"}
    codes = SCHEMAS["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert codes == list(ERRORS)
    for endpoint in ENDPOINTS:
        if endpoint.operation != "openapi":
            responses = DOC["paths"][endpoint.path][endpoint.method.lower()]["responses"]
            assert {"401", "403", "503"} <= set(responses), endpoint.path


def test_every_documented_operation_answers_as_documented(ag: AuthgateProcess) -> None:
    """Each path and method of the document, called once as it is meant to be called and
    once wrongly, answers with a documented status and a conforming body."""
    admin, _ = mint(ag.env)
    made = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    victim = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    good: dict[tuple[str, str], tuple[str, Any]] = {
        ("GET", "/v1/tokens"): ("/v1/tokens?limit=1", None),
        ("POST", "/v1/tokens"): ("/v1/tokens", {**QUERY, "expires_in": "1h"}),
        ("GET", "/v1/tokens/{id}"): (f"/v1/tokens/{made['id']}", None),
        ("PATCH", "/v1/tokens/{id}"): (f"/v1/tokens/{made['id']}", {"name": "x"}),
        ("GET", "/v1/tokens/{id}/usage"): (f"/v1/tokens/{made['id']}/usage?days=2", None),
        ("POST", "/v1/tokens/{id}/rotate"): (f"/v1/tokens/{made['id']}/rotate", {"grace": "1m"}),
        ("POST", "/v1/tokens/{id}/revoke"): (f"/v1/tokens/{victim['id']}/revoke", None),
        ("DELETE", "/v1/tokens/{id}"): (f"/v1/tokens/{victim['id']}", None),
        ("GET", "/v1/audit"): ("/v1/audit?count=5", None),
        ("GET", "/openapi.json"): ("/openapi.json", None),
    }
    documented = {
        (m.upper(), p) for p, item in DOC["paths"].items() for m in item if m != "parameters"
    }
    assert set(good) == documented, "every documented operation is exercised here"
    for (method, path), (url, body) in good.items():
        resp = call(ag, method, url, admin, json=body)
        assert resp.status_code < 300, (method, url, resp.text)
        check_answer(method, path, resp)
        if path == "/openapi.json":
            assert resp.json() == DOC
            continue
        wrongs = [
            call(ag, method, url),  # no token
            call(ag, method, url.split("?")[0] + "?bogus=1", admin, json=body),
        ]
        if "{id}" in path:
            unknown = re.sub(r"tok_[0-9A-Z]{26}", "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", url)
            wrongs.append(call(ag, method, unknown, admin, json=body))
        for wrong in wrongs:
            assert wrong.status_code >= 400, (method, url, wrong.text)
            check_answer(method, path, wrong)


# -- properties ------------------------------------------------------------------------------
# Values the callers below may hand out (their roles and permissions), and some they may not.
_SAMPLES: dict[str, Any] = {
    "roles": st.lists(st.sampled_from(["viewer", "ops"]), max_size=2),
    "permissions": st.lists(st.sampled_from(["read:assets", "read:*"]), max_size=2),
    "ip_allowlist": st.lists(st.sampled_from(["10.0.0.0/8", "::1", "192.0.2.1/32"]), max_size=3),
    "app_ids": st.lists(st.sampled_from(["APP1", "APP2"]), max_size=2),
}
_MISSES: dict[str, list[Any]] = {
    "roles": [["admin"], ["Bad Role"], [""]],
    "permissions": [["write:all"], ["bad scope"]],
    "ip_allowlist": [["300.1.1.1"], ["10.0.0.0/33"]],
    "app_ids": [["a b"]],
    "org": ["globex", "a b", "*"],
    "name": ["", "a\nb", "x" * 101],
    "expires_at": ["2020-01-01T00:00:00Z", "tomorrow", "2030-01-01T00:00:00"],
    "expires_in": ["30", "soon", "0s"],
}
_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABC0123456789-_.", min_size=1, max_size=20)


def _future() -> st.SearchStrategy[str]:
    now = datetime.now(UTC)
    return st.integers(60, 5 * 365 * 86400).map(
        lambda s: (now + timedelta(seconds=s)).isoformat().replace("+00:00", "Z")
    )


def valid(name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A value the document allows for one property (and the caller may hand out)."""
    if "allOf" in schema:
        target = schema["allOf"][0]
        if "$ref" in target:
            target = SCHEMAS[target["$ref"].rsplit("/", 1)[1]]
        return valid(name, {**target, **{k: v for k, v in schema.items() if k != "allOf"}})
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if name == "org":
        return st.just("acme")
    if name == "expires_in":
        return st.sampled_from(["90s", "12h", "30d", "1w", None])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if name in _SAMPLES:
        return _SAMPLES[name]
    if schema.get("format") == "date-time":
        return _future() | st.none() if "null" in kinds else _future()
    if "pattern" in schema:
        return st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,12}", fullmatch=True)
    if "boolean" in kinds:
        return st.booleans()
    return _TEXT


def near_miss(name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Something the API must refuse for this property: a wrong type or a bad value."""
    return st.sampled_from([*_MISSES.get(name, []), 7, True, ["x"], {"a": 1}, "x" * 600])


def body_of(schema_name: str, **fixed: Any) -> st.SearchStrategy[dict[str, Any]]:
    """Valid bodies of the schema, half of them with one property spoiled or one too many."""
    schema = SCHEMAS[schema_name]
    props = schema["properties"]
    required = set(schema.get("required", []))
    good = st.fixed_dictionaries(
        {k: valid(k, v) for k, v in props.items() if k in required},
        optional={k: valid(k, v) for k, v in props.items() if k not in required},
    ).map(lambda body: {**body, **fixed})
    if "expires_in" in props:  # one of the two ways to say when, not both
        good = good.map(lambda b: {k: v for k, v in b.items() if k != "expires_at"}
                        if "expires_in" in b else b)  # fmt: skip

    def spoil(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        names = sorted(props)
        return st.one_of(
            st.just(body),
            st.sampled_from(names).flatmap(
                lambda n: near_miss(n, props[n]).map(lambda v: {**body, n: v})
            ),
            st.just({**body, "colour": "red"}),
        )

    return good.filter(lambda b: bool(b)).flatmap(spoil)


def _asgi(redis_url: str, method: str, url: str, token: str, body: Any) -> httpx.Response:
    """One call to the app in process (fast), against the real Valkey."""
    env = base_env(redis_url)
    settings_ = load_settings(env)

    async def go() -> httpx.Response:
        client = connect(settings_.redis_url, 2.0)
        app = create_admin_app(TokenStore(client, settings_), settings_, Metrics())
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
                return await http.request(
                    method, url, content=orjson.dumps(body), headers={"X-API-Key": token}
                )
        finally:
            await client.aclose()

    return asyncio.run(go())


PROPERTY = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY
@given(body=body_of("TokenPatch"))
def test_any_patch_is_applied_whole_or_not_at_all(redis_url: str, body: dict[str, Any]) -> None:
    """Any PATCH body drawn from TokenPatch (and near misses): a documented answer; on 200
    every field asked for is what the token now holds; otherwise nothing was written."""
    env = base_env(redis_url)
    admin, _ = mint(env, permissions=["read:assets", "read:*"], roles=["viewer", "ops"])
    _, target_id = mint(env, kind="query", permissions=["read:assets"])
    before = keys_snapshot(redis_url)
    resp = _asgi(redis_url, "PATCH", f"/v1/tokens/{target_id}", admin, body)
    event(f"status {resp.status_code}")
    check_answer("PATCH", "/v1/tokens/{id}", resp)
    if resp.status_code != 200:
        assert keys_snapshot(redis_url) == before
        return
    view = resp.json()
    for name, value in body.items():
        if name in ("name", "description", "enabled"):
            assert view[name] == value
        elif name == "expires_at":
            assert (view[name] is None) == (value is None)
        elif name == "expires_in":
            assert view["expires_at"] is not None
        elif isinstance(value, list):
            assert len(view[name]) <= len(value)


@PROPERTY
@given(body=body_of("TokenSpec"))
def test_any_create_body_answers_as_documented(redis_url: str, body: dict[str, Any]) -> None:
    """Any create body drawn from TokenSpec (and near misses): 201 with a CreatedToken that
    holds what was asked, or a documented error and no write."""
    env = base_env(redis_url)
    admin, _ = mint(
        env, org="acme", project="*", permissions=["read:assets", "read:*"], roles=["viewer", "ops"]
    )
    before = keys_snapshot(redis_url)
    resp = _asgi(redis_url, "POST", "/v1/tokens", admin, body)
    event(f"status {resp.status_code}")
    check_answer("POST", "/v1/tokens", resp)
    if resp.status_code != 201:
        assert keys_snapshot(redis_url) == before
        return
    made = resp.json()
    assert made["org"] == "acme" and made["name"] == body["name"]
    assert len(keys_snapshot(redis_url)) == len(before) + 2


_QUERY_VALUES = st.sampled_from(
    ["", "0", "1", "5", "1000", "1001", "-1", "x", "active", "expiring", "lost", "acme", "A" * 300]
)


@PROPERTY
@given(
    params=st.dictionaries(
        st.sampled_from(["org", "project", "status", "name", "limit", "cursor", "colour"]),
        _QUERY_VALUES,
        max_size=4,
    )
)
def test_any_list_query_answers_as_documented(redis_url: str, params: dict[str, str]) -> None:
    """Any list query: 200 with a TokenList, or a documented 4xx naming the parameter."""
    env = base_env(redis_url)
    admin, _ = mint(env)
    query = "&".join(f"{k}={v}" for k, v in params.items())
    resp = _asgi(redis_url, "GET", f"/v1/tokens?{query}", admin, None)
    event(f"status {resp.status_code}")
    check_answer("GET", "/v1/tokens", resp)
    if resp.status_code != 200:
        assert resp.json()["error"]["details"].get("field") in (*params, None)
