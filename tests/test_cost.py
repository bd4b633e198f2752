"""No request is expensive: whatever its query, path and headers, a request costs at most a
few times the CPU of a cached allowed decision.

Each shape is fed as raw bytes to the data-plane protocol (`FastProtocol`: httptools parsing,
reading, deciding, encoding), in process, many times over, and its CPU time per request is
compared with that of the plain cached allowed request measured the same way.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest

from authgate._uvicorn import ServerState
from authgate.app import Runtime
from authgate.fasthttp import FastProtocol
from tests.inproc import create, settings_for

pytestmark = pytest.mark.anyio

BOUND = 5.0  # times the CPU of a cached allowed decision
SCOPED = "/minimal/api/rest/v1/acme/tunes/items"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Sink(asyncio.Transport):
    """A transport that keeps nothing: counts the bytes and answers written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.answers = 0
        self.last = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        self.answers += bytes(data).count(b"HTTP/1.1 ")
        self.last = bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def request(target: str, headers: list[tuple[str, str]], method: str = "GET") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: authgate\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (head + "\r\n").encode("latin-1")


def nginx(uri: str, token: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    """An nginx auth subrequest for `uri`, as deploy/nginx sends it."""
    return request(
        "/auth",
        [
            ("X-Original-URI", uri),
            ("X-Original-Method", "GET"),
            ("X-Real-IP", "203.0.113.7"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Power-Token", token),
            *(extra or []),
        ],
    )


class Connection:
    """One data-plane connection fed raw requests in process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.proto = FastProtocol(runtime.data_plane, ServerState(), 75.0)
        self.sink = Sink()
        self.proto.connection_made(self.sink)

    async def cpu(self, data: bytes, rounds: int) -> float:
        """CPU seconds per request for `data` sent `rounds` times; answers are flushed
        every 50 requests, as the event loop would."""
        proto = self.proto
        started = time.process_time()
        for i in range(rounds):
            proto.data_received(data)
            if self.sink.closed:  # an answer that closes (431): the next on a new one
                self.__init__(self.runtime)  # type: ignore[misc]
                proto = self.proto
            if i % 50 == 49:
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        return (time.process_time() - started) / rounds


def many_headers(token: str) -> bytes:
    return nginx(SCOPED + f"?pwt={token}", token, [(f"X-H{i}", "v") for i in range(90)])


def shape(make: Callable[[str], bytes], status: int, id: str) -> Any:
    return pytest.param(make, status, id=id)


SHAPES = [
    shape(lambda t: nginx("/x?" + "&".join(["%=%"] * 2600), t), 403, "query-2600-percent-pairs"),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&" + "&".join(["%41%=%42%"] * 250), t),
        200,
        "query-250-escaped-pairs",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&" + "&".join([f"p{i}=pw" for i in range(250)]), t),
        200,
        "query-250-pairs-like-the-token-name",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&app_id=" + "%41" * 2500, t),
        403,
        "query-app-id-of-2500-escapes",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&app_id=" + "%41" * 340, t),
        200,
        "query-app-id-of-340-escapes",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&q=" + "%41" * 2500, t),
        200,
        "query-value-of-2500-escapes",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&q=" + "pw" * 3700, t),
        200,
        "query-value-of-3700-token-name-halves",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&q=" + (t[-12:-1] + "-") * 600, t),
        200,
        "query-value-of-600-near-copies",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}&q=" + "%41pp_i" * 1000, t),
        200,
        "query-value-of-1000-near-app-ids",
    ),
    shape(
        lambda t: nginx(SCOPED + "/" + "a" * 7700 + "%41" + f"?pwt={t}", t),
        200,
        "path-7700-bytes-one-escape",
    ),
    shape(
        lambda t: nginx(SCOPED + "/" + "%C3%A9" * 1250 + f"?pwt={t}", t),
        200,
        "path-2600-escapes",
    ),
    shape(lambda t: nginx(SCOPED + "/a" * 3800 + f"?pwt={t}", t), 200, "path-3800-segments"),
    shape(lambda t: nginx(SCOPED + "/a/.." * 1500 + f"?pwt={t}", t), 403, "path-3000-dot-segments"),
    shape(lambda t: nginx(SCOPED + "/a/.." * 60 + f"?pwt={t}", t), 200, "path-120-dot-segments"),
    shape(
        lambda t: request(
            "/ext-authz" + SCOPED + "/" + "%C3%A9" * 1250 + f"?pwt={t}", [("X-Power-Token", t)]
        ),
        200,
        "envoy-path-2600-escapes",
    ),
    shape(
        lambda t: nginx(SCOPED + f"?pwt={t}", t, [(f"X-H{i}", "v") for i in range(90)]),
        200,
        "90-headers",
    ),
    shape(lambda t: request("/auth", [(f"X-H{i}", "v") for i in range(2000)]), 431, "2000-headers"),
    shape(
        lambda t: nginx(
            SCOPED + f"?pwt={t}", t, [("X-Forwarded-For", ", ".join(["10.0.0.1"] * 700))]
        ),
        200,
        "forwarded-for-700-hops",
    ),
]


@pytest.mark.parametrize(("make", "status"), SHAPES)
async def test_no_request_costs_more_than_a_few_decisions(
    redis_url: str, make: Callable[[str], bytes], status: int
) -> None:
    """The worst shapes found (long queries of escapes, long or deep paths, many headers,
    long forwarding chains) cost at most BOUND times a cached allowed decision's CPU,
    allowed or refused. Both are measured in pairs, nine times, and the median ratio
    compared, so a busy moment of the machine slows both sides of a ratio alike."""
    runtime = Runtime(settings_for(redis_url))
    try:
        token, _ = await create(runtime)
        plain, shaped = nginx(SCOPED + f"?pwt={token}", token), make(token)
        for data, want in ((plain, 200), (shaped, status)):  # warm the cache, check answers
            conn = Connection(runtime)
            conn.proto.data_received(data)
            deadline = time.monotonic() + 5
            while not conn.sink.answers and time.monotonic() < deadline:
                await asyncio.sleep(0.005)  # the first use reads the token from Valkey
            assert conn.sink.last.startswith(b"HTTP/1.1 %d " % want), conn.sink.last[:300]
        base = Connection(runtime)
        conn = Connection(runtime)
        ratios, costs = [], []
        for _ in range(9):  # in pairs, so a busy moment slows both sides of a ratio
            baseline = await base.cpu(plain, 500)
            cost = await conn.cpu(shaped, 100)
            ratios.append(cost / baseline)
            costs.append((cost, baseline))
    finally:
        await runtime.stop()
    ratio = statistics.median(ratios)
    cost, baseline = min(costs)
    print(f"{ratio:.2f}x (best {cost * 1e6:.1f} us against {baseline * 1e6:.1f} us)")
    assert ratio <= BOUND, f"{ratio:.1f}x a cached allowed decision"
