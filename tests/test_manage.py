"""Tenancy, no growth, update and disable, cursors and usage history, end to end.

Two real `authgate serve` instances share one real Valkey: `a` serves the management API
(and a data plane), `b` only a data plane, so every change made through `a` is checked
where only the invalidation channel can have told it. /auth is asked as Traefik asks it
(the real status and the JSON body come back), from a client address the test chooses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import AuthgateProcess, Valkey, base_env, run_cli, start_authgate
from tests.test_admin import call, conforms, error_of, keys_snapshot, mint, raw_audit

ROUTES = """
[[routes]]
class = "scoped"
prefix = "/minimal/api/rest/v1/{org}/{project}"

[[routes]]
class = "system"
prefix = "/minimal/api/system"

[[routes]]
class = "app"
prefix = "/minimal/rest/apps/v1"

[[routes]]
class = "default"
prefix = "/minimal/api/reports"
permissions = ["read:reports"]
"""
SCOPED = "/minimal/api/rest/v1/acme/tunes/assets"
REPORTS = "/minimal/api/reports/q1"
APP = "/minimal/rest/apps/v1/data?app_id=APP1"
ACME = {"name": "acme-reader", "org": "acme", "project": "tunes", "key_type": "r--"}
GLOBEX = {"name": "globex-reader", "org": "globex", "project": "web", "key_type": "r--"}


@pytest.fixture(scope="module")
def pair(valkey: Valkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """Instance `a` (management API + data plane) and `b` (data plane) on one Valkey."""
    config = Path(tmp_path_factory.mktemp("config")) / "authgate.toml"
    config.write_text(ROUTES)
    env = base_env(valkey.url, AUTHGATE_CONFIG=str(config))
    a = start_authgate(env, admin=True)
    try:
        b = start_authgate(env)
        try:
            with httpx.Client(timeout=5) as client_a, httpx.Client(timeout=5) as client_b:
                a.extra["client"], b.extra["client"] = client_a, client_b  # keep-alive
                yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.fixture
def gates(pair: tuple[AuthgateProcess, AuthgateProcess], redis_url: str) -> Any:
    """The module's two instances, with the database flushed for this test."""
    return pair


def ask(
    gate: AuthgateProcess, token: str, uri: str = SCOPED, method: str = "GET", ip: str = "10.1.1.1"
) -> httpx.Response:
    """/auth as Traefik asks it, for a client at `ip`."""
    sep = "&" if "?" in uri else "?"
    client: httpx.Client = gate.extra["client"]  # type: ignore[assignment]
    return client.get(
        gate.url + "/auth",
        headers={
            "X-Forwarded-Uri": f"{uri}{sep}pwt={token}",
            "X-Forwarded-Method": method,
            "X-Forwarded-For": ip,
            "X-Power-Token": token,
        },
    )


def code(resp: httpx.Response) -> str:
    return "OK" if resp.status_code == 200 else str(resp.json()["error"]["code"])


def until(check: Any, timeout: float = 5.0) -> float:
    """Seconds until `check()` holds (polling as fast as HTTP allows); fails on timeout."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "condition never held"
    return time.monotonic() - started


def create(a: AuthgateProcess, admin: str, **spec: Any) -> dict[str, Any]:
    resp = call(a, "POST", "/v1/tokens", admin, json={**ACME, **spec})
    assert resp.status_code == 201, resp.text
    made: dict[str, Any] = resp.json()
    return made


# -- tenancy ---------------------------------------------------------------------------------
TARGETED = [
    pytest.param("GET", "", None, id="show"),
    pytest.param("PATCH", "", {"name": "mine now"}, id="update"),
    pytest.param("POST", "/rotate", {"grace": "1h"}, id="rotate"),
    pytest.param("POST", "/revoke", None, id="revoke"),
    pytest.param("DELETE", "", None, id="delete"),
    pytest.param("GET", "/usage", None, id="usage"),
]


@pytest.mark.parametrize(("method", "suffix", "body"), TARGETED)
def test_a_tenant_never_sees_or_touches_another_tenants_token(
    gates: tuple[AuthgateProcess, AuthgateProcess],
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    """An acme management token gets 404 NOT_FOUND (not 403) for a globex token id on every
    endpoint, exactly as for an id that does not exist; nothing is written; the globex
    token keeps working; the same call on its own acme token succeeds."""
    a, b = gates
    acme_admin, _ = mint(a.env, org="acme", project="*")
    root, _ = mint(a.env)
    theirs = create(a, root, **GLOBEX)
    mine = create(a, root)
    url = a.env["AUTHGATE_REDIS_URL"]
    before = keys_snapshot(url)
    resp = call(a, method, f"/v1/tokens/{theirs['id']}{suffix}", acme_admin, json=body)
    assert resp.status_code == 404, resp.text
    error = error_of(resp)
    unknown = call(
        a, method, f"/v1/tokens/tok_01ARZ3NDEKTSV4RRFFQ69G5FAV{suffix}", acme_admin, json=body
    )
    assert error["code"] == error_of(unknown)["code"] == "NOT_FOUND"
    assert error["message"] == error_of(unknown)["message"]
    assert keys_snapshot(url) == before
    assert code(ask(b, theirs["token"], "/minimal/api/rest/v1/globex/web/x")) == "OK"
    own = call(a, method, f"/v1/tokens/{mine['id']}{suffix}", acme_admin, json=body)
    assert own.status_code in (200, 201), own.text


def test_list_shows_only_the_callers_tenancy(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """List never includes tokens outside the caller's org/project/space, whatever the
    filters say; `*` sees the whole environment."""
    a, _ = gates
    root, root_id = mint(a.env)
    acme_tunes = create(a, root)
    acme_other = create(a, root, project="other")
    acme_space = create(a, root, space="blue")
    globex = create(a, root, **GLOBEX)
    org_admin, org_admin_id = mint(a.env, org="acme", project="*")
    project_admin, project_admin_id = mint(a.env, org="acme", project="tunes")
    space_admin, space_admin_id = mint(a.env, org="acme", project="tunes", space="blue")

    def ids(token: str, query: str = "") -> set[str]:
        resp = call(a, "GET", "/v1/tokens" + query, token)
        assert resp.status_code == 200, resp.text
        conforms(resp.json(), "TokenList")
        return {t["id"] for t in resp.json()["tokens"]}

    managers = {org_admin_id, project_admin_id, space_admin_id}
    acme = {acme_tunes["id"], acme_other["id"], acme_space["id"], *managers}
    assert ids(root) == {*acme, globex["id"], root_id}
    assert ids(org_admin) == acme
    assert ids(org_admin, "?org=globex") == set()
    assert ids(project_admin) == acme - {acme_other["id"], org_admin_id}  # project "*" too
    assert ids(project_admin, "?project=other") == set()
    assert ids(space_admin) == {acme_space["id"], space_admin_id}


def test_a_tenant_reads_only_its_own_audit_events(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """The audit read by a tenant holds the events of its own tokens and its own failed
    calls; another tenant's ids and unrecognised callers' denials are not in it. The
    environment-wide token reads everything."""
    a, _ = gates
    root, _ = mint(a.env)
    acme_admin, acme_admin_id = mint(a.env, org="acme", project="*")
    mine = create(a, acme_admin)
    theirs = create(a, root, **GLOBEX)
    call(a, "POST", f"/v1/tokens/{theirs['id']}/revoke", root)
    call(a, "GET", "/v1/tokens?limit=0", acme_admin)  # rejected: acme's own failure
    call(a, "GET", "/v1/tokens", "min_" + "Z" * 38)  # denied: nobody known
    seen = call(a, "GET", "/v1/audit?count=100", acme_admin)
    assert seen.status_code == 200
    conforms(seen.json(), "AuditList")
    events = seen.json()["events"]
    assert theirs["id"] not in seen.text and "anonymous" not in seen.text
    assert all(
        (e["scope"] or {}).get("org") == "acme" or e["actor"] == acme_admin_id for e in events
    )
    assert ("create", mine["id"]) in {(e["action"], e["token_id"]) for e in events}
    assert any(e["action"] == "rejected" and e["actor"] == acme_admin_id for e in events)
    everything = call(a, "GET", "/v1/audit?count=100", root).text
    assert theirs["id"] in everything and "anonymous" in everything


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param({"org": "globex"}, "org", id="other-org"),
        pytest.param({"project": "web"}, "project", id="other-project"),
        pytest.param({"org": "*", "project": "*", "kind": "management"}, "org", id="wildcard"),
        pytest.param({"space": "red"}, "space", id="other-space"),
    ],
)
def test_create_outside_the_scope_is_scope_mismatch(
    gates: tuple[AuthgateProcess, AuthgateProcess], spec: dict[str, Any], field: str
) -> None:
    """Creating a token outside the caller's scope is 403 SCOPE_MISMATCH naming the field,
    and writes nothing."""
    a, _ = gates
    admin, _ = mint(a.env, org="acme", project="tunes", space="blue")
    before = keys_snapshot(a.env["AUTHGATE_REDIS_URL"])
    resp = call(a, "POST", "/v1/tokens", admin, json={**ACME, "space": "blue", **spec})
    assert resp.status_code == 403, resp.text
    error = error_of(resp)
    assert (error["code"], error["details"]["field"]) == ("SCOPE_MISMATCH", field)
    assert keys_snapshot(a.env["AUTHGATE_REDIS_URL"]) == before


# -- no growth -------------------------------------------------------------------------------
def test_a_limited_management_token_cannot_mint_a_stronger_one(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """The issue's attack: a -w- management token limited to 127.0.0.1/32 and expiring in an
    hour cannot mint a token with no allowlist, a wider one, no expiry or a later one, more
    roles or permissions; within its limits it can. Nothing is written when refused."""
    a, _ = gates
    hour = time.time() + 3600
    limited, _ = mint(
        a.env, key_type="-w-", ip_allowlist=["127.0.0.1/32"], expires_at=hour,
        roles=["ops"], permissions=["read:reports"],
    )  # fmt: skip
    ok = {**ACME, "kind": "management", "key_type": "-w-", "org": "*", "project": "*",
          "ip_allowlist": ["127.0.0.1"], "expires_in": "30m"}  # fmt: skip
    url = a.env["AUTHGATE_REDIS_URL"]
    wider = [
        ({"ip_allowlist": []}, "ip_allowlist"),
        ({"ip_allowlist": ["127.0.0.0/8"]}, "ip_allowlist"),
        ({"ip_allowlist": ["127.0.0.1", "::1"]}, "ip_allowlist"),
        ({"expires_in": None}, "expires_at"),
        ({"expires_in": "2h"}, "expires_at"),
        ({"roles": ["ops", "admin"]}, "roles"),
        ({"permissions": ["read:reports", "write:reports"]}, "permissions"),
        ({"key_type": "rw-"}, "key_type"),
    ]
    for change, field in wider:
        before = keys_snapshot(url)
        resp = call(a, "POST", "/v1/tokens", limited, json={**ok, **change})
        assert resp.status_code == 403, (change, resp.text)
        assert error_of(resp)["details"]["field"] == field
        assert keys_snapshot(url) == before
    made = call(a, "POST", "/v1/tokens", limited, json={**ok, "roles": ["ops"]})
    assert made.status_code == 201, made.text
    assert made.json()["expires_at"] is not None


def test_changes_cannot_widen_and_are_all_or_nothing(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """A PATCH that would make a token more powerful than its caller (allowlist, expiry,
    apps, permissions) is 403 naming the field and changes nothing, not even the other
    fields of the same PATCH; a token the caller could not have minted cannot be changed,
    rotated, revoked or deleted by it."""
    a, _ = gates
    root, _ = mint(a.env)
    tenant, _ = mint(
        a.env, org="acme", project="tunes", ip_allowlist=["10.0.0.0/8", "127.0.0.0/8"],
        permissions=["read:reports"], app_ids=["APP1"], expires_in=86400.0,
    )  # fmt: skip
    child = create(
        a, tenant, ip_allowlist=["10.1.0.0/16"], app_ids=["APP1"], expires_in="1h",
        permissions=["read:reports"],
    )  # fmt: skip
    url = a.env["AUTHGATE_REDIS_URL"]
    for patch, field in [
        ({"name": "x", "ip_allowlist": []}, "ip_allowlist"),
        ({"name": "x", "ip_allowlist": ["0.0.0.0/0"]}, "ip_allowlist"),
        ({"name": "x", "expires_at": None}, "expires_at"),
        ({"name": "x", "expires_in": "30d"}, "expires_at"),
        ({"name": "x", "app_ids": []}, "app_ids"),
        ({"name": "x", "permissions": ["read:reports", "admin:all"]}, "permissions"),
    ]:
        before = keys_snapshot(url)
        resp = call(a, "PATCH", f"/v1/tokens/{child['id']}", tenant, json=patch)
        assert resp.status_code == 403, (patch, resp.text)
        assert error_of(resp)["details"]["field"] == field
        assert keys_snapshot(url) == before
    stronger = create(a, root)  # acme/tunes, no allowlist: more than `tenant` could make
    for method, suffix, body in [
        ("PATCH", "", {"name": "renamed"}),
        ("POST", "/rotate", {"grace": "0s"}),
        ("POST", "/revoke", None),
        ("DELETE", "", None),
    ]:
        resp = call(a, method, f"/v1/tokens/{stronger['id']}{suffix}", tenant, json=body)
        assert resp.status_code == 403, (method, suffix, resp.text)
        assert error_of(resp)["code"] == "EXCEEDS_CALLER"
    assert call(a, "GET", f"/v1/tokens/{stronger['id']}", tenant).status_code == 200


# -- update, enforced everywhere ----------------------------------------------------------
def test_every_change_is_enforced_by_another_instance_within_100_ms(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """Each patchable field changed through instance a is enforced by instance b (which had
    the token cached) within 100 ms; name and description show at once; each change is an
    audit event naming the fields changed."""
    a, b = gates
    root, root_id = mint(a.env, roles=["admin"], permissions=["read:reports"])
    made = create(a, root, permissions=["read:reports"], app_ids=["APP1"])
    token, token_id = made["token"], made["id"]

    def patch(body: dict[str, Any]) -> dict[str, Any]:
        resp = call(a, "PATCH", f"/v1/tokens/{token_id}", root, json=body)
        assert resp.status_code == 200, resp.text
        conforms(resp.json(), "Token")
        return dict(resp.json())

    def enforced(uri: str, want: str, ip: str = "10.1.1.1") -> None:
        took = until(lambda: code(ask(b, token, uri, ip=ip)) == want, 2.0)
        assert took < 0.1, f"{want} on {uri} took {took * 1000:.0f} ms"

    for uri in (SCOPED, REPORTS, APP):
        assert code(ask(b, token, uri)) == "OK"
    shown = patch({"name": "renamed", "description": "now with words"})
    assert (shown["name"], shown["description"]) == ("renamed", "now with words")
    assert shown["updated_at"] is not None and shown["updated_by"] == root_id

    patch({"enabled": False})
    enforced(SCOPED, "TOKEN_DISABLED")
    assert ask(b, token).status_code == 403
    patch({"enabled": True})
    enforced(SCOPED, "OK")

    patch({"ip_allowlist": ["192.0.2.0/24"]})
    enforced(SCOPED, "IP_NOT_ALLOWED")
    assert code(ask(b, token, ip="192.0.2.9")) == "OK"
    patch({"ip_allowlist": []})
    enforced(SCOPED, "OK")

    patch({"permissions": []})
    enforced(REPORTS, "INSUFFICIENT_PERMISSIONS")
    patch({"permissions": ["read:reports"]})
    enforced(REPORTS, "OK")

    patch({"app_ids": ["APP2"]})
    enforced(APP, "SCOPE_MISMATCH")
    patch({"app_ids": "APP1,APP2"})
    enforced(APP, "OK")

    soon = patch({"expires_in": "1500ms"})
    assert soon["expires_at"] is not None and soon["status"] == "active"
    until(lambda: code(ask(b, token)) == "TOKEN_EXPIRED", 5.0)
    assert code(ask(a, token)) == "TOKEN_EXPIRED"
    cleared = call(a, "PATCH", f"/v1/tokens/{token_id}", root, json={"expires_at": None})
    assert cleared.status_code == 200 and cleared.json()["status"] == "active"
    enforced(SCOPED, "OK")

    updates = [e for e in raw_audit(a.env["AUTHGATE_REDIS_URL"]) if e["action"] == "update"]
    fields = [e["detail"] for e in updates]
    assert fields[0] == '{"fields":["description","name"]}'
    assert len(updates) == 11 and all(e["actor"] == root_id for e in updates)


def test_a_disabled_management_token_is_refused_until_enabled(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """A management token disabled by another is refused on the API (403 TOKEN_DISABLED)
    and works again once enabled."""
    a, _ = gates
    root, _ = mint(a.env)
    ops, ops_id = mint(a.env, org="acme", project="*")
    assert call(a, "GET", "/v1/tokens", ops).status_code == 200
    call(a, "PATCH", f"/v1/tokens/{ops_id}", root, json={"enabled": False})
    refused = call(a, "GET", "/v1/tokens", ops)
    assert refused.status_code == 403 and error_of(refused)["code"] == "TOKEN_DISABLED"
    call(a, "PATCH", f"/v1/tokens/{ops_id}", root, json={"enabled": True})
    assert call(a, "GET", "/v1/tokens", ops).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        pytest.param({}, 422, "body", id="empty"),
        pytest.param({"colour": "red"}, 422, "colour", id="unknown"),
        pytest.param({"kind": "management"}, 422, "kind", id="kind"),
        pytest.param({"org": "globex"}, 422, "org", id="org"),
        pytest.param({"key_type": "rwd"}, 422, "key_type", id="key-type"),
        pytest.param({"roles": ["admin"]}, 422, "roles", id="roles"),
        pytest.param({"token": "x"}, 422, "token", id="value"),
        pytest.param({"enabled": "no"}, 400, "enabled", id="enabled-text"),
        pytest.param({"enabled": None}, 400, "enabled", id="enabled-null"),
        pytest.param({"name": 7}, 400, "name", id="name-number"),
        pytest.param({"name": ""}, 422, "name", id="name-empty"),
        pytest.param({"permissions": [1]}, 400, "permissions", id="permissions-numbers"),
        pytest.param({"expires_at": "tomorrow"}, 422, "expires_at", id="bad-time"),
        pytest.param({"expires_at": "2030-01-01T00:00:00"}, 422, "expires_at", id="no-zone"),
        pytest.param({"expires_in": "30"}, 422, "expires_in", id="no-unit"),
        pytest.param({"expires_in": 30}, 422, "expires_in", id="number"),
        pytest.param({"expires_in": "1h", "expires_at": None}, 422, "expires_in", id="both"),
        pytest.param({"name": "ok", "ip_allowlist": ["10.0.0.300"]}, 422, "ip_allowlist",
                     id="half-bad"),
    ],
)  # fmt: skip
def test_bad_patches_change_nothing(
    gates: tuple[AuthgateProcess, AuthgateProcess],
    body: dict[str, Any],
    status: int,
    field: str,
) -> None:
    """An empty patch, an unknown or unchangeable field, a wrong type or a bad value: 4xx
    naming the field, and not one byte written (not even the valid part of the patch)."""
    a, _ = gates
    root, _ = mint(a.env)
    made = create(a, root)
    url = a.env["AUTHGATE_REDIS_URL"]
    before = keys_snapshot(url)
    resp = call(a, "PATCH", f"/v1/tokens/{made['id']}", root, json=body)
    assert resp.status_code == status, resp.text
    assert error_of(resp)["details"]["field"] == field
    assert keys_snapshot(url) == before


def test_a_revoked_token_cannot_be_changed_back(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """PATCH on a revoked token is refused; concurrent PATCHes and a revocation never bring
    a revoked token back (each change is a compare-and-set on the record)."""
    a, b = gates
    root, _ = mint(a.env)
    made = create(a, root)
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            call(a, "PATCH", f"/v1/tokens/{made['id']}", root, json={"name": f"n{n}"})
            n += 1

    workers = [threading.Thread(target=churn) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.2)
        assert call(a, "POST", f"/v1/tokens/{made['id']}/revoke", root).status_code == 200
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join()
    shown = call(a, "GET", f"/v1/tokens/{made['id']}", root).json()
    assert shown["status"] == "revoked"
    assert code(ask(b, made["token"])) == "TOKEN_INVALID"
    again = call(a, "PATCH", f"/v1/tokens/{made['id']}", root, json={"name": "back"})
    assert again.status_code == 422 and error_of(again)["details"]["field"] == "id"


# -- listing with cursors --------------------------------------------------------------------
def walk(a: AuthgateProcess, admin: str, query: str, between: Any = None) -> list[str]:
    """Every id a paged walk returns, in order; `between(page_number)` runs between pages."""
    seen: list[str] = []
    cursor = None
    page = 0
    while True:
        q = query + (f"&cursor={cursor}" if cursor else "")
        resp = call(a, "GET", f"/v1/tokens?{q}", admin)
        assert resp.status_code == 200, resp.text
        conforms(resp.json(), "TokenList")
        seen.extend(t["id"] for t in resp.json()["tokens"])
        cursor = resp.json()["next_cursor"]
        if cursor is None:
            return seen
        page += 1
        if between is not None:
            between(page)


def test_cursor_walks_every_token_once_while_tokens_come_and_go(
    gates: tuple[AuthgateProcess, AuthgateProcess],
) -> None:
    """A walk of small pages, newest first, while other tokens are created and deleted
    (between pages and from a thread at the same time), returns every token that existed
    throughout exactly once, in order, and no token twice."""
    a, _ = gates
    root, root_id = mint(a.env)
    base = [create(a, root, name=f"t{i:02d}")["id"] for i in range(40)]
    doomed = set(base[5:35:3])  # deleted during the walk, some before and some after
    order = [*reversed(base), root_id]
    stop = threading.Event()
    extra: list[str] = []

    churner, churner_id = mint(a.env)  # its own audit budget; it backs off when that is spent

    def churn() -> None:
        while not stop.is_set():
            made = call(a, "POST", "/v1/tokens", churner, json={**ACME, "name": "new"})
            if made.status_code == 429:
                time.sleep(0.1)
                continue
            extra.append(made.json()["id"])
            call(a, "DELETE", f"/v1/tokens/{extra[-1]}", churner)

    def between(page: int) -> None:
        for token_id in list(doomed)[page - 1 :: 6]:
            call(a, "DELETE", f"/v1/tokens/{token_id}", root)
        create(a, root, name="during")

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        seen = walk(a, root, "limit=4", between)
    finally:
        stop.set()
        thread.join()
    assert len(seen) == len(set(seen)), "a token was returned twice"
    kept = [t for t in order if t not in doomed]
    assert [t for t in seen if t in set(kept)] == kept, "a token was skipped or out of order"
    assert set(seen) <= {*order, *extra, churner_id, *_names(a, root, "during")}
    assert walk(a, root, "limit=1000") == [t for t in walk(a, root, "limit=3")]


def _names(a: AuthgateProcess, admin: str, name: str) -> set[str]:
    resp = call(a, "GET", f"/v1/tokens?name={name}&limit=1000", admin)
    return {t["id"] for t in resp.json()["tokens"]}


def test_cursor_is_bound_to_its_listing(gates: tuple[AuthgateProcess, AuthgateProcess]) -> None:
    """A cursor changed by one character, made for other filters or another caller, or not
    a cursor at all is 422 naming `cursor`; absurd limits are 422 naming `limit`."""
    a, _ = gates
    root, _ = mint(a.env)
    other, _ = mint(a.env)
    for i in range(4):
        create(a, root, name=f"t{i}")
    first = call(a, "GET", "/v1/tokens?limit=2&org=acme", root).json()
    cursor = first["next_cursor"]
    assert cursor
    assert call(a, "GET", f"/v1/tokens?limit=2&org=acme&cursor={cursor}", root).status_code == 200
    flipped = cursor[:-1] + ("A" if cursor[-1] != "A" else "B")
    forged = "W1sxLjAsInRva18wMUFSWjNOREVLVFNWNFJSRkZRNjlHNUZBViJdXQ." + cursor.split(".")[1]
    cases = [
        f"limit=2&org=acme&cursor={flipped}",
        f"limit=2&org=acme&cursor={forged}",
        f"limit=2&org=globex&cursor={cursor}",
        f"limit=2&cursor={cursor}",
        f"limit=2&org=acme&cursor={cursor}.x",
        "limit=2&org=acme&cursor=nonsense",
    ]
    for query in cases:
        resp = call(a, "GET", f"/v1/tokens?{query}", root)
        assert resp.status_code == 422, (query, resp.text)
        assert error_of(resp)["details"]["field"] == "cursor"
    for i, char in enumerate(cursor):  # any one character changed, anywhere
        if char == ".":
            continue
        changed = cursor[:i] + ("A" if char != "A" else "B") + cursor[i + 1 :]
        resp = call(a, "GET", f"/v1/tokens?limit=2&org=acme&cursor={changed}", root)
        assert resp.status_code == 422, (i, resp.text)
    foreign = call(a, "GET", f"/v1/tokens?limit=2&org=acme&cursor={cursor}", other)
    assert foreign.status_code == 422 and error_of(foreign)["details"]["field"] == "cursor"
    for bad in ("0", "1001", "-1", "ten", "99999999999"):
        resp = call(a, "GET", f"/v1/tokens?limit={bad}", root)
        assert resp.status_code == 422, bad
        assert error_of(resp)["details"]["field"] == "limit"


def test_list_filters_by_status_and_name(gates: tuple[AuthgateProcess, AuthgateProcess]) -> None:
    """status=active|disabled|expiring|expired|revoked and a name prefix (any case)."""
    a, _ = gates
    root, root_id = mint(a.env)
    active = create(a, root, name="Billing export")
    disabled = create(a, root, name="billing import")
    call(a, "PATCH", f"/v1/tokens/{disabled['id']}", root, json={"enabled": False})
    expiring = create(a, root, name="short", expires_in="2d")
    revoked = create(a, root, name="gone")
    call(a, "POST", f"/v1/tokens/{revoked['id']}/revoke", root)
    expired = create(a, root, name="brief", expires_in="300ms")
    until(lambda: call(a, "GET", f"/v1/tokens/{expired['id']}", root).json()["status"]
          == "expired")  # fmt: skip

    def ids(query: str) -> list[str]:
        return [t["id"] for t in call(a, "GET", f"/v1/tokens?{query}", root).json()["tokens"]]

    assert ids("status=active") == [expiring["id"], active["id"], root_id]
    assert ids("status=disabled") == [disabled["id"]]
    assert ids("status=expiring") == [expiring["id"]]
    assert ids("status=expired") == [expired["id"]]
    assert ids("status=revoked") == [revoked["id"]]
    assert ids("name=BILLING") == [disabled["id"], active["id"]]
    assert ids("name=billing&status=active") == [active["id"]]


# -- usage -----------------------------------------------------------------------------------
def test_usage_history_counts_real_traffic(gates: tuple[AuthgateProcess, AuthgateProcess]) -> None:
    """After traffic through /auth on both instances, GET /v1/tokens/{id}/usage shows today's
    allowed requests, the denials tied to the token by code, and the last client address;
    a token's usage is its own (another token's traffic is not in it)."""
    a, b = gates
    root, _ = mint(a.env)
    made = create(a, root, ip_allowlist=["10.0.0.0/8"])
    other = create(a, root)
    token = made["token"]

    def today() -> dict[str, Any]:
        resp = call(a, "GET", f"/v1/tokens/{made['id']}/usage?days=3", root)
        assert resp.status_code == 200, resp.text
        conforms(resp.json(), "Usage")
        return dict(resp.json())

    for _ in range(2):
        assert code(ask(b, token, ip="10.2.2.2")) == "OK"
    assert code(ask(b, token, method="DELETE")) == "INSUFFICIENT_KEY_TYPE"
    # The last address is the one the instance that flushed last saw: let b's be written.
    until(lambda: today()["days"][0]["allowed"] == 2, 10.0)
    for _ in range(3):
        assert code(ask(a, token)) == "OK"
    assert code(ask(a, token, method="POST")) == "INSUFFICIENT_KEY_TYPE"
    assert code(ask(a, token, ip="192.0.2.1")) == "IP_NOT_ALLOWED"
    assert code(ask(a, token, "/minimal/api/rest/v1/globex/web/x")) == "SCOPE_MISMATCH"
    assert code(ask(a, token, "/minimal/api/system/users")) == "ADMIN_REQUIRED"
    assert code(ask(a, token, REPORTS)) == "INSUFFICIENT_PERMISSIONS"
    call(a, "PATCH", f"/v1/tokens/{made['id']}", root, json={"enabled": False})
    until(lambda: code(ask(a, token, ip="10.9.9.9")) == "TOKEN_DISABLED")
    assert code(ask(a, other["token"])) == "OK"

    until(lambda: today()["days"][0]["allowed"] == 5 and "TOKEN_DISABLED"
          in today()["days"][0]["denied"], 10.0)  # fmt: skip
    usage = today()
    day = usage["days"][0]
    assert len(usage["days"]) == 3
    assert day["date"] == time.strftime("%Y-%m-%d", time.gmtime())
    denied = dict(day["denied"])
    assert denied.pop("TOKEN_DISABLED") >= 1
    assert denied == {
        "INSUFFICIENT_KEY_TYPE": 2,
        "IP_NOT_ALLOWED": 1,
        "SCOPE_MISMATCH": 1,
        "ADMIN_REQUIRED": 1,
        "INSUFFICIENT_PERMISSIONS": 1,
    }
    assert day["last_client_ip"] == "10.9.9.9"
    assert usage["days"][1] == {"date": usage["days"][1]["date"], "allowed": 0, "denied": {},
                                "last_client_ip": None}  # fmt: skip
    assert usage["totals"]["request_count"] == 5 and usage["totals"]["allowed"] == 5
    shown = call(a, "GET", f"/v1/tokens/{made['id']}", root).json()
    assert shown["last_client_ip"] == "10.9.9.9" and shown["last_used_at"] is not None
    for bad in ("0", "91", "x", "-3"):
        resp = call(a, "GET", f"/v1/tokens/{made['id']}/usage?days={bad}", root)
        assert resp.status_code == 422 and error_of(resp)["details"]["field"] == "days"
    cli = run_cli(a.env, "token", "usage", made["id"], "--days", "2")
    assert "INSUFFICIENT_KEY_TYPE 2" in cli.stdout and "10.9.9.9" in cli.stdout


def test_usage_history_memory_per_token(
    gates: tuple[AuthgateProcess, AuthgateProcess], redis_url: str
) -> None:
    """A token used every day with every kind of denial keeps at most ten small history
    hashes; each reports its memory to Redis and expires by itself (no trimming needed)."""
    from authgate.backend import connect
    from authgate.config import load_settings
    from authgate.store import TokenStore
    from authgate.usage import TOKEN_DENIALS, Usage

    a, _ = gates
    root, _ = mint(a.env)
    made = create(a, root)

    async def fill() -> None:
        settings = load_settings(a.env)
        client = connect(settings.redis_url, 2.0)
        try:
            await TokenStore(client, settings).record_usage(
                {
                    made["id"]: Usage(
                        10, time.time(), "203.0.113.200", dict.fromkeys(TOKEN_DENIALS, 3)
                    )
                }
            )
        finally:
            await client.aclose()

    asyncio.run(fill())
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"authgate:usage:{made['id']}:*"))
        assert len(keys) == 1
        ttl = client.ttl(keys[0])
        assert 91 * 86400 <= ttl <= 101 * 86400
        assert (client.memory_usage(keys[0]) or 0) < 1024
    finally:
        client.close()


# -- the audit budget ------------------------------------------------------------------------
def _in_process(redis_url: str, calls: Any, **env: str) -> Any:
    """Run `await calls(http, metrics)` against the management app in this process, with
    the given settings, on the real Valkey."""
    from authgate.admin import create_admin_app
    from authgate.backend import connect
    from authgate.config import load_settings
    from authgate.metrics import Metrics
    from authgate.store import TokenStore

    settings = load_settings(base_env(redis_url, **env))

    async def go() -> Any:
        client = connect(settings.redis_url, 2.0)
        metrics = Metrics()
        app = create_admin_app(TokenStore(client, settings), settings, metrics)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
                return await calls(http, metrics)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _suppressed(metrics: Any) -> float:
    value = metrics.registry.get_sample_value("authgate_admin_audit_suppressed_total")
    return float(value or 0)


BUDGET = {"AUTHGATE_ADMIN_AUDIT_BURST": "5", "AUTHGATE_ADMIN_AUDIT_RATE": "1"}


def test_no_caller_writes_audit_events_faster_than_its_budget(redis_url: str) -> None:
    """A known management token whose calls keep failing (denied, rejected) gets its budget
    of events (burst, then the rate), the rest are counted as suppressed and the next event
    written says how many; another caller's budget is its own; reads write no event."""
    env = base_env(redis_url)
    reader, reader_id = mint(env, key_type="r--")
    other, other_id = mint(env, key_type="r--")

    async def calls(http: httpx.AsyncClient, metrics: Any) -> tuple[float, float, float]:
        started = time.monotonic()
        for i in range(40):
            if i % 2:
                r = await http.delete("/v1/tokens/tok_01ARZ3NDEKTSV4RRFFQ69G5FAV",
                                      headers={"X-API-Key": reader})  # fmt: skip
                assert r.status_code == 403
            else:
                r = await http.get("/v1/tokens?limit=0", headers={"X-API-Key": reader})
                assert r.status_code == 422
        for _ in range(30):
            assert (await http.get("/v1/tokens", headers={"X-API-Key": reader})).status_code == 200
            assert (await http.get("/v1/audit", headers={"X-API-Key": reader})).status_code == 200
        elapsed = time.monotonic() - started
        suppressed = _suppressed(metrics)
        r = await http.get("/v1/tokens?limit=0", headers={"X-API-Key": other})
        assert r.status_code == 422
        await asyncio.sleep(1.1)
        r = await http.get("/v1/tokens?limit=0", headers={"X-API-Key": reader})
        return elapsed, suppressed, _suppressed(metrics)

    elapsed, suppressed, after = _in_process(redis_url, calls, **BUDGET)
    events = [e for e in raw_audit(redis_url) if e["actor"] == reader_id]
    assert {e["action"] for e in events} == {"denied", "rejected"}, "reads wrote events"
    written_first = len(events) - 1
    assert 5 <= written_first <= 5 + elapsed * 1 + 1
    assert suppressed == 40 - written_first and after == suppressed
    last = events[-1]
    assert '"suppressed_before":' in last["detail"]
    assert int(last["detail"].split('"suppressed_before":')[1].split(",")[0].rstrip("}")) == (
        suppressed
    )
    assert [e["actor"] for e in raw_audit(redis_url)].count(other_id) == 1


def test_changes_over_the_budget_are_refused_not_left_unaudited(redis_url: str) -> None:
    """A writer creating tokens faster than its budget gets 429 RATE_LIMITED with
    Retry-After once it is spent; every token that was made has its audit event."""
    env = base_env(redis_url)
    writer, writer_id = mint(env)

    async def calls(http: httpx.AsyncClient, metrics: Any) -> list[httpx.Response]:
        out = []
        for i in range(12):
            out.append(await http.post("/v1/tokens", headers={"X-API-Key": writer},
                                       json={**ACME, "name": f"n{i}"}))  # fmt: skip
        return out

    answers = _in_process(redis_url, calls, **BUDGET)
    made = [r for r in answers if r.status_code == 201]
    limited = [r for r in answers if r.status_code == 429]
    assert len(made) + len(limited) == 12
    assert 5 <= len(made) <= 7 and limited
    error = limited[0].json()["error"]
    assert error["code"] == "RATE_LIMITED" and int(limited[0].headers["retry-after"]) >= 1
    creates = [e for e in raw_audit(redis_url) if e["action"] == "create"]
    assert {e["token_id"] for e in creates if e["actor"] == writer_id} == {
        r.json()["id"] for r in made
    }


def test_pages_go_on_past_sparse_matches_and_equal_creation_times(redis_url: str) -> None:
    """Store level: with few matches among many tokens a call looks at no more than
    `scan_most` ids and hands back a position to go on from; tokens sharing one creation
    time (as a bulk import writes them) are each returned once."""
    from authgate.backend import connect
    from authgate.config import load_settings
    from authgate.store import TokenStore

    settings = load_settings(base_env(redis_url))

    async def go() -> tuple[list[str], list[int], list[str], list[str]]:
        client = connect(settings.redis_url, 2.0)
        store = TokenStore(client, settings)
        try:
            made = [(await store.create({**ACME, "name": f"t{i:02d}"}, "test"))[1]["id"]
                    for i in range(30)]  # fmt: skip
            # The first ten share one score, as tokens inserted in bulk can.
            await client.zadd(store.ids_key, dict.fromkeys(made[:10], 1_700_000_000.0))
            wanted = set(made[::4])
            seen: list[str] = []
            sizes: list[int] = []
            position = None
            while True:
                page, position = await store.page(
                    after=position, limit=3, keep=lambda r: r["id"] in wanted, scan_most=5
                )
                seen.extend(v["id"] for v in page)
                sizes.append(len(page))
                if position is None:
                    break
            every: list[str] = []
            position = None
            while True:
                page, position = await store.page(after=position, limit=2, keep=lambda r: True)
                every.extend(v["id"] for v in page)
                if position is None:
                    break
            return seen, sizes, every, made
        finally:
            await client.aclose()

    seen, sizes, every, made = asyncio.run(go())
    assert sorted(seen) == sorted(made[::4]) and len(seen) == len(set(seen))
    assert min(sizes) < 3 and len(sizes) > 3, "short pages that still go on"
    assert sorted(every) == sorted(made) and len(every) == len(set(every))
    assert every[:20] == list(reversed(made[10:])), "newest first"
