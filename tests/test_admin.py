"""The management API: end to end over HTTP against a real `authgate serve` and real Valkey.

One server (with its admin listener) serves the whole module; every test starts from a
flushed database. Responses are checked against the OpenAPI document the server itself
publishes, so the document and the behaviour cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from authgate import openapi
from authgate.admin import MAX_BODY, ROUTES, create_admin_app
from authgate.backend import connect
from authgate.config import load_settings
from authgate.metrics import Metrics
from authgate.model import ATTRIBUTES, validate_spec
from authgate.store import TokenStore
from tests.conftest import (
    AuthgateProcess,
    base_env,
    run_cli,
    start_authgate,
    start_valkey,
)

DOC = openapi.build()
_REGISTRY = Registry().with_resource(
    "urn:authgate", Resource.from_contents(DOC, default_specification=DRAFT202012)
)
TOKEN_VALUE = re.compile(r"min_[0-9A-Za-z]{38}")


# -- fixtures and helpers ----------------------------------------------------------------------
def conforms(body: Any, schema: str) -> None:
    """`body` validates against components/schemas/<schema> of the published document."""
    ref = {"$ref": f"urn:authgate#/components/schemas/{schema}"}
    errors = list(Draft202012Validator(ref, registry=_REGISTRY).iter_errors(body))
    assert not errors, f"{schema}: {errors[0].message} at {list(errors[0].absolute_path)}"
    if schema in ("Token", "CreatedToken"):
        known = set(DOC["components"]["schemas"]["Token"]["properties"]) | {"token"}
        assert set(body) <= known, f"undocumented fields: {set(body) - known}"


def mint(env: Mapping[str, str], **spec: Any) -> tuple[str, str]:
    """Create a token straight through the store (default: an `rwd` management token)."""
    full: dict[str, Any] = {"name": "ops", "key_type": "rwd", "kind": "management"}
    full.update(spec)
    wide = full["kind"] == "management"
    full.setdefault("org", "*" if wide else "acme")
    full.setdefault("project", "*" if wide else "tunes")

    async def go() -> tuple[str, str]:
        settings_ = load_settings(env)
        client = connect(settings_.redis_url, 2.0)
        try:
            token, view = await TokenStore(client, settings_).create(full, "test-setup")
        finally:
            await client.aclose()
        return token, view["id"]

    return asyncio.run(go())


def call(
    ag: AuthgateProcess,
    method: str,
    path: str,
    token: str | None = None,
    **kwargs: Any,
) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers.setdefault("Authorization", f"Bearer {token}")
    return httpx.request(method, ag.admin_url + path, headers=headers, timeout=10, **kwargs)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    """The error object of a JSON error answer (checked against the Error schema)."""
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    conforms(body, "Error")
    error: dict[str, Any] = body["error"]
    return error


def ask(ag: AuthgateProcess, token: str, method: str = "GET") -> httpx.Response:
    """/auth as Traefik asks it (real statuses), for the default project path."""
    uri = f"/minimal/api/rest/v1/acme/tunes/assets?pwt={token}"
    return httpx.get(
        ag.url + "/auth",
        headers={"X-Forwarded-Uri": uri, "X-Forwarded-Method": method, "X-Power-Token": token},
        timeout=5,
    )


def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Poll `check()` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.01)


def keys_snapshot(redis_url: str) -> dict[bytes, bytes | None]:
    """Every key with its serialised value, but the audit stream and the usage counters
    (those the data plane flushes in the background, whatever the management API does)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return {
            k: client.dump(k)
            for k in client.scan_iter()
            if not k.endswith(b":audit") and b":usage:" not in k
        }
    finally:
        client.close()


def raw_audit(redis_url: str) -> list[dict[str, str]]:
    """The audit stream as stored, oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        rows = client.xrange("authgate:audit")
    finally:
        client.close()
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


QUERY = {"name": "reader", "org": "acme", "project": "tunes", "key_type": "r--"}


# -- lifecycle -------------------------------------------------------------------------------
def test_bootstrap_with_cli_then_create_over_http(ag: AuthgateProcess) -> None:
    """A management token made with the CLI creates a query token that /auth then allows."""
    out = run_cli(
        ag.env,
        "token", "create", "--kind", "management", "--key-type", "rwd",
        "--name", "ops", "--org", "*", "--project", "*", "--json",
    )  # fmt: skip
    admin = json.loads(out.stdout)
    resp = call(ag, "POST", "/v1/tokens", admin["token"], json={**QUERY, "expires_in": "30d"})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    conforms(created, "CreatedToken")
    assert resp.headers["location"] == f"/v1/tokens/{created['id']}"
    assert resp.headers["cache-control"] == "no-store"
    assert TOKEN_VALUE.fullmatch(created["token"])
    assert created["created_by"] == admin["id"]
    assert created["kind"] == "query" and created["status"] == "active"
    assert created["expires_at"] is not None
    allowed = ask(ag, created["token"])
    assert allowed.status_code == 200
    assert allowed.headers["x-token-id"] == created["id"]


def test_x_api_key_authenticates_too(ag: AuthgateProcess) -> None:
    """X-API-Key alone, or equal to the Bearer value, is accepted."""
    admin, _ = mint(ag.env)
    assert call(ag, "GET", "/v1/tokens", headers={"X-API-Key": admin}).status_code == 200
    both = {"X-API-Key": admin, "Authorization": f"Bearer {admin}"}
    assert call(ag, "GET", "/v1/tokens", headers=both).status_code == 200


def test_list_filters_and_show_never_reveal_secrets(ag: AuthgateProcess) -> None:
    """List filters by org, project and status; show gives one token; no value, no hash."""
    admin, admin_id = mint(ag.env)
    a = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    b = call(ag, "POST", "/v1/tokens", admin, json={**QUERY, "project": "other"}).json()
    c = call(ag, "POST", "/v1/tokens", admin, json={**QUERY, "org": "globex"}).json()
    assert call(ag, "POST", f"/v1/tokens/{c['id']}/revoke", admin).status_code == 200

    def ids(query: str) -> list[str]:
        resp = call(ag, "GET", "/v1/tokens" + query, admin)
        assert resp.status_code == 200, resp.text
        conforms(resp.json(), "TokenList")
        assert '"token":' not in resp.text and '"hash":' not in resp.text
        assert not TOKEN_VALUE.search(resp.text)
        return [t["id"] for t in resp.json()["tokens"]]

    assert ids("") == [c["id"], b["id"], a["id"], admin_id]
    assert ids("?org=acme") == [b["id"], a["id"]]
    assert ids("?org=acme&project=tunes") == [a["id"]]
    assert ids("?status=revoked") == [c["id"]]
    assert ids("?status=active&org=globex") == []
    assert ids("?limit=2") == [c["id"], b["id"]]

    shown = call(ag, "GET", f"/v1/tokens/{a['id']}", admin)
    assert shown.status_code == 200
    conforms(shown.json(), "Token")
    assert shown.json() == {k: v for k, v in a.items() if k != "token"}


@pytest.mark.parametrize(
    ("query", "status", "code", "field"),
    [
        pytest.param("?status=lost", 422, "INVALID_INPUT", "status", id="bad-status"),
        pytest.param("?orgs=acme", 422, "INVALID_INPUT", None, id="unknown-parameter"),
        pytest.param("?org=a&org=b", 422, "INVALID_INPUT", "org", id="repeated-parameter"),
        pytest.param("?limit=0", 422, "INVALID_INPUT", "limit", id="limit-zero"),
        pytest.param("?limit=ten", 422, "INVALID_INPUT", "limit", id="limit-text"),
        pytest.param("?limit=1001", 422, "INVALID_INPUT", "limit", id="limit-too-big"),
    ],
)
def test_list_rejects_bad_queries(
    ag: AuthgateProcess, query: str, status: int, code: str, field: str | None
) -> None:
    """A list query with a bad or unknown parameter is a 422 naming it, not a silent match."""
    admin, _ = mint(ag.env)
    resp = call(ag, "GET", "/v1/tokens" + query, admin)
    assert resp.status_code == status
    error = error_of(resp)
    assert error["code"] == code
    if field is not None:
        assert error["details"]["field"] == field


def test_revoke_stops_the_token_and_is_idempotent(ag: AuthgateProcess) -> None:
    """After revoke, /auth refuses the token; a second revoke changes nothing."""
    admin, _ = mint(ag.env)
    made = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    assert ask(ag, made["token"]).status_code == 200
    resp = call(ag, "POST", f"/v1/tokens/{made['id']}/revoke", admin)
    assert resp.status_code == 200
    conforms(resp.json(), "Token")
    assert resp.json()["status"] == "revoked"
    refused = eventually(lambda: ask(ag, made["token"]).status_code == 404, 1.0)
    assert refused, "a revoked token still works on /auth"
    again = call(ag, "POST", f"/v1/tokens/{made['id']}/revoke", admin)
    assert again.status_code == 200
    assert again.json()["revoked_at"] == resp.json()["revoked_at"]
    events = [e for e in raw_audit(ag.env["AUTHGATE_REDIS_URL"]) if e["action"] == "revoke"]
    assert [json.loads(e["detail"]) for e in events] == [{}, {"already_revoked": True}]


def test_rotate_keeps_the_old_token_for_the_grace_period(ag: AuthgateProcess) -> None:
    """Rotate returns a new token at once; the old one works during grace, then expires."""
    admin, _ = mint(ag.env)
    old = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    resp = call(ag, "POST", f"/v1/tokens/{old['id']}/rotate", admin, json={"grace": "1500ms"})
    assert resp.status_code == 201, resp.text
    new = resp.json()
    conforms(new, "CreatedToken")
    assert new["rotated_from"] == old["id"] and new["token"] != old["token"]
    assert resp.headers["location"] == f"/v1/tokens/{new['id']}"
    assert {k: new[k] for k in ("org", "project", "key_type")} == {
        k: old[k] for k in ("org", "project", "key_type")
    }
    assert ask(ag, new["token"]).status_code == 200
    assert ask(ag, old["token"]).status_code == 200, "the old token must work during grace"
    expired = eventually(lambda: ask(ag, old["token"]).status_code == 401, 10.0)
    assert expired, "the old token still works after its grace period"
    assert ask(ag, old["token"]).json()["error"]["code"] == "TOKEN_EXPIRED"
    assert ask(ag, new["token"]).status_code == 200
    shown = call(ag, "GET", f"/v1/tokens/{old['id']}", admin).json()
    assert shown["rotated_to"] == new["id"] and shown["status"] == "expired"


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        pytest.param({"grace": "forever"}, 422, "INVALID_INPUT", "grace", id="bad-duration"),
        pytest.param({"grace": "31d"}, 422, "INVALID_INPUT", "grace", id="grace-too-long"),
        pytest.param({"grace": -5}, 422, "INVALID_INPUT", "grace", id="negative"),
        pytest.param({"grace": True}, 400, "BAD_REQUEST", "grace", id="boolean"),
        pytest.param({"grace": ["1h"]}, 400, "BAD_REQUEST", "grace", id="array"),
        pytest.param({"grace": "1h", "name": "x"}, 422, "INVALID_INPUT", "name", id="unknown"),
    ],
)
def test_rotate_rejects_bad_bodies(
    ag: AuthgateProcess, body: dict[str, Any], status: int, code: str, field: str
) -> None:
    """A bad rotate body is refused with the field named and no new token written."""
    admin, _ = mint(ag.env)
    made = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    before = keys_snapshot(ag.env["AUTHGATE_REDIS_URL"])
    resp = call(ag, "POST", f"/v1/tokens/{made['id']}/rotate", admin, json=body)
    assert resp.status_code == status, resp.text
    error = error_of(resp)
    assert error["code"] == code and error["details"]["field"] == field
    assert keys_snapshot(ag.env["AUTHGATE_REDIS_URL"]) == before


def test_rotate_of_a_revoked_token_is_refused(ag: AuthgateProcess) -> None:
    """Only an active token can be rotated."""
    admin, _ = mint(ag.env)
    made = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    call(ag, "POST", f"/v1/tokens/{made['id']}/revoke", admin)
    resp = call(ag, "POST", f"/v1/tokens/{made['id']}/rotate", admin)
    assert resp.status_code == 422
    assert error_of(resp)["details"]["field"] == "id"


def test_delete_removes_the_token(ag: AuthgateProcess) -> None:
    """Delete answers with the token as it was; afterwards it is unknown everywhere."""
    admin, _ = mint(ag.env)
    made = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    assert ask(ag, made["token"]).status_code == 200
    resp = call(ag, "DELETE", f"/v1/tokens/{made['id']}", admin)
    assert resp.status_code == 200
    conforms(resp.json(), "Token")
    assert resp.json()["id"] == made["id"]
    assert call(ag, "GET", f"/v1/tokens/{made['id']}", admin).status_code == 404
    assert call(ag, "DELETE", f"/v1/tokens/{made['id']}", admin).status_code == 404
    assert eventually(lambda: ask(ag, made["token"]).status_code == 404, 1.0)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/v1/tokens/nonsense", id="not-an-id"),
        pytest.param("/v1/tokens/tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", id="unknown-id"),
        pytest.param("/v1/tokens/tok_01arz3ndektsv4rrffq69g5fav", id="lower-case"),
        pytest.param("/v1/tokens/%0d%0aX-Injected:%20yes", id="crlf"),
        pytest.param("/v1/tokens/" + "A" * 5000, id="long"),
    ],
)
@pytest.mark.parametrize(
    "method,suffix", [("GET", ""), ("DELETE", ""), ("POST", "/revoke"), ("POST", "/rotate")]
)
def test_bad_ids_are_not_found(ag: AuthgateProcess, path: str, method: str, suffix: str) -> None:
    """Every operation on an id that is not a stored token is a 404 NOT_FOUND JSON answer."""
    admin, _ = mint(ag.env)
    before = keys_snapshot(ag.env["AUTHGATE_REDIS_URL"])
    resp = call(ag, method, path + suffix, admin)
    assert resp.status_code == 404, resp.text
    error = error_of(resp)
    assert error["code"] == "NOT_FOUND"
    if path.endswith("FAV"):
        assert error["details"]["id"] == path.rsplit("/", 1)[1]
    else:
        assert "id" not in error["details"], "what the caller sent is not repeated back"
    assert "x-injected" not in resp.headers
    assert keys_snapshot(ag.env["AUTHGATE_REDIS_URL"]) == before


# -- authentication and authorization ------------------------------------------------------
# operation -> (method, path template, body); {id} is a query token made for the test.
OPERATIONS = {
    "list": ("GET", "/v1/tokens", None),
    "show": ("GET", "/v1/tokens/{id}", None),
    "audit": ("GET", "/v1/audit", None),
    "create": ("POST", "/v1/tokens", QUERY),
    "rotate": ("POST", "/v1/tokens/{id}/rotate", {"grace": "0s"}),
    "revoke": ("POST", "/v1/tokens/{id}/revoke", None),
    "delete": ("DELETE", "/v1/tokens/{id}", None),
    "update": ("PATCH", "/v1/tokens/{id}", {"name": "renamed"}),
    "usage": ("GET", "/v1/tokens/{id}/usage", None),
}
NEEDS = {
    "list": "r",
    "show": "r",
    "audit": "r",
    "usage": "r",
    "create": "w",
    "update": "w",
    "rotate": "w",
    "revoke": "d",
    "delete": "d",
}


def run_operation(ag: AuthgateProcess, token: str, operation: str, target: str) -> httpx.Response:
    method, path, body = OPERATIONS[operation]
    return call(ag, method, path.format(id=target), token, json=body)


@pytest.mark.parametrize("key_type", ["r--", "-w-", "--d", "rw-", "r-d", "-wd", "rwd"])
def test_key_type_gates_each_operation(ag: AuthgateProcess, key_type: str) -> None:
    """Reads need r, create and rotate need w, revoke and delete need d."""
    admin, admin_id = mint(ag.env, key_type=key_type)
    setup, _ = mint(ag.env)
    for operation, need in NEEDS.items():
        own = {**QUERY, "key_type": key_type}  # no more than the caller holds
        target = call(ag, "POST", "/v1/tokens", setup, json=own).json()["id"]
        method, path, body = OPERATIONS[operation]
        body = own if operation == "create" else body
        resp = call(ag, method, path.format(id=target), admin, json=body)
        if need in key_type:
            assert resp.status_code in (200, 201), f"{operation}: {resp.text}"
        else:
            assert resp.status_code == 403, f"{operation} with {key_type}: {resp.text}"
            error = error_of(resp)
            assert error["code"] == "INSUFFICIENT_KEY_TYPE"
            assert error["details"]["required"] == need
    denied = [
        e
        for e in raw_audit(ag.env["AUTHGATE_REDIS_URL"])
        if e["action"] == "denied" and e["actor"] == admin_id
    ]
    assert len(denied) == sum(need not in key_type for need in NEEDS.values())


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param({}, "TOKEN_MISSING", id="none"),
        pytest.param({"Authorization": "Bearer"}, "TOKEN_MISSING", id="empty-bearer"),
        pytest.param({"Authorization": "Basic b3BzOm9wcw=="}, "TOKEN_MISSING", id="basic"),
        pytest.param({"Authorization": "Bearer nonsense"}, "TOKEN_INVALID", id="garbage"),
        pytest.param({"X-API-Key": "min_" + "A" * 38}, "TOKEN_INVALID", id="bad-checksum"),
        pytest.param({"X-API-Key": "min_" + "A" * 5000}, "TOKEN_INVALID", id="huge"),
    ],
)
def test_missing_and_malformed_credentials(
    ag: AuthgateProcess, headers: dict[str, str], code: str
) -> None:
    """Without a well-formed management token every call is a 401 with WWW-Authenticate."""
    for operation in OPERATIONS:
        method, path, body = OPERATIONS[operation]
        resp = call(
            ag, method, path.format(id="tok_01ARZ3NDEKTSV4RRFFQ69G5FAV"), headers=headers, json=body
        )
        assert resp.status_code == 401, f"{operation}: {resp.text}"
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert error_of(resp)["code"] == code


def test_refused_credentials(ag: AuthgateProcess) -> None:
    """Unknown, query-kind, revoked, expired and mismatched credentials are all refused."""
    admin, admin_id = mint(ag.env)
    query, _ = mint(ag.env, kind="query")
    revoked, revoked_id = mint(ag.env)
    short, _ = mint(ag.env, expires_in=0.3)
    other, _ = mint(ag.env)
    assert call(ag, "POST", f"/v1/tokens/{revoked_id}/revoke", admin).status_code == 200
    unknown = admin[:-10] + ("B" if admin[-10] != "B" else "C") + admin[-9:]

    def code_of(headers: dict[str, str]) -> tuple[int, str]:
        resp = call(ag, "GET", "/v1/tokens", headers=headers)
        return resp.status_code, error_of(resp)["code"] if resp.status_code != 200 else "OK"

    assert code_of({"Authorization": f"Bearer {admin}"}) == (200, "OK")
    assert code_of({"Authorization": f"Bearer {query}"}) == (401, "TOKEN_INVALID")
    assert code_of({"Authorization": f"Bearer {revoked}"}) == (401, "TOKEN_INVALID")
    assert code_of({"X-API-Key": admin, "Authorization": f"Bearer {other}"}) == (
        401,
        "TOKEN_MISMATCH",
    )
    assert code_of({"Authorization": f"Bearer {unknown}"})[0] == 401
    assert eventually(lambda: code_of({"X-API-Key": short}) == (401, "TOKEN_EXPIRED"), 5.0)
    # The revoked token cannot even revoke itself back into use, or do anything else.
    for operation in OPERATIONS:
        assert run_operation(ag, revoked, operation, admin_id).status_code == 401


def test_other_environment_token_is_refused(ag: AuthgateProcess) -> None:
    """A management token minted for another prefix (environment) does not authenticate."""
    test_env = {**ag.env, "AUTHGATE_TOKEN_PREFIX": "ak_test_"}
    foreign, _ = mint(test_env)
    resp = call(ag, "GET", "/v1/tokens", foreign)
    assert resp.status_code == 401
    assert error_of(resp)["code"] == "TOKEN_INVALID"


def test_ip_allowlist_applies_to_the_peer_address(ag: AuthgateProcess) -> None:
    """A management token bound to other addresses is refused, whatever X-Forwarded-For says."""
    far, far_id = mint(ag.env, ip_allowlist=["10.0.0.0/8"])
    near, _ = mint(ag.env, ip_allowlist=["127.0.0.1", "::1"])
    spoof = {"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3"}
    resp = call(ag, "GET", "/v1/tokens", far, headers=spoof)
    assert resp.status_code == 403
    error = error_of(resp)
    assert error["code"] == "IP_NOT_ALLOWED"
    assert error["details"]["client_ip"] == "127.0.0.1"
    assert call(ag, "GET", "/v1/tokens", near).status_code == 200
    denied = [e for e in raw_audit(ag.env["AUTHGATE_REDIS_URL"]) if e["action"] == "denied"]
    assert denied[-1]["actor"] == far_id


def test_no_escalation_through_management_tokens(ag: AuthgateProcess) -> None:
    """A management token cannot mint a token with flags it lacks, of any kind, nor rotate,
    revoke or delete a token holding flags it lacks."""
    writer, _ = mint(ag.env, key_type="-w-")
    _, strong_id = mint(ag.env, key_type="rwd")
    up = {**QUERY, "kind": "management", "key_type": "rw-"}
    resp = call(ag, "POST", "/v1/tokens", writer, json=up)
    assert resp.status_code == 403
    error = error_of(resp)
    assert (error["code"], error["details"]["required"]) == ("INSUFFICIENT_KEY_TYPE", "r")
    same = call(ag, "POST", "/v1/tokens", writer, json={**up, "key_type": "-w-"})
    assert same.status_code == 201
    query = call(ag, "POST", "/v1/tokens", writer, json={**QUERY, "key_type": "rwd"})
    assert query.status_code == 403, "a writer cannot mint a reader or a deleter either"
    assert call(ag, "POST", f"/v1/tokens/{strong_id}/rotate", writer).status_code == 403
    deleter, _ = mint(ag.env, key_type="--d")
    for method, path in (("POST", "/revoke"), ("DELETE", "")):
        resp = call(ag, method, f"/v1/tokens/{strong_id}{path}", deleter)
        assert resp.status_code == 403, "a --d token revoked or deleted an rwd administrator"
    assert call(ag, "GET", f"/v1/tokens/{strong_id}", writer).status_code == 403  # no r


# -- bad input -------------------------------------------------------------------------------
BAD_BODIES = [
    pytest.param(b"{", 400, "BAD_REQUEST", None, id="malformed-json"),
    pytest.param(b"[]", 400, "BAD_REQUEST", None, id="array-body"),
    pytest.param(b'"name"', 400, "BAD_REQUEST", None, id="string-body"),
    pytest.param(b"\xff\xfe{}", 400, "BAD_REQUEST", None, id="not-utf8"),
    pytest.param(b'{"name": NaN}', 400, "BAD_REQUEST", None, id="nan"),
    pytest.param(b"", 422, "INVALID_INPUT", "name", id="empty-body"),
    pytest.param({**QUERY, "name": 5}, 400, "BAD_REQUEST", "name", id="name-number"),
    pytest.param({**QUERY, "org": ["acme"]}, 400, "BAD_REQUEST", "org", id="org-array"),
    pytest.param({**QUERY, "roles": [1]}, 400, "BAD_REQUEST", "roles", id="roles-numbers"),
    pytest.param({**QUERY, "roles": {"a": 1}}, 400, "BAD_REQUEST", "roles", id="roles-object"),
    pytest.param({**QUERY, "kind": False}, 400, "BAD_REQUEST", "kind", id="kind-false"),
    pytest.param({**QUERY, "expires_in": True}, 400, "BAD_REQUEST", "expires_in", id="exp-bool"),
    pytest.param({**QUERY, "expires_in": 3600}, 422, "INVALID_INPUT", "expires_in", id="no-unit"),
    pytest.param({**QUERY, "expires_in": "30"}, 422, "INVALID_INPUT", "expires_in", id="bare"),
    pytest.param({**QUERY, "token": "x"}, 422, "INVALID_INPUT", "token", id="unknown-field"),
    pytest.param({**QUERY, "hash": "x"}, 422, "INVALID_INPUT", "hash", id="hash-field"),
    pytest.param({**QUERY, "id": "tok_x"}, 422, "INVALID_INPUT", "id", id="id-field"),
    pytest.param({**QUERY, "name": "a\r\nX-Evil: 1"}, 422, "INVALID_INPUT", "name", id="crlf"),
    pytest.param({**QUERY, "name": "a\x00b"}, 422, "INVALID_INPUT", "name", id="nul"),
    pytest.param(
        {**QUERY, "description": "\x1b[31m"}, 422, "INVALID_INPUT", "description", id="escape"
    ),
    pytest.param({**QUERY, "name": "a\u2028b"}, 422, "INVALID_INPUT", "name", id="line-sep"),
    pytest.param({**QUERY, "org": "ac me"}, 422, "INVALID_INPUT", "org", id="org-space"),
    pytest.param({**QUERY, "key_type": "---"}, 422, "INVALID_INPUT", "key_type", id="no-flags"),
    pytest.param({**QUERY, "key_type": "rwx"}, 422, "INVALID_INPUT", "key_type", id="bad-flags"),
    pytest.param({**QUERY, "kind": "root"}, 422, "INVALID_INPUT", "kind", id="bad-kind"),
    pytest.param(
        {**QUERY, "ip_allowlist": ["10.0.0.0/33"]},
        422,
        "INVALID_INPUT",
        "ip_allowlist",
        id="bad-cidr",
    ),
    pytest.param(
        {**QUERY, "expires_in": "forever"}, 422, "INVALID_INPUT", "expires_in", id="bad-duration"
    ),
    pytest.param({**QUERY, "expires_in": -1}, 422, "INVALID_INPUT", "expires_in", id="negative"),
    pytest.param(
        {**QUERY, "expires_in": "11000d"}, 422, "INVALID_INPUT", "expires_in", id="too-long"
    ),
    pytest.param(
        {**QUERY, "expires_in": 60, "expires_at": "2099-01-01T00:00:00Z"},
        422,
        "INVALID_INPUT",
        "expires_in",
        id="both-expiries",
    ),
    pytest.param(
        {**QUERY, "expires_at": "2000-01-01T00:00:00Z"},
        422,
        "INVALID_INPUT",
        "expires_at",
        id="past",
    ),
    pytest.param(
        {"org": "acme", "project": "tunes", "key_type": "r--"},
        422,
        "INVALID_INPUT",
        "name",
        id="no-name",
    ),
    pytest.param({**QUERY, "roles": ["r"] * 65}, 422, "INVALID_INPUT", "roles", id="many"),
    pytest.param(
        orjson.dumps({**QUERY, "description": "x" * MAX_BODY}),
        400,
        "BAD_REQUEST",
        None,
        id="huge-body",
    ),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD_BODIES)
def test_bad_create_bodies_write_nothing(
    ag: AuthgateProcess, body: Any, status: int, code: str, field: str | None
) -> None:
    """A bad create body is a 4xx JSON error naming the field; no key is written."""
    admin, admin_id = mint(ag.env)
    url = ag.env["AUTHGATE_REDIS_URL"]
    before = keys_snapshot(url)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = call(
        ag, "POST", "/v1/tokens", admin, content=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    error = error_of(resp)
    assert error["code"] == code
    if field is not None:
        assert error["details"]["field"] == field
    assert keys_snapshot(url) == before
    last = raw_audit(url)[-1]
    assert (last["action"], last["actor"]) == ("rejected", admin_id)
    assert json.loads(last["detail"])["code"] == code


def test_chunked_oversized_body_is_refused(ag: AuthgateProcess) -> None:
    """A body without Content-Length is still capped."""
    admin, _ = mint(ag.env)

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    before = keys_snapshot(ag.env["AUTHGATE_REDIS_URL"])
    resp = call(ag, "POST", "/v1/tokens", admin, content=chunks())
    assert resp.status_code == 400
    assert error_of(resp)["details"]["limit"] == MAX_BODY
    assert keys_snapshot(ag.env["AUTHGATE_REDIS_URL"]) == before


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        pytest.param("GET", "/", 404, "NOT_FOUND", id="root"),
        pytest.param("GET", "/auth", 404, "NOT_FOUND", id="no-auth-here"),
        pytest.param("GET", "/v1/tokens/", 404, "NOT_FOUND", id="trailing-slash"),
        pytest.param("GET", "/v1/tokens/tok_x/revoke", 405, "METHOD_NOT_ALLOWED", id="get-revoke"),
        pytest.param("PUT", "/v1/tokens", 405, "METHOD_NOT_ALLOWED", id="put"),
        pytest.param("PUT", "/v1/tokens/tok_x", 405, "METHOD_NOT_ALLOWED", id="put-token"),
        pytest.param("PATCH", "/v1/tokens", 405, "METHOD_NOT_ALLOWED", id="patch-list"),
        pytest.param("POST", "/openapi.json", 405, "METHOD_NOT_ALLOWED", id="post-openapi"),
        pytest.param("OPTIONS", "/v1/audit", 405, "METHOD_NOT_ALLOWED", id="options"),
    ],
)
def test_unknown_endpoints_answer_json(
    ag: AuthgateProcess, method: str, path: str, status: int, code: str
) -> None:
    """Unknown paths and methods get JSON 404/405 (with Allow), never a framework page."""
    admin, _ = mint(ag.env)
    resp = call(ag, method, path, admin)
    assert resp.status_code == status
    assert error_of(resp)["code"] == code
    if status == 405:
        assert resp.headers["allow"]


# -- audit, logs, metrics --------------------------------------------------------------------
def test_audit_records_calls_and_denials_without_token_values(ag: AuthgateProcess) -> None:
    """Every call and denial is an event naming the caller by id; no token value is stored."""
    admin, admin_id = mint(ag.env)
    reader, reader_id = mint(ag.env, key_type="r--")
    made = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    call(ag, "GET", "/v1/tokens?org=acme", admin)
    call(ag, "GET", f"/v1/tokens/{made['id']}", admin)
    rotated = call(ag, "POST", f"/v1/tokens/{made['id']}/rotate", admin).json()
    call(ag, "POST", f"/v1/tokens/{rotated['id']}/revoke", admin)
    call(ag, "DELETE", f"/v1/tokens/{rotated['id']}", reader)  # denied: no d
    unknown = "min_" + "Q" * 32
    from authgate.tokens import checksum

    unknown += checksum(unknown)
    call(ag, "GET", "/v1/tokens", unknown)  # denied: well-formed but unknown
    call(ag, "GET", "/v1/tokens", "not-a-token")  # denied: malformed
    call(ag, "GET", "/v1/tokens")  # denied: nothing sent
    call(ag, "DELETE", f"/v1/tokens/{rotated['id']}", admin)

    resp = call(ag, "GET", "/v1/audit?count=100", reader)
    assert resp.status_code == 200
    conforms(resp.json(), "AuditList")
    events = list(reversed(resp.json()["events"]))
    seen = [(e["action"], e["actor"]) for e in events if e["actor"] != "test-setup"]
    assert seen == [
        ("create", admin_id),
        ("rotate", admin_id),
        ("revoke", admin_id),
        ("denied", reader_id),
        ("denied", "anonymous"),
        ("denied", "anonymous"),
        ("denied", "anonymous"),
        ("delete", admin_id),
    ]
    denials = [e["detail"] for e in events if e["action"] == "denied"]
    assert [d["code"] for d in denials] == [
        "INSUFFICIENT_KEY_TYPE",
        "TOKEN_INVALID",
        "TOKEN_INVALID",
        "TOKEN_MISSING",
    ]
    assert denials[0]["required"] == "d" and denials[0]["operation"] == "delete"
    assert denials[1]["presented_prefix"] == unknown[:8]
    assert "presented_prefix" not in denials[2]
    rotate = next(e for e in events if e["action"] == "rotate")
    assert rotate["detail"]["new_id"] == rotated["id"] and rotate["token_id"] == made["id"]
    stream = orjson.dumps(raw_audit(ag.env["AUTHGATE_REDIS_URL"])).decode()
    for secret in (admin, reader, made["token"], rotated["token"], unknown, "not-a-token"):
        assert secret not in stream
    # Reads are counted in /metrics, not written to the stream one event each.
    again = call(ag, "GET", "/v1/audit?count=1", reader).json()["events"]
    assert again[0]["action"] == "delete"


def test_audit_count_is_bounded(ag: AuthgateProcess) -> None:
    """`count` must be 1..1000."""
    admin, _ = mint(ag.env)
    for bad in ("0", "-1", "1001", "x"):
        resp = call(ag, "GET", f"/v1/audit?count={bad}", admin)
        assert resp.status_code == 422
        assert error_of(resp)["details"]["field"] == "count"


def test_server_log_never_holds_a_token(ag: AuthgateProcess) -> None:
    """Nothing the API is sent or answers puts a token value in the server's log."""
    admin, _ = mint(ag.env)
    made = call(ag, "POST", "/v1/tokens", admin, json=QUERY).json()
    rotated = call(ag, "POST", f"/v1/tokens/{made['id']}/rotate", admin).json()
    call(ag, "GET", "/v1/tokens", headers={"X-API-Key": admin, "Authorization": "Bearer x"})
    call(ag, "POST", "/v1/tokens", admin, json={**QUERY, "name": made["token"] + "\n"})
    call(ag, "POST", "/v1/tokens", admin, json={made["token"]: 1})
    call(ag, "GET", f"/v1/tokens/{made['token']}", admin)
    log = ag.log()
    for secret in (admin, made["token"], rotated["token"]):
        assert secret not in log
    assert not TOKEN_VALUE.search(log)
    assert "Traceback" not in log


def test_admin_calls_are_counted_in_metrics(ag: AuthgateProcess) -> None:
    """/metrics counts management calls by operation and code (no ids, no tokens)."""
    admin, _ = mint(ag.env)
    call(ag, "POST", "/v1/tokens", admin, json=QUERY)
    call(ag, "GET", "/v1/tokens")

    def scraped() -> str:
        text = httpx.get(ag.metrics_url, timeout=5).text
        ok = 'authgate_admin_requests_total{code="OK",operation="create"}' in text
        denied = 'authgate_admin_requests_total{code="TOKEN_MISSING",operation="list"}' in text
        return text if ok and denied else ""

    text = eventually(scraped, 5.0)
    assert text, "management calls missing from /metrics"
    assert admin not in text and "tok_" not in text


# -- listeners -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/v1/tokens", id="list"),
        pytest.param("POST", "/v1/tokens", id="create"),
        pytest.param("GET", "/v1/audit", id="audit"),
        pytest.param("GET", "/openapi.json", id="openapi"),
        pytest.param("DELETE", "/v1/tokens/tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", id="delete"),
    ],
)
def test_data_plane_never_serves_the_management_api(
    ag: AuthgateProcess, method: str, path: str
) -> None:
    """The management paths answer 404 on the data-plane and metrics ports, token or not."""
    admin, _ = mint(ag.env)
    before = keys_snapshot(ag.env["AUTHGATE_REDIS_URL"])
    headers = {"Authorization": f"Bearer {admin}", "X-API-Key": admin}
    resp = httpx.request(method, ag.url + path, headers=headers, json=QUERY, timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "NOT_FOUND"
    assert keys_snapshot(ag.env["AUTHGATE_REDIS_URL"]) == before


def test_admin_listener_is_off_unless_configured(cli_env: dict[str, str]) -> None:
    """Without AUTHGATE_ADMIN_LISTEN no port serves the management API."""
    plain = start_authgate(cli_env, admin=False)
    try:
        admin, _ = mint(cli_env)
        resp = httpx.get(plain.url + "/v1/tokens", headers={"Authorization": f"Bearer {admin}"})
        assert resp.status_code == 404
    finally:
        plain.stop()


# -- the OpenAPI document --------------------------------------------------------------------
def test_openapi_is_served_without_a_token(ag: AuthgateProcess) -> None:
    """GET /openapi.json needs no token and is the document in authgate.openapi."""
    resp = call(ag, "GET", "/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == DOC


def test_openapi_document_validates() -> None:
    """The document is valid OpenAPI 3.1 (openapi-spec-validator)."""
    import openapi_spec_validator as validator

    validator.validate(DOC)


def test_openapi_describes_every_route() -> None:
    """Every route the app serves is in the document, with its security and error answers."""
    assert DOC["openapi"].startswith("3.1.")
    paths = DOC["paths"]
    for shape, methods in ROUTES.items():
        path = "/" + "/".join(shape)
        assert path in paths, path
        for method in methods:
            operation = paths[path][method.lower()]
            assert operation["operationId"] and operation["responses"]
            if path == "/openapi.json":
                assert operation["security"] == []
            else:
                assert "401" in operation["responses"] and "503" in operation["responses"]
    documented = {(p, m) for p, item in paths.items() for m in item if m != "parameters"}
    served = {("/" + "/".join(s), m.lower()) for s, ms in ROUTES.items() for m in ms}
    assert documented == served
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    refs = re.findall(r'"\$ref":"#/([^"]+)"', orjson.dumps(DOC).decode())
    for ref in refs:
        node: Any = DOC
        for part in ref.split("/"):
            node = node[part]
    required = set(DOC["components"]["schemas"]["TokenSpec"]["required"])
    assert required == {"name", "org", "project", "key_type"}


# -- Redis down ------------------------------------------------------------------------------
def test_redis_down_is_503_and_no_traceback() -> None:
    """With Redis unreachable every authenticated call is 503 UNAVAILABLE, never a 500."""
    own = start_valkey()
    env = base_env(own.url)
    try:
        admin, _ = mint(env)
        ag = start_authgate(env, admin=True)
        try:
            assert call(ag, "GET", "/v1/tokens", admin).status_code == 200
            own.stop()
            for operation in OPERATIONS:
                resp = run_operation(ag, admin, operation, "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV")
                assert resp.status_code == 503, f"{operation}: {resp.text}"
                error = error_of(resp)
                assert error["code"] == "UNAVAILABLE"
                assert "Traceback" not in resp.text and "redis" not in resp.text.lower()
            assert call(ag, "GET", "/openapi.json").status_code == 200
            own.start()  # an empty server: the data did not survive
            admin, _ = mint(env)
            assert eventually(lambda: call(ag, "GET", "/v1/tokens", admin).status_code == 200)
            assert "Traceback" not in ag.log()
        finally:
            ag.stop()
    finally:
        own.stop()


# -- property: any create body ---------------------------------------------------------------
_FIELDS = [*ATTRIBUTES, "expires_in", "token", "hash", "id"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6,
)  # fmt: skip
_VALUES = {
    "name": st.text(max_size=12),
    "key_type": st.sampled_from(["r--", "-w-", "--d", "rw-", "r-d", "-wd", "rwd", "---", "x"]),
    "kind": st.sampled_from(["query", "management", "", "other"]),
    "org": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,5}", fullmatch=True) | st.text(max_size=4),
    "project": st.sampled_from(["tunes", "p-1", "", "a b"]),
    "roles": st.lists(st.sampled_from(["admin", "viewer", "Bad Role"]), max_size=3),
    "ip_allowlist": st.lists(st.sampled_from(["10.0.0.0/8", "::1", "300.1.1.1"]), max_size=2),
    "expires_in": st.sampled_from(["30d", "90s", "1w", "0", "soon", 3600, 0, -1]),
}
_BODY = st.dictionaries(
    st.sampled_from(_FIELDS),
    st.deferred(lambda: _JSON),
    max_size=4,
).flatmap(lambda extra: st.fixed_dictionaries({}, optional=_VALUES).map(lambda d: {**extra, **d}))


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_BODY)
def test_any_create_body_is_created_or_refused_cleanly(
    redis_url: str, body: dict[str, Any]
) -> None:
    """Any JSON object: 201 with exactly the validated attributes, or 400/422 and no write."""
    env = base_env(redis_url)
    settings_ = load_settings(env)
    admin, _ = mint(env)

    async def go() -> tuple[httpx.Response, dict[bytes, bytes | None], dict[bytes, bytes | None]]:
        client = connect(settings_.redis_url, 2.0)
        app = create_admin_app(TokenStore(client, settings_), settings_, Metrics())
        transport = httpx.ASGITransport(app=app)
        try:
            before = keys_snapshot(redis_url)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
                resp = await http.post(
                    "/v1/tokens", content=orjson.dumps(body), headers={"X-API-Key": admin}
                )
            return resp, before, keys_snapshot(redis_url)
        finally:
            await client.aclose()

    resp, before, after = asyncio.run(go())
    assert resp.status_code in (201, 400, 403, 422), resp.text
    if resp.status_code != 201:
        error_of(resp)
        assert after == before
        return
    created = resp.json()
    conforms(created, "CreatedToken")
    assert len(after) == len(before) + 2  # the record and its id index entry
    spec = dict(body)
    if isinstance(spec.get("expires_in"), str):
        from authgate.durations import parse_duration

        spec["expires_in"] = parse_duration(spec["expires_in"])
    clean = validate_spec(spec)
    for key in ("name", "kind", "key_type", "org", "project", "roles", "ip_allowlist"):
        assert created[key] == clean[key], key


def test_anonymous_denials_cannot_flush_the_audit_stream(redis_url: str) -> None:
    """Callers without a recognised management token are audited up to a burst and then at a
    steady rate per worker; the rest are counted in /metrics, and the next denial written
    says how many were left out. Lifecycle events stay in the capped stream."""
    from tests.cluster_harness import metric

    defaults = load_settings(base_env(redis_url))
    ANONYMOUS_AUDIT_BURST, ANONYMOUS_AUDIT_RATE = (
        defaults.admin_audit_burst,
        defaults.admin_audit_rate,
    )
    ag = start_authgate({**base_env(redis_url), "AUTHGATE_AUDIT_MAXLEN": "150"}, admin=True)
    try:
        created = mint(ag.env)  # a lifecycle event, first in the stream
        sent = ANONYMOUS_AUDIT_BURST + 150
        started = time.monotonic()
        with httpx.Client(base_url=ag.admin_url, timeout=10) as client:
            for i in range(sent):
                headers = {"Authorization": "Bearer not-a-token"} if i % 2 else {}
                assert client.get("/v1/tokens", headers=headers).status_code == 401
        elapsed = time.monotonic() - started
        written = [e for e in raw_audit(redis_url) if e["action"] == "denied"]
        assert ANONYMOUS_AUDIT_BURST <= len(written)
        assert len(written) <= ANONYMOUS_AUDIT_BURST + ANONYMOUS_AUDIT_RATE * elapsed + 1
        left_out = sent - len(written)
        assert left_out > 0
        assert metric(ag.metrics_url, "authgate_admin_audit_suppressed_total") == left_out
        assert any(e["action"] == "create" for e in raw_audit(redis_url))

        time.sleep(2 / ANONYMOUS_AUDIT_RATE)
        assert call(ag, "GET", "/v1/tokens").status_code == 401
        last = raw_audit(redis_url)[-1]
        assert last["action"] == "denied" and last["actor"] == "anonymous"
        reported = [orjson.loads(e["detail"]).get("suppressed_before", 0) for e in written]
        assert sum(reported) + orjson.loads(last["detail"]).get("suppressed_before", 0) == left_out
        assert created[0] not in ag.log()
    finally:
        ag.stop()
