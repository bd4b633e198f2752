"""`authgate serve` over real sockets: metrics, health, shutdown."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest

from tests.conftest import AuthgateProcess, run_cli, start_authgate


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
    assert labels <= {"status", "code", "result", "kind", "reason", "le", "version"}, labels
    assert token not in text and "tok_" not in text


def test_sigterm_stops_cleanly(authgate_server: AuthgateProcess) -> None:
    """SIGTERM ends the parent and its workers with exit code 0."""
    assert httpx.get(f"{authgate_server.url}/healthz").status_code == 200
    authgate_server.proc.send_signal(signal.SIGTERM)
    assert authgate_server.proc.wait(15) == 0


def test_redis_up_reads_1_on_an_idle_instance_and_build_info_names_the_version(
    authgate_server: AuthgateProcess,
) -> None:
    """Without a single lookup, authgate_redis_up is 1 (checked in the background), and
    authgate_build_info carries the version."""
    from authgate import __version__

    text = settled_metrics(authgate_server.metrics_url, "authgate_redis_up", 1)
    assert metric(text, "authgate_redis_up") == 1
    assert metric(text, "authgate_decisions_total") == 0
    assert metric(text, "authgate_build_info", version=__version__) == 1


def workers_of(parent: int) -> list[int]:
    """The uvicorn worker processes (multiprocessing spawns) of `serve`'s parent."""
    import os
    from pathlib import Path

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def test_redis_down_at_start_is_logged_once_and_recovery_shows_without_traffic(
    cli_env: dict[str, str],
) -> None:
    """`serve` with Redis down starts, says so in one line, answers /readyz 503 and reports
    authgate_redis_up 0; once Redis answers, both recover with no request to /auth, even
    though a worker that saw Redis down was killed meanwhile (dead workers do not count)."""
    import tempfile
    from pathlib import Path

    from tests.conftest import Valkey, free_port, wait_for_http

    server = Valkey(port=free_port(), proc=None, workdir=Path(tempfile.mkdtemp()))
    env = {**cli_env, "AUTHGATE_REDIS_URL": server.url}
    ag = start_authgate(env, workers=2, wait_ready=False)
    try:
        assert httpx.get(f"{ag.url}/readyz").status_code == 503
        text = settled_metrics(ag.metrics_url, "authgate_redis_up", 0)
        assert "authgate_redis_up" in text and metric(text, "authgate_redis_up") == 0
        (victim, _) = workers_of(ag.proc.pid)
        os.kill(victim, signal.SIGKILL)  # its last value, 0, stays in its metrics file
        deadline = time.monotonic() + 15
        while victim in workers_of(ag.proc.pid) or len(workers_of(ag.proc.pid)) < 2:
            assert time.monotonic() < deadline, "uvicorn did not replace the killed worker"
            time.sleep(0.1)
        server.start()
        wait_for_http(f"{ag.url}/readyz", proc=ag.proc)
        deadline = time.monotonic() + 15
        while metric(httpx.get(ag.metrics_url).text, "authgate_redis_up") != 1:
            assert time.monotonic() < deadline, "authgate_redis_up stayed 0 after recovery"
            time.sleep(0.2)
    finally:
        ag.stop()
        server.stop()
    log = ag.log()
    assert log.count("does not answer at start") == 1, log
    assert "Redis answers now" in log


def test_a_url_that_points_at_http_is_named_not_redis(cli_env: dict[str, str]) -> None:
    """AUTHGATE_REDIS_URL pointing at an HTTP server: `serve` and `config check` refuse
    with one line saying it is not Redis, not redis-py's protocol error."""
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {**cli_env, "AUTHGATE_REDIS_URL": f"redis://127.0.0.1:{httpd.server_address[1]}/0"}
    try:
        for args in (("config", "check"), ("serve",)):
            proc = run_cli(env, *args, check=False)
            assert proc.returncode == 2, proc
            (line,) = proc.stderr.strip().splitlines()
            assert (
                "AUTHGATE_REDIS_URL points at something that is not Redis (it answered HTTP)"
                in line
            )
            assert "Protocol error" not in line
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("first", "said"),
    [
        pytest.param("H", "(it answered HTTP)", id="status-line"),
        pytest.param("<", "(it answered HTTP)", id="html-page"),
        pytest.param("S", "(it answered something starting with 'S')", id="other"),
    ],
)
def test_protocol_errors_are_named_by_what_answered(first: str, said: str) -> None:
    """redis-py's `Protocol error, got "H"` becomes a configuration error naming the URL
    variable and what answered; other backend errors are left alone."""
    from redis.exceptions import ConnectionError, InvalidResponse

    from authgate.errors import BackendUnavailable
    from authgate.preflight import not_redis

    exc = BackendUnavailable("redis: InvalidResponse")
    exc.__cause__ = InvalidResponse(f'Protocol error, got "{first}" as reply type byte')
    found = not_redis(exc)
    assert found is not None and str(found).endswith(said)
    assert str(found).startswith("AUTHGATE_REDIS_URL points at something that is not Redis")
    down = BackendUnavailable("redis: ConnectionError")
    down.__cause__ = ConnectionError("refused")
    assert not_redis(down) is None
