"""The web console at /console/, driven in a real Chromium by Playwright.

A real `authgate serve` with the management listener and a real Valkey; the browser is
Debian's Chromium (`executable_path`), since Playwright's own browser download is out of
reach. Without Chromium or Playwright the module is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AuthgateProcess, Valkey, base_env, run_cli, start_authgate

CHROMIUM = os.environ.get("AUTHGATE_TEST_CHROMIUM") or shutil.which("chromium") or ""
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install playwright)"
)
if not CHROMIUM:
    pytest.skip(
        "no Chromium on this machine (apt-get install chromium, or set AUTHGATE_TEST_CHROMIUM)",
        allow_module_level=True,
    )

TOKEN_VALUE = re.compile(r"min_[0-9A-Za-z]{38}")
SHOTS = os.environ.get("AUTHGATE_SCREENSHOTS")  # a folder: the README's pictures
API_PATH = "/minimal/api/rest/v1/acme/tunes/songs"

pytestmark = pytest.mark.browser


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(valkey: Valkey) -> Iterator[AuthgateProcess]:
    import redis

    client = redis.Redis.from_url(valkey.url)
    client.flushall()
    client.close()
    ag = start_authgate(base_env(valkey.url), admin=True)
    yield ag
    ag.stop()
    assert not TOKEN_VALUE.search(ag.log()), "a token value reached authgate's log"


def mint(ag: AuthgateProcess, *args: str) -> dict[str, Any]:
    """A token made with the CLI, as an operator would (`r--` unless a key type is given)."""
    if "--key-type" not in args:
        args = (*args, "--key-type", "r--")
    out = run_cli(ag.env, "token", "create", *args, "--json").stdout
    created: dict[str, Any] = json.loads(out)
    return created


@pytest.fixture(scope="module")
def root_token(server: AuthgateProcess) -> str:
    """The environment's bootstrap management token (org `*`)."""
    made = mint(
        server, "--name", "root", "--org", "*", "--project", "*", "--key-type", "rwd",
        "--kind", "management", "--roles", "admin", "--permissions", "read:assets",
    )  # fmt: skip
    return str(made["token"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield chromium
        chromium.close()


class Console:
    """One browser context (its own cookies), signed in with one management token."""

    def __init__(self, browser: Any, ag: AuthgateProcess) -> None:
        self.ag = ag
        self.base = f"{ag.admin_url}/console"
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.csp_errors: list[str] = []
        self.page.on(
            "console",
            lambda msg: (
                self.csp_errors.append(msg.text) if "Content Security Policy" in msg.text else None
            ),
        )
        self.urls: list[str] = []
        self.page.on("request", lambda request: self.urls.append(request.url))

    def sign_in(self, token: str) -> None:
        self.page.goto(f"{self.base}/")
        assert self.page.url.endswith("/console/login")
        self.page.get_by_label("Management token").fill(token)
        self.page.get_by_test_id("sign-in").click()
        self.page.wait_for_url(f"{self.base}/tokens")

    def create(self, **fields: str) -> tuple[str, str]:
        """Fill the create form by its visible labels; (token value, token id)."""
        self.page.goto(f"{self.base}/tokens/new")
        labels = {
            "name": "Name", "org": "Org", "project": "Project", "space": "Space",
            "roles": "Roles", "permissions": "Permissions", "ip_allowlist": "IP allowlist",
            "app_ids": "App ids", "expires_in": "Expires in", "description": "Description",
        }  # fmt: skip
        for name, value in fields.items():
            if name in ("key_type", "kind"):
                self.page.get_by_label("Key type" if name == "key_type" else "Kind").select_option(
                    value
                )
            else:
                self.page.get_by_label(labels[name], exact=True).fill(value)
        self.page.get_by_test_id("create").click()
        self.page.wait_for_load_state()
        if self.page.get_by_test_id("error").count():
            raise AssertionError(self.page.get_by_test_id("error").inner_text())
        value = self.page.get_by_test_id("new-token").inner_text().strip()
        link = self.page.get_by_role("link", name=re.compile(r"^Go to "))
        token_id = (link.get_attribute("href") or "").rsplit("/", 1)[-1]
        return value, token_id

    def open_token(self, token_id: str) -> None:
        self.page.goto(f"{self.base}/tokens/{token_id}")

    def status(self) -> str:
        return str(self.page.get_by_test_id("status").first.inner_text()).strip()

    def close(self) -> None:
        assert not self.csp_errors, f"CSP violations: {self.csp_errors}"
        for url in self.urls:
            assert not TOKEN_VALUE.search(url), f"a token value in a URL: {url}"
        self.context.close()


@pytest.fixture
def console(browser: Any, server: AuthgateProcess) -> Iterator[Console]:
    c = Console(browser, server)
    yield c
    c.close()


def auth(ag: AuthgateProcess, token: str, path: str = API_PATH) -> httpx.Response:
    """The token used as a client would, through the data plane's /auth."""
    return httpx.get(
        f"{ag.url}/auth",
        headers={"X-Original-URI": f"{path}?pwt={token}", "X-Power-Token": token},
        timeout=5,
    )


def auth_status(ag: AuthgateProcess, token: str) -> tuple[int, str]:
    """The status and code the client would see (nginx folds 404/503 into headers)."""
    r = auth(ag, token)
    if r.status_code == 200:
        return 200, "OK"
    status = int(r.headers.get("X-Authgate-Status", r.status_code))
    error = json.loads(r.headers["X-Authgate-Error"])["error"]
    return status, error["code"]


def shot(console: Console, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        console.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


# -- tests ----------------------------------------------------------------------------------
def test_a_token_lives_its_whole_life_in_the_browser(
    console: Console, server: AuthgateProcess, root_token: str
) -> None:
    """Sign in; create (value shown once); list; use; disable/enable; rotate with a grace;
    revoke; delete; each step visible in the page and enforced on /auth."""
    console.sign_in(root_token)
    value, token_id = console.create(
        name="tunes-reader", org="acme", project="tunes", key_type="r--",
        permissions="read:assets", description="reads songs",
    )  # fmt: skip
    assert TOKEN_VALUE.fullmatch(value)
    assert console.page.get_by_text("will not be shown again").is_visible()
    shot(console, "one-time")

    # Reloading re-posts the form: refused, and the value is not shown again.
    console.page.reload()
    assert console.page.get_by_test_id("new-token").count() == 0
    assert value not in console.page.content()
    assert "ALREADY_SUBMITTED" in console.page.get_by_test_id("error").inner_text()
    console.page.go_back()
    assert value not in console.page.content()

    console.page.goto(f"{console.base}/tokens")
    row = console.page.locator(f'[data-testid="token-row"][data-token-id="{token_id}"]')
    assert row.count() == 1
    assert "tunes-reader" in row.inner_text() and "active" in row.inner_text()
    assert value not in console.page.content()

    assert auth_status(server, value) == (200, "OK")

    console.open_token(token_id)
    console.page.get_by_test_id("disable").click()
    console.page.wait_for_url(f"{console.base}/tokens/{token_id}")
    assert console.status() == "disabled"
    assert auth_status(server, value) == (403, "TOKEN_DISABLED")

    console.page.get_by_test_id("enable").click()
    console.page.wait_for_url(f"{console.base}/tokens/{token_id}")
    assert console.status() == "active"
    assert auth_status(server, value) == (200, "OK")

    # The usage chart counts what /auth decided for it (usage is written in batches).
    deadline = time.monotonic() + 10
    while True:
        console.page.reload()
        allowed = int(console.page.get_by_test_id("usage-allowed").inner_text())
        denied = int(console.page.get_by_test_id("usage-denied").inner_text())
        if (allowed >= 2 and denied >= 1) or time.monotonic() > deadline:
            break
        console.page.wait_for_timeout(250)
    usage = console.page.get_by_test_id("usage")
    assert usage.locator("svg rect").count() >= 1
    assert int(console.page.get_by_test_id("usage-allowed").inner_text()) == 2
    assert int(console.page.get_by_test_id("usage-denied").inner_text()) == 1
    shot(console, "token")
    console.page.goto(f"{console.base}/tokens")
    assert row.locator("td.num").inner_text().strip() == "3"  # 2 allowed, 1 disabled
    shot(console, "tokens")
    console.open_token(token_id)

    console.page.get_by_label("Grace").fill("1h")
    console.page.get_by_test_id("rotate").click()
    console.page.get_by_test_id("confirm").click()
    new_value = console.page.get_by_test_id("new-token").inner_text().strip()
    assert TOKEN_VALUE.fullmatch(new_value) and new_value != value
    assert auth_status(server, new_value) == (200, "OK")
    assert auth_status(server, value) == (200, "OK")  # within the grace period
    new_id = (
        console.page.get_by_role("link", name=re.compile(r"^Go to ")).get_attribute("href") or ""
    ).rsplit("/", 1)[-1]
    console.page.reload()
    assert new_value not in console.page.content()
    assert "ALREADY_SUBMITTED" in console.page.get_by_test_id("error").inner_text()
    console.open_token(new_id)
    console.page.get_by_test_id("revoke").click()
    assert "cannot be undone" in console.page.content()
    console.page.get_by_test_id("confirm").click()
    console.page.wait_for_url(f"{console.base}/tokens/{new_id}")
    assert console.status() == "revoked"
    assert auth_status(server, new_value) == (404, "TOKEN_INVALID")

    console.page.get_by_test_id("delete").click()
    console.page.get_by_test_id("confirm").click()
    console.page.wait_for_url(f"{console.base}/tokens")
    assert console.page.locator(f'[data-token-id="{new_id}"]').count() == 0

    console.page.goto(f"{console.base}/audit")
    events = console.page.get_by_test_id("audit").inner_text()
    for event in ("create", "update", "rotate", "revoke", "delete"):
        assert event in events, f"no {event} event in the audit page"
    assert value not in console.page.content() and new_value not in console.page.content()


def test_an_edit_is_saved_and_a_bad_one_shows_the_api_error(
    console: Console, server: AuthgateProcess, root_token: str
) -> None:
    """Edit changes the token; an invalid allowlist shows the error code and message and
    changes nothing."""
    console.sign_in(root_token)
    _, token_id = console.create(name="editable", org="acme", project="tunes")
    console.open_token(token_id)
    console.page.get_by_test_id("edit").click()
    console.page.get_by_label("Name", exact=True).fill("renamed")
    console.page.get_by_label("IP allowlist").fill("10.0.0.0/8")
    console.page.get_by_test_id("save").click()
    console.page.wait_for_url(f"{console.base}/tokens/{token_id}")
    attributes = console.page.get_by_test_id("attributes").inner_text()
    assert "10.0.0.0/8" in attributes
    assert console.page.locator("h1").inner_text().startswith("renamed")

    console.page.get_by_test_id("edit").click()
    console.page.get_by_label("IP allowlist").fill("not-an-address")
    console.page.get_by_test_id("save").click()
    error = console.page.get_by_test_id("error").inner_text()
    assert "INVALID" in error and "ip_allowlist" in error
    console.open_token(token_id)
    assert "10.0.0.0/8" in console.page.get_by_test_id("attributes").inner_text()


def test_a_tenant_admin_sees_and_reaches_only_its_tenant(
    browser: Any, server: AuthgateProcess, root_token: str
) -> None:
    """An acme management token lists acme's tokens only, and globex's token page is a
    404 for it, even by URL."""
    acme_admin = mint(
        server, "--name", "acme-admin", "--org", "acme", "--project", "*", "--key-type", "rwd",
        "--kind", "management",
    )  # fmt: skip
    globex = mint(server, "--name", "globex-secret", "--org", "globex", "--project", "x")
    acme = mint(server, "--name", "acme-visible", "--org", "acme", "--project", "tunes")
    c = Console(browser, server)
    try:
        c.sign_in(acme_admin["token"])
        c.page.goto(f"{c.base}/tokens")
        ids = c.page.locator('[data-testid="token-row"]').evaluate_all(
            "rows => rows.map(r => r.dataset.tokenId)"
        )
        assert acme["id"] in ids and globex["id"] not in ids
        assert "globex-secret" not in c.page.content()
        response = c.page.goto(f"{c.base}/tokens/{globex['id']}")
        assert response is not None and response.status == 404
        assert "globex-secret" not in c.page.content()
        # Creating outside its tenant is refused with the API's code.
        c.page.goto(f"{c.base}/tokens/new")
        c.page.get_by_label("Name", exact=True).fill("sneaky")
        c.page.get_by_label("Org", exact=True).fill("globex")
        c.page.get_by_label("Project", exact=True).fill("x")
        c.page.get_by_test_id("create").click()
        assert "SCOPE_MISMATCH" in c.page.get_by_test_id("error").inner_text()
        assert c.page.get_by_test_id("new-token").count() == 0
    finally:
        c.close()


def test_a_read_only_admin_sees_no_write_controls_and_a_forged_post_is_refused(
    browser: Any, server: AuthgateProcess, root_token: str
) -> None:
    """An `r--` management token gets no create/edit/rotate/disable/revoke/delete controls,
    and posting the disable form anyway (with its CSRF token) is refused by the API."""
    reader = mint(
        server, "--name", "auditor", "--org", "*", "--project", "*", "--key-type", "r--",
        "--kind", "management",
    )  # fmt: skip
    target = mint(server, "--name", "target", "--org", "acme", "--project", "tunes")
    c = Console(browser, server)
    try:
        c.sign_in(reader["token"])
        c.open_token(target["id"])
        for control in ("edit", "rotate", "disable", "enable", "revoke", "delete"):
            assert c.page.get_by_test_id(control).count() == 0, control
        assert c.page.get_by_role("link", name="New token").count() == 0
        csrf = c.page.locator('input[name="csrf"]').first.get_attribute("value")
        forged = c.context.request.post(
            f"{c.base}/tokens/{target['id']}/disable", form={"csrf": csrf or ""}
        )
        assert forged.status == 403
        assert "INSUFFICIENT_KEY_TYPE" in forged.text()
    finally:
        c.close()
    assert auth_status(server, target["token"]) == (200, "OK")


def test_a_form_post_without_the_csrf_token_is_refused(
    console: Console, server: AuthgateProcess, root_token: str
) -> None:
    """The session cookie alone does not make a write: the CSRF token must come too."""
    target = mint(server, "--name", "csrf-target", "--org", "acme", "--project", "tunes")
    console.sign_in(root_token)
    for form in ({}, {"csrf": "forged"}):
        r = console.context.request.post(f"{console.base}/tokens/{target['id']}/disable", form=form)
        assert r.status == 403 and "CSRF_REJECTED" in r.text()
    assert auth_status(server, target["token"]) == (200, "OK")


def test_signing_out_ends_the_session_on_the_server(
    console: Console, server: AuthgateProcess, root_token: str
) -> None:
    """After sign-out, the old session cookie no longer opens any page."""
    console.sign_in(root_token)
    cookie = next(c for c in console.context.cookies() if c["name"] == "authgate_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN_VALUE.search(cookie["value"]) is None
    console.page.get_by_test_id("sign-out").click()
    console.page.wait_for_url(f"{console.base}/login")
    replay = httpx.get(
        f"{console.base}/tokens",
        cookies={"authgate_console": cookie["value"]},
        follow_redirects=False,
        timeout=5,
    )
    assert replay.status_code == 303 and replay.headers["location"].endswith("/console/login")


def test_a_wrong_token_does_not_sign_in(console: Console, server: AuthgateProcess) -> None:
    """A query token or a made-up one is refused at sign-in with the API's code."""
    query = mint(server, "--name", "not-management", "--org", "acme", "--project", "tunes")
    console.page.goto(f"{console.base}/login")
    console.page.get_by_label("Management token").fill(query["token"])
    console.page.get_by_test_id("sign-in").click()
    assert "TOKEN_INVALID" in console.page.get_by_test_id("error").inner_text()
    assert console.page.url.endswith("/console/login")
    assert query["token"] not in console.page.content()


def test_every_page_sends_the_security_headers(
    console: Console, server: AuthgateProcess, root_token: str
) -> None:
    """CSP without unsafe-inline, no framing, no caching, no referrer; no inline script or
    style in the HTML."""
    console.sign_in(root_token)
    for path in ("/login", "/tokens", "/tokens/new", "/audit", "/static/console.css"):
        response = console.context.request.get(console.base + path)
        headers = response.headers
        csp = headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp, path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["cache-control"] == "no-store", path
        assert headers["referrer-policy"] == "no-referrer", path
        if path.endswith(".css"):
            continue
        html = response.text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path
        assert not re.search(r"\sstyle\s*=", html) and "<style" not in html, path


def test_revoking_the_signed_in_token_ends_its_session(
    console: Console, server: AuthgateProcess
) -> None:
    """The console asks again on every page: a revoked management token is signed out."""
    admin = mint(
        server, "--name", "short-lived-admin", "--org", "*", "--project", "*",
        "--key-type", "r--", "--kind", "management",
    )  # fmt: skip
    console.sign_in(admin["token"])
    run_cli(server.env, "token", "revoke", admin["id"])
    console.page.goto(f"{console.base}/tokens")
    assert console.page.url.endswith("/console/login")
