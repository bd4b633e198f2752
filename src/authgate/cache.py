"""The per-process token cache.

Positive entries are fresh for `ttl` seconds and may be served stale for `stale_window`
more, only while Redis is unreachable. Unknown hashes are remembered for `negative_ttl`
so a flood of the same bad token stays off Redis. Invalidation drops one hash (or all).

Keys are the raw 32-byte HMAC digests (half the size of their hex form); a few hundred
bytes per cached token in all (see "Performance" in README.md).
"""

from __future__ import annotations

import time
from typing import Literal

from .model import Entry

Freshness = Literal["fresh", "stale", "negative", "miss"]


class TokenCache:
    def __init__(
        self, *, ttl: float, stale_window: float, negative_ttl: float, size: int, negative_size: int
    ) -> None:
        self.ttl = ttl
        self.stale_window = stale_window
        self.negative_ttl = negative_ttl
        self.size = size
        self.negative_size = negative_size
        self._entries: dict[bytes, tuple[Entry, float]] = {}
        self._negative: dict[bytes, float] = {}
        self.generation = 0  # bumped on every invalidation; guards in-flight loads

    def fresh(self, digest: bytes, now: float) -> Entry | None:
        """The hot path's question: a fresh entry, or None (then ask `get`)."""
        hit = self._entries.get(digest)
        if hit is not None and now - hit[1] < self.ttl:
            return hit[0]
        return None

    def known_unknown(self, digest: bytes, now: float) -> bool:
        """Whether the digest is in the negative cache and not yet expired."""
        until = self._negative.get(digest)
        return until is not None and now < until

    def get(self, digest: bytes, now: float) -> tuple[Freshness, Entry | None]:
        hit = self._entries.get(digest)
        if hit is not None:
            entry, loaded = hit
            if now - loaded < self.ttl:
                return "fresh", entry
            if now - loaded < self.ttl + self.stale_window:
                return "stale", entry
            del self._entries[digest]
            return "miss", None
        until = self._negative.get(digest)
        if until is not None:
            if now < until:
                return "negative", None
            del self._negative[digest]
        return "miss", None

    def put(self, digest: bytes, entry: Entry, now: float, generation: int) -> None:
        if generation != self.generation:
            return  # invalidated while Redis was being asked: the answer may be stale
        entries = self._entries
        # Oldest first: a re-read moves to the end, and an expired entry at the front (a
        # token nobody asked for since) is forgotten, so memory follows the tokens in use,
        # not every token ever seen up to `size`.
        entries.pop(digest, None)
        for _ in range(2):
            first = next(iter(entries), None)
            if first is None or now - entries[first][1] < self.ttl + self.stale_window:
                break
            del entries[first]
        if len(entries) >= self.size:
            entries.pop(next(iter(entries)))
        entries[digest] = (entry, now)
        self._negative.pop(digest, None)

    def put_negative(self, digest: bytes, now: float, generation: int) -> None:
        if generation != self.generation:
            return
        negative = self._negative
        negative.pop(digest, None)
        for _ in range(2):  # as in `put`: expired entries at the front are forgotten
            first = next(iter(negative), None)
            if first is None or negative[first] > now:
                break
            del negative[first]
        if len(negative) >= self.negative_size:
            negative.pop(next(iter(negative)))
        negative[digest] = now + self.negative_ttl

    def invalidate(self, digest: bytes) -> None:
        self.generation += 1
        self._entries.pop(digest, None)
        self._negative.pop(digest, None)

    def flush(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._negative.clear()

    def demote(self, now: float) -> None:
        """Invalidations may be missed from now on: make every entry stale.

        Stale entries are re-read from Redis when it answers and served only while it
        does not, for at most `stale_window` from now.
        """
        self.generation += 1
        cutoff = now - self.ttl
        self._entries = {d: (e, min(t, cutoff)) for d, (e, t) in self._entries.items()}

    def __len__(self) -> int:
        return len(self._entries)


def monotonic() -> float:
    return time.monotonic()
