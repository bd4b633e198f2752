"""One log format for every line `authgate serve` writes, uvicorn's own included.

`AUTHGATE_LOG_FORMAT=json` makes each line one JSON object, what log pipelines in
Kubernetes expect: `time` (UTC, ISO 8601), `level`, `logger`, `message`, `fields` (the
`extra=` values of the call) and, for an error with a traceback, `exception`.
`text` (the default) is the same content for a terminal.

authgate never logs a token, a query string or a header value; uvicorn's access log is off
(server.py). As a second line of defence every message and traceback passes `redact()`,
which blanks anything shaped like a token or a query string.
"""

from __future__ import annotations

import logging
import logging.config
import re
from datetime import UTC, datetime
from typing import Any

import orjson

FORMATS = ("text", "json")

# prefix (as config.py allows it) + at least 32 base62 characters: a token, or close enough.
_TOKEN = re.compile(r"\b[a-z][a-z0-9_]{0,23}_[A-Za-z0-9]{32,}")
# `?name=value…` up to the next blank or quote: a query string, which may carry `pwt`.
_QUERY = re.compile(r"\?[^\s\"'?]*=[^\s\"']*")
# LogRecord's own attributes; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    """`text` with token-like strings and query strings blanked."""
    return _QUERY.sub("?[redacted]", _TOKEN.sub("[redacted]", text))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k != "color_message"}


class Formatter(logging.Formatter):
    """`json` or `text` lines; `logging.config` builds it from `dict_config()`."""

    def __init__(self, fmt: str = "text") -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        when = when.replace("+00:00", "Z")
        message = redact(record.getMessage())
        fields = _fields(record)
        exception = redact(self.formatException(record.exc_info)) if record.exc_info else None
        if self.json:
            line: dict[str, Any] = {
                "time": when,
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": message,
                "fields": fields,
            }
            if exception is not None:
                line["exception"] = exception
            return orjson.dumps(line, default=str).decode()
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        text = f"{when} {record.levelname} {record.name}: {message}{extra}"
        return text if exception is None else f"{text}\n{exception}"


def dict_config(fmt: str, level: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: authgate's, uvicorn's and every other logger write
    through one handler in `fmt`. uvicorn applies it in each worker process too."""
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "authgate",
        "stream": "ext://sys.stderr",
    }
    # uvicorn's loggers propagate to the root handler instead of their own.
    quiet = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"authgate": {"()": "authgate.logs.Formatter", "fmt": fmt}},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            "uvicorn": quiet,
            "uvicorn.error": quiet,
            "uvicorn.access": {"handlers": [], "propagate": False},  # never a URI in a log
        },
    }


def configure(fmt: str, level: str = "info") -> None:
    """Send this process's log lines through the one handler, in `fmt`."""
    logging.config.dictConfig(dict_config(fmt if fmt in FORMATS else "text", level))


def fatal_line(message: str, fmt: str) -> str:
    """The line a command that cannot go on writes to stderr, in the log format in use."""
    if fmt != "json":
        return f"{message}\n"
    record = logging.makeLogRecord(
        {"name": "authgate", "levelno": logging.CRITICAL, "levelname": "CRITICAL", "msg": message}
    )
    return Formatter("json").format(record) + "\n"
