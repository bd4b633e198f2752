"""The data plane's HTTP/1.1 server: an asyncio protocol on httptools, without ASGI.

uvicorn loads `HttpProtocol` for every listener (`authgate serve` names it as the `http`
implementation). On a connection to the management API's port it hands the transport to
uvicorn's own httptools protocol and the ASGI app; on the data-plane port it hands it to
`FastProtocol`, which answers through `DataPlane.answer_now`, the same function the ASGI
entry uses. A request the cache can answer is answered inside `data_received`; only one
that needs Redis (or /readyz) becomes a task, and pipelined answers leave in request order.

Limits: request line plus headers at most `MAX_HEAD` bytes and `MAX_HEADERS` headers (431,
or 414 for the URL, then close); malformed requests get 400 and the connection is closed;
bodies are read and dropped; an idle keep-alive connection is closed after uvicorn's
`timeout_keep_alive`.
Nothing here logs a URI or a header value: they carry tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from .dataplane import DataPlane
from .paths import unescape_loosely
from .plane import MAX_HEADERS, Answer, Scope
from .wire import Headers, json_answer, safe_lines

log = logging.getLogger("authgate")

STATE_KEY = "authgate.data_plane"  # lifespan state: (DataPlane, admin port or None)
MAX_HEAD = 16 * 1024  # request line plus headers
MAX_PIPELINE = 64  # answers waiting to be written before reading pauses

_STATUS_LINES = {
    200: b"HTTP/1.1 200 OK\r\n",
    400: b"HTTP/1.1 400 Bad Request\r\n",
    401: b"HTTP/1.1 401 Unauthorized\r\n",
    403: b"HTTP/1.1 403 Forbidden\r\n",
    404: b"HTTP/1.1 404 Not Found\r\n",
    414: b"HTTP/1.1 414 URI Too Long\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
    500: b"HTTP/1.1 500 Internal Server Error\r\n",
    503: b"HTTP/1.1 503 Service Unavailable\r\n",
}
_CLOSE_END = b"\r\nConnection: close\r\n\r\n"
_KEEP_END = b"\r\nConnection: keep-alive\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _error(status: int, code: str, message: str) -> bytes:
    body = (
        b'{"error":{"code":"' + code.encode() + b'","message":"' + message.encode() + b'",'
        b'"details":{}}}'
    )
    return encode(json_answer(status, body), close=True)


class TooLarge(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def encode(
    answer: Answer, close: bool = False, keep_alive_header: bool = False, head_only: bool = False
) -> bytes:
    """The response's bytes: status line, headers (with their Content-Length), body (none
    for HEAD).
    A header with a control character (CR, LF …) is refused: it would split the response."""
    status, headers, body = answer
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
    end = _CLOSE_END if close else _KEEP_END if keep_alive_header else b"\r\n\r\n"
    if head_only:
        body = b""
    if not headers:
        return line + end[2:] + body
    if type(headers) is Headers:
        head = headers.encoded  # checked when it was made
    else:
        head = b"\r\n".join([name + b": " + value for name, value in headers])
        if not safe_lines(head, len(headers) - 1):
            raise ValueError("invalid response header")
    return line + head + end + body


_BAD_REQUEST = _error(400, "BAD_REQUEST", "The request could not be interpreted.")
_TOO_LARGE = {
    414: _error(414, "BAD_REQUEST", "The request target is too long."),
    431: _error(431, "BAD_REQUEST", "The request headers are too large."),
}
_UNAVAILABLE_ANSWER = json_answer(
    503,
    b'{"error":{"code":"UNAVAILABLE","message":"Token storage is unavailable; try again '
    b'shortly.","details":{}}}',
)


class HttpProtocol(asyncio.Protocol):
    """What uvicorn creates per connection: picks the protocol by the local port."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        found = self.app_state.get(STATE_KEY)
        sockname = transport.get_extra_info("sockname")
        port = sockname[1] if isinstance(sockname, tuple) else None
        inner: asyncio.Protocol
        if found is not None and port != found[1]:
            inner = FastProtocol(
                found[0], self.server_state, self.config.timeout_keep_alive, self.loop
            )
        else:
            inner = HttpToolsProtocol(
                config=self.config,
                server_state=self.server_state,
                app_state=self.app_state,
                _loop=self.loop,
            )
        transport.set_protocol(inner)
        inner.connection_made(transport)


class _Queued:
    """One answer not yet written: its bytes, or the task that makes it."""

    __slots__ = ("close", "data", "head_only", "keep_alive_header", "task")

    def __init__(
        self,
        data: bytes | None,
        task: asyncio.Future[Answer] | None,
        close: bool,
        keep_alive_header: bool = False,
        head_only: bool = False,
    ) -> None:
        self.data = data
        self.head_only = head_only
        self.task = task
        self.close = close
        self.keep_alive_header = keep_alive_header


class FastProtocol(asyncio.Protocol):
    """One data-plane connection: HTTP/1.1 keep-alive and pipelining, HTTP/1.0."""

    def __init__(
        self,
        plane: DataPlane,
        server_state: ServerState,
        keep_alive: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.answer_now = plane.answer_now
        self.connections: set[Any] = server_state.connections
        self.loop = loop or asyncio.get_running_loop()
        self.keep_alive = keep_alive
        self.parser = httptools.HttpRequestParser(self)
        try:  # answer the first of several pipelined requests when it says Connection: close
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # pragma: no cover - httptools < 0.6.3
            pass
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.queue: deque[_Queued] = deque()
        self.closing = False  # no further request is read; close once the queue is written
        self.in_head = False  # between a request's first byte and the end of its headers
        self.unparsed = 0  # bytes received since the last complete header block
        self.head_size = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect = False
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.read_paused = False
        self.out: list[bytes] = []  # answers to write at the end of this event-loop turn
        self.out_close = False  # close once `out` is written
        self.flush_due = False

    # -- connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self.server = (str(local[0]), int(local[1]))
        self.last_active = self.loop.time()
        self.timer = self.loop.call_later(self.keep_alive, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.out.clear()

    def eof_received(self) -> bool | None:
        # The client will send nothing more: answer what is queued, then close.
        self.closing = True
        if self._nothing_pending() and self.transport is not None:
            self.transport.close()
        return True  # keep the write side open until then

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._flow()

    def _flow(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = self.write_paused or len(self.queue) >= MAX_PIPELINE
        if pause and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()
        elif not pause and self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def shutdown(self) -> None:
        """Graceful stop: finish the answers under way, read no further request."""
        self.closing = True
        if self._nothing_pending() and self.transport is not None:
            self.transport.close()

    def _nothing_pending(self) -> bool:
        """No answer is being made or waiting to be written."""
        return not self.queue and not self.out

    def _idle_check(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        remaining = self.last_active + self.keep_alive - self.loop.time()
        if remaining <= 0 and self._nothing_pending():
            transport.close()
            return
        self.timer = self.loop.call_later(max(remaining, 1.0), self._idle_check)

    # -- reading -----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # the request was answered; no other protocol follows here
            if self._nothing_pending() and self.transport is not None:
                self.transport.close()
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, TooLarge):
                self._fail(_TOO_LARGE[cause.status])
            elif isinstance(cause, UnicodeDecodeError):
                self._fail(_BAD_REQUEST)
            else:
                log.error("unexpected %s reading a request", type(cause).__name__)
                self._fail(encode(_UNAVAILABLE_ANSWER, close=True))
            return
        except httptools.HttpParserError:
            self._fail(_BAD_REQUEST)
            return
        if self.in_head and self.unparsed > MAX_HEAD:
            self._fail(_TOO_LARGE[431])

    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.expect = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_HEAD:
            raise TooLarge(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size + len(self.url) > MAX_HEAD or len(self.headers) >= MAX_HEADERS:
            raise TooLarge(431)
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.unparsed = 0
        if (
            self.expect
            and self._nothing_pending()
            and self.transport is not None
            and self.parser.get_http_version() == "1.1"
        ):
            self.transport.write(_CONTINUE)

    def on_message_complete(self) -> None:
        self.unparsed = 0
        if self.closing:
            return
        parser = self.parser
        keep = parser.should_keep_alive()
        keep_header = keep and parser.get_http_version() == "1.0"
        url = self.url
        if url[:1] == b"/" and b"#" not in url:
            raw_path, _, query = url.partition(b"?")
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._fail(_BAD_REQUEST)
                return
            raw_path, query = parsed.path or b"", parsed.query or b""
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            self._fail(_BAD_REQUEST)
            return
        if "%" in path and not path.startswith("/ext-authz/"):  # that one reads raw_path
            path = unescape_loosely(path)  # in C: a long path costs no Python step per escape
        method = parser.get_method().decode("ascii")
        head_only = method == "HEAD"
        scope: Scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "client": self.client,
            "server": self.server,
        }
        self.last_active = self.loop.time()
        if not keep:
            self.closing = True
        try:
            answer = self.answer_now(scope)
        except Exception as exc:
            log.error("unexpected %s while answering; answering UNAVAILABLE", type(exc).__name__)
            answer = _UNAVAILABLE_ANSWER
        if isinstance(answer, tuple):
            data = self._encode(answer, not keep, keep_header, head_only)
            if not self.queue:
                self._write(data, not keep)
                return
            self.queue.append(_Queued(data, None, not keep))
        else:
            task = self.loop.create_task(answer)
            self.queue.append(_Queued(None, task, not keep, keep_header, head_only))
            task.add_done_callback(self._written)
        if len(self.queue) >= MAX_PIPELINE:
            self._flow()

    # -- writing -----------------------------------------------------------------------------
    @staticmethod
    def _encode(
        answer: Answer, close: bool, keep_alive_header: bool = False, head_only: bool = False
    ) -> bytes:
        try:
            return encode(answer, close, keep_alive_header, head_only)
        except Exception as exc:
            log.error("unexpected %s while writing; answering UNAVAILABLE", type(exc).__name__)
            return encode(_UNAVAILABLE_ANSWER, close)

    def _write(self, data: bytes, close: bool) -> None:
        """Queue `data` for the end of this event-loop turn. The answers of every request
        read in one turn then leave together: pipelined answers share a send, and the
        client is woken once per turn rather than once per answer."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.out_close:
            return
        self.out.append(data)
        if close:
            self.queue.clear()
            self.out_close = True
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_due = False
        transport = self.transport
        out = self.out
        if transport is None or transport.is_closing() or not out:
            out.clear()
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self.out_close or (self.closing and not self.queue):
            transport.close()  # a graceful stop or the client's EOF waited for this one

    def _fail(self, data: bytes) -> None:
        """Answer a request that cannot be served with `data` (which closes), after what is
        queued, and read nothing more."""
        self.closing = True
        if not self.queue:
            self._write(data, True)
        else:
            self.queue.append(_Queued(data, None, True))

    def _written(self, _task: asyncio.Future[Answer] | None = None) -> None:
        """Write every answer at the head of the queue that is ready, in order."""
        queue = self.queue
        while queue:
            head = queue[0]
            data = head.data
            if data is None:
                task = head.task
                assert task is not None
                if not task.done():
                    break
                try:
                    answer = task.result()
                except BaseException as exc:
                    log.error("unexpected %s while deciding", type(exc).__name__)
                    answer = _UNAVAILABLE_ANSWER
                data = self._encode(answer, head.close, head.keep_alive_header, head.head_only)
            queue.popleft()
            self._write(data, head.close)
            if head.close:
                return
        self.last_active = self.loop.time()
        if self.read_paused:
            self._flow()
