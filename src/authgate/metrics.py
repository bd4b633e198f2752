"""Prometheus metrics. A registry is passed in; several workers share one multiprocess dir.

Label values are fixed sets (status, code, cache result): never a token, id or path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
CACHE_RESULTS = ("fresh", "stale", "negative", "miss")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
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
        self.redis_up = Gauge(
            "authgate_redis_up",
            "1 when this worker's last Redis call succeeded",
            registry=registry,
            multiprocess_mode="min",
        )
        # Children resolved once: labels() is not free on the hot path.
        self.decision_child = {
            (status, code): self.decisions.labels(str(status), code)
            for code, status in [*CODES.items(), ("OK", 200)]
        }
        self.cache_child = {r: self.cache.labels(r) for r in CACHE_RESULTS}
        self.invalidation_child = {k: self.invalidations.labels(k) for k in ("token", "flush")}
