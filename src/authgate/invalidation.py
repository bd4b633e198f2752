"""Fleet-wide cache invalidation over Redis pub/sub.

Every lifecycle change publishes the token's hash; every instance drops it from its cache
and records it as issued (`issued.IssuedTokens`: create and rotate publish the new hash).
When the subscription is lost, nothing says what was missed, so the cache is flushed and
the issued set reloaded on every (re)subscribe; the cache TTL bounds staleness even if this
task never runs, and the issued set answers "maybe" for every token until it is reloaded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from .backend import FOREIGN_ERRORS
from .cache import TokenCache
from .issued import IssuedTokens
from .metrics import Metrics

log = logging.getLogger("authgate")

# The subscription is pinged after each second without a message; after SILENCE seconds
# without any (a pong included), the connection is taken as lost, as if it had failed:
# a silently dead socket would otherwise hide lost invalidations indefinitely.
PING_AFTER = 1.0
SILENCE = 5.0


class Invalidator:
    def __init__(
        self,
        client: Any,
        channel: str,
        cache: TokenCache,
        metrics: Metrics,
        issued: IssuedTokens | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.cache = cache
        self.metrics = metrics
        self.issued = issued
        self.subscribed = asyncio.Event()
        self._pubsub: Any = None  # the confirmed subscription, while it lasts
        if issued is not None:
            issued.quiet = self.quiet

    def quiet(self) -> bool:
        """Whether nothing received on the subscription waits to be applied: no message
        in the socket, nor read and not yet handled (the client's buffers). An announcement
        that has reached this host is then applied already. False whenever unsure (no
        subscription, a client whose buffers cannot be inspected)."""
        pubsub = self._pubsub
        try:
            conn = pubsub.connection
            stream = conn._reader  # asyncio.StreamReader
            if stream is None or stream._buffer:
                return False
            parser = conn._parser
            hired = getattr(parser, "_reader", None)
            if hired is not None:  # hiredis
                if hired.has_data():
                    return False
            elif len(parser._buffer) > parser._pos or parser._chunks:  # redis-py's own
                return False
            sock = stream._transport.get_extra_info("socket")
            return not select.select([sock], [], [], 0)[0]
        except Exception:  # any doubt means "not quiet": ask Redis
            return False

    def apply(self, data: bytes) -> None:
        """One message: a token's hex hash to drop, or "*" (or anything unreadable): all."""
        try:
            digest = b"" if data == b"*" else bytes.fromhex(data.decode("ascii"))
        except ValueError:
            digest = b""
        if len(digest) == 32:
            self.cache.invalidate(digest)
            if self.issued is not None:
                self.issued.add(digest)
            self.metrics.invalidation_child["token"].inc()
        else:
            self.cache.flush()
            if self.issued is not None:  # anything may have changed: load it all again
                self.issued.load()
            self.metrics.invalidation_child["flush"].inc()

    def resubscribed(self) -> None:
        """The subscription is (again) confirmed: whatever was published before is lost."""
        self.cache.flush()
        if self.issued is not None:
            self.issued.load()
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
                self.resubscribed()
                self._pubsub = pubsub
                self.subscribed.set()
                backoff = 0.05
                loop = asyncio.get_running_loop()
                heard = loop.time()
                while True:
                    msg = await pubsub.get_message(timeout=PING_AFTER)
                    if msg is None:
                        if loop.time() - heard > SILENCE:
                            raise RedisConnectionError("the subscription stopped answering")
                        await pubsub.ping()
                        continue
                    heard = loop.time()
                    if msg["type"] == "message":
                        self.apply(msg["data"])
                    elif msg["type"] == "subscribe":
                        # The client reconnected and re-subscribed on its own: whatever
                        # was published in between is lost.
                        self.resubscribed()
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
                if self.issued is not None:
                    self.issued.unsure()
                # Not a flush: while Redis is unreachable, cached decisions are what keeps
                # known tokens working (for stale_window). Stale entries are re-read from
                # Redis whenever it answers; the cache is flushed on re-subscribe.
                self.cache.demote(time.monotonic())
            finally:
                self._pubsub = None
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:  # noqa: S110 - closing a broken connection may fail too
                    pass
            await asyncio.sleep(backoff * (1 + random.random()))  # noqa: S311
            backoff = min(backoff * 2, 2.0)
