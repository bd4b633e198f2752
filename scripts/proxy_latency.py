"""Median latency of one request through the shipped Traefik and Caddy configurations.

Starts Valkey, authgate, the echo upstream, Traefik (the Kubernetes overlay's chain, plus
the same chain without its two plugin stages, selected by a header) and Caddy, then times
sequential allowed and denied requests, each on a new connection, and the echo alone.
Run: `.venv/bin/python scripts/proxy_latency.py [REQUESTS]`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import start_valkey
from tests.traefik_caddy_harness import Reply, Site, k8s_dynamic, send, start_caddy, start_traefik
from tests.traefik_caddy_promises import SYSTEM, Gateway, both, neighbours


def timed(label: str, count: int, request: Callable[[], Reply], status: int) -> None:
    for _ in range(count // 10):  # warm up
        request()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        reply = request()
        times.append(time.perf_counter() - started)
        assert reply.status == status, (label, reply.status, reply.body)
    times.sort()
    median, p90 = statistics.median(times) * 1e3, times[int(count * 0.9)] * 1e3
    print(f"{label:<40} median {median:6.3f} ms   p90 {p90:6.3f} ms")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    valkey = start_valkey()
    work = Path(tempfile.mkdtemp(prefix="authgate-proxy-latency-"))
    stack = neighbours(valkey, work)
    nb = next(stack)
    proxies = []
    try:
        bare = k8s_dynamic(Site("bare", nb.addresses["main"], nb.echo.address), "ep-k8s-main")
        for router in bare["http"]["routers"].values():
            stages = ("guard", "forward")
            router["middlewares"] = [m for m in router["middlewares"] if not m.endswith(stages)]
            router["rule"] += " && Header(`X-Bare`, `1`)"
            router["priority"] = 1000
        traefik = start_traefik(work / "traefik", nb.sites("k8s-", "k8s"), bare)
        proxies.append(traefik)
        caddy = start_caddy(work / "caddy", nb.sites())
        proxies.append(caddy)
        for name, proxy, prefix in (("traefik", traefik, "k8s-"), ("caddy", caddy, "")):
            gw = Gateway(proxy, nb.echo, nb.tokens, nb.authgates, prefix)
            timed(f"{name}: allowed", count, lambda gw=gw: gw.send(both("ro")), 200)
            timed(f"{name}: denied", count, lambda gw=gw: gw.send(both("ro", SYSTEM)), 403)
            if name == "traefik":
                bare_headers = [("X-Bare", "1")]
                timed(
                    "traefik: allowed, without plugin stages",
                    count,
                    lambda gw=gw, h=bare_headers: gw.send(both("ro"), headers=h),
                    200,
                )
        timed("echo upstream alone", count, lambda: send(nb.echo.port, "/x"), 200)
    finally:
        for proxy in proxies:
            proxy.stop()
        for _ in stack:  # stops authgate and the echo
            pass
        valkey.stop()


if __name__ == "__main__":
    main()
