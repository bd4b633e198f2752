"""Envoy's ext_authz gRPC API (`authgate.grpc_authz`): a real grpc.aio server and client in
process, a real Valkey. Each CheckRequest is decided exactly as the HTTP Envoy dialect
(`/ext-authz/<path>`) decides the same request; allowed answers set the identity headers,
remove the token header and set `:path` to the judged path without token parameters."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authgate.app import Runtime
from authgate.config import Settings
from authgate.errors import ConfigError
from authgate.grpc_authz import GrpcListener, check_scope
from tests.conftest import base_env, free_port, run_cli, start_authgate
from tests.inproc import create, running, settings_for
from tests.test_decision import CLIENT_IP, ROWS, SCOPED, Row, build, make_tokens, route_config

pytestmark = pytest.mark.anyio

CREATE = (
    "token",
    "create",
    "--name",
    "t",
    "--org",
    "acme",
    "--project",
    "tunes",
    "--key-type",
    "r--",
)
ENVOY_PEER = "127.0.0.1"  # the downstream address Envoy reports: here the proxy in front


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def check_request(method: str, path: str, headers: dict[str, str], source: str = ENVOY_PEER) -> Any:
    """The CheckRequest Envoy sends for `method path` with `headers` (lower-case keys)."""
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = method
    http.path = path
    for key, value in headers.items():
        http.headers[key.lower()] = value
    req.attributes.source.address.socket_address.address = source
    req.attributes.source.address.socket_address.port_value = 50000
    return req


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Runtime, Any, Any]]:
    """(runtime, HTTP client of the data plane, Check stub) against one runtime."""
    port = free_port()
    settings = _with_grpc(settings, port)
    async with running(settings) as (runtime, client):
        listener = GrpcListener(settings, runtime.authorizer)
        await listener.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield runtime, client, external_auth_pb2_grpc.AuthorizationStub(channel)
        finally:
            await listener.stop()


def _with_grpc(settings: Settings, port: int) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, grpc_listen=("127.0.0.1", port))


def denied(response: Any) -> tuple[int, dict[str, Any]]:
    d = response.denied_response
    headers = {h.header.key: h.header.value for h in d.headers}
    assert headers["content-type"] == "application/json"
    return int(d.status.code), orjson.loads(d.body)


def ok_headers(response: Any) -> dict[str, str]:
    return {h.header.key.lower(): h.header.value for h in response.ok_response.headers}


# Raw paths not in normal form: refused (400) where authgate sees the raw path, as here.
NORMAL_FORM_ROWS = {"10-encoded-slash", "10-dot-segments", "10-encoded-letter"}


@pytest.mark.parametrize("row", ROWS)
async def test_check_decides_every_row_as_the_http_envoy_dialect(redis_url: str, row: Row) -> None:
    """Every decision-table row: the gRPC answer has the same status and JSON body as
    authgate's HTTP `/ext-authz/…` answer to the same request, and the row's status (a raw
    path that is not in normal form may be refused with 400 instead: Envoy normalises it
    before asking, so through Envoy it never arrives raw)."""
    settings = settings_for(redis_url, AUTHGATE_CONFIG=route_config())
    async with serving(settings) as (runtime, client, stub):
        tokens = await make_tokens(runtime)
        token = None if (not row.header and not row.pwt) else tokens[row.token]
        method, url, headers = build("envoy", row, token)
        path = url[len("/ext-authz") :]
        http = await client.request(method, url, headers=headers)
        response = await stub.Check(check_request(method, path, headers))
    if row.status == 200:
        assert http.status_code == 200
        assert response.status.code == 0 and response.HasField("ok_response")
        set_ = ok_headers(response)
        assert set_[":path"] == http.headers["x-authgate-uri"]
        assert "pwt=" not in set_[":path"]
        assert set_["x-org-id"] == http.headers["x-org-id"] == "acme"
        assert set_["x-token-id"] == http.headers["x-token-id"]
        assert list(response.ok_response.headers_to_remove) == ["x-power-token"]
        return
    assert response.status.code != 0 and response.HasField("denied_response")
    status, body = denied(response)
    if _row_id(row) in NORMAL_FORM_ROWS:
        # httpx resolves dots and escapes before sending: the HTTP side is not this path.
        assert (status, body["error"]["code"]) in ((row.status, row.code), (400, "BAD_REQUEST"))
        return
    assert (status, body) == (http.status_code, http.json())
    assert status == row.status
    assert body["error"]["code"] == row.code
    for key, value in row.details.items():
        assert body["error"]["details"][key] == value


def _row_id(row: Row) -> str:
    for param in ROWS:
        if param.values[0] is row:
            return str(param.id)
    return ""


async def test_redis_down_is_a_503_denial_with_the_json_body(redis_url: str) -> None:
    """Check 12 through gRPC: Redis unreachable and the token not cached is a denial with
    status 503 and the UNAVAILABLE body (a denial, so Envoy's failure_mode_allow can never
    turn it into a pass), not a gRPC error."""
    settings = settings_for(
        "redis://127.0.0.1:1/0", AUTHGATE_REDIS_TIMEOUT="100ms", AUTHGATE_CONFIG=route_config()
    )
    async with serving(settings) as (_runtime, _client, stub):
        from authgate import tokens

        token = tokens.generate("min_")
        response = await stub.Check(
            check_request("GET", f"{SCOPED}?pwt={token}", {"x-power-token": token})
        )
    status, body = denied(response)
    assert status == 503 and body["error"]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("headers", "source", "seen"),
    [
        pytest.param({}, "203.0.113.9", "203.0.113.9", id="untrusted-peer-is-the-client"),
        pytest.param(
            {"x-real-ip": "10.1.2.3", "x-forwarded-for": "10.1.2.3"},
            "203.0.113.9",
            "203.0.113.9",
            id="untrusted-peer-cannot-claim-an-address",
        ),
        pytest.param({"x-real-ip": CLIENT_IP}, ENVOY_PEER, CLIENT_IP, id="trusted-x-real-ip"),
    ],
)
async def test_client_address_is_the_source_envoy_saw(
    redis_url: str, headers: dict[str, str], source: str, seen: str
) -> None:
    """The address judged is the CheckRequest's source (the downstream peer Envoy saw); its
    X-Real-IP / X-Forwarded-For count only when that source is a trusted proxy, as for an
    HTTP caller."""
    async with serving(settings_for(redis_url)) as (runtime, _client, stub):
        token, _ = await create(runtime, ip_allowlist=["192.0.2.0/24"])
        response = await stub.Check(
            check_request(
                "GET", f"{SCOPED}?pwt={token}", {"x-power-token": token, **headers}, source
            )
        )
    status, body = denied(response)
    assert (status, body["error"]["code"]) == (403, "IP_NOT_ALLOWED")
    assert body["error"]["details"]["client_ip"] == seen


async def test_allowed_answer_removes_every_token_source_and_keeps_the_rest_of_the_query(
    redis_url: str,
) -> None:
    """With a custom header and Bearer as token sources, both are removed; `:path` is the
    normalised path with the query as sent, minus token parameters, byte for byte."""
    settings = settings_for(
        redis_url,
        AUTHGATE_TOKEN_SOURCES="header:X-Api-Token,bearer,query:pwt",
        AUTHGATE_TOKEN_MODE="any",
    )
    async with serving(settings) as (runtime, _client, stub):
        token, _ = await create(runtime)
        response = await stub.Check(
            check_request(
                "GET",
                f"{SCOPED}?a=%26b%3Dc&pwt={token}&z",
                {"x-api-token": token, "authorization": f"Bearer {token}"},
            )
        )
    assert response.status.code == 0
    assert ok_headers(response)[":path"] == f"{SCOPED}?a=%26b%3Dc&z"
    assert sorted(response.ok_response.headers_to_remove) == ["authorization", "x-api-token"]


async def test_identity_headers_overwrite_what_the_client_sent(redis_url: str) -> None:
    """Identity headers are set with OVERWRITE_IF_EXISTS_OR_ADD: a client's own X-Org-Id
    never survives next to authgate's."""
    async with serving(settings_for(redis_url)) as (runtime, _client, stub):
        token, _ = await create(runtime)
        response = await stub.Check(
            check_request(
                "GET", f"{SCOPED}?pwt={token}", {"x-power-token": token, "x-org-id": "evil"}
            )
        )
    for option in response.ok_response.headers:
        assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert ok_headers(response)["x-org-id"] == "acme"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("", id="empty"),
        pytest.param("minimal/x", id="relative"),
    ],
)
async def test_a_request_without_a_path_is_refused(redis_url: str, path: str) -> None:
    """A CheckRequest without an absolute path is a 400 BAD_REQUEST denial."""
    async with serving(settings_for(redis_url)) as (_runtime, _client, stub):
        response = await stub.Check(check_request("GET", path, {}))
    status, body = denied(response)
    assert (status, body["error"]["code"]) == (400, "BAD_REQUEST")


async def test_non_ascii_bytes_travel_unchanged(redis_url: str) -> None:
    """A query holding UTF-8 (which Envoy passes as it came) reaches `:path` as those
    bytes."""
    async with serving(settings_for(redis_url)) as (runtime, _client, stub):
        token, _ = await create(runtime)
        response = await stub.Check(
            check_request("GET", f"{SCOPED}?q=café&pwt={token}", {"x-power-token": token})
        )
    assert ok_headers(response)[":path"] == f"{SCOPED}?q=café"


def test_check_scope_is_the_envoy_http_dialect() -> None:
    """A CheckRequest reads as Envoy's HTTP form: /ext-authz/<path> on the request line,
    the query apart, header names lower-cased, the source as the peer."""
    scope = check_scope(check_request("DELETE", "/a/b?x=1", {"X-Power-Token": "t"}, "10.0.0.1"))
    assert scope["path"] == "/ext-authz/a/b" and scope["raw_path"] == b"/ext-authz/a/b"
    assert scope["query_string"] == b"x=1" and scope["method"] == "DELETE"
    assert (b"x-power-token", b"t") in scope["headers"]
    assert scope["client"] == ("10.0.0.1", 50000)


async def test_listener_on_a_taken_port_is_a_config_error(redis_url: str) -> None:
    """A gRPC address that cannot be bound stops start-up with a message naming the setting."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = _with_grpc(settings_for(redis_url), port)
        async with running(settings) as (runtime, _client):
            listener = GrpcListener(settings, runtime.authorizer)
            with pytest.raises(ConfigError, match="AUTHGATE_GRPC_LISTEN"):
                await listener.start()
            await listener.stop()


def test_grpc_listen_setting_is_parsed(redis_url: str) -> None:
    """AUTHGATE_GRPC_LISTEN is HOST:PORT, off unless set."""
    assert settings_for(redis_url).grpc_listen is None
    assert settings_for(redis_url, AUTHGATE_GRPC_LISTEN="0.0.0.0:9191").grpc_listen == (
        "0.0.0.0",
        9191,
    )
    with pytest.raises(ConfigError, match="AUTHGATE_GRPC_LISTEN"):
        settings_for(redis_url, AUTHGATE_GRPC_LISTEN="9191")


def test_http_data_plane_never_imports_grpc() -> None:
    """Serving HTTP only loads neither grpcio nor the Envoy messages."""
    code = (
        "import sys, authgate.app, authgate.server, authgate.cli\n"
        "authgate.app.create_app\n"
        "bad = [m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'envoy.'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_refuses_a_grpc_address_taken_by_another_listener(redis_url: str) -> None:
    """`authgate serve` stops with one message when AUTHGATE_GRPC_LISTEN names another
    listener's address."""
    env = base_env(redis_url, AUTHGATE_LISTEN="127.0.0.1:18080")
    env["AUTHGATE_GRPC_LISTEN"] = "127.0.0.1:18080"
    proc = run_cli(env, "serve", check=False)
    assert proc.returncode != 0
    assert "AUTHGATE_GRPC_LISTEN: must differ from the other listeners" in proc.stderr


async def test_authgate_serve_with_two_workers_answers_checks(redis_url: str) -> None:
    """With two workers sharing AUTHGATE_GRPC_LISTEN, `authgate serve` answers Check on
    every connection (eight at once), allowing and denying as the table says."""
    port = free_port()
    env = base_env(redis_url, AUTHGATE_GRPC_LISTEN=f"127.0.0.1:{port}")
    token = orjson.loads(run_cli(env, *CREATE, "--json").stdout)["token"]
    ag = start_authgate(env, workers=2)
    request = check_request("GET", f"{SCOPED}?pwt={token}", {"x-power-token": token})

    async def ask() -> list[Any]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            return list(await asyncio.gather(*(stub.Check(request) for _ in range(5))))

    try:
        answers = [a for batch in await asyncio.gather(*(ask() for _ in range(8))) for a in batch]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            missing = await stub.Check(check_request("GET", SCOPED, {}))
    finally:
        ag.stop()
    assert len(answers) == 40
    assert all(a.status.code == 0 and ok_headers(a)[":path"] == SCOPED for a in answers)
    assert denied(missing)[0] == 401
    assert "Traceback" not in ag.log()
