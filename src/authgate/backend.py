"""Redis connections from `AUTHGATE_REDIS_URL`, and the boundary where redis errors end.

Supported URLs:
  redis://[:password@]host:port/db, rediss://…, unix:///path?db=0   a single server
  redis+sentinel://[:password@]host:port[,host:port…]/service[/db]  Sentinel
  redis+cluster://[:password@]host:port[,host:port…]                Redis Cluster
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from .errors import BackendUnavailable, ConfigError

FOREIGN_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@asynccontextmanager
async def mapped_errors() -> AsyncIterator[None]:
    """Turn any Redis or network error into BackendUnavailable."""
    try:
        yield
    except FOREIGN_ERRORS as exc:
        raise BackendUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: str  # single | sentinel | cluster
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs and errors."""
        parts = urlsplit(self.url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return f"{parts.scheme}://{host}{parts.path}"


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, str(default_port)
        if not port.isdigit():
            raise ConfigError(f"AUTHGATE_REDIS_URL: bad port in {item!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def parse_redis_url(url: str) -> RedisTarget:
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in ("redis", "rediss", "unix", "valkey", "valkeys"):
        return RedisTarget("single", url)
    auth, _, hostpart = parts.netloc.rpartition("@")
    username = password = None
    if auth:
        user, _, pw = auth.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    if scheme == "redis+sentinel":
        bits = [b for b in parts.path.split("/") if b]
        if not bits:
            raise ConfigError(
                "AUTHGATE_REDIS_URL: a sentinel URL names the service: "
                "redis+sentinel://host:26379/mymaster/0"
            )
        db = int(bits[1]) if len(bits) > 1 and bits[1].isdigit() else 0
        return RedisTarget(
            "sentinel", url, _hosts(hostpart, 26379), bits[0], db, username, password
        )
    if scheme == "redis+cluster":
        return RedisTarget("cluster", url, _hosts(hostpart, 6379), "", 0, username, password)
    raise ConfigError(
        f"AUTHGATE_REDIS_URL: unsupported scheme {scheme!r} "
        "(use redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://)"
    )


def connect(url: str, timeout: float, *, decode: bool = False) -> Any:
    """A redis.asyncio client for `url` with short timeouts and no hidden retries."""
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": decode,
    }
    if target.kind == "single":
        return aioredis.Redis.from_url(
            url, retry_on_timeout=False, health_check_interval=30, **common
        )
    if target.kind == "sentinel":
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts),
            sentinel_kwargs={"socket_timeout": timeout, "password": target.password},
            username=target.username,
            password=target.password,
            db=target.db,
            **common,
        )
        return sentinel.master_for(target.service)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],
        username=target.username,
        password=target.password,
        **common,
    )


def connect_subscriber(url: str, timeout: float) -> Any:
    """A client for pub/sub: no read timeout (it waits for messages), a connect timeout.

    In a Cluster, PUBLISH reaches every node, so a plain connection to one node is enough.
    """
    target = parse_redis_url(url)
    common: dict[str, Any] = {"socket_connect_timeout": timeout, "health_check_interval": 5}
    if target.kind == "single":
        return aioredis.Redis.from_url(url, **common)
    if target.kind == "sentinel":
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts),
            sentinel_kwargs={"socket_timeout": timeout, "password": target.password},
            username=target.username,
            password=target.password,
            db=target.db,
            **common,
        )
        return sentinel.master_for(target.service)
    host, port = target.hosts[0]
    return aioredis.Redis(
        host=host, port=port, username=target.username, password=target.password, **common
    )
