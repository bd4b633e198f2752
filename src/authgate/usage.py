"""Per-token request counts and last-used times, gathered in memory, written in batches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .errors import BackendUnavailable

log = logging.getLogger("authgate")
Flush = Callable[[dict[str, tuple[int, float]]], Awaitable[None]]


class UsageRecorder:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def note(self, token_id: str) -> None:
        """The hot path's share: two dict updates, no I/O."""
        self._counts[token_id] = self._counts.get(token_id, 0) + 1
        self._last[token_id] = time.time()

    def drain(self) -> dict[str, tuple[int, float]]:
        counts, last = self._counts, self._last
        self._counts, self._last = {}, {}
        return {k: (v, last[k]) for k, v in counts.items()}

    def restore(self, batch: dict[str, tuple[int, float]]) -> None:
        """Put a batch that could not be written back, so counts are not lost."""
        for token_id, (count, last) in batch.items():
            self._counts[token_id] = self._counts.get(token_id, 0) + count
            self._last[token_id] = max(last, self._last.get(token_id, 0.0))

    async def run(self, flush: Flush, interval: float) -> None:
        """Flush every `interval` seconds until cancelled (then flush once more)."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self.flush_once(flush)
        finally:
            await self.flush_once(flush)

    async def flush_once(self, flush: Flush) -> None:
        batch = self.drain()
        if not batch:
            return
        try:
            await flush(batch)
        except BackendUnavailable:
            self.restore(batch)
            if len(self._counts) > 1_000_000:  # pragma: no cover - a very long outage
                self._counts.clear()
                self._last.clear()
