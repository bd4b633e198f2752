"""The CLI as a user runs it, against a real `authgate serve` (uvicorn socket) and Valkey."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import AuthgateProcess, run_cli

SCOPED = "/minimal/api/rest/v1/acme/tunes/items"


def ask(
    server: AuthgateProcess, token: str, method: str = "GET", uri: str = SCOPED
) -> httpx.Response:
    sep = "&" if "?" in uri else "?"
    return httpx.request(
        method,
        f"{server.url}/auth",
        headers={
            "X-Original-URI": f"{uri}{sep}pwt={token}",
            "X-Original-Method": method,
            "X-Power-Token": token,
        },
    )


def create(env: dict[str, str], *extra: str) -> dict[str, Any]:
    out = run_cli(
        env,
        "token",
        "create",
        "--name",
        "ci",
        "--org",
        "acme",
        "--project",
        "tunes",
        *extra,
        "--json",
    )
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_round_trip_create_rotate_revoke(
    cli_env: dict[str, str], authgate_server: AuthgateProcess
) -> None:
    """create -> allowed -> rotate (old works during grace, not after) -> revoke -> 404,
    all through subprocesses and a real server; no token value lands in Redis, the log or
    /metrics."""
    made = create(cli_env, "--key-type", "rw-")
    token, token_id = made["token"], made["id"]
    assert ask(authgate_server, token).status_code == 200
    assert ask(authgate_server, token, "POST").status_code == 200
    assert ask(authgate_server, token, "DELETE").status_code == 403

    rotated = json.loads(
        run_cli(cli_env, "token", "rotate", token_id, "--grace", "2s", "--json").stdout
    )
    new_token, new_id = rotated["token"], rotated["id"]
    assert new_id != token_id and new_token != token
    assert ask(authgate_server, new_token).status_code == 200
    assert ask(authgate_server, token).status_code == 200  # inside the grace period
    deadline = time.monotonic() + 10
    while ask(authgate_server, token).status_code == 200:
        assert time.monotonic() < deadline, "old token still works long after its grace"
        time.sleep(0.1)
    expired = ask(authgate_server, token)
    assert expired.status_code == 401
    assert json.loads(expired.headers["x-authgate-error"])["error"]["code"] == "TOKEN_EXPIRED"

    run_cli(cli_env, "token", "revoke", new_id)
    deadline = time.monotonic() + 2
    while (r := ask(authgate_server, new_token)).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert r.headers["x-authgate-status"] == "404"

    shown = json.loads(run_cli(cli_env, "token", "show", new_id, "--json").stdout)
    assert shown["status"] == "revoked" and shown["rotated_from"] == token_id
    assert shown["request_count"] >= 0
    listed = json.loads(run_cli(cli_env, "token", "list", "--json").stdout)
    assert {t["id"] for t in listed} == {token_id, new_id}
    assert all("token" not in t and "hash" not in t for t in listed)
    actions = [e["action"] for e in json.loads(run_cli(cli_env, "audit", "--json").stdout)]
    assert actions[:3] == ["revoke", "rotate", "create"]

    run_cli(cli_env, "token", "delete", token_id)
    assert run_cli(cli_env, "token", "show", token_id, check=False).returncode == 1
    assert_no_secret_anywhere(cli_env, authgate_server, [token, new_token])


def assert_no_secret_anywhere(
    env: dict[str, str], server: AuthgateProcess, secrets: list[str]
) -> None:
    client = redis.Redis.from_url(env["AUTHGATE_REDIS_URL"])
    blobs: list[bytes] = []
    for key in client.scan_iter(count=1000):
        blobs.append(key)
        kind = client.type(key)
        if kind == b"string":
            blobs.append(client.get(key) or b"")
        elif kind == b"hash":
            blobs.extend(b for kv in client.hgetall(key).items() for b in kv)
        elif kind == b"zset":
            blobs.extend(client.zrange(key, 0, -1))
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                blobs.extend(b for kv in fields.items() for b in kv)
    assert blobs, "expected authgate keys in Redis"
    metrics = httpx.get(server.metrics_url).text
    log = server.log()
    for secret in secrets:
        assert not any(secret.encode() in b for b in blobs), "token value stored in Redis"
        assert secret not in metrics
        assert secret not in log


def test_usage_is_recorded_in_batches(
    cli_env: dict[str, str], authgate_server: AuthgateProcess
) -> None:
    """Allowed requests show up as request_count and last_used_at after a flush interval."""
    made = create(cli_env, "--key-type", "r--")
    for _ in range(5):
        assert ask(authgate_server, made["token"]).status_code == 200
    deadline = time.monotonic() + 5
    while True:
        shown = json.loads(run_cli(cli_env, "token", "show", made["id"], "--json").stdout)
        if shown["request_count"] == 5:
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    assert shown["last_used_at"] is not None


def test_key_type_with_leading_dash_is_accepted(cli_env: dict[str, str]) -> None:
    """`--key-type -w-` works as the docs write it, not only `--key-type=-w-`."""
    for key_type in ("-w-", "--d", "-wd", "r--"):
        assert create(cli_env, "--key-type", key_type)["key_type"] == key_type


def test_human_output_shows_token_once_and_list_never(cli_env: dict[str, str]) -> None:
    """Without --json, create prints the token with a shown-once warning; list never shows it."""
    out = run_cli(
        cli_env,
        "token",
        "create",
        "--name",
        "h",
        "--org",
        "acme",
        "--project",
        "tunes",
        "--key-type",
        "r--",
        "--roles",
        "admin,ops",
        "--ip",
        "10.0.0.0/8",
        "--expires-in",
        "30d",
    ).stdout
    token = next(line.split()[1] for line in out.splitlines() if line.startswith("token:"))
    assert token.startswith("min_") and "shown once" in out
    listing = run_cli(cli_env, "token", "list").stdout
    assert token not in listing and token[:8] in listing


def test_bad_cli_input_changes_nothing(cli_env: dict[str, str]) -> None:
    """Refused input exits non-zero with a message naming the field, and writes nothing."""
    client = redis.Redis.from_url(cli_env["AUTHGATE_REDIS_URL"])
    cases = [
        (["--key-type", "---"], "key_type"),
        (["--key-type", "rwx"], "key_type"),
        (["--key-type", "r--", "--ip", "10.0.0.300"], "ip_allowlist"),
        (["--key-type", "r--", "--roles", "Admin Role"], "roles"),
        (["--key-type", "r--", "--user-id", "a\r\nX-Evil: 1"], "user_id"),
        (["--key-type", "r--", "--expires-in", "soon"], "duration"),
    ]
    for extra, word in cases:
        proc = run_cli(
            cli_env,
            "token",
            "create",
            "--name",
            "x",
            "--org",
            "acme",
            "--project",
            "tunes",
            *extra,
            check=False,
        )
        assert proc.returncode == 2, proc
        assert word in proc.stderr
        assert "Traceback" not in proc.stderr
    assert client.dbsize() == 0
    bad_name = run_cli(
        cli_env,
        "token",
        "create",
        "--name",
        "a\nb",
        "--org",
        "acme",
        "--project",
        "tunes",
        "--key-type",
        "r--",
        check=False,
    )
    assert bad_name.returncode == 2 and "control" in bad_name.stderr
    assert client.dbsize() == 0
    missing = run_cli(cli_env, "token", "revoke", "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", check=False)
    assert missing.returncode == 1 and "no token" in missing.stderr


def test_explain_names_the_deciding_check(cli_env: dict[str, str]) -> None:
    """explain says allow or deny and which check decided, by token or by id."""
    made = create(cli_env, "--key-type", "r--")
    ok = run_cli(cli_env, "explain", "--method", "GET", "--uri", SCOPED, "--id", made["id"])
    assert ok.stdout.startswith("ALLOW 200")
    denied = run_cli(
        cli_env,
        "explain",
        "--method",
        "GET",
        "--uri",
        "/minimal/api/%73ystem/x",
        "--id",
        made["id"],
        "--json",
        check=False,
    )
    result = json.loads(denied.stdout)
    assert denied.returncode == 3
    assert (result["code"], result["check"]) == ("ADMIN_REQUIRED", 10)
    by_value = run_cli(
        cli_env,
        "explain",
        "--method",
        "POST",
        "--uri",
        SCOPED,
        "--token",
        made["token"],
        check=False,
    )
    assert "INSUFFICIENT_KEY_TYPE" in by_value.stdout and "check 9" in by_value.stdout
    assert made["token"] not in by_value.stdout


def test_bootstrap_and_tenant_management_tokens(cli_env: dict[str, str]) -> None:
    """The CLI bootstraps with --org '*' --project '*'; '*' is refused for a query token."""
    root = create(cli_env, "--kind", "management", "--key-type", "rwd")
    assert (root["org"], root["project"]) == ("acme", "tunes")
    wide = json.loads(
        run_cli(
            cli_env, "token", "create", "--kind", "management", "--key-type", "rwd",
            "--name", "bootstrap", "--org", "*", "--project", "*", "--json",
        ).stdout
    )  # fmt: skip
    assert (wide["org"], wide["project"], wide["kind"]) == ("*", "*", "management")
    refused = run_cli(
        cli_env, "token", "create", "--key-type", "r--", "--name", "q", "--org", "*",
        "--project", "*", check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "management tokens only" in refused.stderr


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        pytest.param(["create", "--name", "x", "--org", "a", "--project", "b", "--key-type",
                      "r--", "--expires-in", "30"], "30s, 30h or 30d", id="expires-in-bare"),
        pytest.param(["rotate", "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--grace", "24"],
                     "24s, 24h or 24d", id="grace-bare"),
        pytest.param(["update", "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--expires-in", "7"],
                     "7s, 7h or 7d", id="update-bare"),
        pytest.param(["show", "min_8Hoi"], "starts with tok_", id="display-prefix"),
        pytest.param(["revoke", "min_8HoiAAAA"], "starts with tok_", id="value-like"),
        pytest.param(["create", "--name", "x", "--org", "a", "--project", "b", "--key-type",
                      "r--", "--expires-at", "2030-01-01T00:00:00"], "zone", id="no-zone"),
        pytest.param(["usage", "tok_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--days", "91"], "--days",
                     id="days"),
    ],
)  # fmt: skip
def test_cli_refuses_durations_without_units_and_non_ids(
    cli_env: dict[str, str], args: list[str], hint: str
) -> None:
    """Every duration needs a unit (`--expires-in 30`, `--grace 24` are refused with a hint);
    a display prefix where an id belongs is told what an id is; nothing is written."""
    proc = run_cli(cli_env, "token", *args, check=False)
    assert proc.returncode == 2, proc
    assert hint in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert redis.Redis.from_url(cli_env["AUTHGATE_REDIS_URL"]).dbsize() == 0


def test_update_disable_enable_and_expiry_through_auth(
    cli_env: dict[str, str], authgate_server: AuthgateProcess
) -> None:
    """`token update` changes attributes; --disable makes /auth answer 403 TOKEN_DISABLED
    at once, --enable lets it back in; --expires-at, --expires-in and --no-expiry set and
    clear the expiry; `token list` shows status and expiry."""
    made = create(cli_env, "--key-type", "r--")
    token, token_id = made["token"], made["id"]
    assert ask(authgate_server, token).status_code == 200

    def update(*extra: str) -> dict[str, Any]:
        out = run_cli(cli_env, "token", "update", token_id, *extra, "--json")
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    assert update("--disable")["status"] == "disabled"
    denied = ask(authgate_server, token)
    assert denied.status_code == 403
    assert json.loads(denied.headers["x-authgate-error"])["error"]["code"] == "TOKEN_DISABLED"
    listing = run_cli(cli_env, "token", "list").stdout
    assert "disabled" in listing and "never" in listing
    why = run_cli(cli_env, "explain", "--uri", SCOPED, "--id", token_id, check=False)
    assert why.returncode == 3 and "TOKEN_DISABLED" in why.stdout and "6b" in why.stdout
    assert update("--enable")["status"] == "active"
    assert ask(authgate_server, token).status_code == 200
    dated = update("--expires-at", "2030-01-31T12:00:00+01:00", "--name", "renamed")
    assert dated["expires_at"] == "2030-01-31T11:00:00.000Z" and dated["name"] == "renamed"
    assert "2030-01-31 11:00" in run_cli(cli_env, "token", "list").stdout
    assert update("--expires-in", "2d")["expires_at"].startswith("20")
    assert update("--no-expiry")["expires_at"] is None
    assert update("--ip", "10.0.0.0/8,192.0.2.1")["ip_allowlist"] == ["10.0.0.0/8", "192.0.2.1/32"]
    assert update("--ip", "")["ip_allowlist"] == []
    nothing = run_cli(cli_env, "token", "update", token_id, check=False)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    events = json.loads(run_cli(cli_env, "audit", "--json").stdout)
    assert events[0]["action"] == "update" and events[0]["detail"]["fields"] == ["ip_allowlist"]
