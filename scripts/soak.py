"""Soak: bounded load with token churn against a real authgate and Valkey on loopback.

    make soak                      # ten minutes
    SOAK_SECONDS=120 make soak     # shorter
    SOAK_RATE=1500 SOAK_WORKERS=2  # requests per second in all, authgate worker processes
    SOAK_APPENDFSYNC=everysec      # Valkey's AOF fsync policy (always: fsync every write)
    SOAK_VALKEY_NICE=-10           # Valkey's CPU priority when run as root (0: as is)

While a steady load asks about live, rotated, revoked, deleted and unknown tokens, a churn
loop creates a token four times a second, rotates or revokes the oldest live ones and deletes
retired ones. Every answer is judged: an allow for a revoked, expired or deleted token more
than 100 ms after the change is a wrong decision, and so is any 503: no fault is injected,
Redis is healthy throughout, so UNAVAILABLE would be a false outage (the fault suites in
tests/test_reliability_*.py are where a 503 can be right). RSS and open file descriptors of
the authgate processes are sampled; after a warm-up, RSS must grow by less than 5 % and the
descriptors other than Redis connections must not grow (those are pooled, at most
LOOKUP_CONNECTIONS per worker for lookups). The summary also shows
authgate_lookup_unavailable_total by reason and Valkey's own longest stalls (its latency
monitor), so a 503 can be traced to its cause. Prints a table and a summary, writes
soak-results.json, and exits 1 if any check fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster_harness import (  # noqa: E402
    Load,
    Probe,
    metric,
    open_fds,
    proc_children,
    rss_kib,
    start_node,
    unknown_token,
)
from tests.conftest import base_env, start_authgate  # noqa: E402

from authgate.backend import LOOKUP_CONNECTIONS  # noqa: E402
from authgate.config import load_settings  # noqa: E402
from authgate.errors import UNAVAILABLE_REASONS  # noqa: E402
from authgate.store import TokenStore  # noqa: E402

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
RATE = float(os.environ.get("SOAK_RATE", "1500"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "2"))
# As the shipped Valkey (deploy/k8s/overlays/example/redis): an append-only file, fsynced
# every second by a background thread. With `always`, Valkey fsyncs before it answers, and
# on a disk shared with other work that alone stops it answering for hundreds of ms (see
# its latency monitor in the summary), which authgate rightly takes for an outage.
APPENDFSYNC = os.environ.get("SOAK_APPENDFSYNC", "everysec")
# The soak's Valkey stands for a Redis on a host of its own. On a machine shared with other
# work it waits for CPU behind everything else, for hundreds of ms at a time when the
# machine is overloaded, and a Redis that does not answer for AUTHGATE_REDIS_TIMEOUT is
# unavailable to authgate. So it runs first (a lower nice value, when allowed), and a probe
# at the same priority pings it every PROBE_EVERY seconds: its slowest PONG is in the
# summary, next to Valkey's own latency monitor.
VALKEY_NICE = int(os.environ.get("SOAK_VALKEY_NICE", "-10"))
PROBE_EVERY = 0.02
SAMPLE_EVERY = min(20.0, max(2.0, SECONDS / 30))
WARMUP = min(120.0, max(10.0, SECONDS * 0.2))
LIVE = 60  # tokens in use at any time
GRACE = 2.0  # rotation grace period
RETIRE_AFTER = 8.0  # seconds a rotated or revoked token is still asked about, then deleted
MAX_RSS_GROWTH = 0.05
STALL_MS = 50  # Valkey's latency monitor records its own stalls longer than this
SOAK_CLIENT = "soak"  # the name this script's Redis connections carry (CLIENT LIST)


@dataclass
class Token:
    probe: Probe
    token_id: str
    state: str = "live"  # live | rotated | revoked | deleted
    since: float = 0.0  # when the state began
    grace_end: float = 0.0


@dataclass
class Churn:
    store: TokenStore
    load: Load
    tokens: dict[str, Token] = field(default_factory=dict)  # by probe name
    made: int = 0
    rotated: int = 0
    revoked: int = 0
    deleted: int = 0
    errors: int = 0

    async def create(self) -> Token:
        token, view = await self.store.create(
            {"name": "soak", "org": "acme", "project": "tunes", "key_type": "rw-"}, "soak"
        )
        self.made += 1
        item = Token(Probe(f"t{self.made}", token), view["id"])
        self.tokens[item.probe.name] = item
        self.load.probes.append(item.probe)
        return item

    async def step(self, rng: random.Random) -> None:
        """Create a token; retire the oldest live ones beyond LIVE (a rotation's new token
        is live again, so the live set stays at LIVE plus about two)."""
        await self.create()
        live = [t for t in self.tokens.values() if t.state == "live"]
        for oldest in live[: max(0, len(live) - LIVE)]:
            if rng.random() < 0.5:
                token, view = await self.store.rotate(oldest.token_id, GRACE, "soak")
                self.made += 1
                fresh = Token(Probe(f"t{self.made}", token), view["id"])
                self.tokens[fresh.probe.name] = fresh
                self.load.probes.append(fresh.probe)
                oldest.state, oldest.grace_end = "rotated", time.monotonic() + GRACE
                self.rotated += 1
            else:
                await self.store.revoke(oldest.token_id, "soak")
                oldest.state = "revoked"
                self.revoked += 1
            oldest.since = time.monotonic()
        now = time.monotonic()
        for item in list(self.tokens.values()):
            if item.state in ("rotated", "revoked") and now - item.since > RETIRE_AFTER:
                await self.store.delete(item.token_id, "soak")
                item.state, item.since = "deleted", time.monotonic()
                self.deleted += 1
            elif item.state == "deleted" and now - item.since > RETIRE_AFTER:
                self.load.probes.remove(item.probe)
                del self.tokens[item.probe.name]

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(7)  # noqa: S311 - which token to rotate, not a secret
        while not stop.is_set():
            try:
                await self.step(rng)
            except Exception as exc:  # report, keep soaking
                self.errors += 1
                print(f"churn error: {type(exc).__name__}: {exc}", file=sys.stderr)
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except TimeoutError:
                pass

    def judge(self, probe: Probe, status: int, sent: float) -> bool:
        """True when the answer is a wrong decision (or a client-visible error). Redis is
        healthy for the whole run, so a 503 UNAVAILABLE is always wrong."""
        if status == 0 or status >= 500:
            return True
        if probe.name.startswith("unknown"):
            return status == 200
        item = self.tokens.get(probe.name)
        if item is None:  # retired while the request was in flight
            return status == 200
        if item.state == "live":
            return status != 200
        changed = item.grace_end if item.state == "rotated" else item.since
        return status == 200 and sent > changed + 0.1


def authgate_pids(parent: int) -> list[int]:
    return [parent, *proc_children(parent)]


async def authgate_connections(client: Any) -> int:
    """Connections Valkey has from authgate (every one not named by this script)."""
    clients = await client.client_list()
    return sum(1 for c in clients if c.get("name") != SOAK_CLIENT)


# Pings 127.0.0.1:<port> until SIGTERM, then prints its slowest round trip in ms.
PROBE = """
import signal, socket, sys, time
port, every = int(sys.argv[1]), float(sys.argv[2])
worst = 0.0
def done(*_):
    print(round(worst * 1000)); sys.exit(0)
signal.signal(signal.SIGTERM, done)
sock = socket.create_connection(("127.0.0.1", port))
while True:
    started = time.monotonic()
    sock.sendall(b"PING\\r\\n")
    if not sock.recv(64).startswith(b"+PONG"):
        sys.exit("valkey probe: unexpected answer")
    worst = max(worst, time.monotonic() - started)
    time.sleep(every)
"""


def steal_ms() -> int:
    """CPU time the hypervisor took from this machine's vCPUs so far (/proc/stat), in ms:
    while it does, whatever ran there (Valkey too) is frozen."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) * 1000 // os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0


def first_in_line(pid: int) -> bool:
    """Give `pid` the CPU before other work (VALKEY_NICE), when this user may."""
    if not VALKEY_NICE or os.geteuid() != 0:
        return False
    os.setpriority(os.PRIO_PROCESS, pid, VALKEY_NICE)
    return True


def sample(pids: list[int]) -> tuple[list[int], int]:
    """RSS (KiB) of each process, and their open descriptors in all."""
    rss, fds = [], 0
    for pid in pids:
        try:
            rss.append(rss_kib(pid))
            fds += open_fds(pid)
        except FileNotFoundError:
            rss.append(0)
    return rss, fds


async def soak() -> int:
    node = start_node("--appendfsync", APPENDFSYNC, "--latency-monitor-threshold", str(STALL_MS))
    assert node.proc is not None
    reniced = first_in_line(node.proc.pid)
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(node.port), str(PROBE_EVERY)],
        stdout=subprocess.PIPE,
        text=True,
    )
    first_in_line(probe.pid)
    env = base_env(
        node.url,
        AUTHGATE_WORKERS=str(WORKERS),
        AUTHGATE_USAGE_FLUSH_INTERVAL="1s",
    )
    ag = start_authgate(env, workers=WORKERS)
    settings = load_settings(env)
    client = Redis.from_url(
        settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, client_name=SOAK_CLIENT
    )
    store = TokenStore(client, settings)
    unknown = [Probe(f"unknown{i}", unknown_token()) for i in range(50)]
    load = Load(ag.port, [*unknown], concurrency=16, rate=RATE, keep=False)
    churn = Churn(store, load)
    load.judge = churn.judge
    stop = asyncio.Event()
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(LIVE):
            await churn.create()
        load.probes.append(Probe("unknown-fresh", "", fresh=True))
        tasks = [
            asyncio.ensure_future(load.run_until(stop)),
            asyncio.ensure_future(churn.run(stop)),
        ]
        started = time.monotonic()
        last_total, last_at, last_steal = 0, started, steal_ms()
        print(f"soak: {SECONDS:.0f} s at {RATE:.0f} req/s, {WORKERS} worker(s), ", end="")
        print(f"Valkey appendfsync {APPENDFSYNC}, nice {VALKEY_NICE if reniced else 0}, ", end="")
        print(f"warm-up {WARMUP:.0f} s")
        print(
            f"{'t (s)':>7} {'req/s':>7} {'RSS MiB':>8} {'fds':>5} {'redis':>5} "
            f"{'valkey MiB':>10} {'steal ms':>8} {'wrong':>5}"
        )
        while time.monotonic() - started < SECONDS:
            await asyncio.sleep(SAMPLE_EVERY)
            now = time.monotonic()
            each, fds = sample(authgate_pids(ag.proc.pid))
            rss = sum(each)
            info = await client.info("memory")
            redis_conns = await authgate_connections(client)
            stolen, last_steal = steal_ms() - last_steal, steal_ms()
            row = {
                "t": round(now - started, 1),
                "rps": round((load.total - last_total) / (now - last_at)),
                "rss_kib": rss,
                "rss_kib_each": each,
                "fds": fds,
                "redis_connections": redis_conns,
                "valkey_kib": int(info["used_memory"]) // 1024,
                "steal_ms": stolen,
                "wrong": load.wrong_count,
            }
            last_total, last_at = load.total, now
            rows.append(row)
            print(
                f"{row['t']:>7.0f} {row['rps']:>7} {rss / 1024:>8.1f} {fds:>5} {redis_conns:>5} "
                f"{row['valkey_kib'] / 1024:>10.1f} {stolen:>8} {row['wrong']:>5}",
                flush=True,
            )
        stop.set()
        await asyncio.gather(*tasks)
        stalls = {
            event.decode(): int(worst)
            for event, _at, _latest, worst, *_ in await client.execute_command("LATENCY", "LATEST")
        }
        name = "authgate_lookup_unavailable_total"
        reasons = {r: metric(ag.metrics_url, f'{name}{{reason="{r}"') for r in UNAVAILABLE_REASONS}
        flushes = metric(ag.metrics_url, 'authgate_invalidations_total{kind="flush"')
    finally:
        stop.set()
        await client.aclose()
        ag.stop()
        probe.terminate()
        pong_ms = int(probe.communicate(timeout=10)[0].strip() or -1)
        node.stop()

    steady = [r for r in rows if r["t"] >= WARMUP] or rows[-1:]
    head = steady[: max(1, len(steady) // 5)]
    tail = steady[-max(1, len(steady) // 5) :]
    rss_start = statistics.median(r["rss_kib"] for r in head)
    rss_end = statistics.median(r["rss_kib"] for r in tail)
    growth = (rss_end - rss_start) / rss_start
    # Connection pools grow to the load's peak concurrency and stay there; a leak keeps
    # growing. So: no more descriptors in the second half of the steady state than in the first.
    # Redis connections are pooled (bounded), so they are checked against their bound.
    half = len(steady) // 2 or 1
    fds_start = max(r["fds"] - r["redis_connections"] for r in steady[:half])
    fds_end = max(r["fds"] - r["redis_connections"] for r in steady[half:] or steady)
    redis_most = max(r["redis_connections"] for r in rows)
    redis_bound = WORKERS * (LOOKUP_CONNECTIONS + 4)  # + the subscriber, usage, readiness
    log = ag.log()
    leaked = sum(1 for t in churn.tokens.values() if t.probe.token in log)
    checks = {
        f"RSS growth after warm-up {growth * 100:+.2f} % (< {MAX_RSS_GROWTH * 100:.0f} %)": (
            growth < MAX_RSS_GROWTH
        ),
        f"open fds but Redis connections, most in each half after warm-up: "
        f"{fds_start} -> {fds_end} (no growth)": fds_end <= fds_start,
        f"Redis connections at most {redis_most} (<= {redis_bound})": redis_most <= redis_bound,
        f"503 answers: {load.statuses.get(503, 0)}": load.statuses.get(503, 0) == 0,
        f"wrong decisions or errors: {load.wrong_count}": load.wrong_count == 0,
        f"connect errors: {load.connect_errors}": load.connect_errors == 0,
        f"churn errors: {churn.errors}": churn.errors == 0,
        f"token values in the authgate log: {leaked}": leaked == 0 and "Traceback" not in log,
    }
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(load.statuses.items()))
    print(
        f"\n{load.total} answers ({statuses}); tokens created {churn.made}, rotated "
        f"{churn.rotated}, revoked {churn.revoked}, deleted {churn.deleted}"
    )
    print(f"RSS (authgate, all processes) {rss_start / 1024:.1f} MiB -> {rss_end / 1024:.1f} MiB")
    counted = ", ".join(f"{r} {n:.0f}" for r, n in reasons.items())
    print(f"lookups ended in UNAVAILABLE by reason: {counted}; cache flushes {flushes:.0f}")
    worst = ", ".join(f"{e} {ms} ms" for e, ms in sorted(stalls.items())) or f"none > {STALL_MS} ms"
    print(f"Valkey's own longest stalls (latency monitor): {worst}; slowest PONG {pong_ms} ms")
    for text, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
    if load.wrong:
        print(f"  first wrong answers: {load.wrong[:5]}")
    (ROOT / "soak-results.json").write_text(
        json.dumps(
            {
                "seconds": SECONDS,
                "rate": RATE,
                "workers": WORKERS,
                "appendfsync": APPENDFSYNC,
                "samples": rows,
                "rss_growth": growth,
                "checks": {k: v for k, v in checks.items()},
                "statuses": load.statuses,
                "unavailable_by_reason": reasons,
                "valkey_stalls_ms": stalls,
                "valkey_slowest_pong_ms": pong_ms,
                "valkey_nice": VALKEY_NICE if reniced else 0,
            },
            indent=2,
        )
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    # The servers' logs and Valkey's directory live here, and go when the run ends.
    work = tempfile.mkdtemp(prefix="authgate-soak-")
    os.environ["TMPDIR"] = tempfile.tempdir = work
    try:
        code = asyncio.run(soak())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(code)
