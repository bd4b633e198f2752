"""Per-token usage, gathered in memory on the hot path and written in batches.

For each token: the allowed requests, the denials that can be tied to it (expired, disabled,
IP, scope, key type, admin, permissions) by code, and the last client address. The hot path
adds one to a dict entry; `last_used_at` is the time of the flush that wrote the count, so
it is exact to within `usage_flush_interval` (default one second). The store keeps a total
and a per-UTC-day history (`TokenStore.record_usage`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from .errors import BackendUnavailable

log = logging.getLogger("authgate")
CHUNK = 100  # tokens per write: a few hundred commands, about a millisecond of encoding
# Denial codes a request can be tied to a token by (SPEC §2, checks 6-11).
TOKEN_DENIALS = (
    "TOKEN_EXPIRED",
    "TOKEN_DISABLED",
    "IP_NOT_ALLOWED",
    "SCOPE_MISMATCH",
    "INSUFFICIENT_KEY_TYPE",
    "ADMIN_REQUIRED",
    "INSUFFICIENT_PERMISSIONS",
)


class Usage(NamedTuple):
    """One token's usage since the last flush. A plain `(count, last_used_at)` pair is read
    as one too."""

    allowed: int  # allowed requests
    last_used: float  # when they were counted (0 when none were)
    address: str | None = None  # last client address, allowed or denied
    denied: Mapping[str, int] = {}


Batch = dict[str, Any]  # token id -> Usage (or a (count, last_used_at) pair)
Flush = Callable[[Batch], Awaitable[None]]


class UsageRecorder:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._addresses: dict[str, object] = {}  # token id -> last client address (any form)
        self._denied: dict[tuple[str, str], int] = {}
        self._restored: dict[str, Usage] = {}  # put back by `restore`

    def note(self, token_id: str, address: object = None) -> None:
        """An allowed request: the hot path's share is a dict update or two, no I/O."""
        counts = self._counts
        counts[token_id] = counts.get(token_id, 0) + 1
        if address is not None:
            self._addresses[token_id] = address

    def refused(self, token_id: str, code: str, address: object = None) -> None:
        """A denial tied to a token (one of TOKEN_DENIALS)."""
        key = (token_id, code)
        self._denied[key] = self._denied.get(key, 0) + 1
        if address is not None:
            self._addresses[token_id] = address

    def drain(self) -> dict[str, Usage]:
        """Usage since the last drain, each with its last-used time."""
        counts, addresses, denied, restored = (
            self._counts,
            self._addresses,
            self._denied,
            self._restored,
        )
        self._counts, self._addresses, self._denied, self._restored = {}, {}, {}, {}
        now = time.time()
        refusals: dict[str, dict[str, int]] = {}
        for (token_id, code), n in denied.items():
            refusals.setdefault(token_id, {})[code] = n
        out: dict[str, Usage] = {}
        for token_id in {*counts, *refusals, *addresses}:
            count = counts.get(token_id, 0)
            old = restored.get(token_id)
            # Only counts put back, no new use since: keep the time they were drained at.
            if old is not None and old.allowed == count:
                last = old.last_used
            else:
                last = now if count else 0.0
            address = addresses.get(token_id)
            out[token_id] = Usage(
                count, last, None if address is None else str(address), refusals.get(token_id, {})
            )
        return out

    def restore(self, batch: Mapping[str, Any]) -> None:
        """Put a batch that could not be written back, so counts are not lost."""
        for token_id, item in batch.items():
            usage = as_usage(item)
            if usage.allowed:
                self._counts[token_id] = self._counts.get(token_id, 0) + usage.allowed
            if usage.address is not None:
                self._addresses.setdefault(token_id, usage.address)
            for code, n in usage.denied.items():
                key = (token_id, code)
                self._denied[key] = self._denied.get(key, 0) + n
            prev = self._restored.get(token_id)
            if prev is None:
                self._restored[token_id] = usage
            else:
                self._restored[token_id] = Usage(
                    prev.allowed + usage.allowed, max(prev.last_used, usage.last_used)
                )

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
                if len(self._counts) + len(self._denied) > 1_000_000:  # pragma: no cover
                    self._counts.clear()
                    self._denied.clear()
                    self._addresses.clear()
                    self._restored.clear()
                return


def as_usage(item: Any) -> Usage:
    """A batch entry as `Usage` (a `(count, last_used_at)` pair is one with no more)."""
    if isinstance(item, Usage):
        return item
    count, last = item[0], item[1]
    return Usage(int(count), float(last))
