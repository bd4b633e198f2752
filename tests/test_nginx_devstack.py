"""`make run` (scripts/devstack.py): one command brings the stack up, its printed curl
lines work, and SIGTERM stops every process it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.nginx_harness import request

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

PORT_VARS = (
    "DEVSTACK_NGINX_PORT",
    "DEVSTACK_SHARE_PORT",
    "DEVSTACK_AUTHGATE_PORT",
    "DEVSTACK_METRICS_PORT",
    "DEVSTACK_ECHO_PORT",
    "DEVSTACK_VALKEY_PORT",
    "DEVSTACK_ADMIN_PORT",
)


class Output:
    """Collects the script's output from a thread, so waiting never blocks on a read."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, timeout: float = 60.0) -> str:
        """Wait until a line starts with `marker`; fail early if the script exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(marker) for line in list(self.lines)):
                return self.text()
            if self.proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {marker!r} in the output:\n{self.text()}")


def is_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_devstack_starts_serves_and_stops_cleanly(tmp_path: Path) -> None:
    """The stack answers the printed allowed call and the shared dashboard, refuses a
    tokenless call, serves the console and the management API to the printed management
    token, and SIGTERM stops nginx, authgate, the echo upstream and Valkey."""
    ports = {var: free_port() for var in PORT_VARS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGATE_")}
    if "AUTHGATE_TEST_NGINX" in os.environ:
        env["AUTHGATE_TEST_NGINX"] = os.environ["AUTHGATE_TEST_NGINX"]
    env.update({var: str(port) for var, port in ports.items()}, DEVSTACK_DIR=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "devstack.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(proc)
    try:
        out = output.wait_for("Try:")
        token = re.search(r"^export TOKEN=(\S+)", out, re.M)
        assert token, out
        value = token.group(1)
        api = ports["DEVSTACK_NGINX_PORT"]
        path = "/minimal/api/rest/v1/acme/tunes/items"
        allowed = request(api, f"{path}?pwt={value}", headers=[("X-Power-Token", value)])
        assert allowed.status == 200
        assert request(api, path).status == 401
        assert request(ports["DEVSTACK_SHARE_PORT"], "/dashboard").status == 200
        mgmt = re.search(r"^export MGMT_TOKEN=(\S+)", out, re.M)
        assert mgmt, out
        admin = ports["DEVSTACK_ADMIN_PORT"]
        listed = request(
            admin, "/v1/tokens?limit=3", headers=[("Authorization", f"Bearer {mgmt.group(1)}")]
        )
        assert listed.status == 200
        assert request(admin, "/console/login").status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        output.thread.join(10)
        if proc.stdout is not None:
            proc.stdout.close()
    rest = output.text()
    assert proc.returncode == 0, rest
    for name in ("nginx", "echo", "authgate", "valkey"):
        assert f"stopped {name}" in rest
    assert not [var for var, port in ports.items() if is_listening(port)]
    nginx_logs = (tmp_path / "nginx" / "logs" / "access.log").read_text()
    assert value not in nginx_logs and "pwt" not in nginx_logs
