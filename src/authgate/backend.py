"""Redis connections from `AUTHGATE_REDIS_URL`, and the boundary where redis errors end.

Supported URLs:
  redis://[:password@]host:port/db, rediss://…, unix:///path?db=0   a single server
  redis+sentinel://[:password@]host:port[,host:port…]/service[/db]  Sentinel
  redis+cluster://[:password@]host:port[,host:port…]                Redis Cluster

Every client made here fails fast: one attempt per command, `timeout` for connecting and
for each reply, no hidden retries or back-off (redis-py's default would retry ten times
and turn a dead Redis into seconds of waiting per request), and a bounded number of
connections, so a Redis that stops answering cannot pile up sockets either. What to do
about a failure is decided above this module: serve from the cache, or answer 503.

Lookups on the decision path differ in three ways (`connect_lookups`, `lookup_call`): a
client of their own with at most LOOKUP_CONNECTIONS connections; a deadline that counts
the worker's running time, not wall time, so a worker that was descheduled or paused while
Redis answered does not blame Redis for it; and a second attempt when the first failed on
a connection Redis had closed, which fails at once too when Redis is really gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import BackendUnavailable, ConfigError

log = logging.getLogger("authgate")

# RedisClusterException (e.g. "cannot connect to any node") is not a RedisError.
FOREIGN_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# Connections one client may open (per node for a Cluster). Far above what a worker needs
# while Redis answers in time; reached only when Redis stalls, and then the next command
# fails at once instead of opening another socket that would wait too.
MAX_CONNECTIONS = 256

# Connections of a worker's lookup client, and so the most lookups it has in flight at
# once (the Authorizer batches further misses into the next read instead of opening more):
# a slow Redis makes misses wait their turn, it cannot exhaust the pool.
LOOKUP_CONNECTIONS = 32

# When a lookup's deadline fires, a reply that came in at the last moment, or while the
# worker itself was not running (descheduled on a busy machine, paused, a long callback),
# may sit unread, or read but not yet handed to the waiting task, which resumes only after
# the timer's callback: the deadline gives the worker GRACE to finish with it, and again
# while its timer fires more than STALL late (the worker was away again), at most GRACES
# times in all. Only a deadline whose grace ran out on time says Redis was silent.
GRACE = 0.05
STALL = 0.01
GRACES = 3

# How often a Sentinel client asks the sentinels where the master is (see watch_topology).
SENTINEL_POLL = 0.25

# Older redis-py pools report a full pool as a plain ConnectionError with one of these.
_POOL_FULL = ("Too many connections", "No connection available")

T = TypeVar("T")


def reason_of(exc: BaseException) -> str:
    """Which of UNAVAILABLE_REASONS a foreign error stands for."""
    if isinstance(exc, MaxConnectionsError) or (
        isinstance(exc, RedisConnectionError) and str(exc).startswith(_POOL_FULL)
    ):
        return "pool"
    if isinstance(exc, (RedisTimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, (RedisConnectionError, RedisClusterException, OSError)):
        return "connection"
    return "error"  # Redis answered with an error (LOADING, READONLY, …)


@asynccontextmanager
async def mapped_errors() -> AsyncIterator[None]:
    """Turn any Redis or network error into BackendUnavailable."""
    try:
        yield
    except FOREIGN_ERRORS as exc:
        raise BackendUnavailable(f"redis: {type(exc).__name__}: {exc}", reason_of(exc)) from exc


@asynccontextmanager
async def lookup_deadline(seconds: float) -> AsyncIterator[None]:
    """Raise BackendUnavailable (reason "timeout") when the block has not finished after
    `seconds` of this worker's running time.

    A plain timeout counts wall time: after a stall of the worker longer than `seconds`,
    the timer and Redis's long-arrived reply are both due, the timer's callback cancels the
    lookup before the task that would read the reply resumes, and a healthy Redis is
    blamed for the worker's own absence. Here the worker first gets the chance to read
    what arrived (see GRACE), so a timeout means Redis was silent for `seconds` of the
    worker's time (plus at most GRACES x GRACE).
    """
    try:
        async with asyncio.timeout(None) as timer:
            patience = _Patience(timer, seconds)
            try:
                yield
            finally:
                patience.handle.cancel()
    except TimeoutError as exc:
        raise BackendUnavailable(f"redis: no answer within {seconds}s", "timeout") from exc


class _Patience:
    """The timer of one `lookup_deadline`: expires `timer` once a grace ends on time."""

    __slots__ = ("due", "graces", "handle", "loop", "timer")

    def __init__(self, timer: asyncio.Timeout, seconds: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timer = timer
        self.graces = 0
        self.due = time.monotonic() + seconds
        self.handle = self.loop.call_later(seconds, self.expire)

    def expire(self) -> None:
        now = time.monotonic()
        if self.graces < GRACES and (self.graces == 0 or now - self.due > STALL):
            self.graces += 1
            self.due = now + GRACE
            self.handle = self.loop.call_later(GRACE, self.expire)
        else:
            self.timer.reschedule(self.loop.time())


async def lookup_call(call: Callable[[], Awaitable[T]], seconds: float) -> T:
    """`await call()` under `lookup_deadline`, once more if it failed on its connection.

    Redis, or a proxy in front of it, may close a connection while it sits idle in the
    pool (an idle `timeout`, CLIENT KILL, a restart behind a load balancer); the next
    command on it fails before Redis is even asked. The pool drops that connection, so the
    second attempt runs on a new one, and fails at once if Redis is really unreachable.
    """
    async with lookup_deadline(seconds):
        try:
            return await call()
        except BackendUnavailable as exc:
            if exc.reason != "connection":
                raise
        return await call()


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


_NAME = "AUTHGATE_REDIS_URL"
_EXAMPLE = "(example: redis://127.0.0.1:6379/0)"


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = port, str(default_port)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{_NAME}: bad port in {item!r}")
        if not host.strip("[]"):
            raise ConfigError(f"{_NAME}: a host is missing in {item!r}")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def _db(text: str, where: str) -> int:
    if not text.isdigit() or int(text) > 2**31 - 1:
        raise ConfigError(f"{_NAME}: {where} {text!r} is not a database number (0, 1, 2 …)")
    return int(text)


def _check_single(url: str, scheme: str, netloc: str, path: str, query: str) -> int:
    """The database number of a single-server URL; ConfigError when the URL is malformed."""
    if scheme == "unix":
        if netloc or not path.startswith("/") or path == "/":
            raise ConfigError(f"{_NAME}: a unix URL names a socket path: unix:///run/redis.sock")
        for key, _, value in (p.partition("=") for p in query.split("&") if p):
            if key == "db":
                return _db(value, "db")
        return 0
    host = netloc.rpartition("@")[2]
    if not host:
        raise ConfigError(f"{_NAME}: {scheme}:// needs a host after '//' {_EXAMPLE}")
    if "," in host:
        raise ConfigError(f"{_NAME}: one host only; name a Sentinel or Cluster with its scheme")
    _hosts(host, 6379)
    db = path.strip("/")
    return 0 if not db else _db(db, "path")


def parse_redis_url(url: str) -> RedisTarget:
    """What `url` names; every malformed URL is a ConfigError naming AUTHGATE_REDIS_URL.

    redis-py accepts `redis:/host:6379/0` (and connects to localhost:6379) or a database
    path such as `/abc`; nothing reaches it that this function did not understand.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise ConfigError(f"{_NAME}: {exc} {_EXAMPLE}") from None
    scheme = parts.scheme
    if not scheme or "://" not in url:
        raise ConfigError(f"{_NAME}: {_safe(url)!r} is not a URL {_EXAMPLE}")
    if scheme in ("redis", "rediss", "unix", "valkey", "valkeys"):
        db = _check_single(url, scheme, parts.netloc, parts.path, parts.query)
        return RedisTarget("single", url, db=db)
    auth, _, hostpart = parts.netloc.rpartition("@")
    username = password = None
    if auth:
        user, _, pw = auth.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    if scheme == "redis+sentinel":
        bits = [b for b in parts.path.split("/") if b]
        if not bits or len(bits) > 2 or not hostpart:
            raise ConfigError(
                f"{_NAME}: a sentinel URL names its hosts and service: "
                "redis+sentinel://host:26379/mymaster/0"
            )
        db = _db(bits[1], "database") if len(bits) > 1 else 0
        return RedisTarget(
            "sentinel", url, _hosts(hostpart, 26379), bits[0], db, username, password
        )
    if scheme == "redis+cluster":
        if not hostpart or parts.path.strip("/") not in ("", "0"):
            raise ConfigError(
                f"{_NAME}: a cluster URL names its hosts and no database: "
                "redis+cluster://host:6379,host:6380"
            )
        return RedisTarget("cluster", url, _hosts(hostpart, 6379), "", 0, username, password)
    raise ConfigError(
        f"{_NAME}: unsupported scheme {scheme!r} "
        "(use redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://)"
    )


def _safe(url: str) -> str:
    """`url` without a password, for an error message."""
    head, at, tail = url.rpartition("@")
    return f"{head.split('//', 1)[0]}//***@{tail}" if at else url


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


class MajoritySentinel(Sentinel):
    """Asks every sentinel at once and follows what most of those that answer say.

    redis-py takes the first sentinel that answers; one that has not yet heard of a
    failover would send new connections back to the old master.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        async def ask(sentinel: Any) -> tuple[str, int] | None:
            try:
                masters = await sentinel.sentinel_masters()
            except FOREIGN_ERRORS:
                return None
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                return str(state["ip"]), int(state["port"])
            return None

        answers = await asyncio.gather(*(ask(s) for s in self.sentinels))
        votes = Counter(a for a in answers if a is not None)
        if not votes:
            raise MasterNotFoundError(f"No master found for {service_name!r}")
        return votes.most_common(1)[0][0]


class SentinelMasterClient(aioredis.Redis):
    """The client `master_for` returns; closing it closes its sentinel connections too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool: Any = self.connection_pool
        await pool.sentinel_manager.aclose()


def _sentinel(target: RedisTarget, timeout: float, **common: Any) -> MajoritySentinel:
    return MajoritySentinel(  # type: ignore[no-untyped-call]
        list(target.hosts),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "password": target.password,
            "retry": _no_retry(),
        },
        username=target.username,
        password=target.password,
        db=target.db,
        **common,
    )


def connect(url: str, timeout: float, *, decode: bool = False) -> Any:
    """A redis.asyncio client for `url` with short timeouts and no hidden retries."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": decode,
        "retry": _no_retry(),
        "max_connections": MAX_CONNECTIONS,
    }
    return _client(url, timeout, common)


def connect_lookups(url: str, timeout: float) -> Any:
    """The decision path's client: no socket timeouts of its own (each lookup runs under
    `lookup_deadline`, which does not count the worker's stalls), at most
    LOOKUP_CONNECTIONS connections, and none shared with management or usage writes.
    `timeout` still bounds each question to a sentinel."""
    common: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": None,
        "retry": _no_retry(),
        "max_connections": LOOKUP_CONNECTIONS,
    }
    return _client(url, timeout, common)


def _client(url: str, timeout: float, common: dict[str, Any]) -> Any:
    target = parse_redis_url(url)
    if target.kind == "single":
        return aioredis.Redis.from_url(url, health_check_interval=30, **common)
    if target.kind == "sentinel":
        return _sentinel(target, timeout, **common).master_for(
            target.service, redis_class=SentinelMasterClient
        )
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],
        username=target.username,
        password=target.password,
        **common,
    )


class ClusterSubscriber:
    """Pub/sub for a Cluster: one node at a time, the next one on every new subscription.

    PUBLISH in a Cluster reaches every node, so any node hears every invalidation; when
    the one in use fails, the subscriber's retry lands on another.
    """

    def __init__(self, hosts: Sequence[tuple[str, int]], **common: Any) -> None:
        self.clients = [aioredis.Redis(host=h, port=p, **common) for h, p in hosts]
        self._next = 0

    def pubsub(self) -> Any:
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        return client.pubsub()

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def connect_subscriber(url: str, timeout: float) -> Any:
    """A client for pub/sub: no read timeout (it waits for messages), a connect timeout.

    No retries either: redis-py would otherwise reconnect and re-subscribe silently, and
    the invalidation task would never learn that messages may have been missed.
    """
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "health_check_interval": 5,
        "retry": _no_retry(),
    }
    if target.kind == "single":
        return aioredis.Redis.from_url(url, **common)
    if target.kind == "sentinel":
        return _sentinel(target, timeout, **common).master_for(
            target.service, redis_class=SentinelMasterClient
        )
    return ClusterSubscriber(
        target.hosts, username=target.username, password=target.password, **common
    )


def watch_topology(
    url: str, timeout: float, clients: Sequence[Any]
) -> Coroutine[Any, Any, None] | None:
    """For Sentinel: a task that follows the master and reconnects `clients` when it moves.

    After a failover the old master may keep answering (and keep its subscribers) until a
    sentinel reconfigures it, which takes seconds; connections to it would read a stale
    copy and hear no invalidations. Dropping every connection makes the next command ask
    the sentinels again, and the invalidation subscriber re-subscribes (flushing the cache).
    None for other topologies: a Cluster client follows MOVED redirections by itself.
    """
    target = parse_redis_url(url)
    if target.kind != "sentinel":
        return None
    return _follow_master(_sentinel(target, timeout), target.service, clients)


async def _follow_master(sentinel: MajoritySentinel, service: str, clients: Sequence[Any]) -> None:
    known: tuple[str, int] | None = None
    try:
        while True:
            try:
                where = await sentinel.discover_master(service)
            except FOREIGN_ERRORS:
                where = None
            if where is not None:
                if known is not None and where != known:
                    log.warning(
                        "sentinel: master of %s moved from %s:%d to %s:%d; reconnecting",
                        service,
                        *known,
                        *where,
                    )
                    for client in clients:
                        await client.connection_pool.disconnect()
                known = where
            await asyncio.sleep(SENTINEL_POLL)
    finally:
        await sentinel.aclose()
