"""Fleet-wide cache invalidation over Redis pub/sub.

Every lifecycle change publishes the token's hash; every instance drops it from its cache.
When the subscription is lost, nothing says what was missed, so the cache is flushed on
every (re)subscribe; the cache TTL bounds staleness even if this task never runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from .backend import FOREIGN_ERRORS
from .cache import TokenCache
from .metrics import Metrics

log = logging.getLogger("authgate")


class Invalidator:
    def __init__(self, client: Any, channel: str, cache: TokenCache, metrics: Metrics) -> None:
        self.client = client
        self.channel = channel
        self.cache = cache
        self.metrics = metrics
        self.subscribed = asyncio.Event()

    def apply(self, data: bytes) -> None:
        """One message: a token's hex hash to drop, or "*" (or anything unreadable): all."""
        try:
            digest = b"" if data == b"*" else bytes.fromhex(data.decode("ascii"))
        except ValueError:
            digest = b""
        if len(digest) == 32:
            self.cache.invalidate(digest)
            self.metrics.invalidation_child["token"].inc()
        else:
            self.cache.flush()
            self.metrics.invalidation_child["flush"].inc()

    async def run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                # Wait for the server's confirmation before trusting the cache again.
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg["type"] == "subscribe":
                        break
                self.cache.flush()
                self.metrics.invalidation_child["flush"].inc()
                self.subscribed.set()
                backoff = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None:
                        continue
                    if msg["type"] == "message":
                        self.apply(msg["data"])
                    elif msg["type"] == "subscribe":
                        # The client reconnected and re-subscribed on its own: whatever
                        # was published in between is lost.
                        self.cache.flush()
                        self.metrics.invalidation_child["flush"].inc()
            except asyncio.CancelledError:
                raise
            except FOREIGN_ERRORS as exc:
                if self.subscribed.is_set():
                    log.warning(
                        "invalidation subscription lost (%s); cached tokens are re-checked "
                        "until it is back",
                        type(exc).__name__,
                    )
                self.subscribed.clear()
                # Not a flush: while Redis is unreachable, cached decisions are what keeps
                # known tokens working (for stale_window). Stale entries are re-read from
                # Redis whenever it answers; the cache is flushed on re-subscribe.
                self.cache.demote(time.monotonic())
            finally:
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:  # noqa: S110 - closing a broken connection may fail too
                    pass
            await asyncio.sleep(backoff * (1 + random.random()))  # noqa: S311
            backoff = min(backoff * 2, 2.0)
