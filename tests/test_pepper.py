"""The pepper's fingerprint and pepper rotation, against a real Valkey and `authgate serve`."""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from authgate.pepper import fingerprint
from authgate.tokens import hash_token
from tests.conftest import PEPPER, run_cli, start_authgate

NEW_PEPPER = "new-pepper-9876543210-zyxwvutsrqponmlkjihgfedcba"
SPEC = ["--name", "p", "--org", "acme", "--project", "tunes", "--key-type", "r--", "--json"]


def create(env: dict[str, str]) -> dict[str, str]:
    return dict(json.loads(run_cli(env, "token", "create", *SPEC).stdout))


def auth(url: str, token: str) -> int:
    headers = {"X-Power-Token": token, "X-Original-URI": f"/x?pwt={token}"}
    return httpx.get(f"{url}/auth", headers=headers).status_code


def test_fingerprint_identifies_the_pepper_without_revealing_it(
    cli_env: dict[str, str], redis_url: str
) -> None:
    """The first command stores a keyed fingerprint of the pepper: not the pepper, not a
    plain hash of it, and different for another pepper."""
    create(cli_env)
    stored = redis.Redis.from_url(redis_url).get("authgate:pepper")
    assert stored is not None
    assert stored.decode() == fingerprint(PEPPER.encode())
    assert PEPPER not in stored.decode()
    assert fingerprint(NEW_PEPPER.encode()) != stored.decode()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("token", "list"), id="token-list"),
        pytest.param(("config", "check"), id="config-check"),
        pytest.param(("token", "create", *SPEC), id="token-create"),
    ],
)
def test_cli_refuses_another_pepper(cli_env: dict[str, str], args: tuple[str, ...]) -> None:
    """Under another pepper every CLI command stops with one line that says so, instead of
    listing tokens that no longer authenticate."""
    create(cli_env)
    proc = run_cli({**cli_env, "AUTHGATE_PEPPER": NEW_PEPPER}, *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "not the pepper the tokens in this Redis were made with" in lines[0]
    assert NEW_PEPPER not in proc.stderr and PEPPER not in proc.stderr
    assert proc.stdout.count("tok_") == 0


def test_serve_refuses_another_pepper(cli_env: dict[str, str]) -> None:
    """`serve` under another pepper exits at once with one line, before it listens."""
    create(cli_env)
    with pytest.raises(RuntimeError) as failed:
        start_authgate({**cli_env, "AUTHGATE_PEPPER": NEW_PEPPER})
    assert "not the pepper the tokens in this Redis were made with" in str(failed.value)


def test_previous_pepper_keeps_tokens_working_while_they_are_rekeyed(
    cli_env: dict[str, str], redis_url: str
) -> None:
    """Rotation: with the new pepper and the old one as AUTHGATE_PEPPER_PREVIOUS, a token
    made under the old one still works; `pepper rekey` begins moving tokens to their new
    hash on use and reports what is left; once nothing active is pending, the old pepper
    can go and the token works under the new pepper alone."""
    used = create(cli_env)
    unused = create(cli_env)
    rotating = {**cli_env, "AUTHGATE_PEPPER": NEW_PEPPER, "AUTHGATE_PEPPER_PREVIOUS": PEPPER}
    ag = start_authgate(rotating)
    try:
        assert auth(ag.url, used["token"]) == 200  # found under the old hash
        first = json.loads(run_cli(rotating, "pepper", "rekey", "--json").stdout)
        assert first["started"] and first["total"] == 2 and first["active_pending"] == 2
        # Pods with the old pepper alone are now refused: the stored pepper is the new one.
        refused = run_cli(cli_env, "token", "list", check=False)
        assert refused.returncode == 2 and "not the pepper" in refused.stderr
    finally:
        ag.stop()
    ag = start_authgate(rotating)  # a fresh cache: the next use reads Redis again
    try:
        assert auth(ag.url, used["token"]) == 200  # moved to its new hash now
        client = redis.Redis.from_url(redis_url)
        assert not client.exists("authgate:th:" + hash_token(PEPPER.encode(), used["token"]))
        assert client.exists("authgate:th:" + hash_token(NEW_PEPPER.encode(), used["token"]))
        report = run_cli(rotating, "pepper", "rekey")
        assert "active and pending: 1" in report.stdout
        assert unused["id"] in report.stdout and used["id"] not in report.stdout
        assert "keep AUTHGATE_PEPPER_PREVIOUS" in report.stdout
        run_cli(rotating, "token", "revoke", unused["id"])
        done = run_cli(rotating, "pepper", "rekey")
        assert "unset AUTHGATE_PEPPER_PREVIOUS" in done.stdout
    finally:
        ag.stop()
    client = redis.Redis.from_url(redis_url)
    assert client.get("authgate:pepper") == fingerprint(NEW_PEPPER.encode()).encode()
    assert not client.exists("authgate:pepper:pending", "authgate:pepper:previous")
    new_only = {**cli_env, "AUTHGATE_PEPPER": NEW_PEPPER}
    ag = start_authgate(new_only)
    try:
        assert auth(ag.url, used["token"]) == 200
        shown = json.loads(run_cli(new_only, "token", "show", used["id"], "--json").stdout)
        assert shown["status"] == "active"
    finally:
        ag.stop()


def test_rekey_needs_the_previous_pepper(cli_env: dict[str, str]) -> None:
    """`pepper rekey` without AUTHGATE_PEPPER_PREVIOUS is a configuration error naming it."""
    proc = run_cli(cli_env, "pepper", "rekey", check=False)
    assert proc.returncode == 2
    assert "AUTHGATE_PEPPER_PREVIOUS" in proc.stderr


def test_serve_started_while_redis_was_down_stops_on_another_pepper(
    cli_env: dict[str, str],
) -> None:
    """`serve` that starts before Redis answers checks the pepper once it does, and stops
    with the one line when Redis holds another pepper's fingerprint."""
    import tempfile
    from pathlib import Path

    from tests.conftest import Valkey, free_port

    server = Valkey(port=free_port(), proc=None, workdir=Path(tempfile.mkdtemp()))
    server.start()
    env = {**cli_env, "AUTHGATE_REDIS_URL": server.url}
    try:
        create(env)  # stores the fingerprint of PEPPER
        redis.Redis.from_url(server.url).save()  # kept across the restart below
        server.stop()
        ag = start_authgate({**env, "AUTHGATE_PEPPER": NEW_PEPPER}, wait_ready=False)
        try:
            server.start()
            assert ag.proc.wait(30) == 2
        finally:
            ag.stop()
    finally:
        server.stop()
    log = ag.log()
    assert "does not answer at start" in log
    assert log.count("not the pepper the tokens in this Redis were made with") == 1, log


def test_management_tokens_work_on_the_admin_api_during_a_rotation(
    cli_env: dict[str, str],
) -> None:
    """A management token made under the old pepper authenticates on the management API
    while AUTHGATE_PEPPER_PREVIOUS is set."""
    spec = ["--name", "ops", "--org", "acme", "--project", "tunes", "--key-type", "rwd"]
    admin = json.loads(
        run_cli(cli_env, "token", "create", *spec, "--kind", "management", "--json").stdout
    )
    rotating = {**cli_env, "AUTHGATE_PEPPER": NEW_PEPPER, "AUTHGATE_PEPPER_PREVIOUS": PEPPER}
    ag = start_authgate(rotating, admin=True)
    try:
        headers = {"Authorization": f"Bearer {admin['token']}"}
        r = httpx.get(f"{ag.admin_url}/v1/tokens", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        ag.stop()
    stopped = start_authgate({**cli_env, "AUTHGATE_PEPPER": PEPPER}, admin=True)
    try:  # the old pepper alone is still accepted: nothing was re-keyed before `rekey`
        headers = {"Authorization": f"Bearer {admin['token']}"}
        assert httpx.get(f"{stopped.admin_url}/v1/tokens", headers=headers).status_code == 200
    finally:
        stopped.stop()


def test_no_previous_pepper_means_no_second_lookup(redis_url: str) -> None:
    """Without AUTHGATE_PEPPER_PREVIOUS the data plane holds no previous-pepper look-up at
    all (the hot path pays nothing); with it, one that hashes with the old pepper."""
    from authgate.app import Runtime
    from authgate.config import load_settings

    env = {"AUTHGATE_PEPPER": PEPPER, "AUTHGATE_REDIS_URL": redis_url}
    assert Runtime(load_settings(env)).authorizer.previous is None
    rotating = Runtime(load_settings({**env, "AUTHGATE_PEPPER_PREVIOUS": NEW_PEPPER}))
    assert rotating.authorizer.previous is not None
