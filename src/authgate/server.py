"""`authgate serve`: bind the listeners, serve /metrics, and supervise uvicorn workers.

The parent process binds every socket and serves `/metrics` from the prometheus
multiprocess directory that all workers write to; each worker runs uvicorn (uvloop) on the
shared sockets, with `fasthttp` serving the data-plane connections and uvicorn's httptools
protocol the management API's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any

from . import __version__, logs, preflight
from .backend import parse_redis_url
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
RECHECK = 1.0  # seconds between start-up checks while Redis does not answer


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


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


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


def _check_when_up(settings: Settings, supervisor: Any, refused: list[ConfigError]) -> None:
    """After Redis was down at start: the same checks once it answers; stop if they fail."""
    from . import _uvicorn

    while True:
        try:
            if asyncio.run(preflight.at_start(settings)) is None:
                log.info("Redis answers now")
                return
        except ConfigError as exc:  # serve() raises it once the workers have stopped
            refused.append(exc)
            _uvicorn.stop(supervisor)
            return
        time.sleep(RECHECK)


def serve(settings: Settings, workers: int) -> None:
    listeners = [("AUTHGATE_LISTEN", settings.listen)]
    if settings.admin_listen is not None:
        if settings.admin_listen == settings.listen:
            raise ConfigError("AUTHGATE_ADMIN_LISTEN: must differ from AUTHGATE_LISTEN")
        listeners.append(("AUTHGATE_ADMIN_LISTEN", settings.admin_listen))
    if settings.metrics_listen in (settings.listen, settings.admin_listen):
        raise ConfigError("AUTHGATE_METRICS_LISTEN: must differ from the other listeners")
    if settings.grpc_listen is not None:
        others = (settings.listen, settings.admin_listen, settings.metrics_listen)
        if settings.grpc_listen in others:
            raise ConfigError("AUTHGATE_GRPC_LISTEN: must differ from the other listeners")
        # Each worker serves it; a missing extra stops start-up here, once.
        if not all(_importable(m) for m in ("grpc", "envoy.service.auth.v3.external_auth_pb2")):
            raise ConfigError(
                "AUTHGATE_GRPC_LISTEN: needs the grpc extra (pip install 'authgate[grpc]')"
            )

    down = asyncio.run(preflight.at_start(settings))  # ConfigError: not Redis, wrong pepper

    metrics_dir, created = prepare_metrics_dir(settings)
    # Must be set before prometheus_client is imported here or in any worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    from . import _uvicorn

    if (changed := _uvicorn.describe_problems()) is not None:
        raise ConfigError(changed)

    sockets = [bind(name, address) for name, address in listeners]
    from .metrics import DeadWorkers

    registry = CollectorRegistry()
    registry.register(DeadWorkers(metrics_dir))
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    host, port = settings.metrics_listen
    try:
        httpd, _thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"AUTHGATE_METRICS_LISTEN: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    config = _uvicorn.Config(
        "authgate.app:create_app",
        factory=True,
        workers=workers,
        lifespan="on",
        log_level=settings.log_level,
        log_config=logs.dict_config(settings.log_format, settings.log_level),
        **{**SERVER_OPTIONS, "http": DATA_PLANE_HTTP},
    )
    named = [*listeners]
    if settings.grpc_listen is not None:
        named.append(("AUTHGATE_GRPC_LISTEN", settings.grpc_listen))
    names = ", ".join(f"{n}={h}:{p}" for n, (h, p) in named)
    log.info(
        "authgate %s serving %s, metrics on %s:%d, %d worker(s)",
        __version__,
        names,
        host,
        port,
        workers,
    )
    supervisor = _uvicorn.supervisor(config, sockets)
    refused: list[ConfigError] = []
    if down is not None:
        log.error(
            "Redis at %s does not answer at start (%s); serving anyway: /readyz and /auth "
            "answer 503 until it does, and the pepper is checked once it answers",
            parse_redis_url(settings.redis_url).safe_url,
            down,
        )
        threading.Thread(
            target=_check_when_up, args=(settings, supervisor, refused), daemon=True
        ).start()
    try:
        supervisor.run()
        if refused:
            raise refused[0]
    finally:
        httpd.shutdown()
        for sock in sockets:
            sock.close()
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)
