"""A small HTTP/1.1 upstream that reports what it received.

Every request is recorded (`EchoUpstream.received`) and, on most paths, answered with
a JSON echo: `{"method", "target", "version", "headers": [[name, value], ...],
"body_length"}`,
`target` being the request target exactly as it arrived.

`/minimal/rest/apps/v1/view` is different: it plays a shared app that answers like a
careless real one would, naming its app id and its own address in headers, so the
tests can show nginx keeps them from public consumers. `app_mode` picks the answer:
`page` (200), `redirect` (302 to its absolute internal URL), `redirect_relative`,
`not_found` (404), `forbidden` (403) or `error` (500), the error bodies naming app and host.

Run alone: `python tests/echo_upstream.py --port 8090`.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

APP_PAGE = "/minimal/rest/apps/v1/view"
APP_MODES = ("page", "redirect", "redirect_relative", "not_found", "forbidden", "error")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: with Nagle on, a proxy's kept-alive connection
    # waits for a delayed ACK (40 ms) before the body arrives.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read `received`

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record = {
            "method": self.command,
            "target": self.path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_length": len(body),
        }
        self.server.owner.record(record)
        if urlsplit(self.path).path == APP_PAGE:
            self._app(record)
        else:
            self._send(200, json.dumps(record).encode(), [("Content-Type", "application/json")])

    def _app(self, record: dict[str, Any]) -> None:
        app_id = parse_qs(urlsplit(self.path).query).get("app_id", [""])[0]
        here = f"http://{self.server.owner.address}"
        internal = f"{here}{APP_PAGE}?app_id={app_id}"
        leaky = [
            ("Content-Location", internal),
            ("Link", f"<{internal}>; rel=canonical"),
            ("Set-Cookie", f"app={app_id}; Path=/minimal/rest/apps/v1"),
            ("X-Powered-By", f"shared-app {app_id}"),
        ]
        mode = self.server.owner.app_mode
        if mode == "page":
            page = {"page": "view", "widgets": 3}
            self._send(
                200, json.dumps(page).encode(), [("Content-Type", "application/json"), *leaky]
            )
        elif mode in ("redirect", "redirect_relative"):
            target = (
                internal + "&tab=2" if mode == "redirect" else f"{APP_PAGE}?app_id={app_id}&tab=2"
            )
            headers = [("Location", target), ("Refresh", f"0; url={target}")]
            self._send(302, b"", headers + leaky)
        else:
            status = {"not_found": 404, "forbidden": 403, "error": 500}[mode]
            text = f"<h1>{status}</h1><p>app {app_id} at {internal} failed</p>"
            self._send(status, text.encode(), [("Content-Type", "text/html"), *leaky])

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: EchoUpstream


class EchoUpstream:
    """The echo server on a loopback port (0: a free one), served from a thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self._lock = threading.Lock()
        self._received: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._thread: threading.Thread | None = None
        self.app_mode = "page"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._received.append(entry)

    @property
    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._received)

    def clear(self) -> None:
        with self._lock:
            self._received.clear()

    def start(self) -> EchoUpstream:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--app-mode", choices=APP_MODES, default="page")
    args = parser.parse_args()
    echo = EchoUpstream(args.port, args.host)
    echo.app_mode = args.app_mode

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"echo upstream on http://{echo.address}", flush=True)
    try:
        echo.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        echo._server.server_close()


if __name__ == "__main__":
    main()
