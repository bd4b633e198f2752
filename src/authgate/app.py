"""One worker process: its Redis clients, cache, background tasks, and the ASGI entry.

`create_app()` is what uvicorn loads in each worker. Requests are dispatched by the
listening socket they arrived on (`listeners`): the management API answers only on the
AUTHGATE_ADMIN_LISTEN socket, never on the data plane's, even when both share a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from .authorizer import Authorizer
from .backend import connect, connect_subscriber, mapped_errors, watch_topology
from .cache import TokenCache
from .config import Settings, load_settings
from .dataplane import DataPlane
from .errors import BackendUnavailable
from .invalidation import Invalidator
from .issued import IssuedTokens
from .listeners import listener
from .metrics import Metrics
from .plane import Receive, Scope, Send
from .store import TokenStore
from .usage import UsageRecorder

STOP_RETRY = 1.0  # seconds between cancellations of a background task that goes on

log = logging.getLogger("authgate")


class Runtime:
    """Everything one worker owns. `start()` launches the background tasks."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, redis: Any = None
    ) -> None:
        self.settings = settings
        self.redis = (
            redis if redis is not None else connect(settings.redis_url, settings.redis_timeout)
        )
        self.metrics = metrics or Metrics()
        self.store = TokenStore(self.redis, settings)
        self.cache = TokenCache(
            ttl=settings.cache_ttl,
            stale_window=settings.stale_window,
            negative_ttl=settings.negative_cache_ttl,
            size=settings.cache_size,
            negative_size=settings.negative_cache_size,
        )
        self.usage = UsageRecorder()
        self.issued = IssuedTokens(
            self.redis, settings.key_prefix, on_change=self.metrics.issued_changed
        )
        self.authorizer = Authorizer(
            settings, self.store, self.cache, self.metrics, self.usage, self.issued
        )
        self.data_plane = DataPlane(settings, self.authorizer, self.ready)
        self.invalidator: Invalidator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready_at = 0.0
        self._ready = False

    async def start(self) -> None:
        sub = connect_subscriber(self.settings.redis_url, self.settings.redis_timeout)
        self.invalidator = Invalidator(
            sub, self.store.channel, self.cache, self.metrics, self.issued
        )
        self._subscriber = sub
        self._tasks = [
            asyncio.create_task(self.invalidator.run(), name="authgate-invalidation"),
            asyncio.create_task(
                self.usage.run(self.store.record_usage, self.settings.usage_flush_interval),
                name="authgate-usage",
            ),
        ]
        follow = watch_topology(
            self.settings.redis_url, self.settings.redis_timeout, (self.redis, sub)
        )
        if follow is not None:  # Sentinel: reconnect both clients when the master moves
            self._tasks.append(asyncio.create_task(follow, name="authgate-topology"))

    async def stop(self) -> None:
        self.issued.unsure()  # ends a load under way
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            # A cancellation that lands while a Redis command times out can come back as
            # that timeout and be handled as one; cancelling again ends the task anyway.
            _, pending = await asyncio.wait(pending, timeout=STOP_RETRY)
        for task in self._tasks:
            if not task.cancelled():
                with contextlib.suppress(BackendUnavailable):
                    task.result()
        self._tasks = []
        self.metrics.flush()  # counts of the last few ms reach /metrics too
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        if self.invalidator is not None:
            with contextlib.suppress(Exception):
                await self._subscriber.aclose()

    async def ready(self) -> bool:
        """Redis answers PING (remembered for half a second)."""
        now = time.monotonic()
        if now - self._ready_at < 0.5:
            return self._ready
        try:
            async with mapped_errors():
                await self.redis.ping()
            self._ready = True
        except BackendUnavailable:
            self._ready = False
        self._ready_at = now
        return self._ready


class WorkerApp:
    """ASGI entry: lifespan, then dispatch by the listening socket (its local address)."""

    def __init__(self, runtime: Runtime, admin: Any = None) -> None:
        self.runtime = runtime
        self.data_plane = runtime.data_plane
        self.admin = admin
        listen = runtime.settings.admin_listen
        self.admin_listener = listener(listen) if listen is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(scope, receive, send)
            return
        if self.admin_listener is not None and self.admin is not None:
            if self.admin_listener.accepted(scope.get("server")):
                await self.admin(scope, receive, send)
                return
        await self.data_plane(scope, receive, send)

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state")
        if state is not None:  # how `fasthttp` finds the data plane and the admin socket
            from .fasthttp import STATE_KEY, Limits, Served

            settings, metrics = self.runtime.settings, self.runtime.metrics
            state[STATE_KEY] = Served(
                self.data_plane,
                self.admin_listener,
                Limits(settings.max_connections, settings.header_timeout),
                refused=metrics.connections_refused.inc,
                timed_out=metrics.header_timeouts.inc,
            )
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.runtime.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _NoWebSocketAdvice(logging.Filter):
    """WebSocket is off on purpose (`server.SERVER_OPTIONS`): uvicorn's advice to install a
    WebSocket library on every Upgrade request is dropped; its "Unsupported upgrade
    request." line stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No supported WebSocket library")


def create_app() -> WorkerApp:
    """uvicorn factory: settings from the environment, metrics into the multiprocess dir."""
    logging.getLogger("uvicorn.error").addFilter(_NoWebSocketAdvice())
    settings = load_settings()
    runtime = Runtime(settings)
    admin = None
    if settings.admin_listen is not None:
        from .admin import create_admin_app

        admin = create_admin_app(runtime.store, settings, runtime.metrics)
    return WorkerApp(runtime, admin)
