"""What every proxy suite starts behind its proxy: a flushed Valkey, authgate with it and
authgate without Redis, a port that accepts connections and never answers, the echo
upstream, and the tokens of `TOKENS` (with revoked, deleted, malformed and unknown ones).
The token names are the ones `tests/decision_rows.py` refers to."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from authgate.cli import main as cli_main
from authgate.tokens import generate
from tests.conftest import AuthgateProcess, base_env, free_port, start_authgate
from tests.decision_rows import Call
from tests.echo_upstream import EchoUpstream

TOKENS: dict[str, list[str]] = {
    "ro": ["--key-type", "r--", "--user-id", "u-1", "--roles", "viewer"],
    "rw": ["--key-type", "rw-"],
    "rwd": ["--key-type", "rwd"],
    "admin": ["--key-type", "r--", "--roles", "admin"],
    "ip_denied": ["--key-type", "r--", "--ip", "203.0.113.0/24"],
    "ip_private": ["--key-type", "r--", "--ip", "10.1.2.3/32"],
    "ip_ok": ["--key-type", "r--", "--ip", "127.0.0.0/8"],
    "ip_client": ["--key-type", "r--", "--ip", "127.0.0.2/32"],
    "app": ["--key-type", "r--", "--app-id", "app-1"],
    "perm": ["--key-type", "r--", "--permissions", "read:reports"],
    "expiring": ["--key-type", "r--", "--expires-in", "1s"],
    "revoked": ["--key-type", "r--"],
    "deleted": ["--key-type", "r--"],
    "cached": ["--key-type", "r--"],
}


def cli(env: Mapping[str, str], *args: str) -> Any:
    """`authgate ARGS --json` run in this process (the CLI's own code, without a Python
    start-up per token), its JSON output parsed."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        for key, value in env.items():
            if key.startswith("AUTHGATE_"):
                mp.setenv(key, value)
        assert cli_main([*args, "--json"]) == 0
    return json.loads(out.getvalue())


def flip_last(token: str) -> str:
    """The token with its last (checksum) character changed."""
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def make_tokens(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The tokens of TOKENS (revoked and deleted ones too) plus malformed and unknown ones."""
    base = ["token", "create", "--org", "acme", "--project", "tunes"]
    tokens = {n: cli(env, *base, "--name", n, *a) for n, a in TOKENS.items()}
    cli(env, "token", "revoke", tokens["revoked"]["id"])
    cli(env, "token", "delete", tokens["deleted"]["id"])
    ro = str(tokens["ro"]["token"])
    tokens["short"] = {"token": "min_short"}
    tokens["bad_checksum"] = {"token": flip_last(ro)}
    tokens["other_prefix"] = {"token": "ak_live_" + ro[len("min_") :]}
    tokens["never_created"] = {"token": generate("min_")}  # well-formed, unknown
    return tokens


def wait_until_expired(tokens: Mapping[str, Mapping[str, Any]]) -> None:
    """The `expiring` token was made with --expires-in 1s: wait for that instant."""
    expires = datetime.fromisoformat(tokens["expiring"]["expires_at"].replace("Z", "+00:00"))
    remaining = expires.timestamp() - time.time()
    if remaining > -0.05:
        time.sleep(remaining + 0.05)


def header_values(record: dict[str, Any], name: str) -> list[str]:
    """The values of header `name` in an echo upstream record, any letter case."""
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


class Tokens:
    """What a suite's stack does with its tokens (a dataclass field `tokens`): a token's
    value by name, every value (for leak checks), and a call's target with its `pwt`s."""

    tokens: dict[str, dict[str, Any]]

    def value(self, name: str) -> str:
        return str(self.tokens[name]["token"])

    def secrets(self) -> list[str]:
        return [str(t["token"]) for t in self.tokens.values()]

    def target(self, call: Call) -> str:
        params = [call.query] if call.query else []
        params += [f"pwt={self.value(n)}" for n in call.pwt]
        return call.path + ("?" + "&".join(params) if params else "")


@dataclass
class Backends:
    """What stands behind a proxy under test (see `backends`)."""

    env: dict[str, str]  # the environment of the authgate with Redis, for the CLI
    authgate: AuthgateProcess
    no_redis: AuthgateProcess  # an authgate whose Redis address answers nothing
    echo: EchoUpstream
    hung: str  # an address that accepts connections and never answers
    tokens: dict[str, dict[str, Any]]


@contextlib.contextmanager
def backends(valkey_url: str, work: Path, config: str) -> Iterator[Backends]:
    """Valkey flushed, `config` written as work/authgate.toml, authgate with and without
    Redis, a port that never answers, the echo upstream and the tokens; all stopped after."""
    client = redis.Redis.from_url(valkey_url)
    client.flushall()
    client.close()
    path = work / "authgate.toml"
    path.write_text(config)
    env = base_env(valkey_url, AUTHGATE_CONFIG=str(path))
    started: list[AuthgateProcess] = []
    hung = socket.socket()  # accepts connections (backlog) and never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    echo = EchoUpstream().start()
    try:
        started.append(start_authgate(env))
        no_redis = base_env(f"redis://127.0.0.1:{free_port()}/0", AUTHGATE_CONFIG=str(path))
        started.append(start_authgate(no_redis, wait_ready=False))
        address = f"127.0.0.1:{hung.getsockname()[1]}"
        yield Backends(env, started[0], started[1], echo, address, make_tokens(env))
    finally:
        for ag in started:
            ag.stop()
        echo.stop()
        hung.close()
