"""Envoy's ext_authz gRPC API (`envoy.service.auth.v3.Authorization/Check`), on its own
listener (`AUTHGATE_GRPC_LISTEN`, off unless set).

Envoy's HTTP ext_authz form can only add headers to the request it forwards; the gRPC form
also lets authgate remove headers and rewrite the path, so the token reaches the upstream
in neither `X-Power-Token` nor `pwt`. A `CheckRequest` is turned into the scope the HTTP
data plane sees for Envoy's `/ext-authz/<original path>` dialect and read and decided by
the same code (`RequestReader`, `Authorizer`); only the answer is encoded differently:

- allowed: an `OkHttpResponse` that sets the identity headers (overwriting any the client
  sent), removes every header that can carry a token, and sets `:path` to the authorised
  path with the clean query (the path authgate judged, without token parameters);
- denied: a `DeniedHttpResponse` with the decision table's status and JSON body, which
  Envoy sends to the client as is (also 503 UNAVAILABLE: a denial, not an error, so
  Envoy's `failure_mode_allow` never lets it through).

grpcio and the generated Envoy messages (`xds-protos`) come with the `authgate[grpc]`
extra and are imported only when the listener is configured.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from .authorizer import Authorizer
from .config import Settings
from .errors import ConfigError
from .plane import AuthRequest, BadRequest, Decision, Scope, deny, log
from .reading import RequestReader
from .wire import error_body

PREFIX = "/ext-authz"  # the HTTP dialect whose reading a CheckRequest goes through
GRACE = 2.0  # seconds in-flight checks get to finish when the worker stops
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = base_pb2.HeaderValueOption(
    header=base_pb2.HeaderValue(key="content-type", value="application/json"),
    append_action=_OVERWRITE,
)


def check_scope(request: Any) -> Scope:
    """The ASGI-like scope `RequestReader.read` expects, from a CheckRequest: Envoy's
    `/ext-authz/<path>` dialect, with the request's own method, path and headers, and the
    downstream address Envoy saw as the peer (so X-Real-IP/X-Forwarded-For count only
    when that address is a trusted proxy, exactly as for an HTTP caller). The messages'
    strings are the request's bytes read as UTF-8; encoded again, they are those bytes."""
    attributes = request.attributes
    http = attributes.request.http
    path, _, query = http.path.partition("?")
    if not path.startswith("/"):
        raise BadRequest("no original path")
    headers: list[tuple[bytes, bytes]] = []
    if http.header_map.headers:  # Envoy's encode_raw_headers form
        for h in http.header_map.headers:
            headers.append((h.key.lower().encode(), h.raw_value or h.value.encode()))
    else:
        for key, value in http.headers.items():
            headers.append((key.lower().encode(), value.encode()))
    socket = attributes.source.address.socket_address
    raw_path = (PREFIX + path).encode()
    return {
        "type": "http",
        "method": http.method.upper(),
        "path": PREFIX + path,
        "raw_path": raw_path,
        "query_string": query.encode(),
        "headers": headers,
        "client": (socket.address, socket.port_value) if socket.address else None,
    }


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """`Check`: one decision per CheckRequest, counted in the same metrics as `/auth`."""

    def __init__(self, settings: Settings, authorizer: Authorizer) -> None:
        self.authorizer = authorizer
        self.metrics = authorizer.metrics
        self.reader = RequestReader(settings, authorizer.routes)
        # Every header that can carry a token is removed before the request goes upstream.
        removed = [s.name for s in settings.token_sources if s.kind == "header"]
        if any(s.kind == "bearer" for s in settings.token_sources):
            removed.append("authorization")
        self.removed = removed

    async def Check(self, request: Any, context: Any) -> Any:  # the RPC's name, as generated
        started = time.perf_counter()
        req: AuthRequest | None = None
        try:
            req = self.reader.read(check_scope(request))
            decision = self.authorizer.decide_cached(req)
            if decision is None:
                decision = await self.authorizer.decide(req)
        except BadRequest as exc:
            decision = deny("BAD_REQUEST", 0, reason=exc.reason)
        except Exception as exc:  # every outcome must be a decision, never a gRPC error
            log.error("unexpected %s while deciding; answering UNAVAILABLE", type(exc).__name__)
            decision = deny("UNAVAILABLE", 12)
        response = self.response(req, decision)
        self.metrics.decided(decision.code, time.perf_counter() - started)
        return response

    def response(self, req: AuthRequest | None, decision: Decision) -> Any:
        entry = decision.entry
        if decision.status == 200 and req is not None and entry is not None:
            uri, _query, _encoded = self.reader.forwarded(req)
            pairs = [*entry.headers, entry.user_header, entry.id_header, (b":path", uri)]
            ok = external_auth_pb2.OkHttpResponse(
                headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=name.decode(), value=value.decode()),
                        append_action=_OVERWRITE,
                    )
                    for name, value in pairs
                ],
                headers_to_remove=self.removed,
            )
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK), ok_response=ok
            )
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=[_JSON],
            body=error_body(decision).decode(),
        )
        code = code_pb2.UNAVAILABLE if decision.status == 503 else code_pb2.PERMISSION_DENIED
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code), denied_response=denied
        )


class GrpcListener:
    """The gRPC server of one worker. Every worker binds the same address (SO_REUSEPORT,
    grpc's default on Linux), so the kernel spreads Envoy's connections over them."""

    def __init__(self, settings: Settings, authorizer: Authorizer) -> None:
        assert settings.grpc_listen is not None
        self.address = settings.grpc_listen
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationService(settings, authorizer), self.server
        )

    async def start(self) -> None:
        host, port = self.address
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self.server.add_insecure_port(target)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"AUTHGATE_GRPC_LISTEN: cannot listen on {host}:{port}")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(GRACE)
