"""`authgate serve`: bind the listeners, serve /metrics, and supervise uvicorn workers.

The parent process binds every socket and serves `/metrics` from the prometheus
multiprocess directory that all workers write to; each worker runs uvicorn (uvloop) on the
shared sockets, with `fasthttp` serving the data-plane connections and uvicorn's httptools
protocol the management API's.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from typing import Any

from .config import Settings
from .errors import ConfigError

log = logging.getLogger("authgate")

# How each worker serves HTTP; `scripts/bench.py` runs its hello-world baseline with these too.
SERVER_OPTIONS: dict[str, Any] = {
    "loop": "uvloop",
    "http": "httptools",
    "access_log": False,  # the proxy logs requests; authgate never logs a URI (tokens!)
    "server_header": False,
    "date_header": False,
    "timeout_keep_alive": 75,  # longer than nginx's upstream keepalive_timeout (60s)
    # The peer address stays the peer: /auth reads X-Real-IP/X-Forwarded-For itself, and only
    # from trusted proxies; the management API's allowlist applies to the peer.
    "proxy_headers": False,
    "backlog": 2048,
    # No WebSocket: nothing here speaks it, and the WebSocket implementations log a
    # handshake's headers (Authorization included) at debug level. An Upgrade request to the
    # management API is answered as plain HTTP.
    "ws": "none",
}


# The data plane is served by authgate's own HTTP/1.1 protocol, the management API by
# uvicorn's httptools protocol (`fasthttp.HttpProtocol` picks one per connection).
DATA_PLANE_HTTP = "authgate.fasthttp:HttpProtocol"


def bind(name: str, address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{name}: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def prepare_metrics_dir(settings: Settings) -> tuple[str, bool]:
    """A clean multiprocess directory; returns (path, whether we created it)."""
    if settings.metrics_dir:
        path = settings.metrics_dir
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
        return path, False
    return tempfile.mkdtemp(prefix="authgate-metrics-"), True


def serve(settings: Settings, workers: int) -> None:
    listeners = [("AUTHGATE_LISTEN", settings.listen)]
    if settings.admin_listen is not None:
        if settings.admin_listen == settings.listen:
            raise ConfigError("AUTHGATE_ADMIN_LISTEN: must differ from AUTHGATE_LISTEN")
        listeners.append(("AUTHGATE_ADMIN_LISTEN", settings.admin_listen))
    if settings.metrics_listen in (settings.listen, settings.admin_listen):
        raise ConfigError("AUTHGATE_METRICS_LISTEN: must differ from the other listeners")

    metrics_dir, created = prepare_metrics_dir(settings)
    # Must be set before prometheus_client is imported here or in any worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    import uvicorn
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server
    from uvicorn.supervisors import Multiprocess

    sockets = [bind(name, address) for name, address in listeners]
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    host, port = settings.metrics_listen
    try:
        httpd, _thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"AUTHGATE_METRICS_LISTEN: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    config = uvicorn.Config(
        "authgate.app:create_app",
        factory=True,
        workers=workers,
        lifespan="on",
        log_level=settings.log_level,
        **{**SERVER_OPTIONS, "http": DATA_PLANE_HTTP},
    )
    names = ", ".join(f"{n}={h}:{p}" for n, (h, p) in listeners)
    log.info("authgate serving %s, metrics on %s:%d, %d worker(s)", names, host, port, workers)
    try:
        Multiprocess(config, sockets=sockets).run()
    finally:
        httpd.shutdown()
        for sock in sockets:
            sock.close()
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)
