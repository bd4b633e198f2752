"""Per-token request counts and last-used times, gathered in memory, written in batches.

The hot path adds one to a dict entry; `last_used_at` is the time of the flush that wrote the
count, so it is exact to within `usage_flush_interval` (default one second).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .errors import BackendUnavailable

log = logging.getLogger("authgate")
Flush = Callable[[dict[str, tuple[int, float]]], Awaitable[None]]
CHUNK = 100  # tokens per write: 200 commands, about a millisecond of encoding


class UsageRecorder:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._restored: dict[str, tuple[int, float]] = {}  # put back by `restore`

    def note(self, token_id: str) -> None:
        """The hot path's share: one dict update, no I/O."""
        counts = self._counts
        counts[token_id] = counts.get(token_id, 0) + 1

    def drain(self) -> dict[str, tuple[int, float]]:
        """Counts since the last drain, each with its last-used time."""
        counts, restored = self._counts, self._restored
        self._counts, self._restored = {}, {}
        now = time.time()
        out: dict[str, tuple[int, float]] = {}
        for token_id, count in counts.items():
            old = restored.get(token_id)
            # Only counts put back, no new use since: keep the time they were drained at.
            out[token_id] = (count, old[1] if old is not None and old[0] == count else now)
        return out

    def restore(self, batch: dict[str, tuple[int, float]]) -> None:
        """Put a batch that could not be written back, so counts are not lost."""
        for token_id, (count, last) in batch.items():
            self._counts[token_id] = self._counts.get(token_id, 0) + count
            prev_count, prev_last = self._restored.get(token_id, (0, 0.0))
            self._restored[token_id] = (prev_count + count, max(last, prev_last))

    async def run(self, flush: Flush, interval: float) -> None:
        """Flush every `interval` seconds until cancelled (then flush once more)."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self.flush_once(flush)
        finally:
            await self.flush_once(flush)

    async def flush_once(self, flush: Flush) -> None:
        """Write what was counted, `CHUNK` tokens per round trip: the event loop answers
        requests between chunks instead of stalling while thousands of commands are
        encoded at once. What could not be written is put back."""
        batch = self.drain()
        items = list(batch.items())
        for start in range(0, len(items), CHUNK):
            chunk = dict(items[start : start + CHUNK])
            try:
                await flush(chunk)
            except BackendUnavailable:
                self.restore(dict(items[start:]))
                if len(self._counts) > 1_000_000:  # pragma: no cover - a very long outage
                    self._counts.clear()
                    self._restored.clear()
                return
