"""`authgate serve` over real sockets: metrics, health, shutdown."""

from __future__ import annotations

import re
import signal
import time

import httpx

from tests.conftest import AuthgateProcess, run_cli


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled_metrics(url: str, name: str, expected: float, timeout: float = 3.0) -> str:
    """/metrics once `name` reaches `expected`: workers flush their counts every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url).text
        if metric(text, name) >= expected or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def test_metrics_count_decisions_by_status_and_code(
    cli_env: dict[str, str], authgate_server: AuthgateProcess
) -> None:
    """Every decision is counted under its status and code, and timed; labels never carry a
    token, id or path."""
    import json

    token = json.loads(
        run_cli(
            cli_env,
            "token",
            "create",
            "--name",
            "m",
            "--org",
            "acme",
            "--project",
            "tunes",
            "--key-type",
            "r--",
            "--json",
        ).stdout
    )["token"]
    url = f"{authgate_server.url}/auth"
    for _ in range(3):
        assert (
            httpx.get(
                url, headers={"X-Power-Token": token, "X-Original-URI": f"/x?pwt={token}"}
            ).status_code
            == 200
        )
    for _ in range(2):
        assert httpx.get(url, headers={"X-Original-URI": "/x"}).status_code == 401
    text = settled_metrics(authgate_server.metrics_url, "authgate_decision_seconds_count", 5)
    assert metric(text, "authgate_decisions_total", status="200", code="OK") == 3
    assert metric(text, "authgate_decisions_total", status="401", code="TOKEN_MISSING") == 2
    assert metric(text, "authgate_decision_seconds_count") == 5
    assert metric(text, "authgate_cache_total", result="fresh") >= 2
    labels = set(re.findall(r'(\w+)="', text))
    assert labels <= {"status", "code", "result", "kind", "reason", "le"}, labels
    assert token not in text and "tok_" not in text


def test_sigterm_stops_cleanly(authgate_server: AuthgateProcess) -> None:
    """SIGTERM ends the parent and its workers with exit code 0."""
    assert httpx.get(f"{authgate_server.url}/healthz").status_code == 200
    authgate_server.proc.send_signal(signal.SIGTERM)
    assert authgate_server.proc.wait(15) == 0
