"""The data plane's HTTP/1.1 server (`authgate.fasthttp`) over real sockets.

Against a real `authgate serve`: keep-alive, HTTP/1.0, pipelining in order (cache hits,
misses and Redis reads mixed), bodies, `Expect: 100-continue`, malformed and oversized
requests, slow and vanishing clients, many connections, flow control, graceful stop. The
idle timeout and the protocol's own failure path are checked on an in-process server.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from authgate import tokens
from authgate._uvicorn import ServerState
from authgate.app import Runtime
from authgate.backend import connect
from authgate.config import load_settings
from authgate.fasthttp import MAX_HEAD, FastProtocol, encode
from authgate.store import TokenStore
from authgate.wire import Headers
from tests.conftest import AuthgateProcess, Valkey, base_env, start_authgate
from tests.inproc import auth_scope

GET = "X-Original-Method: GET\r\n"  # the method judged, whatever the request line says
SPEC = {"name": "fast", "org": "acme", "project": "tunes", "key_type": "r--"}


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


class Conn:
    """A raw HTTP/1.1 client connection that reads responses one by one."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read(self, head_only: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed before a response")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
        resp = Response(status, headers, b"")
        if status == 100:
            return resp
        length = resp.header("content-length")
        assert length is not None, "every response carries Content-Length"
        assert resp.header("transfer-encoding") is None
        if head_only:
            return resp
        while len(self.buf) < int(length):
            if not self._fill():
                raise EOFError("connection closed inside a body")
        resp.body, self.buf = self.buf[: int(length)], self.buf[int(length) :]
        return resp

    def closed(self) -> bool:
        """Whether the server closed the connection (EOF once the buffer is read)."""
        try:
            return not self._fill() and not self.buf
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def mint(url: str, **spec: Any) -> str:
    async def go() -> str:
        settings = load_settings({"AUTHGATE_REDIS_URL": url, "AUTHGATE_PEPPER": _pepper()})
        client = connect(settings.redis_url, 2.0)
        try:
            token, _ = await TokenStore(client, settings).create({**SPEC, **spec}, "test")
        finally:
            await client.aclose()
        return token

    return asyncio.run(go())


def _pepper() -> str:
    from tests.conftest import PEPPER

    return PEPPER


def ask(token: str | None, uri: str, *, version: str = "1.1", extra: str = "") -> bytes:
    """An nginx-style /auth request."""
    lines = [f"GET /auth HTTP/{version}", "Host: authgate", f"X-Original-URI: {uri}"]
    if token is not None:
        lines.append(f"X-Power-Token: {token}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def unknown_token() -> str:
    """Well formed (checksum and all) but never issued: a Redis read on first sight."""
    return tokens.generate("min_")


@pytest.fixture(scope="module")
def server(valkey: Valkey) -> Iterator[AuthgateProcess]:
    """`authgate serve` (one worker) shared by this module."""
    ag = start_authgate(base_env(valkey.url))
    ag.extra["token"] = mint(valkey.url)
    yield ag
    ag.stop()


@pytest.fixture
def token(server: AuthgateProcess) -> str:
    value = server.extra["token"]
    assert isinstance(value, str)
    return value


def warm(port: int, token: str) -> None:
    conn = Conn(port)
    conn.send(ask(token, f"/x?pwt={token}"))
    assert conn.read().status == 200
    conn.close()


# -- keep-alive and HTTP/1.0 ---------------------------------------------------------------------
def test_http11_keeps_the_connection_open(server: AuthgateProcess, token: str) -> None:
    """HTTP/1.1 requests share one connection; the allowed answer is 200 with
    Content-Length: 0 and no Server or Date header."""
    conn = Conn(server.port)
    for i in range(5):
        conn.send(ask(token, f"/x/{i}?pwt={token}"))
        resp = conn.read()
        assert resp.status == 200
        assert resp.header("content-length") == "0"
        assert resp.header("x-authgate-uri") == f"/x/{i}"
        assert resp.header("server") is None and resp.header("date") is None
        assert resp.header("connection") is None
    conn.close()


def test_http10_closes_unless_keep_alive(server: AuthgateProcess, token: str) -> None:
    """HTTP/1.0 gets its answer and the connection closes; with Connection: keep-alive it
    stays open and the answer says so."""
    conn = Conn(server.port)
    conn.send(ask(token, f"/x?pwt={token}", version="1.0"))
    assert conn.read().status == 200
    assert conn.closed()
    conn.close()
    conn = Conn(server.port)
    for _ in range(2):
        conn.send(ask(token, f"/x?pwt={token}", version="1.0", extra="Connection: keep-alive\r\n"))
        resp = conn.read()
        assert resp.status == 200
        assert resp.header("connection") == "keep-alive"
    conn.close()


def test_connection_close_is_honoured(server: AuthgateProcess, token: str) -> None:
    """`Connection: close` is answered with `connection: close` and the connection ends;
    a request pipelined after it is not answered."""
    conn = Conn(server.port)
    conn.send(ask(token, f"/x?pwt={token}", extra="Connection: close\r\n") + ask(None, "/y"))
    resp = conn.read()
    assert resp.status == 200 and resp.header("connection") == "close"
    assert conn.closed()
    conn.close()


def test_requests_then_half_close_are_all_answered(
    valkey: Valkey, server: AuthgateProcess, token: str
) -> None:
    """A client that sends its requests and shuts its side at once (EOF with the data)
    still gets every answer, cache hits and a Redis read alike, then the close."""
    warm(server.port, token)
    fresh = mint(valkey.url, name="half-close")
    for middle in (token, fresh):  # all answered from the cache; one waiting for Redis
        conn = Conn(server.port)
        conn.send(
            ask(token, f"/h/1?pwt={token}")
            + ask(middle, f"/h/2?pwt={middle}")
            + ask(None, "/h/3")
            + ask(token, f"/h/4?pwt={token}")
        )
        conn.sock.shutdown(socket.SHUT_WR)
        answers = [conn.read() for _ in range(4)]
        assert [a.status for a in answers] == [200, 200, 401, 200]
        assert [a.header("x-authgate-uri") for a in answers] == ["/h/1", "/h/2", None, "/h/4"]
        assert conn.closed()
        conn.close()


def test_upgrade_request_is_answered_then_closed(server: AuthgateProcess, token: str) -> None:
    """A request asking to switch protocols (WebSocket) is answered as plain HTTP, and the
    connection then ends: nothing after it is read as HTTP."""
    warm(server.port, token)
    conn = Conn(server.port)
    conn.send(
        ask(token, f"/u?pwt={token}", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n")
        + b"\x81\x05hello"
    )
    resp = conn.read()
    assert resp.status == 200 and resp.header("x-authgate-uri") == "/u"
    assert conn.closed()
    conn.close()


# -- pipelining ----------------------------------------------------------------------------------
def test_pipelined_answers_keep_request_order(valkey: Valkey, server: AuthgateProcess) -> None:
    """Pipelined requests mixing cache hits, denials, never-seen tokens (Redis reads) and a
    token's first use are answered in the order they were sent."""
    hit = server.extra["token"]
    assert isinstance(hit, str)
    warm(server.port, hit)
    fresh = [mint(valkey.url, name=f"p{i}") for i in range(3)]
    plan: list[tuple[bytes, int, str | None]] = []
    for i in range(30):
        uri = f"/p/{i}"
        kind = i % 5
        if kind == 0:
            plan.append((ask(hit, f"{uri}?pwt={hit}"), 200, uri))
        elif kind == 1:
            plan.append((ask(None, uri), 401, None))
        elif kind == 2:
            bad = unknown_token()
            plan.append((ask(bad, f"{uri}?pwt={bad}"), 401, None))
        elif kind == 3 and fresh:
            tok = fresh.pop()
            plan.append((ask(tok, f"{uri}?pwt={tok}"), 200, uri))
        else:
            plan.append((b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 200, "health"))
    conn = Conn(server.port)
    conn.send(b"".join(p[0] for p in plan))
    for _, status, mark in plan:
        resp = conn.read()
        assert resp.status == status
        if mark == "health":
            assert resp.body == b'{"status":"ok"}'
        elif mark is not None:
            assert resp.header("x-authgate-uri") == mark
    conn.close()


def test_many_pipelined_requests_unread_do_not_deadlock(
    server: AuthgateProcess, token: str
) -> None:
    """Thousands of pipelined requests sent before any answer is read (reading pauses while
    answers pile up) are all answered, in order."""
    n = 3000
    conn = Conn(server.port, timeout=30)
    payload = b"".join(ask(token, f"/f/{i}?pwt={token}") for i in range(n))
    sender = threading.Thread(target=conn.send, args=(payload,))
    sender.start()
    time.sleep(0.5)  # let both directions' buffers fill
    for i in range(n):
        resp = conn.read()
        assert resp.status == 200 and resp.header("x-authgate-uri") == f"/f/{i}"
    sender.join(10)
    conn.close()


# -- bodies and Expect -----------------------------------------------------------------------------
def test_request_bodies_are_read_and_dropped(server: AuthgateProcess, token: str) -> None:
    """A Content-Length body and a chunked body are consumed; the next request on the same
    connection is answered normally."""
    conn = Conn(server.port)
    body = b"x" * 5000
    conn.send(
        ask(token, f"/b/1?pwt={token}", extra=f"Content-Length: {len(body)}\r\n{GET}").replace(
            b"GET", b"POST", 1
        )
        + body
    )
    assert conn.read().header("x-authgate-uri") == "/b/1"
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    conn.send(
        ask(token, f"/b/2?pwt={token}", extra="Transfer-Encoding: chunked\r\n" + GET).replace(
            b"GET", b"POST", 1
        )
        + chunked
    )
    assert conn.read().header("x-authgate-uri") == "/b/2"
    conn.send(ask(token, f"/b/3?pwt={token}"))
    assert conn.read().header("x-authgate-uri") == "/b/3"
    conn.close()


def test_expect_100_continue(server: AuthgateProcess, token: str) -> None:
    """`Expect: 100-continue` gets `100 Continue`; the body then sent is dropped and the
    request answered."""
    conn = Conn(server.port)
    conn.send(
        ask(
            token, f"/e?pwt={token}", extra="Content-Length: 4\r\nExpect: 100-continue\r\n" + GET
        ).replace(b"GET", b"PUT", 1)
    )
    assert conn.read().status == 100
    conn.send(b"data")
    resp = conn.read()
    assert resp.status == 200 and resp.header("x-authgate-uri") == "/e"
    conn.close()


# -- malformed and oversized ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /auth HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /auth HTTP/1.1\r\nX-A: \x01\x02\r\n\r\n",
        b"GET /auth HTTP/9.9\r\n\r\n",
        b"GET /auth HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET /auth HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ],
    ids=[
        "garbage",
        "no-colon",
        "control",
        "version",
        "two-lengths",
        "bad-chunk",
        "non-ascii",
        "tls",
    ],
)
def test_malformed_request_gets_400_and_close(
    server: AuthgateProcess, token: str, raw: bytes
) -> None:
    """A request that is not HTTP/1.x is answered 400 (JSON, Content-Length) and the
    connection closes; the server keeps serving."""
    conn = Conn(server.port)
    conn.send(raw)
    resp = conn.read()
    assert resp.status == 400
    assert resp.header("connection") == "close"
    assert b'"BAD_REQUEST"' in resp.body
    assert b"Traceback" not in resp.body
    assert conn.closed()
    conn.close()
    warm(server.port, token)


def test_oversized_headers_get_431_and_close(server: AuthgateProcess, token: str) -> None:
    """Headers beyond the cap (many of them, or one without an end) get 431 and close."""
    many = "".join(f"X-Filler-{i}: {'v' * 100}\r\n" for i in range(MAX_HEAD // 100))
    conn = Conn(server.port)
    conn.send(ask(token, "/h", extra=many))
    assert conn.read().status == 431
    assert conn.closed()
    conn.close()
    conn = Conn(server.port)
    conn.send(b"GET /auth HTTP/1.1\r\nX-Endless: " + b"a" * (MAX_HEAD + 4096))
    assert conn.read().status == 431
    assert conn.closed()
    conn.close()
    warm(server.port, token)


def test_oversized_url_gets_414_and_close(server: AuthgateProcess, token: str) -> None:
    """A request target beyond the cap gets 414 and close."""
    conn = Conn(server.port)
    conn.send(b"GET /auth?" + b"q" * (MAX_HEAD + 10) + b" HTTP/1.1\r\n\r\n")
    assert conn.read().status == 414
    assert conn.closed()
    conn.close()


def test_header_just_under_the_cap_is_decided(server: AuthgateProcess) -> None:
    """A long (but not oversized) header value still reaches the decision: an nginx
    BAD_REQUEST answer, folded, with Content-Length 0."""
    conn = Conn(server.port)
    conn.send(ask("x" * 9000, "/a"))
    resp = conn.read()
    assert resp.header("x-authgate-status") == "400"
    assert resp.header("content-length") == "0"
    conn.close()


# -- nginx-dialect answers -------------------------------------------------------------------------
def test_every_answer_has_an_explicit_length(server: AuthgateProcess, token: str) -> None:
    """nginx-dialect answers (allowed, denied, unknown token) carry Content-Length: 0; the
    JSON ones (direct /auth, /healthz, /readyz, 404) carry their body's length."""
    conn = Conn(server.port)
    for raw in (ask(token, f"/x?pwt={token}"), ask(None, "/x"), ask(unknown_token(), "/x")):
        conn.send(raw)
        resp = conn.read()
        assert resp.header("content-length") == "0" and resp.body == b""
    for path in ("/auth", "/healthz", "/readyz", "/nope"):
        conn.send(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        resp = conn.read()
        assert int(resp.header("content-length") or -1) == len(resp.body) > 0
        assert resp.header("content-type") == "application/json"
    conn.close()


def test_head_gets_headers_only(server: AuthgateProcess, token: str) -> None:
    """HEAD is answered with the GET's headers (Content-Length included) and no body, so the
    next answer on the connection is read correctly."""
    conn = Conn(server.port)
    for path in ("/healthz", "/readyz", "/auth"):
        conn.send(f"HEAD {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        resp = conn.read(head_only=True)
        assert int(resp.header("content-length") or 0) > 0
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    resp = conn.read()
    assert resp.status == 200 and resp.body == b'{"status":"ok"}'
    conn.close()


# -- slow, vanishing and many clients -------------------------------------------------------------
def test_slow_client_does_not_stall_others(server: AuthgateProcess, token: str) -> None:
    """A client that sends half a request and waits does not delay other connections."""
    slow = Conn(server.port)
    slow.send(b"GET /auth HTTP/1.1\r\nX-Original-URI: /s\r\nX-Power-To")
    conn = Conn(server.port)
    started = time.monotonic()
    for _ in range(50):
        conn.send(ask(token, f"/x?pwt={token}"))
        assert conn.read().status == 200
    assert time.monotonic() - started < 5
    slow.send(f"ken: {token}\r\n\r\n".encode())
    assert slow.read().header("x-authgate-status") == "401"  # header only: the query lacks it
    slow.close()
    conn.close()


def test_client_disconnect_mid_request(server: AuthgateProcess, token: str) -> None:
    """Clients that vanish halfway through a request, or before a Redis-backed answer is
    written, leave the server serving and log no error."""
    for _ in range(20):
        conn = Conn(server.port)
        conn.send(b"GET /auth HTTP/1.1\r\nX-Original-URI: /d\r\n")
        conn.close()
        conn = Conn(server.port)
        bad = unknown_token()
        conn.send(ask(bad, f"/d?pwt={bad}") * 3)
        conn.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        conn.close()  # a reset, not a polite close
    warm(server.port, token)
    time.sleep(0.2)
    log = server.log()
    assert "unexpected" not in log and "Traceback" not in log


def test_many_connections(server: AuthgateProcess, token: str) -> None:
    """300 connections open at once are all served, twice each."""
    conns = [Conn(server.port) for _ in range(300)]
    for _ in range(2):
        for c in conns:
            c.send(ask(token, f"/x?pwt={token}"))
        for c in conns:
            assert c.read().status == 200
    for c in conns:
        c.close()


def test_idle_keep_alive_connection_stays_open_briefly(server: AuthgateProcess, token: str) -> None:
    """An idle keep-alive connection is not closed early (the timeout is 75 s, beyond
    nginx's 60 s upstream keepalive_timeout)."""
    conn = Conn(server.port)
    conn.send(ask(token, f"/x?pwt={token}"))
    assert conn.read().status == 200
    time.sleep(2)
    conn.send(ask(token, f"/x?pwt={token}"))
    assert conn.read().status == 200
    conn.close()


def test_sigterm_closes_idle_keep_alive_connections(valkey: Valkey) -> None:
    """On SIGTERM an idle keep-alive connection is closed (not waited on for 75 s), a request
    being answered finishes, and the server exits 0 promptly."""
    ag = start_authgate(base_env(valkey.url))
    try:
        idle = Conn(ag.port)
        idle.send(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert idle.read().status == 200
        started = time.monotonic()
        ag.proc.send_signal(signal.SIGTERM)
        assert ag.proc.wait(15) == 0
        assert time.monotonic() - started < 10
        assert idle.closed()
        idle.close()
    finally:
        ag.stop()


# -- in process: the idle timeout and the protocol's own failures ----------------------------------
@pytest.fixture
def plane_runtime(valkey: Valkey) -> Runtime:
    settings = load_settings({"AUTHGATE_REDIS_URL": valkey.url, "AUTHGATE_PEPPER": _pepper()})
    return Runtime(settings)


async def _serve(runtime: Runtime, keep_alive: float) -> tuple[asyncio.Server, int]:
    state = ServerState()
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(
        lambda: FastProtocol(runtime.data_plane, state, keep_alive), "127.0.0.1", 0
    )
    return srv, srv.sockets[0].getsockname()[1]


async def _exchange(port: int, data: bytes, wait: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if wait:
        await asyncio.sleep(wait)
    out = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    writer.close()
    return out


def test_idle_keep_alive_timeout_closes(plane_runtime: Runtime) -> None:
    """An idle keep-alive connection is closed once the keep-alive timeout has passed, and
    not while a slow request is still within it."""

    async def go() -> None:
        srv, port = await _serve(plane_runtime, 0.5)
        try:
            started = time.monotonic()
            out = await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 ")
            assert 0.4 < time.monotonic() - started < 3
        finally:
            srv.close()
            await plane_runtime.stop()

    asyncio.run(go())


def test_unexpected_error_answers_503_without_details(
    plane_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception inside the protocol is answered 503 UNAVAILABLE; the log names its type
    only (no URI, no header value) and the client sees no traceback."""

    def broken(scope: Any) -> Any:
        raise KeyError(scope["headers"][0][1].decode())

    plane_runtime.data_plane.answer_now = broken  # type: ignore[method-assign]
    secret = "min_" + secrets.token_hex(8)

    async def go() -> bytes:
        srv, port = await _serve(plane_runtime, 5)
        try:
            return await _exchange(
                port,
                f"GET /auth?pwt={secret} HTTP/1.1\r\nX-Power-Token: {secret}\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
        finally:
            srv.close()
            await plane_runtime.stop()

    with caplog.at_level(logging.ERROR, logger="authgate"):
        out = asyncio.run(go())
    assert out.startswith(b"HTTP/1.1 503 ")
    assert b'"UNAVAILABLE"' in out and b"Traceback" not in out and secret.encode() not in out
    assert "KeyError" in caplog.text and secret not in caplog.text


def test_response_header_injection_is_refused(
    plane_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """A header value carrying CR/LF (or another control character) is never written: the
    answer is 503 UNAVAILABLE instead, so a response cannot be split."""
    assert encode((200, [(b"a", b"b"), (b"content-length", b"0")], b"")) == (
        b"HTTP/1.1 200 OK\r\na: b\r\ncontent-length: 0\r\n\r\n"
    )
    for bad in (b"x\r\nset-cookie: y", b"x\ny", b"x\x00"):
        with pytest.raises(ValueError):
            encode((200, [(b"x-authgate-uri", bad), (b"content-length", b"0")], b""))

    def injecting(scope: Any) -> Any:
        return (200, [(b"x-authgate-uri", b"/a\r\nx-evil: 1"), (b"content-length", b"0")], b"")

    plane_runtime.data_plane.answer_now = injecting  # type: ignore[method-assign]

    async def go() -> bytes:
        srv, port = await _serve(plane_runtime, 5)
        try:
            return await _exchange(port, b"GET /auth HTTP/1.1\r\nConnection: close\r\n\r\n")
        finally:
            srv.close()
            await plane_runtime.stop()

    with caplog.at_level(logging.ERROR, logger="authgate"):
        out = asyncio.run(go())
    assert out.startswith(b"HTTP/1.1 503 ") and b"x-evil" not in out
    assert "ValueError" in caplog.text


def test_allowed_answer_is_encoded_once_per_token_and_byte_for_byte(
    plane_runtime: Runtime,
) -> None:
    """An allowed answer carries its headers already encoded (the identity lines made once
    per token); written out, they are exactly what the general encoding gives, for every
    connection form."""
    runtime = plane_runtime
    plane = runtime.data_plane

    async def go() -> list[Any]:
        token, _ = await runtime.store.create(dict(SPEC, user_id="u-1", roles=["ops"]), "test")
        answers = []
        for uri in (f"/v1/a?pwt={token}&page=2", f"/v1/b%20c/?x=1&pwt={token}"):
            scope = auth_scope(token, uri)
            for _ in range(2):  # a Redis read first, then the cache
                answer = plane.answer_now(scope)
                if not isinstance(answer, tuple):
                    answer = await answer
                answers.append(answer)
        await runtime.stop()
        return answers

    answers = asyncio.run(go())
    for status, headers, body in answers:
        assert status == 200 and type(headers) is Headers
        plain = (status, list(headers), body)
        for form in ({}, {"close": True}, {"keep_alive_header": True}, {"head_only": True}):
            assert encode((status, headers, body), **form) == encode(plain, **form)
    assert dict(answers[-1][1])[b"X-Authgate-Uri"] == b"/v1/b%20c/?x=1"
    assert dict(answers[-1][1])[b"X-User-Id"] == b"u-1"


@pytest.mark.parametrize("field", ["org", "roles", "user_id"])
def test_tampered_identity_value_is_never_written(
    field: str, plane_runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """A token record changed in Redis to carry CR/LF in an identity value (shared by many
    tokens, or the token's own) is answered 503 UNAVAILABLE: the value is not put into a
    response header."""
    runtime = plane_runtime

    async def go() -> bytes:
        token, _ = await runtime.store.create(dict(SPEC), "test")
        client = connect(runtime.settings.redis_url, 2.0)
        try:
            digest = hmac.digest(_pepper().encode(), token.encode(), "sha256").hex()
            key = f"{runtime.settings.key_prefix}:th:{digest}"
            record = orjson.loads(await client.get(key))
            evil = "acme\r\nx-evil: 1"
            record[field] = [evil] if field == "roles" else evil
            await client.set(key, orjson.dumps(record))
        finally:
            await client.aclose()
        srv, port = await _serve(runtime, 5)
        try:
            request = ask(token, f"/x?pwt={token}").replace(
                b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
            )
            return await _exchange(port, request)
        finally:
            srv.close()
            await runtime.stop()

    with caplog.at_level(logging.ERROR, logger="authgate"):
        out = asyncio.run(go())
    assert out.startswith(b"HTTP/1.1 503 ") and b"x-evil" not in out
    assert b"UNAVAILABLE" in out


def test_answers_of_one_read_leave_in_one_write(plane_runtime: Runtime) -> None:
    """Requests that arrive together are answered with one write, in order, at the end of
    the event-loop turn: the client is woken once, not once per answer."""
    writes: list[bytes] = []

    class Counting:
        def __init__(self, transport: asyncio.Transport) -> None:
            self._transport = transport

        def write(self, data: bytes) -> None:
            writes.append(data)
            self._transport.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

    class Protocol(FastProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(Counting(transport))  # type: ignore[arg-type]

    async def go() -> bytes:
        state = ServerState()
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(
            lambda: Protocol(plane_runtime.data_plane, state, 5), "127.0.0.1", 0
        )
        port = srv.sockets[0].getsockname()[1]
        try:
            batch = b"GET /healthz HTTP/1.1\r\n\r\n" * 9 + b"GET /nope HTTP/1.1\r\n\r\n"
            return await _exchange(
                port, batch + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
            )
        finally:
            srv.close()
            await plane_runtime.stop()

    out = asyncio.run(go())
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]
    assert statuses == [200] * 9 + [404, 200]
    assert len(writes) == 1 and writes[0] == out


# -- server limits: trailers, the header timeout, the connection cap ------------------------------
def test_chunked_trailer_is_never_a_header(valkey: Valkey, server: AuthgateProcess) -> None:
    """A trailer after a chunked body (`X-Real-IP` from a trusted peer) is dropped with the
    body: the allowlist is judged on the peer's own address, not the trailer's."""
    bound = mint(valkey.url, name="trailer", ip_allowlist=["203.0.113.0/24"])
    head = (
        f"POST /auth HTTP/1.1\r\nHost: authgate\r\nX-Original-URI: /t?pwt={bound}\r\n"
        f"{GET}X-Power-Token: {bound}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    conn = Conn(server.port)
    conn.send(head.encode() + b"2\r\nhi\r\n0\r\nX-Real-IP: 203.0.113.9\r\n\r\n")
    resp = conn.read()
    assert resp.header("x-authgate-status") == "403"
    assert b"IP_NOT_ALLOWED" in (resp.header("x-authgate-error") or "").encode()
    conn.send(ask(bound, f"/t?pwt={bound}", extra="X-Real-IP: 203.0.113.9\r\n"))
    assert conn.read().status == 200  # the same address as a header counts
    conn.close()


@pytest.fixture(scope="module")
def limited(valkey: Valkey) -> Iterator[AuthgateProcess]:
    """`authgate serve` with 4 data-plane connections at most and a 1 s header timeout."""
    ag = start_authgate(
        base_env(valkey.url, AUTHGATE_MAX_CONNECTIONS="4", AUTHGATE_HEADER_TIMEOUT="1s")
    )
    ag.extra["token"] = mint(valkey.url, name="limited")
    yield ag
    ag.stop()


def _metric(ag: AuthgateProcess, name: str) -> float:
    import httpx

    text = httpx.get(ag.metrics_url).text
    found = re.search(rf"^{name}_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"", id="nothing-sent"),
        pytest.param(b"GET /auth HTTP/1.1\r\nX-Original-URI: /x\r\n", id="half-a-head"),
        pytest.param(b"GET /au", id="half-a-request-line"),
        pytest.param(b"POST /auth HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc", id="half-a-body"),
    ],
)
def test_half_sent_request_is_cut_off_at_the_header_timeout(
    limited: AuthgateProcess, partial: bytes
) -> None:
    """A connection whose request has not arrived whole within AUTHGATE_HEADER_TIMEOUT (1 s
    here) is closed, counted in authgate_header_timeouts; it is not held for the 75 s of the
    keep-alive timeout."""
    before = _metric(limited, "authgate_header_timeouts")
    conn = Conn(limited.port, timeout=6)
    started = time.monotonic()
    if partial:
        conn.send(partial)
    assert conn.closed()
    assert 0.9 < time.monotonic() - started < 3
    conn.close()
    deadline = time.monotonic() + 2
    while _metric(limited, "authgate_header_timeouts") < before + 1:
        assert time.monotonic() < deadline, "the timeout was not counted"
        time.sleep(0.05)


def test_requests_slower_than_the_header_timeout_in_total_keep_their_connection(
    limited: AuthgateProcess,
) -> None:
    """The timeout applies to each request, not to the connection: a keep-alive connection
    that sends a whole request every 0.6 s is never cut off."""
    token = limited.extra["token"]
    assert isinstance(token, str)
    conn = Conn(limited.port)
    for _ in range(4):
        conn.send(ask(token, f"/k?pwt={token}"))
        assert conn.read().status == 200
        time.sleep(0.6)  # idle between requests, as a keep-alive client is
    conn.close()


def test_connections_beyond_the_cap_are_refused_and_counted(limited: AuthgateProcess) -> None:
    """With AUTHGATE_MAX_CONNECTIONS=4, a fifth open data-plane connection is answered 503
    (JSON, Connection: close) and closed, counted in authgate_connections_refused; once one
    closes, a new connection is served."""
    token = limited.extra["token"]
    assert isinstance(token, str)
    before = _metric(limited, "authgate_connections_refused")
    held = []
    for _ in range(4):
        conn = Conn(limited.port)
        conn.send(ask(token, f"/c?pwt={token}"))
        assert conn.read().status == 200
        held.append(conn)
    extra = Conn(limited.port)
    resp = extra.read()
    assert resp.status == 503 and resp.header("connection") == "close"
    assert b"UNAVAILABLE" in resp.body
    assert extra.closed()
    extra.close()
    assert _metric(limited, "authgate_connections_refused") == before + 1
    held.pop().close()
    deadline = time.monotonic() + 5
    while True:  # the server sees the close a moment later
        conn = Conn(limited.port)
        conn.send(ask(token, f"/c?pwt={token}"))
        try:
            if conn.read().status == 200:
                break
        except (EOFError, ConnectionResetError):
            pass
        finally:
            conn.close()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for conn in held:
        conn.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"AUTHGATE_HEADER_TIMEOUT": "0s"}, "AUTHGATE_HEADER_TIMEOUT", id="timeout-0"),
        pytest.param({"AUTHGATE_HEADER_TIMEOUT": "10s"}, None, id="timeout-seconds"),
        pytest.param({"AUTHGATE_HEADER_TIMEOUT": "10"}, "needs a unit", id="timeout-no-unit"),
        pytest.param(
            {"AUTHGATE_HEADER_TIMEOUT": "soon"}, "AUTHGATE_HEADER_TIMEOUT", id="timeout-word"
        ),
        pytest.param({"AUTHGATE_MAX_CONNECTIONS": "0"}, "AUTHGATE_MAX_CONNECTIONS", id="cap-0"),
        pytest.param(
            {"AUTHGATE_MAX_CONNECTIONS": "many"}, "AUTHGATE_MAX_CONNECTIONS", id="cap-word"
        ),
    ],
)
def test_server_limit_settings_are_checked(env: dict[str, str], message: str | None) -> None:
    """The connection cap is a positive whole number and the header timeout a duration
    above zero; a bad value stops start-up with a message naming the variable."""
    from authgate.errors import ConfigError

    base = {"AUTHGATE_PEPPER": _pepper(), **env}
    if message is None:
        assert load_settings(base).header_timeout == 10.0
        return
    with pytest.raises(ConfigError, match=message):
        load_settings(base)
