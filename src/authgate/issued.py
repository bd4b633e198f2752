"""Which token hashes were ever issued: an exact in-memory set, so forged tokens cost no Redis.

The checksum is a public CRC32: anyone can mint any number of distinct well-formed tokens,
and each would cost a Redis GET (the negative cache only absorbs repeats). This set answers
"surely never issued" without Redis. It holds the first 8 bytes of every issued token's
HMAC, as a sorted `array('Q')` (8 bytes per token) plus a small set of recent additions
(merged into the array every `MERGE_AT`). An 8-byte prefix of a keyed hash makes a forged
token look issued with odds of about n / 2**64: with a million tokens, one in 10**13.

Kept current like the cache, by the invalidation channel (`invalidation.Invalidator`):
create and rotate publish the new token's hash before they write its record, and `add`
records every hash heard. The set is loaded (SCAN over `{kp}:th:*`, on every Cluster
primary) each time the subscription is confirmed, so every hash published while the SCAN
runs arrives on the channel too. Whenever invalidations may have been lost (the
subscription dropped, a "*" message), or until the first load completes, `may_hold`
answers True for everything: the lookup then asks Redis, exactly as without this set.

A "not issued" answer is acted on only while the channel is `quiet` (nothing received
waits to be applied); otherwise the lookup lets the invalidation task run first (`settle`)
and asks again, and asks Redis if still in doubt. A token's announcement leaves Redis
before the token exists, so by the time anyone can present it, it has reached this host.

Entries of deleted tokens stay until the next load; they cost a GET, as before.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from .backend import FOREIGN_ERRORS

log = logging.getLogger("authgate")

PREFIX_BYTES = 8  # of each HMAC: the set's key
MERGE_AT = 1024  # recent additions kept in a Python set before they join the sorted array
SCAN_COUNT = 2000  # keys asked of Redis per SCAN call
RETRY_MAX = 5.0  # seconds between attempts at most, when a load fails
SETTLE_TURNS = 8  # event-loop turns `settle` waits at most for announcements to be applied


def _never() -> bool:
    return False


def _key(digest: bytes) -> int:
    return int.from_bytes(digest[:PREFIX_BYTES], "big")


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class IssuedTokens:
    """The set of issued token hashes of one worker, and its state (`ready`)."""

    def __init__(
        self,
        redis: Any,
        key_prefix: str,
        *,
        on_change: Callable[[bool, int], None] | None = None,
    ) -> None:
        self.redis = redis
        self.pattern = _glob_escape(f"{key_prefix}:th:") + "*"
        self.ready = False  # False: not loaded yet, or invalidations may have been lost
        self._sorted = array("Q")
        self._recent: set[int] = set()
        self._building: set[int] | None = None  # added while a load runs
        self._task: asyncio.Task[None] | None = None
        self._on_change = on_change
        self.loaded_in = 0.0  # seconds the last load took
        # Set by the invalidation task: True when no received announcement waits to be
        # applied (`Invalidator.quiet`). A "no" from `may_hold` counts only then.
        self.quiet: Callable[[], bool] = _never

    # -- the decision path ---------------------------------------------------------------------
    async def settle(self) -> None:
        """Let the invalidation task apply what it has received (a few event-loop turns at
        most): a token may be used the moment its creation returns, with its announcement
        read but not yet applied."""
        for _ in range(SETTLE_TURNS):
            if self.quiet():
                return
            await asyncio.sleep(0)

    def may_hold(self, digest: bytes) -> bool:
        """False only when the set is loaded and current and `digest` was never issued."""
        if not self.ready:
            return True
        key = _key(digest)
        if key in self._recent:
            return True
        ordered = self._sorted
        i = bisect_left(ordered, key)
        return i < len(ordered) and ordered[i] == key

    # -- kept current --------------------------------------------------------------------------
    def add(self, digest: bytes) -> None:
        """A hash published on the invalidation channel: a token created, rotated, revoked
        or deleted. Recording one that exists already changes nothing."""
        key = _key(digest)
        if self._building is not None:
            self._building.add(key)
        recent, ordered = self._recent, self._sorted
        i = bisect_left(ordered, key)
        if key in recent or (i < len(ordered) and ordered[i] == key):
            return
        recent.add(key)
        if len(recent) >= MERGE_AT:  # two sorted runs: one linear merge
            self._sorted = array("Q", sorted([*ordered, *sorted(recent)]))
            recent.clear()
        self._changed()

    def unsure(self) -> None:
        """Invalidations may be lost from now on: every token may be issued until the next
        `load` completes."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._building = None
        if self.ready:
            self.ready = False
            self._changed()

    def load(self) -> asyncio.Task[None]:
        """Start (again) loading the set from Redis; call once the subscription that will
        carry later additions is confirmed. Until the load completes, `may_hold` is True."""
        self.unsure()
        building: set[int] = set()
        self._building = building
        self._task = asyncio.get_running_loop().create_task(
            self._load(building), name="authgate-issued-load"
        )
        return self._task

    async def _load(self, building: set[int]) -> None:
        """Scan, then publish the set, unless this load was superseded meanwhile (`unsure`
        or a newer `load`): its cancellation can be absorbed inside a Redis call, so the
        scan may still finish, and then it must change nothing."""
        backoff = 0.1
        while True:
            started = time.perf_counter()
            try:
                found = await self._scan()
            except FOREIGN_ERRORS as exc:
                log.warning(
                    "loading issued token hashes failed (%s); lookups ask Redis until it works",
                    type(exc).__name__,
                )
                await asyncio.sleep(backoff * (1 + random.random()))  # noqa: S311
                backoff = min(backoff * 2, RETRY_MAX)
                if self._building is not building:
                    return
                continue
            if self._building is not building:
                return
            found.update(building, self._recent)
            self._sorted = array("Q", sorted(found))
            self._recent = set()
            self._building = None
            self._task = None
            self.loaded_in = time.perf_counter() - started
            self.ready = True
            self._changed()
            return

    async def _scan(self) -> set[int]:
        """The prefixes of every `{kp}:th:<64 hex>` key (every primary of a Cluster)."""
        found: set[int] = set()
        async for name in self.redis.scan_iter(match=self.pattern, count=SCAN_COUNT):
            tail = name[-64:]
            if len(tail) == 64 and name[-68:-64] == b":th:":
                try:
                    found.add(int(tail[: 2 * PREFIX_BYTES], 16))
                except ValueError:
                    continue  # not a token key: not ours to count
        return found

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.ready, len(self))

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def memory_bytes(self) -> int:
        """Bytes the set holds now (the array's buffer and the recent additions)."""
        recent = sys.getsizeof(self._recent) + sum(sys.getsizeof(k) for k in self._recent)
        return self._sorted.buffer_info()[1] * self._sorted.itemsize + recent
