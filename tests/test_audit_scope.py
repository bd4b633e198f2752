"""GET /v1/audit over HTTP: each caller reads the events it may see, a page at a time."""

from __future__ import annotations

import httpx

from tests.conftest import AuthgateProcess
from tests.test_admin import call, mint


def events(ag: AuthgateProcess, token: str, **params: str) -> httpx.Response:
    return call(ag, "GET", "/v1/audit", token, params=params)


def test_a_tenant_reads_only_its_tenants_events(ag: AuthgateProcess) -> None:
    """An acme management token's audit holds acme's token events and its own calls, never
    globex's; the environment token sees both."""
    root, _ = mint(ag.env, org="*", project="*")
    acme, acme_admin = mint(ag.env, org="acme", project="*", name="acme-admin")
    for org in ("acme", "globex"):
        r = call(
            ag, "POST", "/v1/tokens", root,
            json={"name": f"{org}-t", "org": org, "project": "p", "key_type": "r--"},
        )  # fmt: skip
        assert r.status_code == 201, r.text
    made = call(
        ag, "POST", "/v1/tokens", acme,
        json={"name": "by-acme", "org": "acme", "project": "q", "key_type": "r--"},
    )  # fmt: skip
    assert made.status_code == 201, made.text

    seen = events(ag, acme, count="100").json()["events"]
    names = {e["display_prefix"] for e in seen}
    scopes = {(e["scope"] or {}).get("org") for e in seen if e["action"] == "create"}
    assert scopes == {"acme"}, seen
    assert any(e["actor"] == acme_admin for e in seen)
    everything = events(ag, root, count="100").json()["events"]
    assert {(e["scope"] or {}).get("org") for e in everything if e["action"] == "create"} >= {
        "acme",
        "globex",
    }
    assert len(everything) > len(seen) and names


def test_the_audit_pages_with_a_cursor_and_filters_by_token(ag: AuthgateProcess) -> None:
    """Pages of `count` events follow each other without overlap down to the oldest; a
    token_id keeps that token's events only; a made-up cursor is refused."""
    root, _ = mint(ag.env, org="*", project="*")
    ids = []
    for n in range(7):
        r = call(
            ag, "POST", "/v1/tokens", root,
            json={"name": f"t{n}", "org": "acme", "project": "p", "key_type": "r--"},
        )  # fmt: skip
        ids.append(r.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"count": "3", **({"cursor": cursor} if cursor else {})}
        page = events(ag, root, **params).json()
        assert len(page["events"]) <= 3
        seen += [e["event_id"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) >= 7
    assert seen == sorted(seen, key=lambda i: tuple(map(int, i.split("-"))), reverse=True)

    one = events(ag, root, token_id=ids[3]).json()["events"]
    assert [e["token_id"] for e in one] == [ids[3]]
    bad = events(ag, root, cursor="not-a-cursor")
    assert bad.status_code == 422 and bad.json()["error"]["details"]["field"] == "cursor"
