"""Prometheus metrics. A registry is passed in; several workers share one multiprocess dir.

Label values are fixed sets (status, code, cache result): never a token, id or path.

The hot path does not touch prometheus objects: in multiprocess mode every `inc()` and
`observe()` takes a lock and writes an mmap'd file, several microseconds per request. It
counts into plain ints instead (`Tally`), and `flush()` adds those to the prometheus
values at most `FLUSH_DELAY` seconds later (and whenever this registry is collected), so
`/metrics` stays exact across workers and lags by at most that delay.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from .decisions import CODES

LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)
# "unissued": refused without Redis, the hash was never issued (`issued.IssuedTokens`)
CACHE_RESULTS = ("fresh", "stale", "negative", "unissued", "miss")
FLUSH_DELAY = 0.05  # seconds a count may wait before it reaches the shared files


class _FlushFirst:
    """Registered before the metrics: collecting the registry flushes pending counts first."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self.metrics.flush()
        return ()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        registry.register(_FlushFirst(self))
        self.decisions = Counter(
            "authgate_decisions",
            "Decisions by HTTP status and error code (OK when allowed)",
            ["status", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "authgate_decision_seconds",
            "Time to decide one request",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "authgate_cache",
            "Token cache lookups by result",
            ["result"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "authgate_redis_errors",
            "Redis calls that failed or timed out",
            registry=registry,
        )
        self.redis_latency = Histogram(
            "authgate_redis_seconds",
            "Redis lookup latency on the decision path",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.invalidations = Counter(
            "authgate_invalidations",
            "Cache invalidations received",
            ["kind"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "authgate_connections_refused",
            "Data-plane connections refused at AUTHGATE_MAX_CONNECTIONS (per worker)",
            registry=registry,
        )
        self.header_timeouts = Counter(
            "authgate_header_timeouts",
            "Data-plane connections closed because a request did not arrive whole within "
            "AUTHGATE_HEADER_TIMEOUT",
            registry=registry,
        )
        self.issued_ready = Gauge(
            "authgate_issued_set_ready",
            "1 when this worker's set of issued token hashes is loaded and current (else "
            "every unknown token is asked of Redis)",
            registry=registry,
            multiprocess_mode="min",
        )
        self.issued_size = Gauge(
            "authgate_issued_set_tokens",
            "Issued token hashes in this worker's set",
            registry=registry,
            multiprocess_mode="max",
        )
        self.redis_up = Gauge(
            "authgate_redis_up",
            "1 when this worker's last Redis call succeeded",
            registry=registry,
            multiprocess_mode="min",
        )
        # Children resolved once: labels() is not free.
        self.decision_child = {
            (status, code): self.decisions.labels(str(status), code)
            for code, status in [*CODES.items(), ("OK", 200)]
        }
        self.cache_child = {r: self.cache.labels(r) for r in CACHE_RESULTS}
        self.invalidation_child = {k: self.invalidations.labels(k) for k in ("token", "flush")}
        self._decision_by_code = {
            code: self.decision_child[(CODES.get(code, 200), code)] for code in [*CODES, "OK"]
        }
        # The hot path's counters: plain ints, flushed by `flush()`.
        self.decision_counts: dict[str, int] = dict.fromkeys(self._decision_by_code, 0)
        self.cache_counts: dict[str, int] = dict.fromkeys(CACHE_RESULTS, 0)
        self._bounds = (*LATENCY_BUCKETS, float("inf"))
        self._latency_counts = [0] * len(self._bounds)
        self._latency_sum = 0.0
        self._redis_counts = [0] * len(self._bounds)
        self._redis_sum = 0.0
        self._redis_up: int | None = None
        self._pending: asyncio.TimerHandle | None = None

    # -- the hot path ----------------------------------------------------------------------
    def decided(self, code: str, seconds: float) -> None:
        """One decision and how long it took (code "OK" when allowed)."""
        self.decision_counts[code] += 1
        self._latency_counts[bisect_left(self._bounds, seconds)] += 1
        self._latency_sum += seconds
        if self._pending is None:
            self._schedule()

    def redis_call(self, seconds: float) -> None:
        """A lookup that Redis answered."""
        self._redis_counts[bisect_left(self._bounds, seconds)] += 1
        self._redis_sum += seconds
        self.set_redis_up(True)

    def redis_failed(self) -> None:
        self.redis_errors.inc()
        self.set_redis_up(False)

    def issued_changed(self, ready: bool, size: int) -> None:
        """The issued set was loaded, lost its certainty, or grew (rare: a create)."""
        self.issued_ready.set(1 if ready else 0)
        self.issued_size.set(size)

    def set_redis_up(self, up: bool) -> None:
        value = 1 if up else 0
        if value != self._redis_up:  # the gauge's file is written on change only
            self._redis_up = value
            self.redis_up.set(value)

    # -- flushing ----------------------------------------------------------------------------
    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): write through
            self.flush()
            return
        self._pending = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Add the pending counts to the prometheus values."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        counts = self.decision_counts
        for code, n in counts.items():
            if n:
                counts[code] = 0
                self._decision_by_code[code].inc(n)
        cache = self.cache_counts
        for result, n in cache.items():
            if n:
                cache[result] = 0
                self.cache_child[result].inc(n)
        self._latency_sum = _drain(self.latency, self._latency_counts, self._latency_sum)
        self._redis_sum = _drain(self.redis_latency, self._redis_counts, self._redis_sum)


def _drain(histogram: Histogram, counts: list[int], total: float) -> float:
    """Add bucket counts and their sum to `histogram` in one write per bucket; returns 0."""
    if not any(counts):
        return total
    for i, n in enumerate(counts):
        if n:
            counts[i] = 0
            histogram._buckets[i].inc(n)
    histogram._sum.inc(total)
    return 0.0
