"""What `serve`, the CLI and `config check` verify before they act on a Redis.

That it is Redis at all (an HTTP server on that port otherwise shows up as redis-py's
`Protocol error, got "H" as reply type byte`), and that it holds this pepper's fingerprint
(pepper.py). A Redis that does not answer is not an error here: `serve` starts anyway and
says so once (its /readyz answers 503 until Redis does), the CLI reports it and exits.
"""

from __future__ import annotations

import re
from typing import Any

from redis.exceptions import InvalidResponse

from . import pepper
from .config import Settings
from .errors import BackendUnavailable, ConfigError

_FIRST_BYTE = re.compile(r'got "(.)"')


def not_redis(exc: BackendUnavailable) -> ConfigError | None:
    """The configuration error to report when `exc` shows the peer does not speak Redis."""
    cause = exc.__cause__
    if not isinstance(cause, InvalidResponse):
        return None
    match = _FIRST_BYTE.search(str(cause))
    first = match.group(1) if match else ""
    # "HTTP/1.1 400 …", or an HTML page from a server that took the command for HTTP/0.9.
    what = (
        "HTTP" if first in ("H", "<") else f"something starting with {first!r}" if first else "junk"
    )
    return ConfigError(
        f"AUTHGATE_REDIS_URL points at something that is not Redis (it answered {what})"
    )


async def check(redis: Any, settings: Settings, *, store: bool = True) -> str:
    """Redis answers as Redis and holds this pepper (stored on first use unless `store` is
    false). Returns which configured pepper it holds (see `pepper.verify`). Raises
    ConfigError when Redis is something else or holds another pepper, BackendUnavailable
    when it does not answer."""
    try:
        return await pepper.verify(redis, settings, store=store)
    except BackendUnavailable as exc:
        raise not_redis(exc) or exc from exc.__cause__


async def at_start(settings: Settings) -> BackendUnavailable | None:
    """`serve`'s check in the parent process: None when all is well, the error when Redis
    does not answer (the caller logs it once); ConfigError when it must not start."""
    from .backend import connect

    redis = connect(settings.redis_url, max(settings.redis_timeout, 1.0))
    try:
        await check(redis, settings)
    except BackendUnavailable as exc:
        return exc
    finally:
        await redis.aclose()
    return None
