"""One log format: `authgate serve` with AUTHGATE_LOG_FORMAT=json writes only JSON lines."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from authgate.logs import Formatter, redact
from tests.conftest import run_cli, start_authgate

SPEC = ["--name", "l", "--org", "acme", "--project", "tunes", "--key-type", "r--", "--json"]


def test_serve_writes_every_line_as_one_json_object(cli_env: dict[str, str]) -> None:
    """Every line `serve` writes (authgate's and uvicorn's, parent and workers, start to
    stop) is one JSON object with time, level, logger, message and fields; none carries the
    token, its query string or a header value seen on /auth."""
    token = json.loads(run_cli(cli_env, "token", "create", *SPEC).stdout)["token"]
    ag = start_authgate({**cli_env, "AUTHGATE_LOG_FORMAT": "json"}, workers=2)
    try:
        headers = {"X-Power-Token": token, "X-Original-URI": f"/x?pwt={token}&secret=1"}
        assert httpx.get(f"{ag.url}/auth", headers=headers).status_code == 200
        httpx.get(f"{ag.url}/auth", headers={"X-Original-URI": "/x?pwt=min_" + "A" * 40})
    finally:
        ag.stop()
    lines = ag.log().splitlines()
    assert len(lines) >= 4
    loggers = set()
    for line in lines:
        entry = json.loads(line)  # fails on any line that is not JSON
        assert {"time", "level", "logger", "message", "fields"} <= set(entry), line
        assert entry["time"].endswith("Z")
        loggers.add(entry["logger"])
    assert "authgate" in loggers and "uvicorn.error" in loggers
    text = ag.log()
    assert token not in text and "pwt=" not in text and "secret=1" not in text


def test_a_configuration_error_at_start_is_a_json_line_too(cli_env: dict[str, str]) -> None:
    """With JSON logs, even the refusal to start is one JSON line naming the setting."""
    proc = run_cli(
        {**cli_env, "AUTHGATE_LOG_FORMAT": "json", "AUTHGATE_CACHE_TTL": "30"},
        "serve",
        check=False,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "critical" and "AUTHGATE_CACHE_TTL" in entry["message"]


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        pytest.param("GET /x?pwt=abc&a=1 HTTP/1.1", "GET /x", "pwt=abc", id="query"),
        pytest.param("token min_" + "Q" * 40 + " seen", "token", "Q" * 40, id="token"),
        pytest.param("is Redis up? yes", "is Redis up? yes", "[redacted]", id="prose-kept"),
    ],
)
def test_redact_blanks_tokens_and_query_strings(text: str, kept: str, gone: str) -> None:
    """A message that would carry a token or a query string is blanked; prose is not."""
    out = redact(text)
    assert kept in out and gone not in out


def test_text_format_has_the_same_content() -> None:
    """The text format says time, level, logger, message and fields on one line."""
    record = logging.makeLogRecord(
        {"name": "authgate", "levelno": 20, "levelname": "INFO", "msg": "hello", "worker": 2}
    )
    line = Formatter("text").format(record)
    assert line.endswith("INFO authgate: hello worker=2")
    assert json.loads(Formatter("json").format(record))["fields"] == {"worker": 2}
