"""One worker process: its Redis clients, cache, background tasks, and the ASGI entry.

`create_app()` is what uvicorn loads in each worker. Requests are dispatched by the
listening port: the management API answers only on AUTHGATE_ADMIN_LISTEN, never on the
data-plane port.
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
        self.authorizer = Authorizer(settings, self.store, self.cache, self.metrics, self.usage)
        self.data_plane = DataPlane(settings, self.authorizer, self.ready)
        self.invalidator: Invalidator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready_at = 0.0
        self._ready = False

    async def start(self) -> None:
        sub = connect_subscriber(self.settings.redis_url, self.settings.redis_timeout)
        self.invalidator = Invalidator(sub, self.store.channel, self.cache, self.metrics)
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
    """ASGI entry: lifespan, then dispatch by the local port."""

    def __init__(self, runtime: Runtime, admin: Any = None) -> None:
        self.runtime = runtime
        self.data_plane = runtime.data_plane
        self.admin = admin
        listen = runtime.settings.admin_listen
        self.admin_port = listen[1] if listen else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(scope, receive, send)
            return
        if self.admin is not None:
            server = scope.get("server")
            if server is not None and server[1] == self.admin_port:
                await self.admin(scope, receive, send)
                return
        await self.data_plane(scope, receive, send)

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state")
        if state is not None:  # how `fasthttp` finds the data plane and the admin port
            from .fasthttp import STATE_KEY

            state[STATE_KEY] = (self.data_plane, self.admin_port)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.runtime.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app() -> WorkerApp:
    """uvicorn factory: settings from the environment, metrics into the multiprocess dir."""
    settings = load_settings()
    runtime = Runtime(settings)
    admin = None
    if settings.admin_listen is not None:
        from .admin import create_admin_app

        admin = create_admin_app(runtime.store, settings, runtime.metrics)
    return WorkerApp(runtime, admin)
